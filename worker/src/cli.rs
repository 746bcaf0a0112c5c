//! The `nexa-worker` command line: `join` and `profile`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// A Nexa worker.
/// The worker's arguments.
#[derive(Parser)]
#[command(name = "nexa-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join a coordinator and run its jobs, reconnecting forever.
    Join(Box<JoinArgs>),
    /// Print what this machine offers: CPU, memory, disk, GPUs (NVML), runtimes.
    Profile {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where free disk is measured (the worker's work directory).
        #[arg(long, default_value = ".")]
        work_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The coordinator, e.g. http://coord:7070 (https:// with --ca).
    url: String,
    /// The enrolment token the operator gave you.
    #[arg(long, env = "NEXA_ENROL_TOKEN")]
    token: Option<String>,
    /// A name shown to the operator [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Jobs at once [default: the machine's cores].
    #[arg(long)]
    slots: Option<u32>,
    /// GPUs to offer: all, none, or indices like 0,2.
    #[arg(long, default_value = "all")]
    gpus: String,
    /// Extra labels jobs can ask for, k=v (repeatable).
    #[arg(long = "labels", alias = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where job directories and the input cache live.
    #[arg(long, env = "NEXA_WORK_DIR", default_value = "nexa-worker")]
    work_dir: PathBuf,
    /// The identity key [default: $XDG_CONFIG_HOME/nexa/worker.key, else ~/.config/nexa/worker.key].
    #[arg(long, env = "NEXA_WORKER_KEY")]
    key: Option<PathBuf>,
    /// CA certificate to trust for https:// coordinators.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// How jobs run: `process` (on this host; steps that name an image still run in a
    /// container) or `docker` (every job in a sandboxed container, never on the host).
    #[arg(long, value_enum, default_value = "process")]
    executor: ExecutorKind,
    /// With `--executor docker`: the image for steps that name none [default: such
    /// steps are not taken].
    #[arg(long)]
    default_image: Option<String>,
    /// Let container jobs that ask for it (`params.network: true`) have a network
    /// [default: no job gets one].
    #[arg(long)]
    allow_job_network: bool,
    /// Host the model servers `runners.serve` steps start: they run on after their
    /// job, hold their GPUs, are reported in heartbeats and stopped by the coordinator
    /// (`nexa serve stop --coordinator`) [default: serve steps go to other workers].
    #[arg(long)]
    services: bool,
    /// Exit once no job has run for this long, e.g. `2m` (a Slurm pilot gives its
    /// allocation back) [default: never].
    #[arg(long, value_parser = humantime::parse_duration)]
    max_idle: Option<std::time::Duration>,
    /// Do not look for the job interpreter's packages or docker: this worker offers
    /// neither, and takes no ML runner step and no step naming an image unless its
    /// `--label`s say so (a Slurm pilot for steps that need neither) [default: probe,
    /// beside enrolment].
    #[arg(long)]
    no_probe: bool,
    /// Serve this worker's /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9101).
    #[arg(long, env = "NEXA_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

/// `--executor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExecutorKind {
    /// Jobs run as processes on this host.
    Process,
    /// Jobs run only in sandboxed containers.
    Docker,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("label {s:?} must look like key=value"))
}

fn default_key_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("nexa").join("worker.key")
}

/// `<key>.lock` beside the key.
fn lock_path_of(key: &std::path::Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes an exclusive lock on `path` (created), failing with `busy()` if another process
/// holds it. The kernel releases it when the process dies, even by SIGKILL.
fn lock_exclusive(
    path: &std::path::Path,
    busy: impl FnOnce() -> String,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        match errno {
            nix::errno::Errno::EWOULDBLOCK => anyhow::anyhow!(busy()),
            e => anyhow::anyhow!("lock {}: {e}", path.display()),
        }
    })
}

