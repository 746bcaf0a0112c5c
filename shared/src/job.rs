//! Jobs, leases and results: what the coordinator hands a worker and what comes back.
//! The embedded engine passes these in process; the mesh carries them over gRPC.

use crate::ids::{JobId, RunId};
use std::path::PathBuf;
use std::time::Duration;

/// One input of a job, identified by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput {
    /// The step's name for it.
    pub name: String,
    /// `blake3:<hex>`.
    pub digest: crate::ids::Digest,
    /// Whether it is a directory tree.
    pub is_dir: bool,
    /// Where the coordinator holds it (the worker fetches by digest from here); for a
    /// range shard, only its name (the part is never written out on the coordinator).
    pub source: PathBuf,
    /// A range shard: the spans of the input it is staged from (not on the wire: a
    /// mesh worker fetches it by digest and the coordinator streams the spans).
    pub range: Option<std::sync::Arc<crate::shard::Range>>,
}

/// What to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSpec {
    /// Unique id: `<run>/<step>` or `<run>/<step>/<shard>` (see [`JobId`]).
    pub job_id: JobId,
    /// The run it belongs to.
    pub run_id: RunId,
    /// The step id.
    pub step_id: String,
    /// `(index, count)` for a shard.
    pub shard: Option<(u32, u32)>,
    /// Handler.
    pub uses: String,
    /// Handler params.
    pub params: serde_json::Value,
    /// Inputs.
    pub inputs: Vec<JobInput>,
    /// Output names (each becomes a directory the job writes into).
    pub outputs: Vec<String>,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// What the job needs from a worker.
    pub requirements: crate::hardware::Requirements,
}

/// A job given to one worker, fenced by a generation number: a result carrying an older
/// generation is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The job.
    pub job: JobSpec,
    /// Fencing token, strictly increasing per job.
    pub generation: u64,
    /// 1-based attempt.
    pub attempt: u32,
    /// UUIDs of the GPUs the coordinator reserved for the job (its `CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<String>,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit status 0 and outputs hashed.
    Succeeded,
    /// Non-zero exit, a signal, or an error staging or hashing.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Killed because the run was cancelled.
    Cancelled,
}

impl Outcome {
    /// The stable name used in signed manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One output file as the worker hashed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputFile {
    /// The output name.
    pub output: String,
    /// Path inside the output, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `blake3:<hex>`.
    pub digest: crate::ids::Digest,
}

/// What a worker reports for a lease.
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    /// The job.
    pub job_id: JobId,
    /// The lease generation this answers.
    pub generation: u64,
    /// The attempt this answers.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Output files, sorted by (output, path).
    pub outputs: Vec<OutputFile>,
    /// Start, ms since the epoch.
    pub started_ms: u64,
    /// End, ms since the epoch.
    pub ended_ms: u64,
    /// Why it failed (the tail of its log), empty on success.
    pub error: String,
    /// Where the outputs lie on a shared filesystem (embedded); `<dir>/<output>/<path>`.
    pub staging: Option<PathBuf>,
    /// The job's combined stdout/stderr on a shared filesystem (embedded); not signed.
    pub log: Option<PathBuf>,
    /// The newest `::nexa-progress::` line the job printed, read after it ended (a
    /// heartbeat can miss the last one); not signed: it is shown, never sealed.
    pub progress: Option<JobProgress>,
    /// The worker's Ed25519 public key.
    pub worker_key: [u8; 32],
    /// Ed25519 signature over [`crate::signing::result_message`].
    pub signature: Vec<u8>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The prefix of a progress line a job prints (any job: `exec` scripts too):
/// `::nexa-progress:: {"step": 150, "total": 300, "loss": 0.31, "records": 4800}`.
pub const PROGRESS_PREFIX: &str = "::nexa-progress::";

/// How far a running job is, as it last said (every field optional).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobProgress {
    /// Steps done (training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Steps or records in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// The last training loss (finite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Records done (inference, evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}

// `loss` is never NaN: `parse_line` keeps finite numbers only.
impl Eq for JobProgress {}

impl JobProgress {
    /// Reads one line of a job's output; `None` unless it is a well-formed progress line.
    pub fn parse_line(line: &str) -> Option<Self> {
        let json = line.trim().strip_prefix(PROGRESS_PREFIX)?;
        let v: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
        let count = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        let p = Self {
            step: count("step"),
            total: count("total"),
            loss: v
                .get("loss")
                .and_then(serde_json::Value::as_f64)
                .filter(|l| l.is_finite()),
            records: count("records"),
        };
        (p != Self::default()).then_some(p)
    }

    /// `step 150/300, loss 0.3100` or `4800/10000 records`, for people.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (self.step, self.records, self.total) {
            (Some(s), _, Some(t)) => parts.push(format!("step {s}/{t}")),
            (Some(s), _, None) => parts.push(format!("step {s}")),
            (None, Some(r), Some(t)) => parts.push(format!("{r}/{t} records")),
            (None, Some(r), None) => parts.push(format!("{r} records")),
            _ => {}
        }
        if let Some(l) = self.loss {
            parts.push(format!("loss {l:.4}"));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_are_read_and_anything_else_is_ignored() {
        let p = JobProgress::parse_line(
            r#"::nexa-progress:: {"loss": 0.5, "step": 10, "t": 1.0, "total": 300}"#,
        )
        .expect("a progress line");
        assert_eq!((p.step, p.total, p.loss), (Some(10), Some(300), Some(0.5)));
        assert_eq!(p.describe(), "step 10/300, loss 0.5000");
        for junk in [
            "step 10",
            "::nexa-progress:: not json",
            "::nexa-progress:: {}",
            r#"::nexa-progress:: {"loss": "NaN"}"#,
        ] {
            assert_eq!(JobProgress::parse_line(junk), None, "{junk}");
        }
    }
}
