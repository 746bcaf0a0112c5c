//! The Nexa worker: asks its coordinator for leases, stages inputs by content digest into
//! a local content-addressed cache, runs the job, hashes and signs its outputs, and
//! reports. The same loop serves the embedded engine (in-process link) and the mesh.

pub mod allocation;
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

/// A lease asked for and still to come.
pub struct NextLease<'a>(std::pin::Pin<Box<dyn Future<Output = Option<Lease>> + Send + 'a>>);

impl<'a> NextLease<'a> {
    /// The ask that `lease` answers.
    pub fn new(lease: impl Future<Output = Option<Lease>> + Send + 'a) -> Self {
        Self(Box::pin(lease))
    }

    /// Waits for the lease; `None` when the coordinator is going away.
    pub async fn lease(self) -> Option<Lease> {
        self.0.await
    }
}

/// What a worker needs from its coordinator, whatever carries it.
pub trait CoordinatorLink: Send + Sync + 'static {
    /// Waits for the next lease; `None` when the coordinator is going away.
    fn next_lease(&self) -> impl Future<Output = Option<Lease>> + Send;
    /// Reports a finished job.
    fn report(&self, result: JobResult) -> impl Future<Output = ()> + Send;
    /// Reports a finished job and asks for the next lease with it, in one call where
    /// the link can (the mesh's `Exchange`). Resolves once the result is delivered, as
    /// [`CoordinatorLink::report`] does, with the ask still open: waiting for the lease
    /// may be given up (the worker stops) without losing the result.
    fn report_and_ask(&self, result: JobResult) -> impl Future<Output = NextLease<'_>> + Send {
        async move {
            self.report(result).await;
            NextLease::new(self.next_lease())
        }
    }
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
    /// Stop once no job has run for this long (a Slurm pilot gives its allocation
    /// back); `None`: never.
    pub max_idle: Option<std::time::Duration>,
}

