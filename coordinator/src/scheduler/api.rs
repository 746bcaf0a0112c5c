//! What callers of the scheduler send and get back: requests, progress, summaries,
//! worker views, refusal counters and the engine's configuration.

use super::*;
pub use nexa_shared::record::{
    AdminState, Progress, RunOutcome, RunSummary, WorkerState, WorkerSummary,
};

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
    pub run_id: Option<RunId>,
    /// Inputs must resolve inside the project (a submitted pipeline reads only what was
    /// uploaded with it); embedded runs may read any local path.
    pub confined: bool,
}

/// A submitted run: its id, its progress and, at its end, its summary.
///
/// Progress is bounded ([`PROGRESS`] lines waiting): a reader that falls behind misses
/// progress lines, never the summary, and never slows the scheduler.
#[derive(Debug)]
pub struct RunHandle {
    /// Run id.
    pub run_id: RunId,
    progress: mpsc::Receiver<Progress>,
    done: oneshot::Receiver<RunSummary>,
    /// The summary, once it came, until the lines sent before it are read.
    summary: Option<RunSummary>,
    /// `done` answered (the summary, or the engine went).
    answered: bool,
    /// Nothing more comes.
    over: bool,
}

impl RunHandle {
    pub(super) fn new(
        run_id: RunId,
        progress: mpsc::Receiver<Progress>,
        done: oneshot::Receiver<RunSummary>,
    ) -> Self {
        Self {
            run_id,
            progress,
            done,
            summary: None,
            answered: false,
            over: false,
        }
    }

    /// The run's next progress line; its last is [`Progress::Finished`] with its
    /// summary, after every line sent before it. `None` after that, or when the
    /// coordinator stopped before the run finished.
    pub async fn recv(&mut self) -> Option<Progress> {
        loop {
            if let Some(p) = self.try_recv() {
                return Some(p);
            }
            if self.over {
                return None;
            }
            tokio::select! {
                biased;
                Some(p) = self.progress.recv() => return Some(p),
                done = &mut self.done, if !self.answered => {
                    self.answered = true;
                    self.summary = done.ok();
                }
                else => {
                    self.over = true;
                    return None;
                }
            }
        }
    }

