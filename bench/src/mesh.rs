//! `nexa-bench mesh`: a coordinator served in this process on 127.0.0.1 (real gRPC, real
//! sled, real sealing), simulated workers that enrol with real keys, lease, sign a no-op
//! result and report it through the same `GrpcLink` a real worker uses.

use nexa_coordinator::mesh::{MeshConfig, ServeConfig};
use nexa_proto::v1;
use nexa_shared::hardware::Profile;
use nexa_shared::signing::Identity;
use nexa_worker::CoordinatorLink;
use nexa_worker::remote::{Enrolment, GrpcLink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// The `p` quantile of sorted values (0 when there are none).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A simulated worker `w` with `slots` slots: a real key, enrolled on `url` through the
/// same `GrpcLink` a real worker uses (its heartbeats not started).
pub(crate) async fn sim_worker(
    url: &str,
    w: usize,
    slots: usize,
) -> anyhow::Result<(Arc<GrpcLink>, Arc<Identity>)> {
    let identity = Arc::new(Identity::generate());
    let profile = Profile {
        hostname: format!("sim-{w}"),
        cores: slots as u32,
        memory_total: 16 << 30,
        ..Profile::default()
    };
    let link = GrpcLink::new(
        url,
        identity.clone(),
        Enrolment {
            name: format!("sim-{w}"),
            slots: slots as u32,
            profile,
            token: None,
        },
        None,
    )
    .map_err(anyhow::Error::msg)?;
    link.enrol_until_done()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok((link, identity))
}

/// A pipeline `name` of `jobs` independent no-op steps.
pub(crate) fn noop_pipeline(name: &str, jobs: usize) -> String {
    let mut y = String::with_capacity(jobs * 96);
    y.push_str(&format!("pipeline:\n  name: {name}\n  steps:\n"));
    for i in 0..jobs {
        y.push_str(&format!(
            "    - {{id: j{i}, uses: exec, after: [], params: {{cmd: [\"true\"]}}, out: artifacts/j{i}}}\n"
        ));
    }
    y
}

/// Runs the benchmark and prints its figures.
pub fn run(
    workers: usize,
    slots: usize,
    jobs: usize,
    scratch: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    // The data dir sits in the build's target/ by default: on a machine whose /tmp has
    // just had many files deleted, ext4 without a journal scans those inodes on every
    // create, and the bench would measure that instead of the coordinator.
    let scratch = match scratch {
        Some(s) => s,
        None => crate::target_dir()?,
    };
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-mesh-")
        .tempdir_in(&scratch)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(workers, slots, jobs, dir.path(), json))
}

async fn bench(
    workers: usize,
    slots: usize,
    jobs: usize,
    dir: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut mesh = MeshConfig::new(dir.join("data"));
    mesh.enrol_token = None;
    let cfg = ServeConfig {
        mesh,
        operator_token: "bench".into(),
        unfit_grace: Duration::from_secs(30),
        default_validation: None,
        tls: None,
        slurm: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(nexa_coordinator::mesh::serve(listener, cfg, async {
        let _ = stop_rx.await;
    }));

    let dispatch: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::with_capacity(jobs)));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (link, identity) = sim_worker(&url, w, slots).await?;
        let _heartbeats = link.spawn_heartbeats();
        for _ in 0..slots {
            let link = link.clone();
            let identity = identity.clone();
            let dispatch = dispatch.clone();
            tasks.push(tokio::spawn(async move {
                // As the worker's loop does: each report carries the slot's ask for its
                // next lease (one `Exchange`). The dispatch wait runs from the slot being
                // free (its result in hand, not yet reported) to its next lease in hand.
                let mut asked: Option<(Instant, nexa_worker::NextLease<'_>)> = None;
                loop {
                    let (t, next) = match asked.take() {
                        Some((t, n)) => (t, n.lease().await),
                        None => (Instant::now(), link.next_lease().await),
                    };
                    let Some(lease) = next else {
                        break;
                    };
                    let waited = t.elapsed().as_secs_f64() * 1000.0;
                    if let Ok(mut d) = dispatch.lock() {
                        d.push(waited);
                    }
                    let _cancel = link.cancellation(&lease);
                    let r = super::signed_result(
                        &identity,
                        lease.job.job_id.clone(),
                        (lease.generation, lease.attempt),
                        Vec::new(),
                    );
                    let free = Instant::now();
                    asked = Some((free, link.report_and_ask(r).await));
                }
            }));
        }
    }

    let y = noop_pipeline("bench", jobs);
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?
        .connect()
        .await?;
    let mut control = v1::control_service_client::ControlServiceClient::new(channel)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    fn auth<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
        if let Ok(v) = "Bearer bench".parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
    let started = Instant::now();
    let run_id = control
        .submit(auth(tonic::Request::new(v1::SubmitRequest {
            pipeline_yaml: y,
            file_name: "bench.yaml".into(),
            files: Vec::new(),
            verify: false,
            from: String::new(),
        })))
        .await?
        .into_inner()
        .run_id;
    let mut watch = control
        .watch(auth(tonic::Request::new(v1::WatchRequest { run_id })))
        .await?
        .into_inner();
    let mut outcome = None;
    while let Some(e) = watch.next().await {
        let e = e?;
        if let Some(v1::run_event::Event::Finished(f)) = e.event {
            outcome = v1::RunOutcome::try_from(f.outcome).ok();
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // This process: the coordinator and the simulated workers together.
    let rss = crate::workers::usage(std::process::id()).map_or(0.0, |u| u.1);
    let _ = stop_tx.send(());
    for t in tasks {
        t.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let mut d = dispatch.lock().map(|d| d.clone()).unwrap_or_default();
    d.sort_by(f64::total_cmp);
    let jobs_per_s = jobs as f64 / elapsed;
    let (p50, p99) = (percentile(&d, 0.5), percentile(&d, 0.99));
    if outcome != Some(v1::RunOutcome::Succeeded) {
        anyhow::bail!("the bench run ended {outcome:?}");
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"jobs_per_s": jobs_per_s, "p50_dispatch_ms": p50, "p99_dispatch_ms": p99,
                "coordinator_rss_mb": rss, "jobs": jobs, "workers": workers, "slots": slots, "seconds": elapsed})
        );
    } else {
        println!(
            "{jobs} no-op jobs on {workers} simulated workers x {slots} slots over loopback gRPC"
        );
        println!(
            "  {jobs_per_s:.0} jobs/s ({elapsed:.1} s), lease wait p50 {p50:.2} ms, p99 {p99:.2} ms"
        );
        println!("  process RSS {rss:.0} MB (coordinator and simulated workers together)");
    }
    Ok(())
}
