//! The Nexa worker: asks its coordinator for leases, stages inputs by content digest into
//! a local content-addressed cache, runs the job, hashes and signs its outputs, and
//! reports. The same loop serves the embedded engine (in-process link) and the mesh.

pub mod cas;
pub mod cli;
pub mod error;
pub mod exec;
pub mod gpus;
pub mod metrics;
pub mod outputs;
pub mod profile;
pub mod remote;
pub mod runners;
pub mod sandbox;
pub mod services;

pub use error::{Error, Result};

use nexa_shared::job::{JobInput, JobResult, Lease};
use nexa_shared::signing::Identity;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// What a worker needs from its coordinator, whatever carries it.
pub trait CoordinatorLink: Send + Sync + 'static {
    /// Waits for the next lease; `None` when the coordinator is going away.
    fn next_lease(&self) -> impl Future<Output = Option<Lease>> + Send;
    /// Reports a finished job.
    fn report(&self, result: JobResult) -> impl Future<Output = ()> + Send;
    /// A signal that turns `true` when the leased job must be killed (its run was
    /// cancelled, or the lease was lost).
    fn cancellation(&self, lease: &Lease) -> watch::Receiver<bool>;
    /// The leased job said how far it is (a `::nexa-progress::` line in its output);
    /// best effort, never blocks.
    fn progress(&self, lease: &Lease, progress: nexa_shared::job::JobProgress);
    /// Writes the content of `input` to `dest` (a file, or a directory tree).
    fn fetch_input(
        &self,
        input: &JobInput,
        dest: &Path,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;
}

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's name.
    pub name: String,
    /// Concurrent jobs.
    pub slots: usize,
    /// Where job directories and the input cache live.
    pub work_dir: PathBuf,
    /// What this worker has (its GPUs are handed to jobs).
    pub profile: nexa_shared::hardware::Profile,
    /// How jobs run: as processes, or sandboxed in containers.
    pub executor: sandbox::Executor,
    /// The worker's own metrics, when exported.
    pub metrics: Option<Arc<metrics::WorkerMetrics>>,
    /// Where the servers `runners.serve` jobs leave running are kept, when this worker
    /// hosts services at all: embedded (the user stops them with `nexa serve stop`, by
    /// handle) or `nexa-worker join --services` (the coordinator stops them through
    /// heartbeats). `None`: serve jobs are refused.
    pub services: Option<Arc<services::ServiceTable>>,
}

/// Runs `cfg.slots` job loops until `shutdown` turns true or the link closes.
pub async fn run<L: CoordinatorLink>(
    link: Arc<L>,
    cfg: WorkerConfig,
    identity: Arc<Identity>,
    shutdown: watch::Receiver<bool>,
) {
    let cas = Arc::new(cas::Cas::new(cfg.work_dir.join("cas")));
    let gpus = Arc::new(gpus::GpuPool::new(cfg.profile.clone()));
    let mut tasks = Vec::new();
    for slot in 0..cfg.slots.max(1) {
        let link = link.clone();
        let cfg = cfg.clone();
        let identity = identity.clone();
        let cas = cas.clone();
        let gpus = gpus.clone();
        let mut shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let lease = tokio::select! {
                    l = link.next_lease() => l,
                    _ = shutdown.wait_for(|s| *s) => None,
                };
                let Some(lease) = lease else { break };
                tracing::debug!(worker = %cfg.name, slot, job = %lease.job.job_id, "running job");
                let cancel = link.cancellation(&lease);
                if let Some(m) = &cfg.metrics {
                    m.running.inc();
                }
                let mut result = exec::run_job(
                    link.as_ref(),
                    &exec::Host {
                        cas: &cas,
                        gpus: &gpus,
                        work_dir: &cfg.work_dir,
                        executor: &cfg.executor,
                        memory_share: cfg.profile.memory_total / cfg.slots.max(1) as u64,
                        services: cfg.services.is_some(),
                    },
                    &lease,
                    cancel,
                )
                .await;
                if *shutdown.borrow()
                    && result.outcome == nexa_shared::job::Outcome::Failed
                    && result.exit_code.is_none()
                {
                    // Killed by a signal while this worker stops (a Slurm pilot
                    // scancelled or preempted: Slurm signals the whole allocation). Not
                    // the job's failure: it is not reported, its lease expires once this
                    // worker is gone, and it runs elsewhere.
                    tracing::warn!(job = %lease.job.job_id, "the job was killed as this worker stops: left to run elsewhere");
                    if let Some(m) = &cfg.metrics {
                        m.running.dec();
                    }
                    break;
                }
                if let Some(table) = &cfg.services
                    && lease.job.uses == nexa_shared::runners::SERVE
                    && result.outcome == nexa_shared::job::Outcome::Succeeded
                    && let (Some(staging), [output]) =
                        (&result.staging, lease.job.outputs.as_slice())
                    && let Err(e) = table.adopt(&lease, &staging.join(output), &gpus)
                {
                    tracing::warn!(job = %lease.job.job_id, error = %e, "could not adopt the service");
                }
                if let Some(m) = &cfg.metrics {
                    m.running.dec();
                    let secs = result.ended_ms.saturating_sub(result.started_ms) as f64 / 1e3;
                    m.finished(result.outcome.as_str(), secs);
                }
                identity.sign_result(&mut result);
                link.report(result).await;
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "worker slot panicked");
        }
    }
}
