//! `nexa-bench slurm`: the same number of trivial jobs on the same Slurm, side by side
//! in one run: as plain sbatch jobs (one allocation each), and as one `scheduler: slurm`
//! step with that many shards through the Slurm provider's pilots (a real
//! `nexa-coordinator serve --slurm`, real `nexa-worker` pilots, `nexa --coordinator`
//! submitting and following). Both clocks run from the first submission until the
//! last job is done, so the pilots' start-up is included. Needs sbatch and squeue on
//! PATH (and `SLURM_CONF` where the cluster says so).
//!
//! It also measures the floor no pilot system can beat on this machine: how long Slurm
//! takes to start one job (the median of three), plus the same number of bare
//! processes doing the job's work with nothing around them, as many at once as there
//! are cores. The ratio of plain sbatch to that floor is the most any system could
//! show here.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the benchmark and prints its figures.
pub fn run(jobs: usize, pilots: u32, bin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plain = plain_sbatch(jobs, dir.path())?;
    let nexa = through_pilots(jobs, pilots, bin_dir, dir.path())?;
    // Slurm starts a job on its scheduler's next pass: the median of three.
    let mut starts = (0..3)
        .map(|i| first_start(&dir.path().join(format!("first-{i}"))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    starts.sort();
    let first_start = starts[1];
    let bare = bare_processes(jobs, dir.path())?;
    let floor = first_start + bare;
    let (plain_rate, nexa_rate) = (
        jobs as f64 / plain.as_secs_f64(),
        jobs as f64 / nexa.as_secs_f64(),
    );
    let floor_ratio = plain.as_secs_f64() / floor.as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "jobs": jobs,
                "pilots": pilots,
                "sbatch_s": plain.as_secs_f64(),
                "sbatch_jobs_per_s": plain_rate,
                "nexa_s": nexa.as_secs_f64(),
                "nexa_jobs_per_s": nexa_rate,
                "ratio": nexa_rate / plain_rate,
                "slurm_first_start_s": first_start.as_secs_f64(),
                "bare_processes_s": bare.as_secs_f64(),
                "floor_s": floor.as_secs_f64(),
                "floor_ratio": floor_ratio,
            })
        );
    } else {
        println!("{jobs} trivial jobs on the same Slurm:");
        println!(
            "  plain sbatch, one job each:        {:>8.2} s  {plain_rate:>8.1} jobs/s",
            plain.as_secs_f64()
        );
        println!(
            "  Nexa slurm step through {pilots} pilots:  {:>8.2} s  {nexa_rate:>8.1} jobs/s  ({:.1}x)",
            nexa.as_secs_f64(),
            nexa_rate / plain_rate
        );
        println!(
            "  floor: Slurm starts one job in {:.2} s, {jobs} bare processes take {:.2} s: {:.2} s, at most {floor_ratio:.1}x",
            first_start.as_secs_f64(),
            bare.as_secs_f64(),
            floor.as_secs_f64()
        );
    }
    Ok(())
}

