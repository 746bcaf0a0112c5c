//! `nexa-bench`: measurements behind the figures in the README.
//!
//! - `cached`: re-running a fully cached N-step pipeline through the real `nexa` binary
//!   (process start, YAML, validation, sled, planning, state writes: what a user waits for).
//! - `hash`: artifact hashing throughput on one file and on a tree, against `b3sum` and
//!   `sha256sum` on the same bytes, in one run.
//! - `runner`: a training run through `nexa pipeline run` against the same driver run
//!   directly (Nexa's overhead).
//! - `workers`: many idle workers (own connections, keys, heartbeats) on one
//!   coordinator process: heartbeats handled per second, its CPU and RSS.
//! - `store`: the run-state store at a million records: write rate, space
//!   amplification after writing and rewriting, reopen and read-back time.
//! - `fanout`: one step over a generated record file cut into many shards, on a
//!   coordinator process: time to the first lease, peak RSS, shard jobs/s, disk.
//! - `recover`: a coordinator SIGKILLed with a large run in its store, restarted:
//!   seconds until a worker holds a lease again.
//! - `seal`: sealing a large checkpoint (the worker's hash and signature, the
//!   coordinator's check, fsync, rename and `COMPLETE`), phase by phase.

mod fanout;
mod mesh;
mod recover;
mod runner;
mod seal;
mod slurm;
mod store;
mod workers;

/// mimalloc: the coordinator allocates many small, short-lived buffers from several
/// threads (protobuf messages, paths, JSON), where glibc's allocator spent ~14% of the
/// mesh bench's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sha2::Digest as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "nexa-bench", about = "Nexa benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Re-run a fully cached pipeline.
    Cached {
        /// Steps in the generated pipeline.
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Timed re-runs.
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// The nexa binary (default: next to this one).
        #[arg(long)]
        nexa: Option<PathBuf>,
    },
    /// No-op jobs through the whole mesh path: gRPC, enrolment, leases, signing,
    /// verification, sealing, sled; simulated workers in this process.
    Mesh {
        /// Simulated workers.
        #[arg(long, default_value_t = 64)]
        workers: usize,
        /// Slots per worker.
        #[arg(long, default_value_t = 1)]
        slots: usize,
        /// Jobs (independent steps of one pipeline).
        #[arg(long, default_value_t = 20000)]
        jobs: usize,
        /// Where the coordinator's scratch data dir is made (default: the cargo
        /// `target/` directory this binary was built in, else the system temp dir).
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
    /// Sealing a large checkpoint: hash, sign, verify, fsync, rename, COMPLETE.
    Seal {
        /// Checkpoint size (e.g. 2GiB).
        #[arg(long, default_value = "2GiB")]
        size: String,
        /// Files it is split into (sharded weights).
        #[arg(long, default_value_t = 4)]
        files: usize,
        /// Timed repetitions (the best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Where the checkpoints are written (default: the system temp dir). It must
        /// hold `size` twice over.
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
    /// Nexa's overhead on a training run: the runners.train driver directly vs
    /// `nexa pipeline run` (needs NEXA_PYTHON or --python with torch and transformers).
    Runner {
        /// Training steps.
        #[arg(long, default_value_t = 300)]
        steps: u32,
        /// Timed runs of each, interleaved (the medians are compared).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// The interpreter (default: $NEXA_PYTHON, else python3).
        #[arg(long, env = "NEXA_PYTHON", default_value = "python3")]
        python: String,
        /// The nexa binary (default: next to this one).
        #[arg(long)]
        nexa: Option<PathBuf>,
        /// A labelled JSONL file (default: the repo's pipelines/data/reviews/train.jsonl).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Trivial jobs on a real Slurm: plain sbatch jobs vs one `scheduler: slurm` step
    /// of as many shards through the Slurm provider's pilots, in one run.
    Slurm {
        /// Jobs on each side.
        #[arg(long, default_value_t = 500)]
        jobs: usize,
        /// The most pilots the provider submits.
        #[arg(long, default_value_t = 4)]
        pilots: u32,
    },
    /// Idle workers on one coordinator process: enrolment, heartbeats handled per
    /// second, the coordinator's CPU and RSS, and reading the whole list back.
    Workers {
        /// Simulated workers, each with its own connection and key.
        #[arg(long, default_value_t = 10_000)]
        workers: usize,
        /// Seconds of heartbeats measured.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// The coordinator's heartbeat interval.
        #[arg(long, default_value_t = 2000)]
        heartbeat_ms: u64,
        /// Enrolments in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The coordinator binary (default: next to this one).
        #[arg(long)]
        coordinator: Option<PathBuf>,
    },
    /// The run-state store (sled) at many records: write rate, size on disk against
    /// the live bytes, reopening and reading every record back.
    Store {
        /// Step-sized records.
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
    },
    /// One step fanned out over a generated record file on a coordinator process:
    /// time to the first lease, peak RSS, shard jobs/s, what the data dir holds.
    Fanout {
        /// Records generated (one JSON line each).
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Shards the step is cut into (`shards: {count: N}`).
        #[arg(long, default_value_t = 10_000)]
        shards: u32,
        /// Simulated workers.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Slots per worker.
        #[arg(long, default_value_t = 4)]
        slots: usize,
        /// The coordinator binary (default: next to this one).
        #[arg(long)]
        coordinator: Option<PathBuf>,
    },
    /// A coordinator SIGKILLed with a run of many jobs in its store and restarted:
    /// seconds until a freshly enrolled worker holds a lease.
    Recover {
        /// Independent no-op steps in the run (with `--shards`, shards of one step).
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// The run is one step fanned out into `jobs` shards.
        #[arg(long)]
        shards: bool,
    },
    /// Hashing throughput.
    Hash {
        /// Bytes to hash (e.g. 1GiB).
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Timed repetitions per tool (the best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Cached { steps, runs, nexa } => cached(steps, runs, nexa, cli.json),
        Cmd::Hash { size, reps } => hash(&size, reps, cli.json),
        Cmd::Runner {
            steps,
            reps,
            python,
            nexa,
            data,
        } => runner::run(
            steps,
            reps,
            &python,
            &nexa_binary(nexa)?,
            &data.unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/data/reviews/train.jsonl")
            }),
            cli.json,
        ),
        Cmd::Seal {
            size,
            files,
            reps,
            scratch,
        } => seal::run(
            &size,
            files,
            reps,
            &scratch.unwrap_or_else(std::env::temp_dir),
            cli.json,
        ),
        Cmd::Mesh {
            workers,
            slots,
            jobs,
            scratch,
        } => mesh::run(workers, slots, jobs, scratch, cli.json),
        Cmd::Fanout {
            records,
            shards,
            workers,
            slots,
            coordinator,
        } => fanout::run(
            fanout::Args {
                records,
                shards,
                workers,
                slots,
                coordinator,
            },
            &target_dir()?,
            cli.json,
        ),
        Cmd::Recover { jobs, shards } => recover::run(jobs, shards, &target_dir()?, cli.json),
        Cmd::Store { records } => store::run(records, &target_dir()?, cli.json),
        Cmd::Workers {
            workers,
            seconds,
            heartbeat_ms,
            concurrency,
            coordinator,
        } => {
            let scratch = target_dir()?;
            workers::run(
                workers::Args {
                    workers,
                    seconds,
                    heartbeat_ms,
                    concurrency,
                    coordinator,
                },
                &scratch,
                cli.json,
            )
        }
        Cmd::Slurm { jobs, pilots } => {
            let nexa = nexa_binary(None)?;
            let dir = nexa.parent().map(Path::to_path_buf).unwrap_or_default();
            slurm::run(jobs, pilots, &dir, cli.json)
        }
    }
}

/// The cargo `target/` directory this binary was built in (scratch space on the same
/// disk as the build, not a /tmp that may have just had many files deleted), else the
/// system temp dir.
fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir))
}

