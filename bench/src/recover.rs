//! `nexa-bench recover`: how soon a coordinator killed with a large run in its store
//! serves leases again. A real `nexa-coordinator serve` process takes one pipeline of
//! `jobs` independent no-op steps (acknowledged once its records are written), is
//! SIGKILLed before any worker ran one, and is started again on the same data dir; the
//! clock runs from the restart to a freshly enrolled worker holding its first lease.

use crate::workers::{authed, enrol, start_coordinator, usage};
use nexa_proto::v1;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs the benchmark and prints its figures.
pub fn run(jobs: usize, scratch: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-recover-")
        .tempdir_in(scratch)?;
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let y = crate::mesh::noop_pipeline("recover", jobs);
    let (mut first, url) = start_coordinator(None, &data, 2000)?;
    let submitted = Instant::now();
    let run_id = rt.block_on(async {
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
    })?;
    let submit_s = submitted.elapsed().as_secs_f64();
    // Planned and queued: its jobs are in memory and its records in the store.
    std::thread::sleep(Duration::from_secs(1));
    let (_, rss_before, _) = usage(first.id())?;
    first.kill();

    let restarted = Instant::now();
    let (mut second, url) = start_coordinator(None, &data, 2000)?;
    let listen_s = restarted.elapsed().as_secs_f64();
    let lease_s = rt.block_on(async {
        let mut w = enrol(url.clone(), 0).await?;
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
                "jobs": jobs, "run_id": run_id, "submit_s": submit_s,
                "restart_to_listen_s": listen_s, "restart_to_first_lease_s": lease_s,
                "coordinator_rss_before_mb": rss_before, "coordinator_rss_after_mb": rss_after,
                "store_mb": store as f64 / 1e6,
            })
        );
    } else {
        println!(
            "a run of {jobs} jobs submitted in {submit_s:.1} s, the coordinator SIGKILLed ({rss_before:.0} MB RSS) and restarted"
        );
        println!(
            "  listening after {listen_s:.2} s, first lease after {lease_s:.2} s; {rss_after:.0} MB RSS; store {:.0} MB",
            store as f64 / 1e6
        );
    }
    Ok(())
}
