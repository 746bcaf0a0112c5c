//! Service handles in the coordinator's store: what a `runners.serve` step sealed
//! (`handle.json`: backend, endpoint, pid, model digest, command) plus where it runs
//! (worker, job, generation), kept in the tree [`TREE`] by service name so that
//! `nexa serve list|health|stop --coordinator` work from any later process. The live
//! half (is it healthy now, is a stop under way) is the engine's, from the workers'
//! heartbeats (see `scheduler::services`).
//!
//! Embedded, the CLI keeps the same records in the project's `.nexa_state/registry`.

use crate::Store;
use crate::planner::RunContext;
use std::path::Path;

/// The store tree of service handles, keyed by service name.
pub const TREE: &str = "services";

/// Where a service runs: set on the seal task of a job that left a server running.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The worker's id.
    pub worker_id: String,
    /// The worker's display name.
    pub worker_name: String,
    /// The job that started it.
    pub job_id: String,
    /// That job's lease generation.
    pub generation: u64,
}

/// Keeps the handle sealed in `dir` under its name. A handle that cannot be read is
/// logged and skipped: the step is sealed either way, and `list` would not show it.
pub fn record(store: &dyn Store, ctx: &RunContext, dir: &Path, owner: &Owner) {
    let handle = std::fs::read(dir.join("handle.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|h| h.is_object());
    let Some(mut h) = handle else {
        tracing::error!(artifact = %dir.display(), "a serve step sealed no readable handle.json");
        return;
    };
    let Some(name) = h["name"].as_str().map(str::to_string) else {
        tracing::error!(artifact = %dir.display(), "handle.json names no service");
        return;
    };
    let s = |v: &str| serde_json::Value::String(v.to_string());
    h["pipeline"] = s(&ctx.pipeline.name);
    h["artifact"] = s(&ctx.rel(dir));
    h["run_id"] = s(&ctx.run_id);
    h["worker_id"] = s(&owner.worker_id);
    h["worker"] = s(&owner.worker_name);
    h["job_id"] = s(&owner.job_id);
    h["generation"] = serde_json::Value::from(owner.generation);
    let put = serde_json::to_vec(&h)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            store.put(TREE, &name, &bytes).map_err(|e| e.to_string())?;
            store.flush().map_err(|e| e.to_string())
        });
    match put {
        Ok(()) => {
            tracing::info!(service = %name, worker = %owner.worker_name, "service handle recorded")
        }
        Err(e) => tracing::error!(service = %name, error = %e, "recording the service handle"),
    }
}

/// Every recorded handle, in name order.
pub fn list(store: &dyn Store) -> crate::Result<Vec<serde_json::Value>> {
    Ok(store
        .scan_prefix(TREE, "")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

/// One handle by name.
pub fn get(store: &dyn Store, name: &str) -> crate::Result<Option<serde_json::Value>> {
    Ok(store
        .get(TREE, name)?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

/// Forgets a handle (its service has stopped).
pub fn remove(store: &dyn Store, name: &str) -> crate::Result<()> {
    store.remove(TREE, name)?;
    store.flush()
}