fn nexa_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("nexa");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release) or pass --nexa",
            p.display()
        );
    }
    Ok(p)
}

fn cached(steps: usize, runs: usize, nexa: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let nexa = nexa_binary(nexa)?;
    let dir = tempfile::tempdir()?;
    let mut y = String::from("pipeline:\n  name: bench\n  steps:\n");
    for i in 0..steps {
        y.push_str(&format!("    - id: s{i}\n      uses: exec\n"));
        // Half the steps read their predecessor's artifact, so keys chain through content.
        if i > 0 && i % 2 == 0 {
            y.push_str(&format!("      in: {{prev: artifacts/s{}}}\n", i - 1));
        }
        y.push_str(&format!(
            "      params: {{cmd: [sh, -c, 'echo {i} > $NEXA_OUT/x']}}\n      out: artifacts/s{i}\n"
        ));
    }
    std::fs::write(dir.path().join("bench.yaml"), y)?;
    let run = || -> anyhow::Result<(Duration, String)> {
        let t = Instant::now();
        let out = Command::new(&nexa)
            .current_dir(dir.path())
            .args(["pipeline", "run", "bench.yaml"])
            .output()?;
        let el = t.elapsed();
        if !out.status.success() {
            bail!("nexa failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((el, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (first, _) = run().context("first (uncached) run")?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let (t, stdout) = run()?;
        if !stdout.contains(&format!("0 complete, {steps} skipped")) {
            bail!(
                "re-run was not fully cached: {}",
                stdout.lines().next().unwrap_or("")
            );
        }
        times.push(t.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if json {
        println!(
            "{}",
            serde_json::json!({"steps": steps, "first_run_ms": first.as_secs_f64() * 1000.0,
                "cached_min_ms": times[0], "cached_median_ms": median, "cached_max_ms": times[times.len() - 1], "runs": runs})
        );
    } else {
        println!(
            "cached re-run of a {steps}-step pipeline through `nexa pipeline run` ({runs} runs)"
        );
        println!(
            "  first (uncached) run: {:.0} ms",
            first.as_secs_f64() * 1000.0
        );
        println!(
            "  cached re-run: min {:.1} ms, median {:.1} ms, max {:.1} ms (goal <= 200 ms)",
            times[0],
            median,
            times[times.len() - 1]
        );
    }
    Ok(())
}

/// A successful result for `job_id`'s attempt with `outputs`, signed by `identity`, as
/// a worker reports it.
fn signed_result(
    identity: &nexa_shared::signing::Identity,
    job_id: nexa_shared::ids::JobId,
    (generation, attempt): (u64, u32),
    outputs: Vec<nexa_shared::job::OutputFile>,
) -> nexa_shared::job::JobResult {
    let now = nexa_shared::job::now_ms();
    let mut r = nexa_shared::job::JobResult {
        job_id,
        generation,
        attempt,
        outcome: nexa_shared::job::Outcome::Succeeded,
        exit_code: Some(0),
        outputs,
        started_ms: now,
        ended_ms: now,
        error: String::new(),
        staging: None,
        log: None,
        progress: None,
        worker_key: [0; 32],
        signature: Vec::new(),
    };
    identity.sign_result(&mut r);
    r
}

fn fill(path: &Path, bytes: u64) -> anyhow::Result<()> {
    // Incompressible content from BLAKE3's XOF, so no tool gets an easy ride.
    let mut xof = blake3::Hasher::new().update(b"nexa-bench").finalize_xof();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

fn best<F: FnMut() -> anyhow::Result<()>>(reps: usize, mut f: F) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn tool(name: &str, args: &[&str], file: &Path) -> Option<Box<dyn FnMut() -> anyhow::Result<()>>> {
    let ok = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return None;
    }
    let (name, args, file) = (
        name.to_string(),
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        file.to_path_buf(),
    );
    Some(Box::new(move || {
        let out = Command::new(&name).args(&args).arg(&file).output()?;
        if !out.status.success() {
            bail!("{name} failed");
        }
        Ok(())
    }))
}

fn hash(size: &str, reps: usize, json: bool) -> anyhow::Result<()> {
    let bytes = nexa_shared::units::parse_size(size)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("blob");
    fill(&file, bytes)?;
    // The same bytes as a tree of 16 files, as a checkpoint directory would be.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree)?;
    let part = bytes / 16;
    for i in 0..16 {
        fill(&tree.join(format!("shard-{i:02}.bin")), part)?;
    }
    let _ = std::fs::read(&file)?; // warm the page cache
    let gb = bytes as f64 / 1e9;
    let mut rows: Vec<(String, f64)> = Vec::new();
    let t = best(reps, || {
        nexa_shared::digest::hash_file(&file)?;
        Ok(())
    })?;
    rows.push(("nexa blake3 (file, streamed)".into(), t));
    // What hash_file did before it streamed: memory-map the whole file.
    let t = best(reps, || {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(&file)?;
        Ok(())
    })?;
    rows.push(("blake3 mmap on all cores (before)".into(), t));
    let t = best(reps, || {
        nexa_shared::digest::hash_tree(&tree, &[])?;
        Ok(())
    })?;
    rows.push(("nexa blake3 (16-file tree)".into(), t));
    if let Some(mut f) = tool("b3sum", &["--no-names"], &file) {
        rows.push(("b3sum".into(), best(reps, &mut f)?));
    }
    if let Some(mut f) = tool("sha256sum", &[], &file) {
        rows.push(("sha256sum".into(), best(reps.min(2), &mut f)?));
    }
    let t = best(1, || {
        let mut h = sha2::Sha256::new();
        let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&file)?);
        std::io::copy(&mut r, &mut h)?;
        let _ = h.finalize();
        Ok(())
    })?;
    rows.push(("sha2 crate, one core (the cache-key hash)".into(), t));
    let base = rows[0].1;
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, t)| serde_json::json!({"tool": n, "seconds": t, "gb_per_s": gb / t, "time_vs_nexa": t / base}))
            .collect();
        println!("{}", serde_json::json!({"bytes": bytes, "results": v}));
    } else {
        println!(
            "hashing {} ({} bytes), best of {reps}, page cache warm",
            size, bytes
        );
        for (n, t) in &rows {
            println!(
                "  {n:<44} {:>7.3} s  {:>6.2} GB/s  {:>5.2}x nexa's time",
                t,
                gb / t,
                t / base
            );
        }
    }
    Ok(())
}
