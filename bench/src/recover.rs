//! `nexa-bench recover`: how soon a coordinator killed with a large run in its store
//! serves leases again. A real `nexa-coordinator serve` process takes one pipeline of
//! `jobs` independent no-op steps (acknowledged once its records are written), or with
//! `--shards` one step fanned out into `jobs` shards (submitted by the `nexa` CLI,
//! which uploads its input; the fan-out is planned once the coordinator's metrics
//! count its jobs queued), is SIGKILLed before any worker ran one, and is started again
//! on the same data dir; the clock runs from the restart to a freshly enrolled worker
//! holding its first lease.

use crate::workers::{authed, enrol, start_coordinator_with, usage};
use nexa_proto::v1;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// The jobs the coordinator at `metrics` counts queued (`nexa_jobs{state="queued"}`).
fn queued(metrics: &str) -> anyhow::Result<u64> {
    let mut c = std::net::TcpStream::connect(metrics)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .find(|l| l.starts_with("nexa_jobs{") && l.contains("state=\"queued\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Submits one step of `shards` shards over a generated record file through the
/// `nexa` CLI (left running: it is killed with the coordinator) and waits until the
/// coordinator has planned it.
fn submit_fan_out(
    dir: &Path,
    url: &str,
    metrics: &str,
    shards: usize,
) -> anyhow::Result<std::process::Child> {
    let proj = dir.join("project");
    std::fs::create_dir_all(&proj)?;
    {
        let f = std::fs::File::create(proj.join("records.jsonl"))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        for i in 0..shards {
            writeln!(w, "{{\"id\": {i}}}")?;
        }
        w.flush()?;
    }
    std::fs::write(
        proj.join("fan.yaml"),
        format!(
            "pipeline:\n  name: recover\n  steps:\n    - id: infer\n      uses: exec\n      in: {{data: records.jsonl}}\n      shards: {{over: data, count: {shards}}}\n      params: {{cmd: [\"true\"]}}\n      out: artifacts/infer\n"
        ),
    )?;
    let cli = std::process::Command::new(crate::nexa_binary(None)?)
        .current_dir(&proj)
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
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while queued(metrics).unwrap_or(0) < shards as u64 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "the fan-out was not planned within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(cli)
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the benchmark and prints its figures.
pub fn run(jobs: usize, shards: bool, scratch: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-recover-")
        .tempdir_in(scratch)?;
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    );
    // A pipeline of a million steps is ~92 MB of YAML: over the default 64 MiB.
    let flags = ["--metrics-listen", &metrics, "--max-submit", "1GiB"];
    let (mut first, url) = start_coordinator_with(None, &data, 2000, &flags)?;
    let submitted = Instant::now();
    let mut cli = None;
    let run_id = if shards {
        cli = Some(submit_fan_out(dir.path(), &url, &metrics, jobs)?);
        String::new()
    } else {
        let y = crate::mesh::noop_pipeline("recover", jobs);
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect()
                .await?;
            let mut control = v1::control_service_client::ControlServiceClient::new(channel)
                .max_encoding_message_size(1 << 30)
                .max_decoding_message_size(1 << 30);
            let r = control
                .submit(authed(
                    v1::SubmitRequest {
                        pipeline_yaml: y,
                        file_name: "recover.yaml".into(),
                        files: Vec::new(),
                        verify: false,
                        from: String::new(),
                    },
                    "bench",
                )?)
                .await?;
            anyhow::Ok(r.into_inner().run_id)
        })?
    };
    let submit_s = submitted.elapsed().as_secs_f64();
    // Planned and queued: its jobs are in memory and its records in the store.
    std::thread::sleep(Duration::from_secs(1));
    let (_, rss_before, _) = usage(first.id())?;
    first.kill();
    if let Some(mut c) = cli {
        let _ = c.kill();
        let _ = c.wait();
    }

    let restarted = Instant::now();
    let (mut second, url) = start_coordinator_with(None, &data, 2000, &flags)?;
    let listen_s = restarted.elapsed().as_secs_f64();
    let lease_s = rt.block_on(async {
        let mut w = enrol(url.clone(), 0).await?;
        // It beats while it waits, as a real worker does: a restart that takes longer
        // than the lease ttl must not lose it.
        let (mut beat, session) = (w.client.clone(), w.session.clone());
        let beats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                if let Ok(req) = authed(v1::HeartbeatRequest::default(), &session) {
                    let _ = beat.heartbeat(req).await;
                }
            }
        });
        let _stop = AbortOnDrop(beats);
        loop {
            let r = w
                .client
                .lease(authed(v1::LeaseRequest { wait_ms: 1000 }, &w.session)?)
                .await?
                .into_inner();
            if r.lease.is_some() {
                return anyhow::Ok(restarted.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                restarted.elapsed() < Duration::from_secs(600),
                "no lease within 10 minutes of the restart"
            );
        }
    })?;
    let (_, rss_after, _) = usage(second.id())?;
    second.kill();
    let store = nexa_coordinator::SledStore::open(&data.join("store"))?.size_on_disk();
    if std::env::var_os("NEXA_BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "jobs": jobs, "shards": shards, "run_id": run_id, "submit_s": submit_s,
                "restart_to_listen_s": listen_s, "restart_to_first_lease_s": lease_s,
                "coordinator_rss_before_mb": rss_before, "coordinator_rss_after_mb": rss_after,
                "store_mb": store as f64 / 1e6,
            })
        );
    } else {
        println!(
            "a run of {jobs} {} submitted in {submit_s:.1} s, the coordinator SIGKILLed ({rss_before:.0} MB RSS) and restarted",
            if shards { "shards of one step" } else { "jobs" }
        );
        println!(
            "  listening after {listen_s:.2} s, first lease after {lease_s:.2} s; {rss_after:.0} MB RSS; store {:.0} MB",
            store as f64 / 1e6
        );
    }
    Ok(())
}
