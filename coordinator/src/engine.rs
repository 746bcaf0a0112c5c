//! The scheduler loop: one task owns all run, step and job state and consumes a closed
//! set of [`Event`]s. Handlers (the in-process worker link today, the gRPC edge with the
//! mesh) talk to it only through [`Coordinator`].

use crate::planner::{self, Plan, RunContext, StepPlan};
use crate::seal_queue::{SealQueue, SealTask, keep_log};

mod blame;
mod replication;
use crate::sealer::{self, ShardSealed};
use crate::state::{self, ArtifactInfo, RunRecord, ShardRecord, StepRecord, StepStatus};
use crate::{Error, Result, Store, mirror};
use nexa_shared::hardware::{self, Profile, Requirements};
use nexa_shared::job::{JobInput, JobResult, JobSpec, Lease, Outcome};
use nexa_shared::spec::Loaded;
use nexa_shared::{paths, signing};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// What to run.
#[derive(Debug)]
pub struct RunRequest {
    /// The validated pipeline and its graph.
    pub loaded: Loaded,
    /// The project (artifact) root; relative paths in the pipeline resolve against it.
    pub project: PathBuf,
    /// Re-hash cached artifacts before reusing them.
    pub verify: bool,
    /// `rerun --from STEP`: ignore the step-level cache of STEP and everything downstream.
    pub from: Option<String>,
    /// The project's git commit, recorded in artifact labels.
    pub git_sha: Option<String>,
    /// Reuse this run id (a run resumed after a coordinator restart keeps its id).
    pub run_id: Option<String>,
    /// Inputs must resolve inside the project (a submitted pipeline reads only what was
    /// uploaded with it); embedded runs may read any local path.
    pub confined: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOutcome {
    /// Every step COMPLETE or SKIPPED.
    Succeeded,
    /// At least one step FAILED.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Outcome.
    pub outcome: RunOutcome,
    /// Final step records, in file order.
    pub steps: Vec<StepRecord>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Progress of a run, streamed to whoever submitted it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A step changed status.
    Step {
        /// Step id.
        step: String,
        /// New status.
        status: StepStatus,
        /// A short note (cache key reuse, error, retry).
        detail: Option<String>,
    },
    /// A fanned-out step was planned.
    Shards {
        /// Step id.
        step: String,
        /// Number of shards.
        count: u32,
        /// How many were reused from cache.
        cached: u32,
    },
    /// A shard changed status.
    Shard {
        /// Step id.
        step: String,
        /// Shard index.
        index: u32,
        /// New status.
        status: StepStatus,
    },
    /// A job is retried after a failure.
    Retry {
        /// Job id.
        job: String,
        /// The next attempt number.
        attempt: u32,
        /// Delay before it.
        delay: Duration,
        /// Why the last one failed.
        error: String,
    },
    /// The run ended.
    Finished(RunSummary),
}

/// A submitted run: its id and its progress stream.
#[derive(Debug)]
pub struct RunHandle {
    /// Run id.
    pub run_id: String,
    /// Progress, ending with [`Progress::Finished`].
    pub progress: mpsc::UnboundedReceiver<Progress>,
}

/// Counters of refused results, by reason. Kept in the store, so they survive restarts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Refusals {
    /// A stale lease generation (expired, reassigned or already reported).
    pub stale: u64,
    /// Results for jobs the coordinator does not know: already finished (a replay) or
    /// never made.
    pub unknown_job: u64,
    /// Uploads and input fetches for attempts not leased to the caller.
    pub no_lease: u64,
    /// Signature did not verify against the enrolled key.
    pub signature: u64,
    /// Uploaded payload did not match the signed manifest.
    pub digest: u64,
    /// Leases that expired (worker lost, partitioned or too slow).
    pub lease_expiries: u64,
    /// Results from banned workers.
    pub banned: u64,
    /// Uploads whose output or file name would leave the staging directory.
    pub unsafe_name: u64,
    /// Uploads whose bytes did not hash to their declared digest or size.
    pub upload_digest: u64,
    /// Replica results a quorum disagreed with.
    pub outvoted: u64,
}

impl Refusals {
    /// The counters by name.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("stale_generation", self.stale),
            ("unknown_job", self.unknown_job),
            ("no_lease", self.no_lease),
            ("bad_signature", self.signature),
            ("payload_mismatch", self.digest),
            ("lease_expired", self.lease_expiries),
            ("banned_worker", self.banned),
            ("unsafe_name", self.unsafe_name),
            ("upload_digest", self.upload_digest),
            ("outvoted", self.outvoted),
        ]
    }
}

/// Whether an attempt is leased to a worker now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCheck {
    /// Leased to it, its run going on.
    Live,
    /// The job exists but this attempt is not its live lease (expired, reassigned,
    /// reported, cancelled).
    Stale,
    /// No such job.
    Unknown,
}

/// A refusal the gRPC edge made on its own (before a result reached the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeRefusal {
    /// A name would leave the staging directory.
    UnsafeName,
    /// Uploaded bytes did not match their declared digest or size.
    UploadDigest,
    /// An upload or input fetch for an attempt that is not leased to the caller.
    NoLease,
}

/// The closed set of messages the scheduler loop consumes.
#[derive(Debug)]
pub enum Event {
    /// Start a run.
    Submit(Box<RunRequest>, oneshot::Sender<Result<RunHandle>>),
    /// A worker joined with its public key, hardware profile and slots.
    RegisterWorker(String, Box<WorkerInfo>),
    /// A worker has a free slot and waits for a lease.
    LeaseRequest(String, oneshot::Sender<Option<Lease>>),
    /// A worker is alive and runs these `(job, generation)`; the reply lists the ones it
    /// must kill.
    Heartbeat(
        String,
        Vec<(String, u64)>,
        Option<Box<Profile>>,
        oneshot::Sender<Option<Vec<(String, u64)>>>,
    ),
    /// Is `(job, generation)` leased to this worker right now? Uploads and input fetches
    /// are served only for live leases.
    LeaseLive(String, String, u64, oneshot::Sender<LeaseCheck>),
    /// Time passed: expire leases whose deadline is gone.
    Tick,
    /// The grace period of a step no worker could run is over.
    UnfitCheck(String, usize),
    /// A worker reports a job.
    /// A result and the verdict on its signature against the worker's enrolled key,
    /// checked by the caller so that the loop never spends time on curve arithmetic.
    Report(
        String,
        Box<JobResult>,
        std::result::Result<(), String>,
        Option<oneshot::Sender<std::result::Result<(), String>>>,
    ),
    /// Planning of a step finished.
    Planned(String, usize, Plan),
    /// The first planning pass over a run finished.
    PlannedBatch(String, Vec<(usize, Plan)>),
    /// Sealing of a job's outputs finished.
    Sealed(String, std::result::Result<SealedJob, String>),
    /// Replication figures: (units validated, replica jobs made).
    Replication(oneshot::Sender<(u64, u64)>),
    /// Gauges for the metrics endpoint.
    Snapshot(oneshot::Sender<crate::metrics::Snapshot>),
    /// A step the coordinator ran itself (`core.registry.*`) finished: what it did, or why
    /// it failed.
    CoordinatorStepDone(String, usize, std::result::Result<(String, bool), String>),
    /// Assembly of a sharded step finished.
    Assembled(
        String,
        usize,
        std::result::Result<BTreeMap<String, ArtifactInfo>, String>,
    ),
    /// A job's backoff elapsed.
    RetryDue(String),
    /// Cancel a run.
    Cancel(String),
    /// Read the refusal counters.
    Refusals(oneshot::Sender<Refusals>),
    /// Count a refusal made at the gRPC edge.
    Refused(EdgeRefusal),
    /// List workers.
    ListWorkers(oneshot::Sender<Vec<WorkerView>>),
    /// Drain, ban or re-activate a worker.
    SetWorkerState(String, AdminState, oneshot::Sender<bool>),
    /// Stop the loop.
    Shutdown,
}

/// Timing of leases and of giving up on unrunnable jobs.
#[derive(Clone)]
pub struct EngineConfig {
    /// How long a lease lives without a heartbeat; `None`: forever (the embedded worker
    /// lives in the same process).
    pub lease_ttl: Option<Duration>,
    /// How long a job that no enrolled worker could run waits for one to join before it
    /// fails, saying why.
    pub unfit_grace: Duration,
    /// Throttle and quarantine workers whose jobs keep failing (off for the embedded
    /// engine, whose one worker is the user's own machine).
    pub throttle_failing_workers: bool,
    /// The store `core.registry.*` steps act on; `None`: the project's own
    /// `.nexa_state/registry` (embedded), opened for each step.
    pub registry: Option<Arc<dyn Store>>,
    /// Validation for every step that does not ask for its own (a pool of untrusted
    /// workers); `None`: only steps with `validation` are replicated.
    pub default_validation: Option<nexa_shared::spec::Validation>,
    /// Where dispatch latency and job durations are observed.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("lease_ttl", &self.lease_ttl)
            .field("unfit_grace", &self.unfit_grace)
            .field("throttle_failing_workers", &self.throttle_failing_workers)
            .field(
                "registry",
                &self.registry.as_ref().map(|_| "coordinator store"),
            )
            .field("default_validation", &self.default_validation)
            .finish()
    }
}

impl EngineConfig {
    /// The embedded engine: no lease expiry, unrunnable jobs fail at once.
    pub fn embedded() -> Self {
        Self {
            lease_ttl: None,
            unfit_grace: Duration::ZERO,
            throttle_failing_workers: false,
            registry: None,
            default_validation: None,
            metrics: None,
        }
    }
}

/// What the coordinator knows of an enrolled worker.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// The name it gave (for people; the key is its identity).
    pub name: String,
    /// Its Ed25519 public key (its identity).
    pub key: [u8; 32],
    /// Its hardware.
    pub profile: Profile,
    /// Jobs it runs at once.
    pub slots: u32,
}

/// An operator's say over a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Gets work.
    Active,
    /// Finishes what it runs, gets nothing new.
    Drain,
    /// Gets nothing; its results are refused.
    Ban,
}

/// A worker as `nexa workers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    /// Id (from its key).
    pub id: String,
    /// The name it gave.
    pub name: String,
    /// `active`, `lost`, `draining`, `banned`, `throttled`, `quarantined`.
    pub state: String,
    /// Hardware.
    pub profile: Profile,
    /// Slots.
    pub slots: u32,
    /// Jobs leased to it now.
    pub running: u32,
    /// Results accepted.
    pub succeeded: u64,
    /// Failed or refused results.
    pub failed: u64,
    /// Public key.
    pub key: [u8; 32],
    /// Its record per kind of job (`uses`).
    pub trust: BTreeMap<String, crate::quorum::Trust>,
    /// Credit for accepted work.
    pub credit: Credit,
}

