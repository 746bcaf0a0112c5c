//! `nexa-bench workers`: many idle workers on one coordinator. A real
//! `nexa-coordinator serve` process on 127.0.0.1; this process enrols `workers`
//! simulated workers through the real challenge/enrol RPCs, each on its own HTTP/2
//! connection with its own Ed25519 key, then has each heartbeat at the coordinator's
//! interval for `seconds`. The coordinator's CPU and RSS are read from /proc for its
//! process alone, and the whole list is read back page by page as `nexa workers` does.

use nexa_proto::v1;
use nexa_proto::v1::worker_service_client::WorkerServiceClient;
use nexa_shared::signing::Identity;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// What the benchmark is asked to do.
pub struct Args {
    /// Simulated workers.
    pub workers: usize,
    /// Seconds of heartbeats measured.
    pub seconds: u64,
    /// The coordinator's heartbeat interval (each worker beats this often).
    pub heartbeat_ms: u64,
    /// Enrolments in flight at once.
    pub concurrency: usize,
    /// The coordinator binary (default: next to this one).
    pub coordinator: Option<std::path::PathBuf>,
}

/// The coordinator's CPU time so far (user + system), in seconds, and its RSS and
/// peak RSS in MB, from /proc.
pub(crate) fn usage(pid: u32) -> anyhow::Result<(f64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((ticks / clock_ticks(), kb("VmRSS:"), kb("VmHWM:")))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `msg` with `Bearer token`.
pub(crate) fn authed<T>(msg: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(r)
}

/// One simulated worker: its own connection and session.
pub(crate) struct Sim {
    pub(crate) client: WorkerServiceClient<Channel>,
    pub(crate) session: String,
}

/// Enrols simulated worker `n` on its own connection with a fresh key.
pub(crate) async fn enrol(url: String, n: usize) -> anyhow::Result<Sim> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = WorkerServiceClient::new(channel);
    let id = Identity::generate();
    let nonce = client
        .challenge(v1::ChallengeRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: id.public_key().to_vec(),
        })
        .await?
        .into_inner()
        .nonce;
    let session = client
        .enrol(v1::EnrolRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: id.public_key().to_vec(),
            signature: id.sign_enrolment(&nonce),
            nonce,
            name: format!("sim-{n}"),
            slots: 1,
            profile: Some(v1::HardwareProfile {
                hostname: format!("sim-{n}"),
                cores: 2,
                memory_total: 4 << 30,
                ..Default::default()
            }),
            enrol_token: String::new(),
        })
        .await?
        .into_inner()
        .session_token;
    Ok(Sim { client, session })
}

/// A coordinator process, killed when dropped (a failed bench leaves none running).
pub(crate) struct Coordinator(pub(crate) std::process::Child);