    /// [`RunHandle::recv`] without waiting: `None` when nothing is ready.
    pub fn try_recv(&mut self) -> Option<Progress> {
        if self.over {
            return None;
        }
        if !self.answered {
            match self.done.try_recv() {
                Ok(s) => (self.answered, self.summary) = (true, Some(s)),
                Err(oneshot::error::TryRecvError::Closed) => self.answered = true,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        // Looked at after the summary: every line sent before it is in the channel.
        if let Ok(p) = self.progress.try_recv() {
            return Some(p);
        }
        if self.answered {
            self.over = true;
            return self.summary.take().map(Progress::Finished);
        }
        None
    }
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

/// The kinds of refusal the engine counts, one [`Refusals`] counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A stale lease generation (expired, reassigned or already reported).
    Stale,
    /// A result for a job the coordinator does not know.
    UnknownJob,
    /// An upload or input fetch for an attempt not leased to the caller.
    NoLease,
    /// A signature that did not verify against the enrolled key.
    Signature,
    /// An uploaded payload that did not match the signed manifest.
    Digest,
    /// A lease that expired.
    LeaseExpired,
    /// A result from a banned worker.
    Banned,
    /// An upload whose name would leave the staging directory.
    UnsafeName,
    /// Uploaded bytes that did not hash to their declared digest or size.
    UploadDigest,
    /// A replica result its quorum disagreed with.
    Outvoted,
}

impl From<EdgeRefusal> for Refused {
    fn from(e: EdgeRefusal) -> Self {
        match e {
            EdgeRefusal::UnsafeName => Refused::UnsafeName,
            EdgeRefusal::UploadDigest => Refused::UploadDigest,
            EdgeRefusal::NoLease => Refused::NoLease,
            EdgeRefusal::StaleUpload => Refused::Stale,
        }
    }
}

impl Refusals {
    /// Counts one refusal of `kind`.
    pub fn count(&mut self, kind: Refused) {
        let n = match kind {
            Refused::Stale => &mut self.stale,
            Refused::UnknownJob => &mut self.unknown_job,
            Refused::NoLease => &mut self.no_lease,
            Refused::Signature => &mut self.signature,
            Refused::Digest => &mut self.digest,
            Refused::LeaseExpired => &mut self.lease_expiries,
            Refused::Banned => &mut self.banned,
            Refused::UnsafeName => &mut self.unsafe_name,
            Refused::UploadDigest => &mut self.upload_digest,
            Refused::Outvoted => &mut self.outvoted,
        };
        *n += 1;
    }

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

/// What a worker asks the loop for: up to `slots` leases at once (its free slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// The most leases wanted (at least one is asked for).
    pub slots: usize,
    /// Wait for the first lease when nothing fits now; else answer at once, maybe with
    /// none (a worker that reported results in the same call wants its verdicts back).
    pub wait: bool,
}

/// A worker waiting in the loop for leases.
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) worker: WorkerId,
    pub(super) slots: usize,
    /// An empty answer: the loop is stopping (or, for one that does not wait, nothing
    /// fits now).
    pub(super) reply: oneshot::Sender<Vec<Lease>>,
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
    /// How many progress lines may wait for a run's reader before lines are dropped
    /// (never its summary): [`PROGRESS`] unless a test wants fewer.
    pub progress_lines: usize,
    /// Cluster schedulers (`slurm`) whose steps a provider starts workers for: such a
    /// step waits for them however long, and the provider fails it when they cannot
    /// run (see [`Coordinator::fail_steps`]).
    pub provided_schedulers: Vec<String>,
    /// Workers in this process (the embedded worker when pilots join the embedded
    /// engine): they send no heartbeats, so their leases never expire and they are
    /// never lost.
    pub resident_workers: Vec<String>,
    /// The most live jobs of one fan-out step; the rest are made as these end
    /// ([`SHARD_WINDOW`] unless a test wants fewer).
    pub shard_window: usize,
}

/// The most live jobs of one fan-out step (queued, leased, sealing or backing off):
/// a job costs ~700 bytes of engine memory, so a million-shard step made whole would
/// hold ~700 MB of jobs no worker could take for hours. Well above the slots of any
/// mesh one coordinator serves (10,000 workers of one slot each), so a worker asking
/// never finds a fan-out's queue empty while it has shards left.
pub const SHARD_WINDOW: usize = 16_384;

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
            .field("progress_lines", &self.progress_lines)
            .field("provided_schedulers", &self.provided_schedulers)
            .field("resident_workers", &self.resident_workers)
            .field("shard_window", &self.shard_window)
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
            progress_lines: PROGRESS,
            provided_schedulers: Vec::new(),
            resident_workers: Vec::new(),
            shard_window: SHARD_WINDOW,
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

/// Which workers a listing returns: ordered by id, those after `after`, at most
/// `limit` (`nexa workers` asks page by page, so 10,000 workers are never one answer).
#[derive(Debug, Clone, Default)]
pub struct WorkerPage {
    /// The last id of the page before; `None`: from the start.
    pub after: Option<WorkerId>,
    /// The most workers to return.
    pub limit: usize,
}

/// A worker as `nexa workers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    /// Id (from its key).
    pub id: WorkerId,
    /// The name it gave.
    pub name: String,
    /// How it stands.
    pub state: WorkerState,
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

impl WorkerView {
    /// What an operator is shown of it: its trust summed over the kinds of job.
    pub fn summary(&self) -> WorkerSummary {
        WorkerSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            profile: self.profile.clone(),
            slots: self.slots,
            running: self.running,
            succeeded: self.succeeded,
            failed: self.failed,
            key: self.key,
            valid: self.trust.values().map(|t| t.valid).sum(),
            invalid: self.trust.values().map(|t| t.invalid).sum(),
            trusted_for: self
                .trust
                .iter()
                .filter(|(_, t)| t.trusted())
                .map(|(k, _)| k.clone())
                .collect(),
            cpu_seconds: self.credit.cpu_seconds,
            gpu_seconds: self.credit.gpu_seconds,
        }
    }
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