fn join(a: JoinArgs, allow_fake_gpus: bool) -> anyhow::Result<()> {
    use crate::remote::{Enrolment, GrpcLink};
    use std::sync::Arc;
    // Probing the job interpreter's packages and docker takes a few hundred
    // milliseconds of CPU (a Slurm pilot's start, many of them at once on a node): it
    // runs beside the rest of the start and enrolment, and its labels follow in a
    // heartbeat (the profile says `runtimes_pending` until then).
    let probe = (!a.no_probe).then(|| std::thread::spawn(crate::profile::probe_runtimes));
    std::fs::create_dir_all(&a.work_dir)?;
    let work_dir = std::path::absolute(&a.work_dir)?;
    let key_path = a.key.unwrap_or_else(default_key_path);
    // One worker process per key and per work dir: a second one would share the first's
    // identity (and sessions) and reap its jobs as orphans. Held until the process ends.
    let _key_lock = lock_exclusive(&lock_path_of(&key_path), || {
        format!(
            "the key {} is in use by another nexa-worker on this machine; give this one its own with --key and --work-dir",
            key_path.display()
        )
    })?;
    let _dir_lock = lock_exclusive(&work_dir.join(".lock"), || {
        format!(
            "the work dir {} is in use by another nexa-worker; give this one its own with --work-dir",
            work_dir.display()
        )
    })?;
    let identity = Arc::new(nexa_shared::signing::Identity::load_or_create(&key_path)?);
    let mut profile = crate::profile::profile_with(&work_dir, false, allow_fake_gpus);
    profile.runtimes_pending = probe.is_some();
    let gpus_filter = parse_gpu_filter(&a.gpus)?;
    apply_gpu_filter(&mut profile, &gpus_filter);
    profile.labels.extend(a.labels);
    // Inside a Slurm allocation (a pilot): only what it holds, labelled with it.
    let allocation = crate::allocation::Allocation::from_env();
    if let Some(alloc) = &allocation {
        alloc.apply(&mut profile, a.gpus != "all");
    }
    if a.services && a.executor == ExecutorKind::Docker {
        anyhow::bail!(
            "--services runs model servers on this host with its own Python; it does not go \
             with --executor docker, which runs nothing on the host"
        );
    }
    if a.services {
        profile
            .labels
            .insert(nexa_shared::hardware::SERVICES_LABEL.into(), "yes".into());
    }
    let executor = executor_of(a.executor, a.default_image, a.allow_job_network)?;
    {
        use nexa_shared::hardware::{DEFAULT_IMAGE_LABEL, DOCKER_LABEL, SANDBOX_LABEL};
        if executor.sandbox_only {
            let version = crate::sandbox::docker_works(&executor.docker)
                .map_err(|e| anyhow::anyhow!("--executor docker: {e}"))?;
            profile.labels.insert(DOCKER_LABEL.into(), version);
            profile.labels.insert(SANDBOX_LABEL.into(), "docker".into());
            if let Some(image) = &executor.default_image {
                profile
                    .labels
                    .insert(DEFAULT_IMAGE_LABEL.into(), image.clone());
            }
        }
        let reaped = crate::sandbox::reap_orphans(&executor.docker, &work_dir);
        if reaped > 0 {
            eprintln!("removed {reaped} job container(s) left by a previous run");
        }
    }
    let slots = a
        .slots
        .or(allocation.as_ref().and_then(|al| al.cpus))
        .unwrap_or(profile.cores.max(1));
    let name = a.name.unwrap_or_else(|| profile.hostname.clone());
    let ca = a.ca.map(std::fs::read).transpose()?;
    eprintln!(
        "nexa-worker {name}: {} slots, {} GPU(s), key {} ({})",
        slots,
        profile.gpus.len(),
        hex_prefix(&identity.public_key()),
        key_path.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let link = GrpcLink::new(
            &a.url,
            identity.clone(),
            Enrolment {
                name: name.clone(),
                slots,
                profile: profile.clone(),
                token: a.token,
            },
            ca,
        )
        .map_err(anyhow::Error::msg)?;
        if let Err(s) = link.enrol_until_done().await {
            anyhow::bail!("enrolment refused: {}", s.message());
        }
        eprintln!("joined {} as {}", a.url, link.worker_id());
        if let Some(probe) = probe {
            let link = link.clone();
            tokio::spawn(async move {
                let labels = tokio::task::spawn_blocking(move || probe.join())
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or_default();
                tracing::info!(labels = ?labels, "runtimes probed");
                link.runtimes_probed(labels);
            });
        }
        {
            let (dir, gpus_arg) = (work_dir.clone(), gpus_filter.clone());
            let (alloc, explicit) = (allocation.clone(), a.gpus != "all");
            link.set_profiler(Arc::new(move || {
                let mut p = crate::profile::profile_with(&dir, false, allow_fake_gpus);
                apply_gpu_filter(&mut p, &gpus_arg);
                if let Some(al) = &alloc {
                    al.apply(&mut p, explicit);
                }
                p
            }));
        }
        let metrics = match &a.metrics_listen {
            None => None,
            Some(addr) => {
                let m = Arc::new(crate::metrics::WorkerMetrics::new()?);
                m.slots.set(i64::from(slots));
                m.gpus.set(profile.gpus.len() as i64);
                m.sandboxed.set(i64::from(executor.sandbox_only));
                m.connected.set(1);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
                eprintln!("metrics on {}", listener.local_addr()?);
                link.set_metrics(m.clone());
                let served = m.clone();
                tokio::spawn(async move {
                    let forever = std::future::pending::<()>();
                    if let Err(e) = crate::metrics::serve_http(listener, served, forever).await {
                        tracing::error!(error = %e, "the metrics port stopped");
                    }
                });
                Some(m)
            }
        };
        let services = a.services.then(crate::services::ServiceTable::new);
        if let Some(table) = &services {
            link.set_services(table.clone());
            table.spawn_checks(std::time::Duration::from_secs(1));
        }
        let heartbeats = link.spawn_heartbeats();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            let _ = tx.send(true);
        });
        let cfg = crate::WorkerConfig {
            name,
            slots: slots as usize,
            work_dir,
            profile,
            executor,
            metrics,
            services,
            max_idle: a.max_idle,
        };
        // Without heartbeats every lease would expire under the worker: should their
        // task die (a bug), the worker stops with the reason, to be restarted.
        tokio::select! {
            () = crate::run(link, cfg, identity, rx) => Ok(()),
            ended = heartbeats => Err(anyhow::anyhow!(
                "the heartbeat task stopped ({}); the worker exits so that it can be restarted",
                match ended {
                    Err(e) if e.is_panic() => "it panicked",
                    _ => "it ended",
                }
            )),
        }
    })
}