impl Coordinator {
    /// Its process id.
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILLs it and reaps it.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the coordinator binary beside this one on a free port; returns it and its URL
/// once it accepts connections.
pub(crate) fn start_coordinator(
    bin: Option<&Path>,
    data: &Path,
    heartbeat_ms: u64,
) -> anyhow::Result<(Coordinator, String)> {
    start_coordinator_with(bin, data, heartbeat_ms, &[])
}

/// As [`start_coordinator`], with more `serve` flags.
pub(crate) fn start_coordinator_with(
    bin: Option<&Path>,
    data: &Path,
    heartbeat_ms: u64,
    extra: &[&str],
) -> anyhow::Result<(Coordinator, String)> {
    let bin = match bin {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("nexa-coordinator"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: cargo build --release -p nexa-coordinator",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Coordinator(
        std::process::Command::new(&bin)
            .args(["serve", "--listen", &listen, "--data-dir"])
            .arg(data)
            .args([
                "--open-enrolment",
                "--operator-token",
                "bench",
                "--min-free",
                "0",
            ])
            .arg(format!("--heartbeat-ms={heartbeat_ms}"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            // Its log beside its data dir, appended to across restarts.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.with_extension("log"))?,
            )
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&listen).is_err() {
        if Instant::now() >= deadline {
            child.kill();
            anyhow::bail!("the coordinator did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, format!("http://{listen}")))
}

/// Runs the benchmark and prints its figures.
pub fn run(args: Args, scratch: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-workers-")
        .tempdir_in(scratch)?;
    let (mut child, url) = start_coordinator(
        args.coordinator.as_deref(),
        &dir.path().join("data"),
        args.heartbeat_ms,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&args, &url, child.id(), json));
    child.kill();
    result
}

async fn bench(args: &Args, url: &str, pid: u32, json: bool) -> anyhow::Result<()> {
    let (_, idle_rss, _) = usage(pid)?;
    // Enrolment, `concurrency` at a time.
    let started = Instant::now();
    let mut sims: Vec<Sim> = Vec::with_capacity(args.workers);
    let mut next = 0usize;
    let mut pending = tokio::task::JoinSet::new();
    while sims.len() < args.workers {
        while pending.len() < args.concurrency && next < args.workers {
            pending.spawn(enrol(url.to_string(), next));
            next += 1;
        }
        match pending.join_next().await {
            Some(r) => sims.push(r??),
            None => break,
        }
    }
    let enrol_s = started.elapsed().as_secs_f64();
    let (cpu0, rss_enrolled, _) = usage(pid)?;

    // Heartbeats: each worker at the interval, spread over it.
    let every = Duration::from_millis(args.heartbeat_ms);
    let phase = Duration::from_secs(args.seconds);
    let t0 = Instant::now();
    let end = t0 + phase;
    let mut beats = tokio::task::JoinSet::new();
    let n = sims.len().max(1) as u64;
    for (i, mut s) in sims.into_iter().enumerate() {
        let offset = every.mul_f64(i as f64 / n as f64);
        beats.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut at = t0 + offset;
            while at < end {
                tokio::time::sleep_until(at.into()).await;
                let sent = Instant::now();
                let req = match authed(v1::HeartbeatRequest::default(), &s.session) {
                    Ok(r) => r,
                    Err(_) => break,
                };
                match s.client.heartbeat(req).await {
                    Ok(_) => lat.push(sent.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => errors += 1,
                }
                at += every;
            }
            (lat, errors, s)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut kept = Vec::new();
    while let Some(r) = beats.join_next().await {
        let (l, e, s) = r?;
        lat.extend(l);
        errors += e;
        kept.push(s);
    }
    let beat_s = t0.elapsed().as_secs_f64();
    let (cpu1, rss, hwm) = usage(pid)?;
    let cores = (cpu1 - cpu0) / beat_s;
    lat.sort_by(f64::total_cmp);
    let handled = lat.len() as f64 / beat_s;
    let offered = args.workers as f64 * 1000.0 / args.heartbeat_ms as f64;

    // The whole list, page by page, as `nexa workers` reads it.
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    let mut control = v1::control_service_client::ControlServiceClient::new(channel);
    let listed_at = Instant::now();
    let (mut listed, mut active, mut pages, mut after) = (0usize, 0usize, 0usize, String::new());
    loop {
        let r = control
            .list_workers(authed(
                v1::ListWorkersRequest {
                    after: after.clone(),
                    limit: 0,
                },
                "bench",
            )?)
            .await?
            .into_inner();
        pages += 1;
        listed += r.workers.len();
        active += r
            .workers
            .iter()
            .filter(|w| w.state == v1::WorkerState::Active as i32)
            .count();
        if r.next_after.is_empty() {
            break;
        }
        after = r.next_after;
    }
    let list_ms = listed_at.elapsed().as_secs_f64() * 1000.0;
    drop(kept);
    anyhow::ensure!(
        listed == args.workers,
        "listed {listed} of {} workers",
        args.workers
    );
    let p = |q: f64| super::mesh::percentile(&lat, q);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "workers": args.workers, "enrol_per_s": args.workers as f64 / enrol_s,
                "heartbeat_ms": args.heartbeat_ms, "seconds": beat_s,
                "heartbeats_offered_per_s": offered, "heartbeats_per_s": handled,
                "heartbeat_errors": errors, "p50_heartbeat_ms": p(0.5), "p99_heartbeat_ms": p(0.99),
                "coordinator_cpu_cores": cores, "coordinator_rss_mb": rss,
                "coordinator_peak_rss_mb": hwm, "coordinator_rss_before_mb": idle_rss,
                "coordinator_rss_enrolled_mb": rss_enrolled,
                "active": active, "list_pages": pages, "list_ms": list_ms,
            })
        );
    } else {
        println!(
            "{} simulated workers, each its own connection and key, on one nexa-coordinator",
            args.workers
        );
        println!(
            "  enrolled at {:.0}/s ({enrol_s:.1} s); coordinator RSS {idle_rss:.0} MB before, {rss_enrolled:.0} MB enrolled",
            args.workers as f64 / enrol_s
        );
        println!(
            "  heartbeats every {} ms for {beat_s:.1} s: {handled:.0}/s handled of {offered:.0}/s offered, {errors} errors, p50 {:.2} ms, p99 {:.2} ms",
            args.heartbeat_ms,
            p(0.5),
            p(0.99)
        );
        println!(
            "  coordinator: {cores:.2} cores, RSS {rss:.0} MB (peak {hwm:.0} MB); {active} active"
        );
        println!("  listed all in {pages} pages in {list_ms:.0} ms");
    }
    Ok(())
}
