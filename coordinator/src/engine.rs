//! The scheduler loop: one task owns all run, step and job state and consumes a closed
//! set of [`Event`]s. Handlers (the in-process worker link today, the gRPC edge with the
//! mesh) talk to it only through [`Coordinator`].

use crate::planner::{self, Plan, RunContext, StepPlan};
pub use crate::seal_queue::{SealFailure, SealedJob, WrongResult};
use crate::seal_queue::{SealQueue, SealTask, keep_log};

mod blame;
mod finish;
mod generations;
mod handle;
mod jobs;
mod leasing;
mod placement;
mod replication;
mod results;
mod runs;
mod tasks;
mod workers;
use crate::sealer::{self, ShardSealed};
use crate::state::{self, ArtifactInfo, RunRecord, ShardRecord, StepRecord, StepStatus};
use crate::{Error, Result, Store, mirror};
use finish::{cleanup_failed, requirements_of, write_mirror};
use jobs::{Job, JobState};
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
    /// An upload for an old attempt of a job that exists (expired or reassigned).
    StaleUpload,
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
    Sealed(String, std::result::Result<SealedJob, SealFailure>),
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
    /// Where the registry's models are mirrored as JSON (`<data>/registry` on a
    /// coordinator, for `store recover`); `None`: not mirrored.
    pub registry_mirror: Option<PathBuf>,
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
            registry_mirror: None,
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

/// A handle to the coordinator loop; cheap to clone.
#[derive(Clone, Debug)]
pub struct Coordinator {
    tx: mpsc::UnboundedSender<Event>,
    cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    /// Enrolled workers' public keys, for checking result signatures off the loop.
    keys: Arc<std::sync::RwLock<HashMap<String, [u8; 32]>>>,
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
    /// Runs that are over but whose final state the store has not taken yet.
    finishing: std::collections::BTreeSet<String>,
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
    /// Lease generations (fencing tokens that only grow).
    generations: generations::Generations,
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

/// A new run id, `YYYYMMDDTHHMMSS-xxxx` (UTC): sortable by start time, unique enough per
/// process.
pub fn new_run_id() -> String {
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
                    Some(_) => LeaseCheck::Stale,
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
                    j.set_state(JobState::Queued);
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
                EdgeRefusal::StaleUpload => self.refusals.stale += 1,
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
}