/// Credit for accepted work: CPU-seconds (duration × CPU slots) and GPU-seconds
/// (duration × GPUs), counted only for results that were accepted, and validated where
/// the step asks for validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Credit {
    /// CPU-seconds.
    pub cpu_seconds: f64,
    /// GPU-seconds.
    pub gpu_seconds: f64,
}

/// How far into the queue fair share looks for other runs' jobs.
const FAIR_SCAN: usize = 4096;

/// Failures in a row after which a worker is throttled.
const THROTTLE_AFTER: u32 = 3;
/// Failures among its last [`RECENT`] results after which a worker gets no more work
/// until an operator re-activates it.
const QUARANTINE_AFTER: usize = 10;
/// How many recent results count.
const RECENT: usize = 12;

/// The most events handled between two write-behind rounds.
const BURST: usize = 512;

/// What sealing produced.
#[derive(Debug)]
pub enum SealedJob {
    /// An unsharded step's artifacts.
    Step(BTreeMap<String, ArtifactInfo>),
    /// One shard.
    Shard(Box<ShardSealed>),
}

/// A handle to the coordinator loop; cheap to clone.
#[derive(Clone, Debug)]
pub struct Coordinator {
    tx: mpsc::UnboundedSender<Event>,
    cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    /// Enrolled workers' public keys, for checking result signatures off the loop.
    keys: Arc<std::sync::RwLock<HashMap<String, [u8; 32]>>>,
}

impl Coordinator {
    /// Starts the loop on the current tokio runtime.
    pub fn start(
        store: Arc<dyn Store>,
        config: EngineConfig,
    ) -> (Coordinator, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancels = Arc::new(Mutex::new(HashMap::new()));
        if config.lease_ttl.is_some() {
            let tick = tx.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(250));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    if tick.send(Event::Tick).is_err() {
                        break;
                    }
                }
            });
        }
        // Generations only grow, across restarts too: they start at the boot time.
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let seal_tx = tx.clone();
        let sealer = SealQueue::start(
            store.clone(),
            Box::new(move |job, res| {
                let _ = seal_tx.send(Event::Sealed(job, res));
            }),
        );
        // Workers known before a restart come back offline, with their admin state and
        // record, until they enrol again.
        let workers: HashMap<String, WorkerState> = match state::load_workers(store.as_ref()) {
            Ok(records) => records
                .into_iter()
                .filter_map(|r| {
                    let id = r.id.clone();
                    WorkerState::from_record(r).map(|w| (id, w))
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "loading worker records");
                HashMap::new()
            }
        };
        let refusals: Refusals = match store.get(META_TREE, REFUSALS_KEY) {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading the refusal counters; starting from zero");
                Refusals::default()
            }),
            Ok(None) => Refusals::default(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the refusal counters; starting from zero");
                Refusals::default()
            }
        };
        let engine = Engine {
            saved_refusals: refusals,
            dirty_runs: Vec::new(),
            dirty_workers: Default::default(),
            votes: HashMap::new(),
            decided: HashMap::new(),
            replication: Default::default(),
            rng: {
                use rand_core::RngCore;
                rand_core::OsRng.next_u64() | 1
            },
            config,
            sealer,
            granted: HashMap::new(),
            store,
            tx: tx.clone(),
            rx,
            cancels: cancels.clone(),
            workers,
            runs: HashMap::new(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            waiting: VecDeque::new(),
            next_generation: boot << 20,
            refusals,
            blame: blame::Blame::default(),
        };
        let handle = tokio::spawn(engine.run());
        let keys = Arc::new(std::sync::RwLock::new(HashMap::new()));
        (Coordinator { tx, cancels, keys }, handle)
    }

    fn send(&self, e: Event) -> Result<()> {
        self.tx.send(e).map_err(|_| Error::ShutDown)
    }

    /// Submits a run; progress streams on the returned handle.
    pub async fn submit(&self, req: RunRequest) -> Result<RunHandle> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Submit(Box::new(req), tx))?;
        rx.await.map_err(|_| Error::ShutDown)?
    }

    /// Enrols a worker under `id`.
    pub fn register_worker(&self, id: &str, info: WorkerInfo) -> Result<()> {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), info.key);
        self.send(Event::RegisterWorker(id.to_string(), Box::new(info)))
    }

    /// Waits for a lease for `worker`; `None` when the coordinator shuts down.
    pub async fn lease(&self, worker: &str) -> Option<Lease> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::LeaseRequest(worker.to_string(), tx))
            .ok()?;
        rx.await.ok().flatten()
    }

    /// A worker's heartbeat: it runs these `(job, generation)`; returns those it must
    /// kill, with their generations.
    /// `None` when the worker is banned (its heartbeat is refused).
    pub async fn heartbeat(
        &self,
        worker: &str,
        running: Vec<(String, u64)>,
        profile: Option<Profile>,
    ) -> Result<Option<Vec<(String, u64)>>> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Heartbeat(
            worker.to_string(),
            running,
            profile.map(Box::new),
            tx,
        ))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Reports a job result. The signature is checked here, on the caller's thread,
    /// against the key the worker enrolled with; the loop acts on the verdict.
    pub fn report(&self, worker: &str, result: JobResult) -> Result<()> {
        let verdict = self.verify(worker, &result);
        self.send(Event::Report(
            worker.to_string(),
            Box::new(result),
            verdict,
            None,
        ))
    }

    /// [`Coordinator::report`], waiting for the verdict: `Ok` when the result was
    /// admitted (it may still fail sealing), or why it was refused.
    pub async fn report_judged(
        &self,
        worker: &str,
        result: JobResult,
    ) -> Result<std::result::Result<(), String>> {
        let verdict = self.verify(worker, &result);
        let (tx, rx) = oneshot::channel();
        self.send(Event::Report(
            worker.to_string(),
            Box::new(result),
            verdict,
            Some(tx),
        ))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Checks `result`'s signature against the key `worker` enrolled with.
    fn verify(&self, worker: &str, result: &JobResult) -> std::result::Result<(), String> {
        let key = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(worker)
            .copied();
        match key {
            None => Err("worker is not enrolled".to_string()),
            Some(key) => signing::verify_result(&key, result).map_err(|e| e.to_string()),
        }
    }

    /// Whether `(job, generation)` is leased to `worker` now (and its run not cancelled).
    /// A stale answer is counted as a stale-generation refusal.
    pub async fn lease_live(&self, worker: &str, job: &str, generation: u64) -> Result<LeaseCheck> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::LeaseLive(
            worker.to_string(),
            job.to_string(),
            generation,
            tx,
        ))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Cancels a run: queued jobs are dropped, running ones killed, state saved.
    pub fn cancel(&self, run_id: &str) -> Result<()> {
        // The loop marks the run cancelled before it signals workers, so a job's
        // "cancelled" report always finds the run already cancelled.
        self.send(Event::Cancel(run_id.to_string()))
    }

    /// A signal that turns `true` when `run_id` is cancelled.
    pub fn cancellation(&self, run_id: &str) -> watch::Receiver<bool> {
        let mut g = self.lock_cancels();
        g.entry(run_id.to_string())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    /// Counts a refusal the gRPC edge made itself.
    pub fn count_refusal(&self, kind: EdgeRefusal) {
        let _ = self.tx.send(Event::Refused(kind));
    }

    /// Results refused so far, by reason.
    pub async fn refusals(&self) -> Result<Refusals> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Refusals(tx))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Replication so far: (units run under validation, replica jobs made for them).
    /// `replicas / units - 1` is the extra work validation cost.
    pub async fn replication(&self) -> Result<(u64, u64)> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Replication(tx))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Gauges for the metrics endpoint; an answer also shows the loop is alive.
    pub async fn snapshot(&self) -> Result<crate::metrics::Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Snapshot(tx))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Every enrolled worker.
    pub async fn list_workers(&self) -> Result<Vec<WorkerView>> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::ListWorkers(tx))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Drains, bans or re-activates a worker; false when there is no such worker.
    pub async fn set_worker_state(&self, worker: &str, state: AdminState) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::SetWorkerState(worker.to_string(), state, tx))?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Stops the loop; waiting workers get `None`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Queued,
    Backoff,
    Leased,
    Sealing,
}

#[derive(Debug)]
struct Job {
    run_id: String,
    step: usize,
    shard: Option<usize>,
    spec: JobSpec,
    attempt: u32,
    generation: u64,
    worker: Option<String>,
    state: JobState,
    started: Option<Instant>,
    deadline: Option<Instant>,
    /// For a replica: the unit (step or shard job id) it votes on.
    unit: Option<String>,
    /// Credit the worker earns once the result is sealed.
    pending_credit: Option<Credit>,
    /// When it last entered the queue (dispatch latency).
    queued_at: Instant,
}

impl Job {
    /// A job waiting in the queue for its first attempt.
    fn queued(
        run_id: &str,
        step: usize,
        shard: Option<usize>,
        spec: JobSpec,
        unit: Option<String>,
    ) -> Self {
        Self {
            run_id: run_id.to_string(),
            step,
            shard,
            spec,
            attempt: 1,
            generation: 0,
            worker: None,
            state: JobState::Queued,
            started: None,
            deadline: None,
            unit,
            pending_credit: None,
            queued_at: Instant::now(),
        }
    }
}

/// What one leased job holds on its worker.
#[derive(Debug, Clone, Default)]
struct Alloc {
    cpus: u32,
    memory: u64,
    gpus: Vec<usize>,
}

#[derive(Debug)]
struct WorkerState {
    info: WorkerInfo,
    alloc: HashMap<String, Alloc>,
    /// GPUs handed to jobs since the last profile refresh: their reported free memory
    /// may show our own job, which the exclusive reservation already accounts for.
    touched_gpus: std::collections::BTreeSet<usize>,
    /// Its record per kind of job.
    trust: BTreeMap<String, crate::quorum::Trust>,
    /// Credit for accepted work.
    credit: Credit,
    last_seen: Instant,
    lost: bool,
    admin: AdminState,
    succeeded: u64,
    failed: u64,
    consecutive_failures: u32,
    recent: VecDeque<bool>,
    throttled_until: Option<Instant>,
}

