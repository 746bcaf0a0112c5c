//! `nexa pipeline run` on a login node: the embedded engine as a Slurm provider. When
//! the pipeline has `scheduler: slurm` steps and Slurm is there (`sbatch` on PATH, or
//! any `--slurm-*` flag), the run opens a listener for pilots only (the worker service,
//! enrolment by a token made for this run), and the coordinator's own provider
//! ([`nexa_coordinator::slurm`]) submits, scales and, when the run ends or is
//! cancelled, scancels the pilots. The local worker takes every other step, as ever.

use clap::Args;
use nexa_coordinator::Coordinator;
use nexa_coordinator::scheduler::EngineConfig;
use nexa_coordinator::slurm::{Provider, SlurmArgs, provider::SCHEDULER};
use std::path::Path;
use std::time::Duration;

/// The embedded run's Slurm flags.
#[derive(Debug, Args, Default)]
pub struct Flags {
    /// Where pilots connect, opened only for a pipeline with slurm steps [default:
    /// 0.0.0.0 on any port; pilots are told this host's name].
    #[arg(long = "slurm-listen")]
    pub listen: Option<String>,
    /// Submit no pilots even with sbatch on PATH (slurm steps then need pilots
    /// started by hand, which cannot reach an embedded run: they fail).
    #[arg(long = "no-slurm")]
    pub no_slurm: bool,
    /// The provider's settings (as `nexa-coordinator serve --slurm-*`).
    #[command(flatten)]
    pub provider: SlurmArgs,
}

/// Whether this run provides Slurm pilots: it has slurm steps, was not told not to,
/// and Slurm is here (sbatch on PATH) or a `--slurm-*` flag asks for it.
pub fn wanted(loaded: &nexa_shared::spec::Loaded, flags: &Flags) -> bool {
    let has = loaded
        .pipeline
        .steps
        .iter()
        .any(|s| s.scheduler.as_deref() == Some(SCHEDULER));
    has && !flags.no_slurm && (flags.provider.any() || flags.listen.is_some() || on_path("sbatch"))
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// The embedded engine's settings; with pilots, leases of remote workers expire as on
/// the mesh (the local worker's never do), and slurm steps wait for their pilots.
pub fn engine_config(cluster: bool) -> EngineConfig {
    let mut c = EngineConfig::embedded();
    if cluster {
        let mesh = nexa_coordinator::mesh::MeshConfig::new(".".into());
        c.lease_ttl = Some(mesh.lease_ttl);
        c.provided_schedulers = vec![SCHEDULER.to_string()];
        c.resident_workers = vec![crate::embedded::LOCAL_WORKER.to_string()];
    }
    c
}

/// The pilots' side of an embedded run: the listener and the provider.
pub struct Pilots {
    provider: Provider,
    job_name: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

/// Opens the pilots' listener on `coord` and starts the provider; `state_dir` keeps
/// the pilots' id, uploads and logs.
pub async fn start(coord: &Coordinator, flags: Flags, state_dir: &Path) -> anyhow::Result<Pilots> {
    let listen = flags.listen.unwrap_or_else(|| "0.0.0.0:0".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("--slurm-listen {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    let mut b = [0u8; 24];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let token = hex::encode(b);
    let dir = state_dir.join("mesh");
    std::fs::create_dir_all(&dir)?;
    let mut mesh = nexa_coordinator::mesh::MeshConfig::new(dir.clone());
    mesh.enrol_token = Some(token.clone());
    let service = nexa_coordinator::mesh::worker_service(coord.clone(), mesh);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(
                // TCP_NODELAY on every accepted connection: the builder's tcp_nodelay
                // applies only to listeners tonic binds itself, and without it a streamed
                // response's second small frame waits ~40 ms for the peer's delayed ACK.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the pilots' listener stopped");
        }
    });
    let url = nexa_coordinator::slurm::url_of(bound, false);
    let cfg = flags
        .provider
        .config(&dir, url, Some(token))
        .map_err(anyhow::Error::msg)?;
    eprintln!(
        "slurm steps run in pilots ({}) that reach this run at {}",
        cfg.job_name, cfg.url
    );
    let job_name = cfg.job_name.clone();
    Ok(Pilots {
        provider: Provider::spawn(coord.clone(), cfg),
        job_name,
        stop,
        server,
    })
}

impl Pilots {
    /// Scancels every pilot, stops the provider and the listener.
    pub async fn stop(self) {
        self.provider.stop().await;
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }

    /// Scancels every pilot at once, from a process about to exit (a second Ctrl-C).
    pub fn cancel_now(&self) {
        let _ = std::process::Command::new("scancel")
            .args(["-n", &self.job_name])
            .status();
    }
}