/// The executor the flags ask for.
fn executor_of(
    kind: ExecutorKind,
    default_image: Option<String>,
    allow_network: bool,
) -> anyhow::Result<crate::sandbox::Executor> {
    if let Some(i) = &default_image {
        nexa_shared::spec::check_image(i).map_err(|e| anyhow::anyhow!("--default-image: {e}"))?;
        if kind != ExecutorKind::Docker {
            anyhow::bail!("--default-image goes with --executor docker");
        }
    }
    Ok(crate::sandbox::Executor {
        sandbox_only: kind == ExecutorKind::Docker,
        default_image,
        allow_network,
        docker: std::env::var("NEXA_DOCKER").unwrap_or_else(|_| "docker".into()),
    })
}

/// `--gpus`: `None` for all, else the indices to offer.
fn parse_gpu_filter(arg: &str) -> anyhow::Result<Option<Vec<u32>>> {
    match arg {
        "all" => Ok(None),
        "none" => Ok(Some(Vec::new())),
        list => list
            .split(',')
            .map(|x| x.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--gpus takes all, none or indices like 0,2")),
    }
}

fn apply_gpu_filter(p: &mut nexa_shared::hardware::Profile, keep: &Option<Vec<u32>>) {
    if let Some(keep) = keep {
        p.gpus.retain(|g| keep.contains(&g.index));
        if p.gpus.is_empty() && keep.is_empty() {
            p.gpu_note = Some("GPUs withheld by --gpus none".into());
        }
    }
}

fn hex_prefix(k: &[u8; 32]) -> String {
    k[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the CLI. `allow_fake_gpus` is true only in the test-only `nexa-worker-test`
/// binary (built only with the `fake-gpus` feature); `nexa-worker` passes false, so a
/// production worker never honours `NEXA_FAKE_GPUS`.
pub fn main(allow_fake_gpus: bool) -> ExitCode {
    nexa_shared::logging::init("warn");
    match Cli::parse().command {
        Cmd::Join(a) => match join(*a, allow_fake_gpus) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Profile { json, work_dir } => {
            let started = std::time::Instant::now();
            let p = crate::profile::profile_with(&work_dir, true, allow_fake_gpus);
            if json {
                match serde_json::to_string_pretty(&p) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                use nexa_shared::units::format_size;
                println!("{} ({}, {})", p.hostname, p.os, p.arch);
                println!("  cpu     {} x {}", p.cores, p.cpu_model);
                println!(
                    "  memory  {} total, {} available",
                    format_size(p.memory_total),
                    format_size(p.memory_available)
                );
                println!(
                    "  disk    {} free under {}",
                    format_size(p.disk_free),
                    work_dir.display()
                );
                for g in &p.gpus {
                    println!(
                        "  gpu {}   {} {} ({} total, {} free, compute {}.{}{})",
                        g.index,
                        g.name,
                        g.uuid,
                        format_size(g.memory_total),
                        format_size(g.memory_free),
                        g.compute_capability.0,
                        g.compute_capability.1,
                        if g.mig_enabled { ", MIG" } else { "" }
                    );
                }
                if let Some(d) = &p.driver_version {
                    println!(
                        "  driver  {d}, CUDA {}",
                        p.cuda_version.as_deref().unwrap_or("?")
                    );
                }
                if let Some(n) = &p.gpu_note {
                    println!("  {n}");
                }
                let labels: Vec<String> =
                    p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  labels  {}", labels.join(" "));
                println!("  (profiled in {} ms)", started.elapsed().as_millis());
            }
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexa_shared::hardware::{Gpu, Profile};

    fn gpu(i: u32) -> Gpu {
        Gpu {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "g".into(),
            memory_total: 1,
            memory_free: 1,
            compute_capability: (9, 0),
            mig_enabled: false,
        }
    }

    #[test]
    fn gpus_flag_offers_all_none_or_the_listed_indices() {
        let p = Profile {
            gpus: vec![gpu(0), gpu(1), gpu(2)],
            ..Profile::default()
        };
        let offered = |arg: &str| {
            let mut q = p.clone();
            apply_gpu_filter(&mut q, &parse_gpu_filter(arg).expect("valid"));
            q.gpus.iter().map(|g| g.index).collect::<Vec<_>>()
        };
        assert_eq!(offered("all"), [0, 1, 2]);
        assert_eq!(offered("none"), Vec::<u32>::new());
        assert_eq!(offered("0,2"), [0, 2]);
        assert!(parse_gpu_filter("first").is_err());
    }
}