impl WorkerState {
    /// The part of the state that is stored.
    fn record_of(&self, id: &str) -> state::WorkerRecord {
        state::WorkerRecord {
            id: id.to_string(),
            name: self.info.name.clone(),
            public_key: hex::encode(self.info.key),
            slots: self.info.slots,
            profile: self.info.profile.clone(),
            admin: match self.admin {
                AdminState::Active => "active",
                AdminState::Drain => "drain",
                AdminState::Ban => "ban",
            }
            .to_string(),
            succeeded: self.succeeded,
            failed: self.failed,
            recent: self.recent.iter().copied().collect(),
            trust: self.trust.clone(),
            cpu_seconds: self.credit.cpu_seconds,
            gpu_seconds: self.credit.gpu_seconds,
        }
    }

    /// A worker known from before a restart: offline until it enrols again.
    fn from_record(r: state::WorkerRecord) -> Option<Self> {
        let key: [u8; 32] = hex::decode(&r.public_key).ok()?.try_into().ok()?;
        let mut w = Self::new(WorkerInfo {
            name: r.name,
            key,
            profile: r.profile,
            slots: r.slots,
        });
        w.admin = match r.admin.as_str() {
            "drain" => AdminState::Drain,
            "ban" => AdminState::Ban,
            _ => AdminState::Active,
        };
        w.succeeded = r.succeeded;
        w.failed = r.failed;
        w.recent = r.recent.into_iter().collect();
        w.trust = r.trust;
        w.credit = Credit {
            cpu_seconds: r.cpu_seconds,
            gpu_seconds: r.gpu_seconds,
        };
        w.lost = true;
        Some(w)
    }

    fn new(info: WorkerInfo) -> Self {
        Self {
            info,
            alloc: HashMap::new(),
            touched_gpus: Default::default(),
            trust: BTreeMap::new(),
            credit: Credit::default(),
            last_seen: Instant::now(),
            lost: false,
            admin: AdminState::Active,
            succeeded: 0,
            failed: 0,
            consecutive_failures: 0,
            recent: VecDeque::new(),
            throttled_until: None,
        }
    }

    /// Takes a freshly read profile. Free GPU memory is trusted only for GPUs no job of
    /// ours held since the last refresh; ours count as wholly free (they are reserved
    /// whole, and the reading may include our own job's use).
    fn refresh_profile(&mut self, mut p: Profile) {
        let ours: std::collections::BTreeSet<usize> = self
            .alloc
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .collect();
        for &g in self.touched_gpus.iter().chain(&ours) {
            if let Some(gpu) = p.gpus.get_mut(g) {
                gpu.memory_free = gpu.memory_total;
            }
        }
        self.touched_gpus = ours;
        self.info.profile = p;
    }

    fn quarantined(&self) -> bool {
        self.recent.iter().filter(|ok| !**ok).count() >= QUARANTINE_AFTER
    }

    /// Whether it may get a new lease now.
    fn eligible(&self, now: Instant) -> bool {
        self.admin == AdminState::Active
            && !self.lost
            && !self.quarantined()
            && self.throttled_until.is_none_or(|t| t <= now)
    }

    fn state_name(&self, now: Instant) -> &'static str {
        match self.admin {
            AdminState::Ban => "banned",
            AdminState::Drain => "draining",
            AdminState::Active if self.lost => "lost",
            AdminState::Active if self.quarantined() => "quarantined",
            AdminState::Active if self.throttled_until.is_some_and(|t| t > now) => "throttled",
            AdminState::Active => "active",
        }
    }

    /// Records a result: a run of failures throttles the worker (doubling each time),
    /// too many among its recent results stop it getting work (BOINC#3061).
    fn record(&mut self, ok: bool, id: &str) {
        let was_quarantined = self.quarantined();
        self.recent.push_back(ok);
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        if ok {
            self.succeeded += 1;
            self.consecutive_failures = 0;
            self.throttled_until = None;
            return;
        }
        self.failed += 1;
        self.consecutive_failures += 1;
        if self.consecutive_failures >= THROTTLE_AFTER {
            let exp = (self.consecutive_failures - THROTTLE_AFTER).min(8);
            let pause = Duration::from_secs(1 << exp).min(Duration::from_secs(300));
            self.throttled_until = Some(Instant::now() + pause);
            tracing::warn!(worker = %id, failures = self.consecutive_failures, pause_s = pause.as_secs(), "worker throttled after failures in a row");
        }
        if self.quarantined() && !was_quarantined {
            tracing::warn!(worker = %id, "worker quarantined: too many recent failures; an operator must re-activate it");
        }
    }

    fn free(&self) -> hardware::Free<'_> {
        let used_cpus: u32 = self.alloc.values().map(|a| a.cpus).sum();
        let used_mem: u64 = self.alloc.values().map(|a| a.memory).sum();
        let busy: Vec<usize> = self
            .alloc
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .collect();
        hardware::Free {
            worker: "",
            profile: &self.info.profile,
            slots: self.info.slots.saturating_sub(used_cpus),
            memory: self.info.profile.memory_total.saturating_sub(used_mem),
            free_gpus: (0..self.info.profile.gpus.len())
                .filter(|g| !busy.contains(g))
                .collect(),
        }
    }
}

struct Run {
    ctx: Arc<RunContext>,
    records: Vec<StepRecord>,
    plans: Vec<Option<Arc<StepPlan>>>,
    shard_results: Vec<BTreeMap<usize, ShardSealed>>,
    busy: Vec<bool>,
    progress: mpsc::UnboundedSender<Progress>,
    cancelled: bool,
    started: Instant,
    started_at: String,
    last_mirror: Option<Instant>,
    in_flight: usize,
    /// Steps changed since the last write-behind round (see `Engine::flush_dirty`).
    dirty: Vec<usize>,
    /// Steps not yet in a final state (kept by `set_status`, so finishing is O(1)).
    unfinished: usize,
}

impl Run {
    fn emit(&self, p: Progress) {
        let _ = self.progress.send(p);
    }

    /// The sealed outputs of step `i`'s dependencies (all the planner may read).
    fn upstream_outputs(&self, i: usize) -> BTreeMap<usize, BTreeMap<String, ArtifactInfo>> {
        self.ctx.dag.deps[i]
            .iter()
            .filter(|&&d| self.records[d].status.is_done())
            .map(|&d| (d, self.records[d].outputs.clone()))
            .collect()
    }
}

struct Engine {
    store: Arc<dyn Store>,
    /// Runs with step records waiting for the write-behind round.
    dirty_runs: Vec<String>,
    /// Workers whose records changed since the last round.
    dirty_workers: std::collections::BTreeSet<String>,
    /// Replicated units waiting for their quorum, by unit id.
    /// (Snapshot for metrics: see `snapshot`.)
    votes: HashMap<String, replication::Vote>,
    /// Decided units with replicas still running, by unit id.
    decided: HashMap<String, replication::Decided>,
    /// Replication figures: units validated and replica jobs made for them.
    replication: replication::Counters,
    /// State of the spot-check random generator (xorshift, seeded at start).
    rng: u64,
    sealer: SealQueue,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    workers: HashMap<String, WorkerState>,
    config: EngineConfig,
    /// Leases granted per active run (fair share).
    granted: HashMap<String, u64>,
    runs: HashMap<String, Run>,
    jobs: HashMap<String, Job>,
    queue: VecDeque<String>,
    waiting: VecDeque<(String, oneshot::Sender<Option<Lease>>)>,
    next_generation: u64,
    refusals: Refusals,
    /// Whose fault failed jobs are.
    blame: blame::Blame,
    /// The refusal counters as last written to the store.
    saved_refusals: Refusals,
}

/// The store tree of the engine's own counters.
const META_TREE: &str = "meta";
/// The refusal counters' key in it.
const REFUSALS_KEY: &str = "refusals";

/// `YYYYMMDDTHHMMSS-xxxx` (UTC): sortable by start time, unique enough per process.
fn new_run_id() -> String {
    let now = std::time::SystemTime::now();
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let stamp: String = now_rfc3339()
        .chars()
        .filter(|c| !matches!(c, '-' | ':' | 'Z'))
        .collect();
    format!("{stamp}-{:04x}", (nanos ^ std::process::id()) & 0xffff)
}

/// RFC 3339 with seconds, UTC.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

