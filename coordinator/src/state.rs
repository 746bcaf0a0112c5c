//! Run state: step statuses and their records, as kept in the store.

use crate::{Result, Store};
use std::collections::BTreeMap;

pub use nexa_shared::record::{
    AdminState, ArtifactInfo, RunState, ShardList, ShardRecord, StepRecord, StepStatus,
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

/// The store tree holding shard records, keyed `<pipeline>/<step>/<index, 10 digits>`:
/// a fanned-out step's shards are written one by one as they change, never all again
/// with every change of one (a step record holds none of them).
pub const SHARDS_TREE: &str = "shards";

fn shard_key(pipeline: &str, step: &str, index: u32) -> String {
    format!("{pipeline}/{step}/{index:010}")
}

/// Shard records per store batch when a step is written whole. One sled batch holds
/// every entry in memory, and sled grows its nodes as the batch goes in: a 100,000-shard
/// step written as one batch peaked at 550 MB of the coordinator's heap (heaptrack), a
/// million would not fit at all. Batches of this size keep it to a few MB.
pub const SHARD_BATCH: usize = 2048;

/// Writes step records whole, with all their shards (a run's start and end, `store
/// recover`): the shards in batches of [`SHARD_BATCH`], each serialized only when it is
/// written, then the step records; shard keys beyond a step's shards are removed. A
/// crash between two batches leaves some shards as they were before: what a status
/// query shows until the next round, never what decides a run (a restarted run plans
/// again).
pub fn save_steps(store: &dyn Store, pipeline: &str, records: &[&StepRecord]) -> Result<()> {
    let mut steps = Vec::new();
    for r in records {
        put_shards(store, pipeline, r.shards.iter().map(|s| (r.id.as_str(), s)))?;
        remove_shards_from(store, pipeline, &r.id, r.shards.len())?;
        steps.push((format!("{pipeline}/{}", r.id), step_bytes(r)?));
    }
    store.put_batch(STEPS_TREE, &steps)
}

/// What one write-behind round saves of a run: the step records that changed (their
/// shards left out) and the shard records that changed, as `(step id, shard)`.
pub fn save_progress(
    store: &dyn Store,
    pipeline: &str,
    steps: &[StepRecord],
    shards: &[(String, ShardRecord)],
) -> Result<()> {
    put_shards(
        store,
        pipeline,
        shards.iter().map(|(step, s)| (step.as_str(), s)),
    )?;
    let steps = steps
        .iter()
        .map(|r| Ok((format!("{pipeline}/{}", r.id), step_bytes(r)?)))
        .collect::<Result<Vec<_>>>()?;
    store.put_batch(STEPS_TREE, &steps)
}

/// Writes `(step id, shard)` records in batches of [`SHARD_BATCH`], each serialized
/// only when it is written.
fn put_shards<'a>(
    store: &dyn Store,
    pipeline: &str,
    shards: impl Iterator<Item = (&'a str, &'a ShardRecord)>,
) -> Result<()> {
    let mut batch = Vec::new();
    for (step, s) in shards {
        batch.push((shard_key(pipeline, step, s.index), serde_json::to_vec(s)?));
        if batch.len() == SHARD_BATCH {
            store.put_batch(SHARDS_TREE, &batch)?;
            batch.clear();
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    store.put_batch(SHARDS_TREE, &batch)
}

/// A step record as stored: without its shards (they have their own tree).
fn step_bytes(r: &StepRecord) -> Result<Vec<u8>> {
    if r.shards.is_empty() {
        return Ok(serde_json::to_vec(r)?);
    }
    let bare = StepRecord {
        shards: ShardList::new(),
        ..r.clone()
    };
    Ok(serde_json::to_vec(&bare)?)
}

/// Removes a step's shard records from index `from` on (left by a run with more):
/// keys are zero-padded indices, so those are the keys from `from`'s on, found without
/// reading the step's other records (a whole write of a million shards read them all
/// back each time).
fn remove_shards_from(store: &dyn Store, pipeline: &str, step: &str, from: usize) -> Result<()> {
    let prefix = format!("{pipeline}/{step}/");
    let start = shard_key(pipeline, step, u32::try_from(from).unwrap_or(u32::MAX));
    for k in store.keys_from(SHARDS_TREE, &prefix, &start)? {
        let index = k[prefix.len()..].parse::<usize>().unwrap_or(usize::MAX);
        if index >= from {
            store.remove(SHARDS_TREE, &k)?;
        }
    }
    Ok(())
}

/// Reads every step record of a pipeline, by step id, with its shards.
pub fn load_steps(store: &dyn Store, pipeline: &str) -> Result<BTreeMap<String, StepRecord>> {
    let mut out = BTreeMap::new();
    for (_, v) in store.scan_prefix(STEPS_TREE, &format!("{pipeline}/"))? {
        // A record that does not decode (an older format) reads as absent, never as an error.
        if let Ok(r) = serde_json::from_slice::<StepRecord>(&v) {
            out.insert(r.id.clone(), r);
        }
    }
    for r in out.values_mut() {
        let stored = store.scan_prefix(SHARDS_TREE, &format!("{pipeline}/{}/", r.id))?;
        if stored.is_empty() {
            // Written before shards had their own tree: inline, as they were.
            continue;
        }
        let mut shards: Vec<ShardRecord> = stored
            .iter()
            .filter_map(|(_, v)| serde_json::from_slice::<ShardRecord>(v).ok())
            .collect();
        shards.sort_by_key(|s| s.index);
        r.shards = shards.into();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn shard(index: u32, status: StepStatus) -> ShardRecord {
        ShardRecord {
            index,
            status,
            cache_key: None,
            hash: None,
            worker: None,
            attempts: 0,
            error: None,
        }
    }

    fn step(id: &str, shards: usize) -> StepRecord {
        StepRecord {
            shards: (0..shards as u32)
                .map(|k| shard(k, StepStatus::Pending))
                .collect(),
            ..StepRecord::pending(id, "r1")
        }
    }

    #[test]
    fn shards_are_stored_apart_changed_one_by_one_and_a_smaller_run_leaves_none_behind() {
        let store = MemStore::default();
        save_steps(&store, "p", &[&step("fan", 5), &step("one", 0)]).expect("save");
        // The step record itself holds no shard.
        let raw = store.get(STEPS_TREE, "p/fan").expect("get").expect("there");
        let bare: StepRecord = serde_json::from_slice(&raw).expect("json");
        assert!(bare.shards.is_empty());
        // One round: the step (bare) and the one shard that changed.
        let mut fan = step("fan", 0);
        fan.status = StepStatus::Running;
        save_progress(
            &store,
            "p",
            &[fan],
            &[("fan".into(), shard(3, StepStatus::Complete))],
        )
        .expect("progress");
        let back = load_steps(&store, "p").expect("load");
        assert_eq!(back["fan"].status, StepStatus::Running);
        let statuses: Vec<StepStatus> = back["fan"].shards.iter().map(|s| s.status).collect();
        use StepStatus::{Complete, Pending};
        assert_eq!(statuses, [Pending, Pending, Pending, Complete, Pending]);
        assert!(back["one"].shards.is_empty());
        // A later run with 2 shards: the old 3..5 are gone.
        save_steps(&store, "p", &[&step("fan", 2)]).expect("save");
        assert_eq!(
            load_steps(&store, "p").expect("load")["fan"].shards.len(),
            2
        );
    }

    #[test]
    fn a_step_record_written_with_its_shards_inline_still_reads_with_them() {
        let store = MemStore::default();
        let old = step("fan", 3);
        store
            .put(
                STEPS_TREE,
                "p/fan",
                &serde_json::to_vec(&old).expect("json"),
            )
            .expect("put");
        assert_eq!(load_steps(&store, "p").expect("load")["fan"], old);
    }
}
