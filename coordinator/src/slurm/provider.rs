//! The provider's loop: every `poll` it reads squeue for its pilots and the engine for
//! the waiting slurm jobs and the enrolled pilots, then
//!
//! 1. fails the steps of a pilot that waits for a reason no wait can fix
//!    ([`commands::HOPELESS`]: `PartitionConfig` for a request no node can hold…) with
//!    Slurm's reason, and cancels it;
//! 2. submits pilots, up to `max_pilots`, for jobs no pilot is there or coming for
//!    (one job per pilot of its shape); a refused sbatch fails the steps with
//!    sbatch's message;
//! 3. keeps `min_pilots`, and cancels pilots still pending that nothing waits for.
//!
//! Running pilots with nothing to do leave by themselves (`--max-idle`). On stop, every
//! pilot with this coordinator's job name is cancelled. A restarted coordinator reads
//! its predecessor's pilots from squeue (by job name) and counts them as its own:
//! running ones re-enrol when they reach it, pending ones serve new jobs of their shape
//! or are cancelled.

use super::commands::{self, Listed};
use super::{Shape, SlurmConfig, script};
use crate::Coordinator;
use crate::scheduler::{Demand, WorkerView};
use nexa_shared::record::WorkerState;
use std::collections::{BTreeMap, HashMap};
use tokio::sync::watch;

/// The scheduler name whose steps the provider serves.
pub const SCHEDULER: &str = "slurm";

/// How often the engine is asked what waits.
pub const DEMAND_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// A running Slurm provider.
#[derive(Debug)]
pub struct Provider {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    job_name: String,
}

/// A pilot the provider knows of.
#[derive(Debug, Clone)]
struct Pilot {
    /// Its shape's key (from its comment); `None`: not ours to reason about.
    shape: Option<String>,
    state: String,
    reason: String,
    /// Rounds in a row it was pending with nothing waiting for its shape.
    unneeded: u32,
}

impl Provider {
    /// Starts the provider for `coord`'s slurm steps.
    pub fn spawn(coord: Coordinator, cfg: SlurmConfig) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let job_name = cfg.job_name.clone();
        tracing::info!(
            job_name = %cfg.job_name,
            url = %cfg.url,
            max_pilots = cfg.max_pilots,
            partition = cfg.partition.as_deref().unwrap_or("(the cluster's default)"),
            "Slurm provider started"
        );
        let task = tokio::spawn(async move {
            let mut p = Loop {
                coord,
                cfg,
                pilots: BTreeMap::new(),
                last_squeue: None,
            };
            loop {
                p.round().await;
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(DEMAND_POLL.min(p.cfg.poll)) => {}
                    // Jobs started waiting: scale now, not at the next poll.
                    _ = p.coord.demand_changed() => {}
                }
            }
        });
        Self {
            stop,
            task,
            job_name,
        }
    }

    /// Stops scaling and cancels every pilot of this coordinator's job name.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        match commands::scancel_named(&self.job_name).await {
            Ok(()) => tracing::info!(job_name = %self.job_name, "cancelled the Slurm pilots"),
            Err(e) => {
                tracing::error!(job_name = %self.job_name, error = %e, "cancelling the Slurm pilots")
            }
        }
    }
}

struct Loop {
    coord: Coordinator,
    cfg: SlurmConfig,
    pilots: BTreeMap<String, Pilot>,
    /// When squeue was last read.
    last_squeue: Option<std::time::Instant>,
}

/// A pilot's worker as the engine sees it: (running jobs, slots, lost).
type Enrolled = HashMap<String, (u32, u32, bool)>;

impl Loop {
    /// One round: squeue when the last read is `poll` old (or never was), the engine
    /// every round (every [`DEMAND_POLL`]: a step that starts waiting gets its pilots
    /// at once, while Slurm is asked no more often than `poll`).
    async fn round(&mut self) {
        let fresh = self
            .last_squeue
            .is_none_or(|t| t.elapsed() >= self.cfg.poll);
        if fresh {
            match commands::squeue(&self.cfg.job_name).await {
                Ok(listed) => {
                    self.update(&listed);
                    self.last_squeue = Some(std::time::Instant::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "squeue failed; the pilots are scaled next round");
                    return;
                }
            }
        }
        let Ok(demand) = self.coord.demand(SCHEDULER).await else {
            return;
        };
        if demand.is_empty() && !fresh {
            return;
        }
        let Ok(workers) = self.coord.list_workers().await else {
            return;
        };
        let enrolled = enrolled(&workers);
        let mut shaped: Vec<(Shape, &Demand)> = demand
            .iter()
            .map(|d| (Shape::of(&d.requirements, d.timeout, &self.cfg), d))
            .collect();
        // What was failed this round is not waited for any more.
        let failed = self.fail_hopeless(&shaped).await;
        shaped.retain(|(s, _)| !failed.contains(&s.key()));
        self.scale_up(&shaped, &enrolled).await;
        if fresh {
            self.scale_down(&shaped).await;
        }
    }