impl Engine {
    async fn run(mut self) {
        'events: while let Some(ev) = self.rx.recv().await {
            if matches!(ev, Event::Shutdown) {
                break;
            }
            self.handle(ev);
            // Handle what else has queued, then write what changed once.
            for _ in 0..BURST {
                match self.rx.try_recv() {
                    Ok(Event::Shutdown) => {
                        self.flush_dirty();
                        break 'events;
                    }
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            self.flush_dirty();
        }
        for (_, w) in self.waiting.drain(..) {
            let _ = w.send(None);
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %format!("{e:#}"), "flushing the store at shutdown");
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Submit(req, reply) => {
                let _ = reply.send(self.submit(*req));
            }
            Event::RegisterWorker(id, info) => {
                tracing::info!(worker = %id, gpus = info.profile.gpus.len(), slots = info.slots, "worker enrolled");
                // Re-enrolment keeps the worker's record (its admin state, error history).
                match self.workers.get_mut(&id) {
                    Some(w) => {
                        w.info = *info;
                        w.last_seen = Instant::now();
                        w.lost = false;
                    }
                    None => {
                        self.workers.insert(id.clone(), WorkerState::new(*info));
                    }
                }
                self.dirty_workers.insert(id);
                self.dispatch();
            }
            Event::Heartbeat(worker, running, profile, reply) => {
                let banned = self
                    .workers
                    .get(&worker)
                    .is_some_and(|w| w.admin == AdminState::Ban);
                let answer = (!banned).then(|| self.on_heartbeat(&worker, &running, profile));
                let _ = reply.send(answer);
            }
            Event::LeaseLive(worker, job, generation, reply) => {
                let check = match self.jobs.get(&job) {
                    None => LeaseCheck::Unknown,
                    Some(j)
                        if j.state == JobState::Leased
                            && j.generation == generation
                            && j.worker.as_deref() == Some(worker.as_str())
                            && !self.runs.get(&j.run_id).is_some_and(|r| r.cancelled) =>
                    {
                        LeaseCheck::Live
                    }
                    Some(_) => {
                        self.refusals.stale += 1;
                        LeaseCheck::Stale
                    }
                };
                let _ = reply.send(check);
            }
            Event::Tick => self.on_tick(),
            Event::UnfitCheck(run, step) => self.fail_unfit(&run, step),
            Event::LeaseRequest(worker, reply) => {
                self.waiting.push_back((worker, reply));
                self.dispatch();
            }
            Event::Report(worker, result, verdict, reply) => {
                let admitted = self.on_report(&worker, *result, verdict);
                if let Some(r) = reply {
                    let _ = r.send(admitted);
                }
            }
            Event::Planned(run, step, plan) => self.on_planned(&run, step, plan),
            Event::PlannedBatch(run, plans) => self.on_planned_batch(&run, plans),
            Event::Sealed(job, res) => self.on_sealed(&job, res),
            Event::Assembled(run, step, res) => self.on_assembled(&run, step, res),
            Event::Replication(reply) => {
                let _ = reply.send((self.replication.units, self.replication.replicas));
            }
            Event::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Event::CoordinatorStepDone(run, step, res) => {
                self.on_coordinator_step_done(&run, step, res)
            }
            Event::RetryDue(job) => {
                if let Some(j) = self.jobs.get_mut(&job)
                    && j.state == JobState::Backoff
                {
                    j.state = JobState::Queued;
                    j.queued_at = Instant::now();
                    self.queue.push_back(job);
                    self.dispatch();
                }
            }
            Event::Cancel(run) => self.on_cancel(&run),
            Event::Refused(kind) => match kind {
                EdgeRefusal::UnsafeName => self.refusals.unsafe_name += 1,
                EdgeRefusal::UploadDigest => self.refusals.upload_digest += 1,
                EdgeRefusal::NoLease => self.refusals.no_lease += 1,
            },
            Event::Refusals(reply) => {
                let _ = reply.send(self.refusals);
            }
            Event::ListWorkers(reply) => {
                let now = Instant::now();
                let mut v: Vec<WorkerView> = self
                    .workers
                    .iter()
                    .map(|(id, w)| WorkerView {
                        id: id.clone(),
                        name: w.info.name.clone(),
                        state: w.state_name(now).to_string(),
                        profile: w.info.profile.clone(),
                        slots: w.info.slots,
                        running: w.alloc.len() as u32,
                        succeeded: w.succeeded,
                        failed: w.failed,
                        key: w.info.key,
                        trust: w.trust.clone(),
                        credit: w.credit,
                    })
                    .collect();
                v.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(v);
            }
            Event::SetWorkerState(id, state, reply) => {
                let found = match self.workers.get_mut(&id) {
                    Some(w) => {
                        w.admin = state;
                        if state == AdminState::Active {
                            w.recent.clear();
                            w.consecutive_failures = 0;
                            w.throttled_until = None;
                        }
                        tracing::info!(worker = %id, ?state, "operator set worker state");
                        true
                    }
                    None => false,
                };
                // An operator's decision is durable before it is acknowledged.
                if let Some(w) = self.workers.get(&id) {
                    let rec = w.record_of(&id);
                    if let Err(e) = state::save_workers(self.store.as_ref(), &[rec])
                        .and_then(|_| self.store.flush())
                    {
                        tracing::error!(error = %format!("{e:#}"), worker = %id, "saving the worker's state");
                    }
                }
                let _ = reply.send(found);
                self.dispatch();
            }
            Event::Shutdown => {}
        }
    }

    fn submit(&mut self, req: RunRequest) -> Result<RunHandle> {
        let run_id = req.run_id.clone().unwrap_or_else(new_run_id);
        if self.runs.contains_key(&run_id) {
            return Err(Error::NotFound(format!("run {run_id} is already active")));
        }
        let p = &req.loaded.pipeline;
        let n = p.steps.len();
        let mut forced = vec![false; n];
        if let Some(from) = &req.from {
            let i = p
                .steps
                .iter()
                .position(|s| &s.id.value == from)
                .ok_or_else(|| {
                    Error::NotFound(format!("no step '{from}' in pipeline '{}'", p.name))
                })?;
            for d in req.loaded.dag.downstream(i) {
                forced[d] = true;
            }
        }
        let project = std::path::absolute(&req.project)
            .map_err(|e| Error::Domain(nexa_shared::Error::io("resolve", &req.project, e)))?;
        let state_dir = project
            .join(".nexa_state")
            .join(paths::safe_component(&p.name));
        let records: Vec<StepRecord> = p
            .steps
            .iter()
            .map(|s| StepRecord::pending(&s.id.value, &run_id))
            .collect();
        let (ptx, prx) = mpsc::unbounded_channel();
        let ctx = RunContext {
            run_id: run_id.clone(),
            pipeline: req.loaded.pipeline,
            dag: req.loaded.dag,
            project,
            state_dir,
            verify: req.verify,
            forced,
            git_sha: req.git_sha,
            confined: req.confined,
        };
        let refs: Vec<&StepRecord> = records.iter().collect();
        state::save_steps(self.store.as_ref(), &ctx.pipeline.name, &refs)?;
        let started_at = now_rfc3339();
        state::save_run(
            self.store.as_ref(),
            &RunRecord {
                run_id: run_id.clone(),
                pipeline: ctx.pipeline.name.clone(),
                started_at: started_at.clone(),
                finished_at: None,
                outcome: "running".into(),
            },
        )?;
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(run_id.clone())
            .or_insert_with(|| watch::channel(false).0);
        let run = Run {
            ctx: Arc::new(ctx),
            records,
            plans: vec![None; n],
            shard_results: vec![BTreeMap::new(); n],
            busy: vec![false; n],
            progress: ptx,
            cancelled: false,
            started: Instant::now(),
            started_at,
            last_mirror: None,
            in_flight: 0,
            dirty: Vec::new(),
            unfinished: n,
        };
        tracing::info!(run = %run_id, pipeline = %run.ctx.pipeline.name, steps = n, "run submitted");
        self.runs.insert(run_id.clone(), run);
        self.plan_prefix(&run_id);
        Ok(RunHandle {
            run_id,
            progress: prx,
        })
    }