/// From one `sbatch` until its job starts (its batch script writes the time).
fn first_start(dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let stamp = dir.join("first-start");
    let submitted = std::time::SystemTime::now();
    let out = Command::new("sbatch")
        .args([
            "--parsable",
            "--job-name",
            &format!("nexa-bench-first-{}", std::process::id()),
            "--cpus-per-task=1",
            "--mem=16M",
            "--output=/dev/null",
            "--wrap",
            &format!("date +%s.%N > {}.part && mv {0}.part {0}", stamp.display()),
        ])
        .current_dir(dir)
        .output()
        .context("sbatch")?;
    if !out.status.success() {
        bail!("sbatch: {}", String::from_utf8_lossy(&out.stderr));
    }
    let t = Instant::now();
    let started = loop {
        if let Ok(s) = std::fs::read_to_string(&stamp) {
            break s.trim().parse::<f64>().context("the job's start time")?;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the job Slurm was given did not start within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let submitted = submitted
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    Ok(Duration::from_secs_f64((started - submitted).max(0.0)))
}

/// `jobs` bare `sh -c 'cat item > out'` processes (the benchmark job's work, with
/// nothing around it), as many at a time as there are cores.
fn bare_processes(jobs: usize, dir: &Path) -> anyhow::Result<Duration> {
    let work = dir.join("bare");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("item"), "1\n")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let runners: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= jobs {
                            return Ok(());
                        }
                        let status = Command::new("sh")
                            .args(["-c", "cat \"$1\" > \"$2\"", "sh"])
                            .arg(work.join("item"))
                            .arg(work.join(format!("out-{i}")))
                            .status()?;
                        if !status.success() {
                            bail!("a bare process failed: {status}");
                        }
                    }
                })
            })
            .collect();
        for r in runners {
            r.join()
                .map_err(|_| anyhow::anyhow!("a runner panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

/// `sbatch --wrap true` `jobs` times, then waits until squeue lists none of them.
fn plain_sbatch(jobs: usize, dir: &Path) -> anyhow::Result<Duration> {
    let name = format!("nexa-bench-plain-{}", std::process::id());
    let t = Instant::now();
    for i in 0..jobs {
        let out = Command::new("sbatch")
            .args([
                "--parsable",
                "--job-name",
                &name,
                "--cpus-per-task=1",
                "--mem=16M",
                "--output=/dev/null",
                "--wrap",
                &format!("echo {i} > /dev/null"),
            ])
            .current_dir(dir)
            .output()
            .context("sbatch (is Slurm's client on PATH?)")?;
        if !out.status.success() {
            bail!("sbatch: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    wait_gone(&name, Duration::from_secs(3600))?;
    Ok(t.elapsed())
}

/// Waits until squeue lists no job named `name`.
fn wait_gone(name: &str, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let out = Command::new("squeue")
            .args(["-h", "-n", name, "-o", "%i"])
            .output()
            .context("squeue")?;
        if out.status.success() && out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("jobs named {name} still queued after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One coordinator with the Slurm provider, one pipeline of one `jobs`-shard slurm step.
fn through_pilots(
    jobs: usize,
    pilots: u32,
    bin_dir: &Path,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let data = dir.join("coord");
    let worker = bin_dir.join("nexa-worker");
    let mut coord = Command::new(bin_dir.join("nexa-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(["--operator-token", "bench", "--open-enrolment", "--slurm"])
        .args(["--slurm-max-pilots", &pilots.to_string()])
        .args(["--slurm-min-memory", "256MiB", "--slurm-idle-timeout", "5s"])
        .arg("--slurm-worker")
        .arg(&worker)
        .env("NEXA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nexa-coordinator")?;
    let result = (|| -> anyhow::Result<Duration> {
        let mut line = String::new();
        let stdout = coord.stdout.take().context("coordinator stdout")?;
        let mut reader = BufReader::new(stdout);
        let addr = loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                bail!("the coordinator exited before listening");
            }
            if let Some(a) = line.trim().strip_prefix("listening on ") {
                break a.to_string();
            }
        };
        let project = dir.join("project");
        std::fs::create_dir_all(&project)?;
        let items: String = (0..jobs).map(|i| format!("{i}\n")).collect();
        std::fs::write(project.join("items.txt"), items)?;
        std::fs::write(
            project.join("bench.yaml"),
            format!(
                "pipeline:\n  name: slurm-bench\n  steps:\n    - id: fan\n      uses: exec\n      scheduler: slurm\n      in: {{items: items.txt}}\n      shards: {{over: items, count: {jobs}}}\n      params: {{run: 'cat \"$NEXA_IN_ITEMS\" > \"$NEXA_OUT/n\"'}}\n      out: artifacts/fan\n"
            ),
        )?;
        let t = Instant::now();
        let out = Command::new(bin_dir.join("nexa"))
            .current_dir(&project)
            .args([
                "--coordinator",
                &format!("http://{addr}"),
                "--token",
                "bench",
            ])
            .args(["pipeline", "run", "bench.yaml"])
            .output()
            .context("nexa pipeline run")?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!(
                "the pipeline failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    })();
    // The provider cancels its pilots on SIGTERM.
    let _ = Command::new("kill")
        .args(["-TERM", &coord.id().to_string()])
        .status();
    let _ = coord.wait();
    result
}
