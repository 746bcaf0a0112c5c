//! `nexa-bench fanout`: one step fanned out over a generated record file, end to end
//! on a real `nexa-coordinator serve` process: the `nexa` CLI submits it (uploading
//! the input), the coordinator splits it into `shards` and plans their jobs, simulated
//! workers (real enrolment, leases, Ed25519-signed results) complete them. Measured:
//! the time to the first lease (upload, split, planning), the coordinator's peak RSS,
//! jobs per second to completion, and what the data dir holds after (the store's size,
//! all bytes, files).

use nexa_worker::CoordinatorLink;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What the benchmark is asked to do.
pub struct Args {
    /// Records in the generated input (one JSON line each).
    pub records: u64,
    /// Shards the step is cut into.
    pub shards: u32,
    /// Simulated workers.
    pub workers: usize,
    /// Slots per worker.
    pub slots: usize,
    /// The coordinator binary (default: next to this one).
    pub coordinator: Option<std::path::PathBuf>,
}

/// Bytes and files under `dir`.
fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    bytes += m.len();
                    files += 1;
                }
                Err(_) => {}
            }
        }
    }
    (bytes, files)
}

/// Runs the benchmark and prints its figures.
pub fn run(args: Args, scratch: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-fanout-")
        .tempdir_in(scratch)?;
    let proj = dir.path().join("project");
    std::fs::create_dir_all(&proj)?;
    let input = proj.join("records.jsonl");
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&input)?);
        for i in 0..args.records {
            writeln!(w, "{{\"id\": {i}, \"smiles\": \"CC(=O)O{}\"}}", i % 997)?;
        }
        w.flush()?;
    }
    let input_bytes = std::fs::metadata(&input)?.len();
    std::fs::write(
        proj.join("fan.yaml"),
        format!(
            "pipeline:\n  name: fan\n  steps:\n    - id: infer\n      uses: exec\n      in: {{data: records.jsonl}}\n      shards: {{over: data, count: {}}}\n      params: {{cmd: [\"true\"]}}\n      out: artifacts/infer\n",
            args.shards
        ),
    )?;
    let data = dir.path().join("data");
    let (mut coord, url) =
        crate::workers::start_coordinator(args.coordinator.as_deref(), &data, 2000)?;
    let pid = coord.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&args, &url, &proj));
    let (_, rss, peak) = crate::workers::usage(pid).unwrap_or_default();
    coord.kill();
    let (first_lease, seconds) = result?;
    let store = nexa_coordinator::SledStore::open(&data.join("store"))?.size_on_disk();
    let (bytes, files) = tree_size(&data);
    let jobs_per_s = f64::from(args.shards) / (seconds - first_lease).max(1e-9);
    let mb = |b: u64| b as f64 / 1e6;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "records": args.records, "shards": args.shards, "input_mb": mb(input_bytes),
                "workers": args.workers, "slots": args.slots,
                "first_lease_s": first_lease, "seconds": seconds, "jobs_per_s": jobs_per_s,
                "coordinator_rss_mb": rss, "coordinator_peak_rss_mb": peak,
                "store_mb": mb(store), "data_dir_mb": mb(bytes), "data_dir_files": files,
            })
        );
    } else {
        println!(
            "{} records ({:.0} MB) in {} shards, {} simulated workers x {} slots, on a nexa-coordinator process",
            args.records,
            mb(input_bytes),
            args.shards,
            args.workers,
            args.slots
        );
        println!(
            "  first lease after {first_lease:.1} s (upload, split, planning); all done after {seconds:.1} s: {jobs_per_s:.0} shard jobs/s"
        );
        println!(
            "  coordinator RSS {rss:.0} MB (peak {peak:.0} MB); store {:.0} MB; data dir {:.0} MB in {files} files",
            mb(store),
            mb(bytes)
        );
    }
    Ok(())
}

/// Returns the seconds from submission to the first lease and to the run's end.
async fn bench(args: &Args, url: &str, proj: &Path) -> anyhow::Result<(f64, f64)> {
    let first: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let (link, identity) = crate::mesh::sim_worker(url, w, args.slots).await?;
        tasks.push(link.spawn_heartbeats());
        for _ in 0..args.slots {
            let (link, identity, first) = (link.clone(), identity.clone(), first.clone());
            tasks.push(tokio::spawn(async move {
                let mut next = None;
                loop {
                    let lease = match next.take() {
                        Some(n) => nexa_worker::NextLease::lease(n).await,
                        None => link.next_lease().await,
                    };
                    let Some(lease) = lease else {
                        break;
                    };
                    let _ = first.set(Instant::now());
                    let r = crate::signed_result(
                        &identity,
                        lease.job.job_id.clone(),
                        (lease.generation, lease.attempt),
                        Vec::new(),
                    );
                    next = Some(link.report_and_ask(r).await);
                }
            }));
        }
    }
    let nexa = crate::nexa_binary(None)?;
    let started = Instant::now();
    let out = tokio::process::Command::new(&nexa)
        .current_dir(proj)
        .args([
            "pipeline",
            "run",
            "fan.yaml",
            "--coordinator",
            url,
            "--token",
            "bench",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    anyhow::ensure!(
        out.status.success(),
        "the fan-out run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_lease = first
        .get()
        .map_or(seconds, |t| t.duration_since(started).as_secs_f64());
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok((first_lease, seconds))
}