    /// Plans every PENDING step whose dependencies are all done.
    fn schedule_ready(&mut self, run_id: &str, candidates: Option<&[usize]>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.cancelled {
            return;
        }
        let all: Vec<usize>;
        let candidates = match candidates {
            Some(c) => c,
            None => {
                all = (0..run.records.len()).collect();
                &all
            }
        };
        let ready: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| {
                run.records[i].status == StepStatus::Pending
                    && !run.busy[i]
                    && run.ctx.dag.deps[i]
                        .iter()
                        .all(|&d| run.records[d].status.is_done())
            })
            .collect();
        for i in ready {
            run.busy[i] = true;
            run.in_flight += 1;
            let ctx = run.ctx.clone();
            let done = run.upstream_outputs(i);
            let tx = self.tx.clone();
            let rid = run_id.to_string();
            tokio::task::spawn_blocking(move || {
                let plan = planner::plan_step(&ctx, i, &done);
                let _ = tx.send(Event::Planned(rid, i, plan));
            });
        }
    }

    fn set_status(&mut self, run_id: &str, i: usize, status: StepStatus, detail: Option<String>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let rec = &mut run.records[i];
        match (rec.status.is_final(), status.is_final()) {
            (false, true) => run.unfinished -= 1,
            (true, false) => run.unfinished += 1,
            _ => {}
        }
        rec.status = status;
        if matches!(
            status,
            StepStatus::Failed | StepStatus::Blocked | StepStatus::Cancelled
        ) {
            rec.error = detail.clone();
        } else if status != StepStatus::Running {
            rec.error = None;
        }
        let id = rec.id.clone();
        run.emit(Progress::Step {
            step: id,
            status,
            detail,
        });
        self.persist(run_id, i);
    }

    fn snapshot(&self) -> crate::metrics::Snapshot {
        let now = Instant::now();
        let mut s = crate::metrics::Snapshot::default();
        for w in self.workers.values() {
            *s.workers_by_state
                .entry(w.state_name(now).to_string())
                .or_default() += 1;
            if w.lost {
                continue;
            }
            let model = w
                .info
                .profile
                .gpus
                .first()
                .map_or("none".to_string(), |g| g.name.clone());
            *s.workers_by_gpu_model.entry(model).or_default() += 1;
            let held: Vec<usize> = w.alloc.values().flat_map(|a| a.gpus.clone()).collect();
            for (i, g) in w.info.profile.gpus.iter().enumerate() {
                if !held.contains(&i) {
                    s.gpus_available += 1;
                    s.gpu_memory_available_bytes +=
                        i64::try_from(g.memory_free).unwrap_or(i64::MAX);
                }
            }
        }
        for j in self.jobs.values() {
            let state = match j.state {
                JobState::Queued => "queued",
                JobState::Backoff => "backoff",
                JobState::Leased => "leased",
                JobState::Sealing => "sealing",
            };
            *s.jobs_by_state.entry(state.to_string()).or_default() += 1;
        }
        s.queue_depth = s.jobs_by_state.get("queued").copied().unwrap_or(0);
        s.runs_active = self.runs.len() as i64;
        s
    }

    /// Marks a step record for the next write-behind round.
    fn persist(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.dirty.is_empty() {
            self.dirty_runs.push(run_id.to_string());
        }
        run.dirty.push(i);
    }

    /// Writes every step record changed since the last round, one batch per run, and
    /// rewrites the mirrors that are due. Runs after each burst of events, so a busy
    /// coordinator writes once per burst rather than once per change.
    fn flush_dirty(&mut self) {
        if self.refusals != self.saved_refusals {
            let saved = serde_json::to_vec(&self.refusals)
                .map_err(crate::Error::from)
                .and_then(|b| self.store.put(META_TREE, REFUSALS_KEY, &b));
            match saved {
                Ok(()) => self.saved_refusals = self.refusals,
                Err(e) => tracing::error!(error = %format!("{e:#}"), "saving the refusal counters"),
            }
        }
        if !self.dirty_workers.is_empty() {
            let recs: Vec<state::WorkerRecord> = std::mem::take(&mut self.dirty_workers)
                .iter()
                .filter_map(|id| self.workers.get(id).map(|w| w.record_of(id)))
                .collect();
            if let Err(e) = state::save_workers(self.store.as_ref(), &recs) {
                tracing::error!(error = %format!("{e:#}"), "saving worker records");
            }
        }
        for run_id in std::mem::take(&mut self.dirty_runs) {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let mut dirty = std::mem::take(&mut run.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            let recs: Vec<&StepRecord> = dirty.iter().map(|&i| &run.records[i]).collect();
            if let Err(e) = state::save_steps(self.store.as_ref(), &run.ctx.pipeline.name, &recs) {
                tracing::error!(error = %format!("{e:#}"), run = %run_id, "saving step state");
            }
            // The mirror is rewritten whole: space the writes out as the pipeline grows
            // (every 250 ms up to 1,000 steps, proportionally longer beyond).
            let every = Duration::from_millis(250) * (run.records.len() / 1000).max(1) as u32;
            if run.last_mirror.is_none_or(|t| t.elapsed() >= every) {
                write_mirror(run);
            }
        }
    }

    fn on_planned(&mut self, run_id: &str, i: usize, plan: Plan) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.busy[i] = false;
        run.in_flight -= 1;
        self.apply_plan(run_id, i, plan);
        self.maybe_finish(run_id);
    }

    /// Plans, in one blocking task, every step reachable from the roots through steps
    /// that turn out SKIPPED: a fully cached pipeline is decided in one pass instead of
    /// one round trip per step. Steps it does not reach are planned as they get ready.
    fn plan_prefix(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.busy.iter_mut().for_each(|b| *b = true);
        run.in_flight += 1;
        let ctx = run.ctx.clone();
        let tx = self.tx.clone();
        let rid = run_id.to_string();
        tokio::task::spawn_blocking(move || {
            let order = ctx.dag.topo_order().unwrap_or_default();
            let mut done: BTreeMap<usize, BTreeMap<String, ArtifactInfo>> = BTreeMap::new();
            let mut plans = Vec::new();
            for i in order {
                let deps = &ctx.dag.deps[i];
                if !deps.iter().all(|d| done.contains_key(d)) {
                    continue;
                }
                let upstream = deps
                    .iter()
                    .filter_map(|d| done.get(d).map(|o| (*d, o.clone())))
                    .collect();
                let plan = planner::plan_step(&ctx, i, &upstream);
                if let Plan::Skipped { outputs, .. } = &plan {
                    done.insert(i, outputs.clone());
                }
                plans.push((i, plan));
            }
            let _ = tx.send(Event::PlannedBatch(rid, plans));
        });
    }

    fn on_planned_batch(&mut self, run_id: &str, plans: Vec<(usize, Plan)>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        // Every step stays busy while the batch is applied, so nothing is planned twice.
        for (i, plan) in plans {
            self.apply_plan(run_id, i, plan);
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        // The whole prefix shows in the mirror at the next write-behind round.
        run.last_mirror = None;
        run.busy.iter_mut().for_each(|b| *b = false);
        if run.cancelled {
            let pending: Vec<usize> = (0..run.records.len())
                .filter(|&i| run.records[i].status == StepStatus::Pending)
                .collect();
            for i in pending {
                self.set_status(
                    run_id,
                    i,
                    StepStatus::Cancelled,
                    Some("run cancelled".into()),
                );
            }
        }
        self.schedule_ready(run_id, None);
        self.maybe_finish(run_id);
    }

    fn apply_plan(&mut self, run_id: &str, i: usize, plan: Plan) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.cancelled {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
            return;
        }
        match plan {
            Plan::Skipped { cache_key, outputs } => {
                run.records[i].cache_key = Some(cache_key);
                run.records[i].outputs = outputs;
                run.records[i].shards.clear();
                self.set_status(run_id, i, StepStatus::Skipped, Some("cache hit".into()));
                self.step_done(run_id, i);
            }
            Plan::Failed { cache_key, error } => {
                run.records[i].cache_key = cache_key;
                self.step_failed(run_id, i, error);
            }
            Plan::Run(plan) => self.start_step(run_id, i, plan),
        }
    }

    fn job_inputs(plan: &StepPlan, replace: Option<&planner::ResolvedInput>) -> Vec<JobInput> {
        plan.inputs
            .iter()
            .map(|r| {
                let r = match replace {
                    Some(p) if p.name == r.name => p,
                    _ => r,
                };
                JobInput {
                    name: r.name.clone(),
                    digest: r.digest.clone(),
                    is_dir: r.is_dir,
                    source: r.path.clone(),
                }
            })
            .collect()
    }

    fn start_step(&mut self, run_id: &str, i: usize, plan: Arc<StepPlan>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if nexa_shared::handlers::runs_on_coordinator(&run.ctx.pipeline.steps[i].uses.value) {
            self.run_on_coordinator(run_id, i, plan);
            return;
        }
        let requirements = requirements_of(&run.ctx.pipeline.steps[i]);
        // A job no enrolled worker could ever run fails, saying why, instead of waiting
        // forever: at once embedded, after a grace period for workers to join on a mesh.
        if hardware::why_unfit(
            &requirements,
            self.workers
                .values()
                .filter(|w| !w.lost)
                .map(|w| (&w.info.profile, w.info.slots)),
        )
        .is_some()
        {
            if self.config.unfit_grace.is_zero() {
                run.records[i].cache_key = Some(plan.cache_key.clone());
                self.fail_unfit(run_id, i);
                return;
            }
            let tx = self.tx.clone();
            let (rid, grace) = (run_id.to_string(), self.config.unfit_grace);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let _ = tx.send(Event::UnfitCheck(rid, i));
            });
        }
        let step = &run.ctx.pipeline.steps[i];
        let rec = &mut run.records[i];
        rec.cache_key = Some(plan.cache_key.clone());
        rec.outputs.clear();
        rec.attempts = 0;
        rec.worker = None;
        rec.log = None;
        let base = JobSpec {
            job_id: String::new(),
            run_id: run_id.to_string(),
            step_id: step.id.value.clone(),
            shard: None,
            uses: step.uses.value.clone(),
            params: step.params.clone(),
            inputs: Vec::new(),
            outputs: plan.outputs.keys().cloned().collect(),
            timeout: step.timeout,
            requirements,
        };
        let mut new_jobs = Vec::new();
        match &plan.shards {
            None => {
                rec.shards.clear();
                let mut spec = base;
                spec.job_id = format!("{run_id}/{}", step.id.value);
                spec.inputs = Self::job_inputs(&plan, None);
                new_jobs.push((None, spec));
            }
            Some(units) => {
                let count = units.len() as u32;
                let mut cached = 0;
                rec.shards = units
                    .iter()
                    .map(|u| ShardRecord {
                        index: u.index,
                        status: if u.cached.is_some() {
                            StepStatus::Skipped
                        } else {
                            StepStatus::Pending
                        },
                        cache_key: Some(u.cache_key.clone()),
                        hash: u.cached.as_ref().map(|m| m.hash.clone()),
                        worker: u
                            .cached
                            .as_ref()
                            .and_then(|m| m.labels.get("worker").cloned()),
                        attempts: 0,
                        error: None,
                    })
                    .collect();
                run.shard_results[i].clear();
                for (k, u) in units.iter().enumerate() {
                    if let Some(meta) = &u.cached {
                        cached += 1;
                        run.shard_results[i].insert(k, sealer::shard_from_meta(u, meta));
                        continue;
                    }
                    let mut spec = base.clone();
                    spec.job_id = format!("{run_id}/{}/{}", step.id.value, u.index);
                    spec.shard = Some((u.index, count));
                    spec.inputs = Self::job_inputs(&plan, Some(&u.part));
                    new_jobs.push((Some(k), spec));
                }
                run.emit(Progress::Shards {
                    step: step.id.value.clone(),
                    count,
                    cached,
                });
            }
        }
        run.plans[i] = Some(plan);
        self.set_status(run_id, i, StepStatus::Running, None);
        if new_jobs.is_empty() {
            // Every shard came from cache: assemble straight away.
            self.start_assembly(run_id, i);
            return;
        }
        let validation = self
            .runs
            .get(run_id)
            .and_then(|r| r.ctx.pipeline.steps[i].validation)
            .or(self.config.default_validation);
        for (shard, mut spec) in new_jobs {
            let unit = validation.map(|v| {
                // Replicas are jobs `<unit>~r<k>`; the first is made now, the others
                // when the first is leased to a worker that is not trusted.
                let unit = spec.job_id.clone();
                spec.job_id = format!("{unit}~r0");
                self.votes
                    .insert(unit.clone(), replication::Vote::new(v, spec.uses.clone()));
                self.replication.units += 1;
                self.replication.replicas += 1;
                unit
            });
            let id = spec.job_id.clone();
            self.jobs
                .insert(id.clone(), Job::queued(run_id, i, shard, spec, unit));
            self.queue.push_back(id);
        }
        self.dispatch();
    }

    /// The first queued job (in order) that fits `worker`'s free capacity, with the
    /// GPUs it gets. Drops stale queue entries it passes.
    fn pick_job(&mut self, worker: &str) -> Option<(String, Vec<usize>)> {
        let w = self.workers.get(worker)?;
        if !w.eligible(Instant::now()) {
            return None;
        }
        let free = w.free();
        // Fair share: among the first fitting job of each run (looking at most
        // FAIR_SCAN entries into the queue), take the one whose run holds the fewest
        // leases now, then the one that was granted the fewest so far, so one big run
        // cannot starve the others.
        let mut leased: HashMap<&str, usize> = HashMap::new();
        for ws in self.workers.values() {
            for job_id in ws.alloc.keys() {
                if let Some(j) = self.jobs.get(job_id) {
                    *leased.entry(j.run_id.as_str()).or_default() += 1;
                }
            }
        }
        let mut candidates: Vec<(usize, &str, Vec<usize>)> = Vec::new();
        let mut stale = Vec::new();
        let active_runs = self.runs.len();
        for (pos, job_id) in self.queue.iter().enumerate() {
            // Enough: one candidate from every run, or far enough into the queue.
            if candidates.len() >= active_runs || (pos >= FAIR_SCAN && !candidates.is_empty()) {
                break;
            }
            let Some(job) = self
                .jobs
                .get(job_id)
                .filter(|j| j.state == JobState::Queued)
            else {
                stale.push(pos);
                continue;
            };
            if candidates.iter().any(|(_, r, _)| *r == job.run_id) {
                continue;
            }
            if let Some(u) = &job.unit
                && !self.replica_ok(u, worker)
            {
                continue;
            }
            if let Some(a) = hardware::assign(&job.spec.requirements, std::slice::from_ref(&free)) {
                candidates.push((pos, job.run_id.as_str(), a.gpus));
            }
        }
        let granted = &self.granted;
        let (pos, _, gpus) = candidates.into_iter().min_by_key(|(pos, run, _)| {
            (
                leased.get(run).copied().unwrap_or(0),
                granted.get(*run).copied().unwrap_or(0),
                *pos,
            )
        })?;
        let job_id = self.queue.get(pos)?.clone();
        for p in stale.into_iter().rev() {
            if p < pos {
                self.queue.remove(p);
            }
        }
        let idx = self.queue.iter().position(|j| j == &job_id)?;
        self.queue.remove(idx);
        Some((job_id, gpus))
    }

    /// Hands queued jobs to waiting workers, each job to a worker it fits.
    fn dispatch(&mut self) {
        let mut still_waiting = VecDeque::new();
        while let Some((worker, reply)) = self.waiting.pop_front() {
            if reply.is_closed() {
                continue;
            }
            if self.queue.is_empty() {
                still_waiting.push_back((worker, reply));
                continue;
            }
            let Some((job_id, gpu_idx)) = self.pick_job(&worker) else {
                still_waiting.push_back((worker, reply));
                continue;
            };
            let Some(job) = self.jobs.get_mut(&job_id) else {
                still_waiting.push_back((worker, reply));
                continue;
            };
            if let Some(m) = &self.config.metrics {
                m.dispatch_latency
                    .observe(job.queued_at.elapsed().as_secs_f64());
            }
            job.generation = self.next_generation;
            self.next_generation += 1;
            *self.granted.entry(job.run_id.clone()).or_default() += 1;
            job.worker = Some(worker.clone());
            job.state = JobState::Leased;
            job.started = Some(Instant::now());
            job.deadline = self.config.lease_ttl.map(|t| Instant::now() + t);
            let w = self.workers.get_mut(&worker);
            let gpus: Vec<String> = w
                .as_ref()
                .map(|w| {
                    gpu_idx
                        .iter()
                        .filter_map(|&g| w.info.profile.gpus.get(g).map(|x| x.uuid.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let lease = Lease {
                job: job.spec.clone(),
                generation: job.generation,
                attempt: job.attempt,
                gpus,
            };
            if let Some(w) = w {
                w.touched_gpus.extend(gpu_idx.iter().copied());
                w.alloc.insert(
                    job_id.clone(),
                    Alloc {
                        cpus: job.spec.requirements.cpus.max(1),
                        memory: job.spec.requirements.memory,
                        gpus: gpu_idx,
                    },
                );
            }
            let (run_id, step, shard, attempt) =
                (job.run_id.clone(), job.step, job.shard, job.attempt);
            if reply.send(Some(lease)).is_err() {
                // The worker went away between asking and now: put the job back.
                self.release(&job_id);
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    j.state = JobState::Queued;
                    j.worker = None;
                    j.deadline = None;
                }
                self.queue.push_front(job_id);
                continue;
            }
            tracing::debug!(job = %job_id, worker = %worker, attempt, "leased");
            if let Some(unit) = self.jobs.get(&job_id).and_then(|j| j.unit.clone()) {
                self.on_replica_leased(&unit, &worker);
            }
            if let Some(run) = self.runs.get_mut(&run_id) {
                match shard {
                    None => run.records[step].attempts = attempt,
                    Some(k) => {
                        let s = &mut run.records[step].shards[k];
                        s.attempts = attempt;
                        s.status = StepStatus::Running;
                        let index = s.index;
                        let id = run.records[step].id.clone();
                        run.emit(Progress::Shard {
                            step: id,
                            index,
                            status: StepStatus::Running,
                        });
                    }
                }
            }
        }
        self.waiting = still_waiting;
    }

    /// Fails step `i` of a run when no enrolled worker could ever run it and none of its
    /// jobs has started, dropping its queued jobs.
    fn fail_unfit(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.records[i].status.is_final() {
            return;
        }
        let requirements = requirements_of(&run.ctx.pipeline.steps[i]);
        let Some(why) = hardware::why_unfit(
            &requirements,
            self.workers
                .values()
                .filter(|w| !w.lost)
                .map(|w| (&w.info.profile, w.info.slots)),
        ) else {
            return;
        };
        let mine: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.run_id == run_id && j.step == i)
            .map(|(id, _)| id.clone())
            .collect();
        let started = mine.iter().any(|id| {
            self.jobs
                .get(id)
                .is_some_and(|j| !matches!(j.state, JobState::Queued | JobState::Backoff))
        });
        if started {
            return;
        }
        for id in mine {
            self.jobs.remove(&id);
        }
        self.step_failed(
            run_id,
            i,
            format!("no enrolled worker can run this step: {why}"),
        );
        self.maybe_finish(run_id);
    }

    fn record_outcome(&mut self, worker: &str, ok: bool) {
        if !self.config.throttle_failing_workers {
            return;
        }
        if let Some(w) = self.workers.get_mut(worker) {
            w.record(ok, worker);
            self.dirty_workers.insert(worker.to_string());
        }
    }

    /// Frees what a job held on its worker.
    fn release(&mut self, job_id: &str) {
        let Some(worker) = self.jobs.get(job_id).and_then(|j| j.worker.clone()) else {
            return;
        };
        if let Some(w) = self.workers.get_mut(&worker)
            && w.alloc.remove(job_id).is_some()
        {
            // Capacity came back: someone waiting may fit now.
            self.dispatch();
        }
    }

    fn on_heartbeat(
        &mut self,
        worker: &str,
        running: &[(String, u64)],
        profile: Option<Box<Profile>>,
    ) -> Vec<(String, u64)> {
        let ttl = self.config.lease_ttl;
        let Some(w) = self.workers.get_mut(worker) else {
            return running.to_vec();
        };
        w.last_seen = Instant::now();
        if w.lost {
            tracing::info!(worker, "worker is back");
            w.lost = false;
        }
        if let Some(p) = profile {
            w.refresh_profile(*p);
        }
        let mut cancel = Vec::new();
        for (job_id, generation) in running {
            match self.jobs.get_mut(job_id) {
                Some(j)
                    if j.state == JobState::Leased
                        && j.generation == *generation
                        && j.worker.as_deref() == Some(worker) =>
                {
                    j.deadline = ttl.map(|t| Instant::now() + t);
                    let cancelled = self.runs.get(&j.run_id).is_some_and(|r| r.cancelled);
                    if cancelled {
                        cancel.push((job_id.clone(), *generation));
                    }
                }
                // Not this worker's any more (expired, finished, reassigned): stop that
                // attempt (only that one: the same job may be leased here again).
                _ => cancel.push((job_id.clone(), *generation)),
            }
        }
        cancel
    }

    fn on_tick(&mut self) {
        let Some(ttl) = self.config.lease_ttl else {
            return;
        };
        let now = Instant::now();
        for (id, w) in &mut self.workers {
            if !w.lost && now.duration_since(w.last_seen) > ttl {
                w.lost = true;
                tracing::warn!(worker = %id, "worker lost: no heartbeat within the lease ttl");
            }
        }
        let expired: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.state == JobState::Leased && j.deadline.is_some_and(|d| d < now))
            .map(|(id, _)| id.clone())
            .collect();
        for job_id in expired {
            if self.drop_late_replica(&job_id) {
                self.refusals.lease_expiries += 1;
                continue;
            }
            self.release(&job_id);
            let Some(j) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            self.refusals.lease_expiries += 1;
            // A cancelled run's job is never leased again: its lease ending ends it.
            if self.runs.get(&j.run_id).is_some_and(|r| r.cancelled) {
                tracing::info!(job = %job_id, "lease of a cancelled run's job expired; dropping it");
                self.job_failed(&job_id, "cancelled".into(), false);
                continue;
            }
            tracing::warn!(job = %job_id, worker = ?j.worker, generation = j.generation, "lease expired; requeueing");
            j.attempt += 1;
            j.state = JobState::Queued;
            j.worker = None;
            j.deadline = None;
            j.queued_at = Instant::now();
            if let Some(run) = self.runs.get(&j.run_id) {
                run.emit(Progress::Retry {
                    job: job_id.clone(),
                    attempt: j.attempt,
                    delay: Duration::ZERO,
                    error: "lease expired (worker lost or unreachable)".into(),
                });
            }
            self.queue.push_back(job_id);
        }
        self.dispatch();
    }

    /// Takes a reported result: the verdict says whether it was admitted (it may still
    /// fail sealing later) or refused, and why.
    fn on_report(
        &mut self,
        worker: &str,
        result: JobResult,
        verdict: std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        if let Err(why) = self.admit(worker, &result, verdict) {
            // Nothing of a refused result is kept.
            cleanup_failed(None, result.staging.clone());
            return Err(why);
        }
        self.accept(worker, result);
        Ok(())
    }

    /// The checks a result must pass before anything of it is used: a live lease of
    /// this worker, the enrolled key's signature, a run that is not cancelled.
    fn admit(
        &mut self,
        worker: &str,
        result: &JobResult,
        verdict: std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            self.refusals.unknown_job += 1;
            tracing::warn!(job = %result.job_id, worker, "refused result for an unknown or finished job");
            return Err("unknown or finished job".into());
        };
        if job.state != JobState::Leased
            || job.generation != result.generation
            || job.worker.as_deref() != Some(worker)
        {
            self.refusals.stale += 1;
            if job.state != JobState::Leased {
                tracing::warn!(job = %result.job_id, worker, generation = result.generation, "refused result: its lease expired or ended before it arrived");
            } else if job.generation != result.generation {
                tracing::warn!(job = %result.job_id, worker, generation = result.generation, current = job.generation, "refused result from a stale lease generation");
            } else {
                tracing::warn!(job = %result.job_id, worker, generation = result.generation, "refused result: the job is leased to another worker");
            }
            return Err(
                "not this worker's live lease of the job (expired, reassigned or stale)".into(),
            );
        }
        // The job no longer runs on the worker, whatever the result says.
        self.release(&result.job_id);
        let enrolled = self.workers.get(worker).map(|w| (w.info.key, w.admin));
        let verified = match enrolled {
            None => Err("worker is not enrolled".to_string()),
            // The verdict was reached against the enrolled key (see `Coordinator::report`);
            // a worker that re-enrolled with another key since has another id.
            Some((key, _)) if key != result.worker_key => {
                Err("result was not signed with the enrolled key".to_string())
            }
            Some((_, AdminState::Ban)) => {
                self.refusals.banned += 1;
                tracing::warn!(job = %result.job_id, worker, "refused result from a banned worker");
                self.job_failed(
                    &result.job_id,
                    "result refused: the worker is banned".into(),
                    true,
                );
                return Err("the worker is banned".into());
            }
            Some(_) => verdict,
        };
        if let Err(e) = verified {
            self.refusals.signature += 1;
            tracing::warn!(job = %result.job_id, worker, error = %e, "refused result: bad signature");
            self.record_outcome(worker, false);
            self.job_failed(&result.job_id, format!("result refused: {e}"), true);
            return Err(e);
        }
        // A cancelled run seals nothing more, whatever the result says.
        let cancelled = self
            .jobs
            .get(&result.job_id)
            .and_then(|j| self.runs.get(&j.run_id))
            .is_some_and(|r| r.cancelled);
        if cancelled {
            tracing::info!(job = %result.job_id, worker, outcome = ?result.outcome, "result of a cancelled run discarded");
            self.job_failed(&result.job_id, "cancelled".into(), false);
            return Err("the run was cancelled".into());
        }
        Ok(())
    }

    /// Acts on an admitted result: seal it, wait for its quorum, or fail or retry it.
    fn accept(&mut self, worker: &str, result: JobResult) {
        // A job's own failure is judged when the job ends (see `blame`).
        if matches!(result.outcome, Outcome::Failed | Outcome::TimedOut)
            && let Some(j) = self.jobs.get(&result.job_id)
        {
            self.blame.attempt_failed(&j.run_id, &result.job_id, worker);
        }
        if let Some(m) = &self.config.metrics {
            let secs = result.ended_ms.saturating_sub(result.started_ms) as f64 / 1000.0;
            m.job_duration.observe(secs);
            let outcome = match result.outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed => "failed",
                Outcome::TimedOut => "timed_out",
                Outcome::Cancelled => "cancelled",
            };
            m.jobs_finished.with_label_values(&[outcome]).inc();
        }
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return;
        };
        if job.unit.is_some() && result.outcome != Outcome::Succeeded {
            let job_id = result.job_id.clone();
            if self.drop_late_replica(&job_id) {
                cleanup_failed(None, result.staging.clone());
                return;
            }
        }
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return;
        };
        if job.unit.is_some() && result.outcome == Outcome::Succeeded {
            // A replica: its result waits for the quorum before anything is sealed.
            job.state = JobState::Sealing;
            let job_id = result.job_id.clone();
            self.on_replica_result(&job_id, worker, result);
            return;
        }
        job.pending_credit = Some(replication::credit_of(&job.spec, &result));
        let mut log_copy = None;
        if let Some(run) = self.runs.get_mut(&job.run_id) {
            let rec = &mut run.records[job.step];
            let duration = result.ended_ms.saturating_sub(result.started_ms);
            let name = match job.shard {
                None => format!("{}.log", rec.id),
                Some(k) => format!("{}.shard-{k:05}.log", rec.id),
            };
            let dest = run
                .ctx
                .state_dir
                .join("logs")
                .join(paths::safe_component(&name));
            match job.shard {
                None => {
                    rec.log = Some(run.ctx.rel(&dest));
                    rec.duration_ms = Some(duration);
                }
                Some(k) => rec.shards[k].worker = Some(hex::encode(result.worker_key)),
            }
            log_copy = result.log.clone().map(|src| (src, dest));
        }
        match result.outcome {
            Outcome::Succeeded => {
                let job_id = result.job_id.clone();
                self.start_sealing(&job_id, result, log_copy);
            }
            Outcome::Cancelled => {
                cleanup_failed(log_copy, result.staging.clone());
                self.job_failed(&result.job_id, "cancelled".into(), false)
            }
            Outcome::TimedOut => {
                cleanup_failed(log_copy, result.staging.clone());
                let msg = format!("timed out; {}", tail(&result.error, 2000));
                self.job_failed(&result.job_id, msg, true)
            }
            Outcome::Failed => {
                cleanup_failed(log_copy, result.staging.clone());
                let msg = match (result.exit_code, result.error.is_empty()) {
                    (Some(c), true) => format!("exit status {c}"),
                    (Some(c), false) => format!("exit status {c}: {}", tail(&result.error, 2000)),
                    (None, true) => "killed by a signal".to_string(),
                    (None, false) => tail(&result.error, 2000),
                };
                self.job_failed(&result.job_id, msg, true)
            }
        }
    }

    /// Hands an accepted result to the sealing thread.
    fn start_sealing(
        &mut self,
        job_id: &str,
        result: JobResult,
        log_copy: Option<(PathBuf, PathBuf)>,
    ) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.state = JobState::Sealing;
        let Some(run) = self.runs.get_mut(&job.run_id) else {
            return;
        };
        let Some(plan) = run.plans[job.step].clone() else {
            return;
        };
        run.in_flight += 1;
        let task = SealTask {
            job_id: job_id.to_string(),
            ctx: run.ctx.clone(),
            plan,
            shard: job.shard,
            result,
            log_copy,
        };
        if !self.sealer.push(task) {
            tracing::error!("the sealing thread is gone");
        }
    }

    fn on_sealed(&mut self, job_id: &str, res: std::result::Result<SealedJob, String>) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let (run_id, i, shard) = (job.run_id.clone(), job.step, job.shard);
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.in_flight -= 1;
        }
        let pending_credit = job.pending_credit;
        // Only a wrong result is the worker's fault here; a seal that failed for the
        // coordinator's own reasons (its disk) is not.
        let worker_fault = res.as_ref().err().is_some_and(|e| {
            e.contains("does not match the signed manifest")
                || e.contains("result names unknown output")
        });
        if let Some(w) = job.worker.clone() {
            if res.is_ok() || worker_fault {
                self.record_outcome(&w, res.is_ok());
            }
            if res.is_ok() {
                // Workers that failed what this one could run are charged now.
                for failed in self.blame.succeeded(job_id, &w) {
                    self.record_outcome(&failed, false);
                }
            }
            if res.is_ok()
                && let Some(c) = pending_credit
                && let Some(ws) = self.workers.get_mut(&w)
            {
                ws.credit.cpu_seconds += c.cpu_seconds;
                ws.credit.gpu_seconds += c.gpu_seconds;
                self.dirty_workers.insert(w.clone());
            }
        }
        match res {
            Err(e) => {
                if e.contains("does not match the signed manifest") {
                    self.refusals.digest += 1;
                }
                tracing::warn!(job = %job_id, error = %e, "sealing failed");
                self.job_failed(job_id, format!("sealing outputs: {e}"), true);
            }
            Ok(SealedJob::Step(outputs)) => {
                let worker = self.jobs.remove(job_id).and_then(|j| j.worker);
                let key = worker.and_then(|w| self.workers.get(&w).map(|i| i.info.key));
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                run.records[i].outputs = outputs;
                run.records[i].worker = key.map(hex::encode);
                self.set_status(&run_id, i, StepStatus::Complete, None);
                self.step_done(&run_id, i);
            }
            Ok(SealedJob::Shard(sealed)) => {
                let worker = self.jobs.remove(job_id).and_then(|j| j.worker);
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                let k = shard.unwrap_or(0);
                let s = &mut run.records[i].shards[k];
                s.status = StepStatus::Complete;
                s.hash = Some(sealed.hash.clone());
                s.error = None;
                if s.worker.is_none() {
                    s.worker =
                        worker.and_then(|w| self.workers.get(&w).map(|i| hex::encode(i.info.key)));
                }
                run.emit(Progress::Shard {
                    step: run.records[i].id.clone(),
                    index: sealed.index,
                    status: StepStatus::Complete,
                });
                run.shard_results[i].insert(k, *sealed);
                self.persist(&run_id, i);
                self.shard_settled(&run_id, i);
            }
        }
        self.maybe_finish(&run_id);
    }

    /// A shard reached a final state: when all have, fail the step or assemble it.
    fn shard_settled(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let shards = &run.records[i].shards;
        if !shards.iter().all(|s| s.status.is_final()) {
            return;
        }
        let failed: Vec<String> = shards
            .iter()
            .filter(|s| s.status == StepStatus::Failed)
            .map(|s| format!("shard {}: {}", s.index, s.error.clone().unwrap_or_default()))
            .collect();
        if run.cancelled || shards.iter().any(|s| s.status == StepStatus::Cancelled) {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
        } else if !failed.is_empty() {
            let total = shards.len();
            let msg = format!(
                "{} of {total} shards failed; {}",
                failed.len(),
                failed.join("; ")
            );
            self.step_failed(run_id, i, msg);
        } else {
            self.start_assembly(run_id, i);
        }
    }

    fn start_assembly(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(plan) = run.plans[i].clone() else {
            return;
        };
        let shards: Vec<ShardSealed> = run.shard_results[i].values().cloned().collect();
        run.in_flight += 1;
        let ctx = run.ctx.clone();
        let tx = self.tx.clone();
        let rid = run_id.to_string();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let res = sealer::assemble(&ctx, &plan, &shards);
            if let Ok(outputs) = &res {
                let nodes: Vec<_> = outputs
                    .values()
                    .filter_map(|a| {
                        crate::lineage::node_from_disk(&ctx.project, &ctx.project.join(&a.path))
                    })
                    .collect();
                if let Err(e) = crate::lineage::record(store.as_ref(), &nodes) {
                    tracing::error!(error = %format!("{e:#}"), "recording lineage");
                }
            }
            let _ = tx.send(Event::Assembled(rid, i, res));
        });
    }

    /// Runs a `core.registry.*` step here, on the blocking pool: it acts on the
    /// coordinator's registry, so it never goes to a worker.
    fn run_on_coordinator(&mut self, run_id: &str, i: usize, plan: Arc<StepPlan>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let step = &run.ctx.pipeline.steps[i];
        let params =
            nexa_shared::handlers::RegistryParams::from_json(&step.uses.value, &step.params);
        let inputs: Vec<(String, String, PathBuf)> = plan
            .inputs
            .iter()
            .map(|r| (r.name.clone(), r.uri.clone(), r.path.clone()))
            .collect();
        let rec = &mut run.records[i];
        rec.cache_key = Some(plan.cache_key.clone());
        rec.outputs.clear();
        run.in_flight += 1;
        let project = run.ctx.project.clone();
        let registry = self.config.registry.clone();
        let tx = self.tx.clone();
        let rid = run_id.to_string();
        self.set_status(run_id, i, StepStatus::Running, None);
        tokio::task::spawn_blocking(move || {
            let res = params.and_then(|p| {
                let store: Arc<dyn Store> = match registry {
                    Some(s) => s,
                    None => Arc::new(
                        crate::SledStore::open(&project.join(".nexa_state").join("registry"))
                            .map_err(|e| e.to_string())?,
                    ),
                };
                crate::registry::run_step(store.as_ref(), &project, &p, &inputs)
                    .map_err(|e| e.to_string())
            });
            let _ = tx.send(Event::CoordinatorStepDone(rid, i, res));
        });
    }

    fn on_coordinator_step_done(
        &mut self,
        run_id: &str,
        i: usize,
        res: std::result::Result<(String, bool), String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        match res {
            Ok((what, changed)) => {
                tracing::info!(run = %run_id, step = %run.records[i].id, "{what}");
                // Finding the work already done is a cache hit, as for any other step.
                let status = if changed {
                    StepStatus::Complete
                } else {
                    StepStatus::Skipped
                };
                self.set_status(run_id, i, status, Some(what));
                self.step_done(run_id, i);
            }
            Err(e) => self.step_failed(run_id, i, e),
        }
        self.maybe_finish(run_id);
    }

    fn on_assembled(
        &mut self,
        run_id: &str,
        i: usize,
        res: std::result::Result<BTreeMap<String, ArtifactInfo>, String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        match res {
            Ok(outputs) => {
                run.records[i].outputs = outputs;
                self.set_status(run_id, i, StepStatus::Complete, None);
                self.step_done(run_id, i);
            }
            Err(e) => self.step_failed(run_id, i, format!("assembling shards: {e}")),
        }
        self.maybe_finish(run_id);
    }

    fn job_failed(&mut self, job_id: &str, error: String, retryable: bool) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let (run_id, i, shard) = (job.run_id.clone(), job.step, job.shard);
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let retries = run.ctx.pipeline.steps[i].retries;
        if retryable && !run.cancelled && job.attempt <= retries.count {
            let delay = retries.delay(job.attempt);
            job.attempt += 1;
            job.state = JobState::Backoff;
            job.worker = None;
            run.emit(Progress::Retry {
                job: job_id.to_string(),
                attempt: job.attempt,
                delay,
                error: error.clone(),
            });
            tracing::info!(job = %job_id, attempt = job.attempt, delay_ms = delay.as_millis() as u64, error = %error, "retrying job");
            let tx = self.tx.clone();
            let id = job_id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Event::RetryDue(id));
            });
            return;
        }
        self.jobs.remove(job_id);
        if let Some(w) = self.blame.gave_up(job_id) {
            self.record_outcome(&w, false);
        }
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let status = if run.cancelled {
            StepStatus::Cancelled
        } else {
            StepStatus::Failed
        };
        match shard {
            None => {
                if status == StepStatus::Cancelled {
                    self.set_status(&run_id, i, status, Some("run cancelled".into()));
                } else {
                    self.step_failed(&run_id, i, error);
                }
            }
            Some(k) => {
                let s = &mut run.records[i].shards[k];
                s.status = status;
                s.error = Some(error);
                run.emit(Progress::Shard {
                    step: run.records[i].id.clone(),
                    index: run.records[i].shards[k].index,
                    status,
                });
                self.persist(&run_id, i);
                self.shard_settled(&run_id, i);
            }
        }
        self.maybe_finish(&run_id);
    }

    fn step_done(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let next = run.ctx.dag.dependents[i].clone();
        self.schedule_ready(run_id, Some(&next));
    }

    fn step_failed(&mut self, run_id: &str, i: usize, error: String) {
        tracing::info!(run = %run_id, step = i, error = %error, "step failed");
        self.set_status(run_id, i, StepStatus::Failed, Some(error));
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let failed_id = run.records[i].id.clone();
        let blocked: Vec<usize> = run
            .ctx
            .dag
            .downstream(i)
            .into_iter()
            .filter(|&d| d != i && run.records[d].status == StepStatus::Pending)
            .collect();
        for d in blocked {
            self.set_status(
                run_id,
                d,
                StepStatus::Blocked,
                Some(format!("blocked by failed step '{failed_id}'")),
            );
        }
    }

    fn on_cancel(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.cancelled {
            return;
        }
        run.cancelled = true;
        tracing::info!(run = %run_id, "cancelling run");
        if let Some(tx) = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(run_id)
        {
            let _ = tx.send(true);
        }
        // Drop queued and backing-off jobs; leased ones are killed by their workers and
        // report Cancelled.
        let dropped: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.run_id == run_id && matches!(j.state, JobState::Queued | JobState::Backoff)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            self.job_failed(&id, "cancelled".into(), false);
        }
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let pending: Vec<usize> = (0..run.records.len())
            .filter(|&i| run.records[i].status == StepStatus::Pending && !run.busy[i])
            .collect();
        for i in pending {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
        }
        self.maybe_finish(run_id);
    }

    fn maybe_finish(&mut self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.in_flight > 0 || run.unfinished > 0 {
            return;
        }
        debug_assert!(run.records.iter().all(|r| r.status.is_final()));
        if self.jobs.values().any(|j| j.run_id == run_id) {
            return;
        }
        let Some(mut run) = self.runs.remove(run_id) else {
            return;
        };
        self.granted.remove(run_id);
        self.blame.run_finished(run_id);
        let outcome = if run.cancelled
            || run
                .records
                .iter()
                .any(|r| r.status == StepStatus::Cancelled)
        {
            RunOutcome::Cancelled
        } else if run
            .records
            .iter()
            .any(|r| r.status == StepStatus::Failed || r.status == StepStatus::Blocked)
        {
            RunOutcome::Failed
        } else {
            RunOutcome::Succeeded
        };
        let refs: Vec<&StepRecord> = run.records.iter().collect();
        if let Err(e) = state::save_steps(self.store.as_ref(), &run.ctx.pipeline.name, &refs) {
            tracing::error!(error = %format!("{e:#}"), "saving final step state");
        }
        let rec = RunRecord {
            run_id: run_id.to_string(),
            pipeline: run.ctx.pipeline.name.clone(),
            started_at: run.started_at.clone(),
            finished_at: Some(now_rfc3339()),
            outcome: format!("{outcome:?}").to_lowercase(),
        };
        if let Err(e) = state::save_run(self.store.as_ref(), &rec).and_then(|_| self.store.flush())
        {
            tracing::error!(error = %format!("{e:#}"), "saving run record");
        }
        write_mirror(&mut run);
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
        tracing::info!(run = %run_id, ?outcome, elapsed_ms = run.started.elapsed().as_millis() as u64, "run finished");
        run.emit(Progress::Finished(RunSummary {
            run_id: run_id.to_string(),
            pipeline: run.ctx.pipeline.name.clone(),
            outcome,
            steps: run.records.clone(),
            elapsed: run.started.elapsed(),
        }));
    }
}

