//! The embedded default: an in-process coordinator and an in-process worker, joined by a
//! [`LocalLink`] that carries leases and results over the coordinator's own message
//! interface, exactly as the gRPC edge will.

use nexa_coordinator::scheduler::{RunHandle, RunRequest};
use nexa_coordinator::{Coordinator, SledStore, Store};
use nexa_shared::job::{JobInput, JobResult, Lease};
use nexa_shared::signing::Identity;
use nexa_worker::{CoordinatorLink, WorkerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// The in-process link between the embedded worker and coordinator.
pub struct LocalLink {
    coord: Coordinator,
    worker: String,
}

impl CoordinatorLink for LocalLink {
    async fn next_lease(&self) -> Option<Lease> {
        self.coord.lease(&self.worker).await
    }

    async fn report(&self, result: JobResult) {
        if let Err(e) = self.coord.report(&self.worker, result) {
            tracing::warn!(error = %e, "reporting a result to the embedded coordinator");
        }
    }

    fn progress(&self, lease: &Lease, progress: nexa_shared::job::JobProgress) {
        let _ = self.coord.job_progress(
            &self.worker,
            lease.job.job_id.clone(),
            lease.generation,
            progress,
        );
    }

    fn cancellation(&self, lease: &Lease) -> watch::Receiver<bool> {
        self.coord.cancellation(&lease.job.run_id)
    }

    async fn fetch_input(&self, input: &JobInput, dest: &Path) -> Result<(), String> {
        let (src, dest) = (input.source.clone(), dest.to_path_buf());
        let range = input.range.clone();
        tokio::task::spawn_blocking(move || match range {
            // A range shard: its spans of the input, read straight from it.
            Some(r) => r.write_to(&dest).map_err(|e| e.to_string()),
            None => nexa_worker::cas::copy_local(&src, &dest),
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The embedded worker's id.
pub const LOCAL_WORKER: &str = "local";

/// The embedded worker: where it works, who it is, what it offers.
#[derive(Debug, Clone)]
pub struct LocalWorker {
    /// Its job directories and input cache.
    pub work_dir: PathBuf,
    /// Its identity key.
    pub key_path: PathBuf,
    /// Jobs at once.
    pub slots: usize,
    /// Offer the local docker for steps that name an image.
    pub containers: bool,
    /// Probe the job interpreter's packages (labels `python.*`) for the ML runners.
    pub python: bool,
}

/// A running embedded engine.
pub struct Embedded {
    /// The coordinator handle.
    pub coordinator: Coordinator,
    shutdown: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
    engine: tokio::task::JoinHandle<()>,
}

/// Where a pipeline's state lives in a project.
pub fn state_dir(project: &Path, pipeline: &str) -> PathBuf {
    project
        .join(".nexa_state")
        .join(nexa_shared::paths::safe_component(pipeline))
}

/// Opens the pipeline's sled store (`.nexa_state/<pipeline>/store`).
pub fn open_store(project: &Path, pipeline: &str) -> nexa_coordinator::Result<SledStore> {
    let dir = state_dir(project, pipeline);
    std::fs::create_dir_all(&dir)
        .map_err(|e| nexa_coordinator::Error::Domain(nexa_shared::Error::io("create", &dir, e)))?;
    SledStore::open(&dir.join("store"))
}

impl Embedded {
    /// Starts a coordinator on `store` (with `engine`'s settings) and the local worker
    /// `local` describes; `held_gpus` names (by UUID) the GPUs services started earlier
    /// still hold, which this run's jobs do not get (asked only when the machine has
    /// GPUs).
    pub fn start(
        store: Arc<dyn Store>,
        engine: nexa_coordinator::scheduler::EngineConfig,
        local: LocalWorker,
        held_gpus: &dyn Fn() -> Vec<String>,
    ) -> anyhow::Result<Self> {
        let LocalWorker {
            work_dir,
            key_path,
            slots,
            containers,
            python,
        } = local;
        let identity = Arc::new(Identity::load_or_create(&key_path)?);
        let (coordinator, engine) = Coordinator::start(store, engine);
        let name = LOCAL_WORKER.to_string();
        std::fs::create_dir_all(&work_dir)?;
        let mut profile = nexa_worker::profile::profile(&work_dir, false);
        if python {
            profile.labels.extend(nexa_worker::profile::python_labels());
        }
        if !profile.gpus.is_empty() {
            let held = held_gpus();
            if !held.is_empty() {
                tracing::info!(gpus = ?held, "GPUs held by running services are left out");
                profile.gpus.retain(|g| !held.contains(&g.uuid));
            }
        }
        profile
            .labels
            .insert(nexa_shared::hardware::SERVICES_LABEL.into(), "yes".into());
        if containers && let Ok(v) = nexa_worker::sandbox::docker_works("docker") {
            profile
                .labels
                .insert(nexa_shared::hardware::DOCKER_LABEL.into(), v);
        }
        coordinator.register_worker(
            &name,
            nexa_coordinator::scheduler::WorkerInfo {
                name: name.clone(),
                key: identity.public_key(),
                profile: profile.clone(),
                slots: slots as u32,
            },
        )?;
        let link = Arc::new(LocalLink {
            coord: coordinator.clone(),
            worker: name.clone(),
        });
        let (shutdown, rx) = watch::channel(false);
        let cfg = WorkerConfig {
            name,
            slots,
            work_dir,
            profile,
            executor: nexa_worker::sandbox::Executor::process(),
            metrics: None,
            services: Some(nexa_worker::services::ServiceTable::new()),
            max_idle: None,
        };
        let worker = tokio::spawn(nexa_worker::run(link, cfg, identity, rx));
        Ok(Self {
            coordinator,
            shutdown,
            worker,
            engine,
        })
    }

    /// Submits a run.
    pub async fn submit(&self, req: RunRequest) -> nexa_coordinator::Result<RunHandle> {
        self.coordinator.submit(req).await
    }

    /// Stops the worker and the coordinator, flushing the store.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.coordinator.shutdown();
        let _ = self.worker.await;
        let _ = self.engine.await;
    }
}

/// The project's git commit, when the project is a git checkout.
pub fn git_sha(project: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(project)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}
