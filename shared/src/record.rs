//! What a run reports: step statuses and records, its progress and its summary. Shared
//! by the coordinator (which keeps the records in its store), the wire conversions
//! (`nexa-proto`) and the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

mod shard_list;
pub use shard_list::ShardList;

/// A step's (or shard's) status, as the seeds name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    /// Waiting for its dependencies.
    Pending,
    /// Jobs are queued or running.
    Running,
    /// Ran and sealed its artifact.
    Complete,
    /// Its artifact was already sealed under the same cache key.
    Skipped,
    /// Failed (after its retries).
    Failed,
    /// Not run because something upstream failed.
    Blocked,
    /// Stopped by the user.
    Cancelled,
}

impl StepStatus {
    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "PENDING",
            StepStatus::Running => "RUNNING",
            StepStatus::Complete => "COMPLETE",
            StepStatus::Skipped => "SKIPPED",
            StepStatus::Failed => "FAILED",
            StepStatus::Blocked => "BLOCKED",
            StepStatus::Cancelled => "CANCELLED",
        }
    }

    /// True for COMPLETE and SKIPPED: the step's artifacts can be used.
    pub fn is_done(self) -> bool {
        matches!(self, StepStatus::Complete | StepStatus::Skipped)
    }

    /// True when the step will not change any more in this run.
    pub fn is_final(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running)
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One sealed output of a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactInfo {
    /// The artifact directory, relative to the project.
    pub path: String,
    /// `blake3:<hex>`.
    pub hash: String,
    /// Payload bytes.
    pub bytes: u64,
}

/// One shard's record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    /// 0-based index.
    pub index: u32,
    /// Its status.
    pub status: StepStatus,
    /// Its cache key.
    pub cache_key: Option<crate::ids::CacheKey>,
    /// Its payload hash once sealed.
    pub hash: Option<String>,
    /// The worker's public key (hex) that produced it.
    pub worker: Option<String>,
    /// Attempts made in the last run.
    pub attempts: u32,
    /// Why it failed.
    pub error: Option<String>,
}

/// A step's record, as stored and mirrored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Step id.
    pub id: String,
    /// Status.
    pub status: StepStatus,
    /// Cache key, once computed.
    pub cache_key: Option<crate::ids::CacheKey>,
    /// Output name → sealed artifact.
    pub outputs: BTreeMap<String, ArtifactInfo>,
    /// The run that last touched it.
    pub run_id: String,
    /// Attempts made in that run (for unsharded steps).
    pub attempts: u32,
    /// Why it failed, was blocked or cancelled.
    pub error: Option<String>,
    /// The worker's public key (hex) that produced it (unsharded steps).
    pub worker: Option<String>,
    /// Where its log is, relative to the project.
    pub log: Option<String>,
    /// Shards, for fanned-out steps.
    pub shards: ShardList,
    /// Wall time in ms of the last execution.
    pub duration_ms: Option<u64>,
    /// What its running job last said of its progress (unsharded steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::job::JobProgress>,
}

impl StepRecord {
    /// A fresh PENDING record.
    pub fn pending(id: &str, run_id: &str) -> Self {
        Self {
            id: id.to_string(),
            status: StepStatus::Pending,
            cache_key: None,
            outputs: BTreeMap::new(),
            run_id: run_id.to_string(),
            attempts: 0,
            error: None,
            worker: None,
            log: None,
            shards: ShardList::new(),
            duration_ms: None,
            progress: None,
        }
    }
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
    pub run_id: crate::ids::RunId,
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
    /// A running job said how far it is.
    Job {
        /// Step id.
        step: String,
        /// Shard index, for a shard's job.
        shard: Option<u32>,
        /// What it said.
        progress: crate::job::JobProgress,
    },
    /// The run ended.
    Finished(RunSummary),
}

/// Where a run is, as its record in the store says (kept as lowercase names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Started and not over.
    Running,
    /// Every step COMPLETE or SKIPPED.
    Succeeded,
    /// At least one step FAILED or BLOCKED.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

impl From<RunOutcome> for RunState {
    fn from(o: RunOutcome) -> Self {
        match o {
            RunOutcome::Succeeded => RunState::Succeeded,
            RunOutcome::Failed => RunState::Failed,
            RunOutcome::Cancelled => RunState::Cancelled,
        }
    }
}

/// An operator's say over a worker (kept as `active`, `drain`, `ban`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Gets work.
    Active,
    /// Finishes what it runs, gets nothing new.
    Drain,
    /// Gets nothing; its results are refused.
    Ban,
}

impl AdminState {
    /// The lowercase name (`active`, `drain`, `ban`).
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Drain => "drain",
            AdminState::Ban => "ban",
        }
    }
}

/// A worker as an operator sees it (`nexa workers`, the leaderboard): what the
/// coordinator's `ListWorkers` answers, and the wire's `WorkerStatus`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSummary {
    /// Id (from its key).
    pub id: crate::ids::WorkerId,
    /// The name it gave.
    pub name: String,
    /// How it stands.
    pub state: WorkerState,
    /// Its hardware.
    pub profile: crate::hardware::Profile,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Jobs leased to it now.
    pub running: u32,
    /// Results accepted.
    pub succeeded: u64,
    /// Failed or refused results.
    pub failed: u64,
    /// Its Ed25519 public key.
    pub key: [u8; 32],
    /// Results a quorum agreed with, over every kind of job.
    pub valid: u64,
    /// Results a quorum disagreed with.
    pub invalid: u64,
    /// Kinds of job (`uses`) it is trusted for: its results are only spot-checked.
    pub trusted_for: Vec<String>,
    /// Credit: CPU-seconds of accepted (validated where that applies) work.
    pub cpu_seconds: f64,
    /// Credit: GPU-seconds.
    pub gpu_seconds: f64,
}

impl WorkerSummary {
    /// Failed results over all results; 0 before the first.
    pub fn error_rate(&self) -> f64 {
        let total = self.succeeded + self.failed;
        if total == 0 {
            0.0
        } else {
            self.failed as f64 / total as f64
        }
    }
}

/// How a worker stands, as `nexa workers` shows it: the operator's say first, then its
/// health.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Gets work.
    Active,
    /// No heartbeat within the lease ttl.
    Lost,
    /// Drained by an operator.
    Draining,
    /// Banned by an operator.
    Banned,
    /// Paused after failures in a row.
    Throttled,
    /// Too many recent failures: no work until an operator re-activates it.
    Quarantined,
}

impl WorkerState {
    /// Every state, in the order `nexa workers` and the metrics list them.
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Active,
        WorkerState::Lost,
        WorkerState::Draining,
        WorkerState::Banned,
        WorkerState::Throttled,
        WorkerState::Quarantined,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Lost => "lost",
            WorkerState::Draining => "draining",
            WorkerState::Banned => "banned",
            WorkerState::Throttled => "throttled",
            WorkerState::Quarantined => "quarantined",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