/// Keeps a job's log with the run state (`.nexa_state/<pipeline>/logs`).
/// After a failed job: keep its log, drop what it staged (off the scheduler task).
fn cleanup_failed(log: Option<(PathBuf, PathBuf)>, staging: Option<PathBuf>) {
    tokio::task::spawn_blocking(move || {
        keep_log(log);
        if let Some(s) = staging {
            let _ = nexa_shared::artifact::remove_tree(&s);
        }
    });
}

fn write_mirror(run: &mut Run) {
    run.last_mirror = Some(Instant::now());
    let m = mirror::Mirror {
        pipeline: run.ctx.pipeline.name.clone(),
        run_id: run.ctx.run_id.clone(),
        updated_at: now_rfc3339(),
        steps: run.records.clone(),
    };
    if let Err(e) = mirror::write(&run.ctx.state_dir, &m) {
        tracing::warn!(error = %e, "writing pipeline_state.json");
    }
}

/// What a step's jobs need from a worker: its resources, and a container runtime when
/// it names an image.
fn requirements_of(step: &nexa_shared::spec::Step) -> Requirements {
    let mut r = Requirements::from(&step.resources);
    r.container = step.image().is_some();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> WorkerState {
        WorkerState::new(WorkerInfo {
            name: "w".into(),
            key: [0; 32],
            profile: Profile::default(),
            slots: 1,
        })
    }

    #[test]
    fn refreshed_free_gpu_memory_is_trusted_only_for_gpus_we_did_not_hold() {
        const GIB: u64 = 1 << 30;
        let gpu = |i: u32, free: u64| nexa_shared::hardware::Gpu {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "g".into(),
            memory_total: 24 * GIB,
            memory_free: free * GIB,
            compute_capability: (8, 9),
            mig_enabled: false,
        };
        let reading = |a: u64, b: u64| Profile {
            gpus: vec![gpu(0, a), gpu(1, b)],
            ..Profile::default()
        };
        let mut w = worker();
        w.refresh_profile(reading(24, 24));
        // Our job holds GPU 0; the reading shows its memory in use, and GPU 1 held by
        // someone else.
        w.touched_gpus.insert(0);
        w.alloc.insert(
            "j".into(),
            Alloc {
                cpus: 1,
                memory: 0,
                gpus: vec![0],
            },
        );
        w.refresh_profile(reading(1, 3));
        let free = |w: &WorkerState| {
            w.info
                .profile
                .gpus
                .iter()
                .map(|g| g.memory_free / GIB)
                .collect::<Vec<_>>()
        };
        assert_eq!(free(&w), [24, 3]);
        // The job ended just before the next reading, which may still show its memory.
        w.alloc.clear();
        w.refresh_profile(reading(1, 3));
        assert_eq!(free(&w), [24, 3]);
        // From then on the reading is trusted for GPU 0 as well.
        w.refresh_profile(reading(5, 24));
        assert_eq!(free(&w), [5, 24]);
    }

    #[test]
    fn failing_workers_are_throttled_then_quarantined_and_recover_on_success() {
        let mut w = worker();
        let now = Instant::now();
        assert!(w.eligible(now));
        for _ in 0..THROTTLE_AFTER - 1 {
            w.record(false, "w");
        }
        assert!(
            w.eligible(Instant::now()),
            "a couple of failures do not throttle"
        );
        w.record(false, "w");
        assert!(!w.eligible(Instant::now()), "failures in a row throttle");
        assert_eq!(w.state_name(Instant::now()), "throttled");
        w.record(true, "w");
        assert!(w.eligible(Instant::now()), "a success lifts the throttle");
        for _ in 0..QUARANTINE_AFTER {
            w.record(false, "w");
        }
        w.throttled_until = None;
        assert!(w.quarantined());
        assert!(
            !w.eligible(Instant::now()),
            "quarantined workers get no work"
        );
        assert_eq!(w.state_name(Instant::now()), "quarantined");
        assert_eq!(
            (w.succeeded, w.failed),
            (1, u64::from(THROTTLE_AFTER) + QUARANTINE_AFTER as u64)
        );
    }

    #[test]
    fn drained_banned_and_lost_workers_get_no_work() {
        let now = Instant::now();
        for (admin, lost, name) in [
            (AdminState::Drain, false, "draining"),
            (AdminState::Ban, false, "banned"),
            (AdminState::Active, true, "lost"),
        ] {
            let mut w = worker();
            w.admin = admin;
            w.lost = lost;
            assert!(!w.eligible(now));
            assert_eq!(w.state_name(now), name);
        }
    }
}