    /// Takes squeue's word for which pilots exist and how they stand.
    fn update(&mut self, listed: &[Listed]) {
        let mut now = BTreeMap::new();
        for l in listed {
            let mut p = self.pilots.remove(&l.id).unwrap_or_else(|| {
                tracing::info!(job = %l.id, state = %l.state, "found a pilot of this coordinator");
                Pilot {
                    shape: script::shape_key_of(&l.comment).map(str::to_string),
                    state: String::new(),
                    reason: String::new(),
                    unneeded: 0,
                }
            });
            p.state = l.state.clone();
            p.reason = l.reason.clone();
            now.insert(l.id.clone(), p);
        }
        for (id, p) in &self.pilots {
            tracing::info!(job = %id, last_state = %p.state, "a pilot ended");
        }
        self.pilots = now;
    }

    /// Fails the steps of pilots that can never start; the shape keys it failed.
    async fn fail_hopeless(&mut self, shaped: &[(Shape, &Demand)]) -> Vec<String> {
        let mut failed = Vec::new();
        let hopeless: Vec<(String, Pilot)> = self
            .pilots
            .iter()
            .filter(|(_, p)| {
                p.state == "PENDING" && commands::HOPELESS.contains(&p.reason.as_str())
            })
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        for (id, p) in hopeless {
            let mut steps = Vec::new();
            let mut what = String::new();
            for (shape, d) in shaped {
                if p.shape.as_deref() == Some(shape.key().as_str()) {
                    steps.extend(d.steps.iter().map(|(r, i, _)| (r.clone(), *i)));
                    what = shape.describe();
                }
            }
            let why = format!(
                "Slurm will never start this step's pilot (job {id}: {what}): it is pending with \
                 Reason={} ({})",
                p.reason,
                explain(&p.reason)
            );
            tracing::warn!(job = %id, reason = %p.reason, steps = steps.len(), "a pilot can never start");
            if let Err(e) = commands::scancel(std::slice::from_ref(&id)).await {
                tracing::warn!(job = %id, error = %e, "cancelling a pilot that cannot start");
            }
            self.pilots.remove(&id);
            if !steps.is_empty() {
                let _ = self.coord.fail_steps(steps, why).await;
            }
            failed.extend(p.shape);
        }
        failed
    }

    /// Pilots of `key` that could take a job now or soon: pending, starting, or running
    /// with a free slot (or not enrolled yet).
    fn spare(&self, key: &str, enrolled: &Enrolled) -> usize {
        self.pilots
            .iter()
            .filter(|(_, p)| p.shape.as_deref() == Some(key))
            .filter(|(id, p)| match p.state.as_str() {
                "PENDING" | "CONFIGURING" => true,
                "RUNNING" => match enrolled.get(id.as_str()) {
                    None => true,
                    Some((running, slots, lost)) => !lost && running < slots,
                },
                _ => false,
            })
            .count()
    }

    /// Pilots that count against `max_pilots` (not the ones ending).
    fn live(&self) -> usize {
        self.pilots
            .values()
            .filter(|p| p.state != "COMPLETING")
            .count()
    }

