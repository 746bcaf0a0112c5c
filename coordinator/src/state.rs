//! Run state: step statuses and their records, as kept in the store.

use crate::{Result, Store};
use std::collections::BTreeMap;

pub use nexa_shared::record::{
    AdminState, ArtifactInfo, RunState, ShardRecord, StepRecord, StepStatus,
};

/// The store tree holding step records, keyed `<pipeline>/<step>`.
pub const STEPS_TREE: &str = "steps";
/// The store tree holding run records, keyed `<pipeline>/<run_id>`.
pub const RUNS_TREE: &str = "runs";

/// A run's record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Run id.
    pub run_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339), when finished.
    pub finished_at: Option<String>,
    /// Where it is (stored as `running`, `succeeded`, `failed`, `cancelled`).
    pub outcome: RunState,
}

/// Writes step records in one batch.
pub fn save_steps(store: &dyn Store, pipeline: &str, records: &[&StepRecord]) -> Result<()> {
    let entries = records
        .iter()
        .map(|r| Ok((format!("{pipeline}/{}", r.id), serde_json::to_vec(r)?)))
        .collect::<Result<Vec<_>>>()?;
    store.put_batch(STEPS_TREE, &entries)
}

/// Reads every step record of a pipeline, by step id.
pub fn load_steps(store: &dyn Store, pipeline: &str) -> Result<BTreeMap<String, StepRecord>> {
    let mut out = BTreeMap::new();
    for (_, v) in store.scan_prefix(STEPS_TREE, &format!("{pipeline}/"))? {
        // A record that does not decode (an older format) reads as absent, never as an error.
        if let Ok(r) = serde_json::from_slice::<StepRecord>(&v) {
            out.insert(r.id.clone(), r);
        }
    }
    Ok(out)
}

/// Writes a run record.
pub fn save_run(store: &dyn Store, r: &RunRecord) -> Result<()> {
    store.put(
        RUNS_TREE,
        &format!("{}/{}", r.pipeline, r.run_id),
        &serde_json::to_vec(r)?,
    )
}

/// The store tree holding worker records, keyed by worker id.
pub const WORKERS_TREE: &str = "workers";

/// What survives a coordinator restart about a worker: who it is, what the operator
/// decided about it, and its record. A worker that re-enrols with the same key gets
/// all of it back (a banned worker stays banned).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerRecord {
    /// Worker id (the first 8 bytes of its key, hex).
    pub id: String,
    /// The name it gave.
    pub name: String,
    /// Its Ed25519 public key, hex.
    pub public_key: String,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Its last known hardware.
    pub profile: nexa_shared::hardware::Profile,
    /// The operator's say (stored as `active`, `drain` or `ban`).
    pub admin: AdminState,
    /// Results that sealed.
    pub succeeded: u64,
    /// Results that failed or were refused.
    pub failed: u64,
    /// Its most recent outcomes, oldest first (quarantine is decided on them).
    pub recent: Vec<bool>,
    /// Its record per kind of job.
    #[serde(default)]
    pub trust: BTreeMap<String, crate::quorum::Trust>,
    /// Credit: CPU-seconds.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// Credit: GPU-seconds.
    #[serde(default)]
    pub gpu_seconds: f64,
}

/// Writes worker records in one batch.
pub fn save_workers(store: &dyn Store, records: &[WorkerRecord]) -> Result<()> {
    let entries = records
        .iter()
        .map(|r| Ok((r.id.clone(), serde_json::to_vec(r)?)))
        .collect::<Result<Vec<_>>>()?;
    store.put_batch(WORKERS_TREE, &entries)
}

/// Reads every worker record; one that does not decode is skipped.
pub fn load_workers(store: &dyn Store) -> Result<Vec<WorkerRecord>> {
    Ok(store
        .scan_prefix(WORKERS_TREE, "")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}
