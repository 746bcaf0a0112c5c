//! Showing a run's progress: indicatif bars on a terminal, plain lines otherwise.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nexa_coordinator::{Progress, StepStatus};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

/// Renders [`Progress`] events.
pub struct Renderer {
    start: Instant,
    bars: Option<Bars>,
    /// When each job's progress was last printed as a line (no terminal), and what.
    said: HashMap<(String, Option<u32>), (Instant, String)>,
}

/// Plain progress lines per job at most this often (the last one always shows).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

struct Bars {
    multi: MultiProgress,
    steps: ProgressBar,
    shards: HashMap<String, ProgressBar>,
}

impl Renderer {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new(total_steps: usize) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let steps = multi.add(ProgressBar::new(total_steps as u64));
            steps.set_style(
                ProgressStyle::with_template(
                    "{spinner} steps {bar:30} {pos}/{len} {elapsed} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            steps.enable_steady_tick(std::time::Duration::from_millis(120));
            Bars {
                multi,
                steps,
                shards: HashMap::new(),
            }
        });
        Self {
            start: Instant::now(),
            bars,
            said: HashMap::new(),
        }
    }

    fn line(&self, text: String) {
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(text);
            }
            None => eprintln!("[{:>7.2}s] {text}", self.start.elapsed().as_secs_f64()),
        }
    }

    /// Shows one event.
    pub fn show(&mut self, p: &Progress) {
        match p {
            Progress::Step {
                step,
                status,
                detail,
            } => {
                let text = match detail {
                    Some(d) if *status == StepStatus::Failed => {
                        format!("{step:<20} {status}\n{}", indent(d))
                    }
                    Some(d) => format!("{step:<20} {status} ({d})"),
                    None => format!("{step:<20} {status}"),
                };
                if status.is_final()
                    && let Some(b) = &mut self.bars
                {
                    b.steps.inc(1);
                    if let Some(sb) = b.shards.remove(step) {
                        sb.finish_and_clear();
                    }
                }
                if *status == StepStatus::Running
                    && let Some(b) = &self.bars
                {
                    b.steps.set_message(step.clone());
                }
                self.line(text);
            }
            Progress::Shards {
                step,
                count,
                cached,
            } => {
                if let Some(b) = &mut self.bars {
                    let bar = b.multi.add(ProgressBar::new(u64::from(*count)));
                    bar.set_style(
                        ProgressStyle::with_template("  {prefix:<18} shards {bar:30} {pos}/{len}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_prefix(step.clone());
                    bar.set_position(u64::from(*cached));
                    b.shards.insert(step.clone(), bar);
                }
                self.line(format!("{step:<20} {count} shards ({cached} from cache)"));
            }
            Progress::Shard {
                step,
                index,
                status,
            } => {
                if let Some(b) = &self.bars {
                    if status.is_final()
                        && let Some(sb) = b.shards.get(step)
                    {
                        sb.inc(1);
                    }
                } else if status.is_final() {
                    self.line(format!("{step:<20} shard {index} {status}"));
                }
            }
            Progress::Retry {
                job,
                attempt,
                delay,
                error,
            } => {
                let when = if delay.is_zero() {
                    "now".to_string()
                } else {
                    format!("in {:.1}s", delay.as_secs_f64())
                };
                self.line(format!(
                    "{job}: attempt {attempt} {when} after: {}",
                    error.lines().last().unwrap_or("")
                ));
            }
            Progress::Job {
                step,
                shard,
                progress,
            } => {
                let who = match shard {
                    Some(k) => format!("{step} shard {k}"),
                    None => step.clone(),
                };
                let what = progress.describe();
                if let Some(b) = &self.bars {
                    b.steps.set_message(format!("{who}: {what}"));
                    return;
                }
                let done = progress.total.is_some()
                    && progress.step.or(progress.records) == progress.total;
                let key = (step.clone(), *shard);
                let last = self.said.get(&key);
                // A repeat (a heartbeat's word, then the result's) is never printed twice.
                let repeat = last.is_some_and(|(_, w)| *w == what);
                let due = last.is_none_or(|(t, _)| t.elapsed() >= PROGRESS_EVERY);
                if !repeat && (due || done) {
                    self.line(format!("{who:<20} {what}"));
                    self.said.insert(key, (Instant::now(), what));
                }
            }
            Progress::Finished(_) => {
                if let Some(b) = &self.bars {
                    b.steps.finish_and_clear();
                }
            }
        }
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