    /// Submits pilots for what waits, one per shape in turn (so that one wide step
    /// does not take every pilot from the others), up to `max_pilots`; at the limit,
    /// idle pilots of shapes nothing waits for are cancelled to make room.
    async fn scale_up(&mut self, shaped: &[(Shape, &Demand)], enrolled: &Enrolled) {
        let max = self.cfg.max_pilots as usize;
        let mut need: Vec<usize> = shaped
            .iter()
            .map(|(s, d)| d.queued.saturating_sub(self.spare(&s.key(), enrolled)))
            .collect();
        let wanted = need.iter().sum::<usize>();
        if self.live() + wanted > max {
            self.make_room(shaped, enrolled, self.live() + wanted - max)
                .await;
        }
        let mut refused = vec![false; shaped.len()];
        'rounds: loop {
            let mut any = false;
            for (g, (shape, d)) in shaped.iter().enumerate() {
                if need[g] == 0 || refused[g] {
                    continue;
                }
                if self.live() >= max {
                    break 'rounds;
                }
                any = true;
                need[g] -= 1;
                if let Err(e) = self.submit(shape, true).await {
                    refused[g] = true;
                    if commands::transient(&e) {
                        tracing::warn!(error = %e, "sbatch could not reach Slurm; trying again next round");
                        continue;
                    }
                    let steps: Vec<(String, usize)> =
                        d.steps.iter().map(|(r, i, _)| (r.clone(), *i)).collect();
                    let why = format!(
                        "sbatch refused this step's pilot ({}): {e}",
                        shape.describe()
                    );
                    tracing::warn!(error = %e, "sbatch refused a pilot");
                    let _ = self.coord.fail_steps(steps, why).await;
                }
            }
            if !any {
                break;
            }
        }
        let idle = Shape::idle(&self.cfg);
        while self.live() < self.cfg.min_pilots as usize {
            if let Err(e) = self.submit(&idle, false).await {
                tracing::warn!(error = %e, "sbatch refused a pilot kept for min-pilots");
                break;
            }
        }
    }

    /// Cancels up to `n` running pilots that have no job and whose shape nothing waits
    /// for (beyond those kept for `min_pilots`).
    async fn make_room(&mut self, shaped: &[(Shape, &Demand)], enrolled: &Enrolled, n: usize) {
        let wanted: Vec<String> = shaped.iter().map(|(s, _)| s.key()).collect();
        let spare_min = self.live().saturating_sub(self.cfg.min_pilots as usize);
        let idle: Vec<String> = self
            .pilots
            .iter()
            .filter(|(id, p)| {
                p.state == "RUNNING"
                    && !p.shape.as_ref().is_some_and(|k| wanted.contains(k))
                    && enrolled
                        .get(id.as_str())
                        .is_some_and(|(running, _, lost)| *running == 0 && !lost)
            })
            .map(|(id, _)| id.clone())
            .take(n.min(spare_min))
            .collect();
        if idle.is_empty() {
            return;
        }
        tracing::info!(pilots = ?idle, "cancelling idle pilots to make room for other steps' pilots");
        if let Err(e) = commands::scancel(&idle).await {
            tracing::warn!(error = %e, "cancelling idle pilots");
            return;
        }
        for id in idle {
            self.pilots.remove(&id);
        }
    }

    async fn scale_down(&mut self, shaped: &[(Shape, &Demand)]) {
        let wanted: Vec<String> = shaped.iter().map(|(s, _)| s.key()).collect();
        let idle = Shape::idle(&self.cfg).key();
        let mut cancel = Vec::new();
        let mut live = self.live();
        for (id, p) in self.pilots.iter_mut() {
            let needed = p.shape.as_ref().is_some_and(|k| wanted.contains(k));
            if p.state != "PENDING" || needed {
                p.unneeded = 0;
                continue;
            }
            p.unneeded += 1;
            let keep_for_min =
                live <= self.cfg.min_pilots as usize && p.shape.as_deref() == Some(idle.as_str());
            if p.unneeded >= 2 && !keep_for_min {
                cancel.push(id.clone());
                live = live.saturating_sub(1);
            }
        }
        if cancel.is_empty() {
            return;
        }
        tracing::info!(pilots = ?cancel, "cancelling pending pilots nothing waits for");
        if let Err(e) = commands::scancel(&cancel).await {
            tracing::warn!(error = %e, "cancelling pending pilots");
        }
        for id in cancel {
            self.pilots.remove(&id);
        }
    }

    /// Submits one pilot of `shape` (leaving when idle unless `leaves` is false).
    async fn submit(&mut self, shape: &Shape, leaves: bool) -> Result<(), String> {
        let text = script::render(shape, &self.cfg, leaves.then_some(self.cfg.idle_timeout));
        let id = commands::sbatch(&text, self.cfg.token.as_deref()).await?;
        tracing::info!(job = %id, shape = %shape.describe(), "submitted a pilot");
        self.pilots.insert(
            id,
            Pilot {
                shape: Some(shape.key()),
                state: "PENDING".into(),
                reason: String::new(),
                unneeded: 0,
            },
        );
        Ok(())
    }
}

/// The enrolled pilots by Slurm job id.
fn enrolled(workers: &[WorkerView]) -> Enrolled {
    let mut out = Enrolled::new();
    for w in workers {
        if w.profile
            .labels
            .get(nexa_shared::hardware::SCHEDULER_LABEL)
            .map(String::as_str)
            != Some(script::SLURM)
        {
            continue;
        }
        if let Some(job) = w.profile.labels.get("slurm.job_id") {
            let lost = w.state == WorkerState::Lost;
            // A re-enrolled pilot may be listed twice (an old identity, lost): the live
            // one counts.
            let e = out.entry(job.clone()).or_insert((w.running, w.slots, lost));
            if e.2 && !lost {
                *e = (w.running, w.slots, lost);
            }
        }
    }
    out
}

/// What a hopeless pending reason means, for the step's error.
fn explain(reason: &str) -> &'static str {
    match reason {
        "PartitionConfig" => {
            "the request exceeds what the partition's nodes have, or what it allows: ask for less in the step's resources, or name another partition"
        }
        "PartitionNodeLimit" => "the partition does not allow that many nodes",
        "PartitionTimeLimit" => {
            "the pilot's walltime exceeds the partition's limit: lower the step's timeout or the provider's walltime"
        }
        "BadConstraints" => "no node has the features the constraint asks for",
        "InvalidAccount" | "AccountNotAllowed" => "the account may not use this partition",
        "InvalidQOS" | "QOSNotAllowed" => "the QOS may not be used here",
        "PartitionDown" | "PartitionInactive" => "the partition takes no jobs",
        _ => "no wait can fix it",
    }
}