/// How many jobs run now and when the last one ended: what `max_idle` watches.
#[derive(Debug)]
struct Activity {
    busy: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            busy: std::sync::atomic::AtomicUsize::new(0),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

/// A job running; dropped when it ends.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Activity {
    fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(self.clone())
    }

    fn idle_for(&self) -> Option<std::time::Duration> {
        (self.busy.load(std::sync::atomic::Ordering::SeqCst) == 0).then(|| {
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }

    /// A stop signal that turns true with `outer`, or once no job has run for `max`.
    fn stop_when_idle(
        self: Arc<Self>,
        max: std::time::Duration,
        mut outer: watch::Receiver<bool>,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(*outer.borrow());
        tokio::spawn(async move {
            let step = (max / 4).clamp(
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(1),
            );
            loop {
                tokio::select! {
                    _ = outer.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(step) => {}
                }
                if self.idle_for().is_some_and(|idle| idle >= max) {
                    tracing::info!(idle = ?max, "no job for the idle limit: stopping");
                    break;
                }
            }
            let _ = tx.send(true);
        });
        rx
    }
}

/// Whether this worker is stopping, or starts to within a second: a signal that ends
/// the worker's allocation (Slurm's scancel, a preemption) reaches its jobs and the
/// worker at once, and a job may die of it before the worker has noticed.
async fn stopping_soon(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(1), shutdown.wait_for(|s| *s))
        .await
        .is_ok_and(|r| r.is_ok())
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
    let activity = Arc::new(Activity::default());
    let shutdown = match cfg.max_idle {
        Some(max) => activity.clone().stop_when_idle(max, shutdown),
        None => shutdown,
    };
    let mut tasks = Vec::new();
    for slot in 0..cfg.slots.max(1) {
        let link = link.clone();
        let cfg = cfg.clone();
        let identity = identity.clone();
        let cas = cas.clone();
        let gpus = gpus.clone();
        let mut shutdown = shutdown.clone();
        let activity = activity.clone();
        tasks.push(tokio::spawn(async move {
            // The lease asked for with the last report.
            let mut asked: Option<NextLease<'_>> = None;
            loop {
                if *shutdown.borrow() {
                    break;
                }
                let next = asked.take();
                let lease = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => None,
                    l = async {
                        match next {
                            Some(n) => n.lease().await,
                            None => link.next_lease().await,
                        }
                    } => l,
                };
                let Some(lease) = lease else { break };
                let _busy = activity.busy();
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
                if result.outcome == nexa_shared::job::Outcome::Failed
                    && result.exit_code.is_none()
                    && stopping_soon(&mut shutdown).await
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
                if *shutdown.borrow() {
                    link.report(result).await;
                } else {
                    asked = Some(link.report_and_ask(result).await);
                }
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "worker slot panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A coordinator that hands out one lease, then none, and keeps what is reported.
    struct OneLease {
        lease: Mutex<Option<Lease>>,
        reported: Mutex<Vec<JobResult>>,
        /// Kept so that the job is never cancelled.
        cancels: Mutex<Vec<watch::Sender<bool>>>,
    }

    impl CoordinatorLink for OneLease {
        async fn next_lease(&self) -> Option<Lease> {
            let next = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
            match next {
                Some(l) => Some(l),
                None => std::future::pending().await,
            }
        }
        async fn report(&self, result: JobResult) {
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(result);
        }
        fn cancellation(&self, _: &Lease) -> watch::Receiver<bool> {
            let (tx, rx) = watch::channel(false);
            self.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tx);
            rx
        }
        fn progress(&self, _: &Lease, _: nexa_shared::job::JobProgress) {}
        async fn fetch_input(&self, _: &JobInput, _: &Path) -> std::result::Result<(), String> {
            Err("no inputs here".into())
        }
    }

    /// A link holding one exec job running `script`, a one-slot worker config in `dir`
    /// (`slots`, `max_idle`), and an identity.
    fn one_job(
        dir: &Path,
        script: &str,
        slots: usize,
        max_idle: Option<std::time::Duration>,
    ) -> (Arc<OneLease>, WorkerConfig, Arc<Identity>) {
        let lease = Lease {
            job: nexa_shared::job::JobSpec {
                job_id: "j".to_string().into(),
                run_id: "r".to_string().into(),
                step_id: "s".into(),
                uses: "exec".into(),
                params: serde_json::json!({ "run": script }),
                outputs: vec!["out".into()],
                ..Default::default()
            },
            generation: 1,
            attempt: 1,
            gpus: Vec::new(),
        };
        let link = Arc::new(OneLease {
            lease: Mutex::new(Some(lease)),
            reported: Mutex::new(Vec::new()),
            cancels: Mutex::new(Vec::new()),
        });
        let cfg = WorkerConfig {
            name: "w".into(),
            slots,
            work_dir: dir.to_path_buf(),
            profile: nexa_shared::hardware::Profile::default(),
            executor: sandbox::Executor::process(),
            metrics: None,
            services: None,
            max_idle,
        };
        let identity = Arc::new(Identity::load_or_create(&dir.join("key")).expect("key"));
        (link, cfg, identity)
    }

    /// Runs one job that kills itself with SIGTERM; the worker is told to stop
    /// `stop_after` after the job starts (never, when `None`). Returns what it reported.
    async fn killed_job(stop_after: Option<std::time::Duration>) -> Vec<JobResult> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (link, cfg, identity) = one_job(dir.path(), "sleep 0.2; kill -TERM $$", 1, None);
        let (tx, rx) = watch::channel(false);
        let worker = tokio::spawn(run(link.clone(), cfg, identity, rx));
        if let Some(d) = stop_after {
            tokio::time::sleep(d).await;
            let _ = tx.send(true);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let reported = !link
                .reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            if worker.is_finished() || reported || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = tx.send(true);
        let _ = worker.await;
        link.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    #[tokio::test]
    async fn a_job_killed_as_its_worker_stops_is_left_to_run_elsewhere_and_any_other_is_reported() {
        // The signal reached the job first and the worker a moment later, as when
        // Slurm ends a pilot's allocation: nothing is reported, the lease is left to
        // expire.
        let left = killed_job(Some(std::time::Duration::from_millis(400))).await;
        assert!(left.is_empty(), "reported: {left:?}");
        // No stop: a job that died of a signal is the job's failure, reported.
        let failed = killed_job(None).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].outcome, nexa_shared::job::Outcome::Failed);
        assert_eq!(failed[0].exit_code, None);
    }

    #[tokio::test]
    async fn a_worker_with_max_idle_stops_once_no_job_ran_that_long_and_not_while_one_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idle = Some(std::time::Duration::from_millis(300));
        let (link, cfg, identity) = one_job(dir.path(), "sleep 0.6", 2, idle);
        let (_tx, rx) = watch::channel(false);
        let started = std::time::Instant::now();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            run(link.clone(), cfg, identity, rx),
        )
        .await
        .expect("the idle worker stopped by itself");
        let took = started.elapsed();
        let reported = link
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        assert_eq!(
            reported, 1,
            "the running job finished and was reported first"
        );
        // 0.6 s of job, then 0.3 s idle (checked every 75 ms).
        assert!(
            took >= std::time::Duration::from_millis(850),
            "stopped while its job ran, or before its idle time: {took:?}"
        );
    }
}
