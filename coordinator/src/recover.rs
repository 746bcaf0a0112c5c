//! `nexa-coordinator store recover`: a new store rebuilt from what the data directory
//! keeps outside it, for a store that cannot be opened (or, with `force`, one that can
//! but is not trusted).
//!
//! What is rebuilt, and from where:
//! - step records and run records: each pipeline's state mirror,
//!   `projects/<p>/.nexa_state/<p>/pipeline_state.json` (rewritten atomically as runs go);
//! - lineage: every sealed artifact's `meta.json` under `projects/` (the same nodes the
//!   sealer records);
//! - the model registry: its JSON mirror, `registry/<model>.json` (rewritten after each
//!   change).
//!
//! What cannot be, and is said so in the [`Report`]: worker records (enrolments, credit,
//! quarantines and bans: workers enrol again on their next call, and an operator must
//! ban again), the refusal counters, and runs that were not finished (resubmit them: the
//! steps already sealed are reused by their cache keys). The old store is moved aside,
//! never deleted.

use crate::sealing::lineage;
use crate::state::{self, RunRecord, RunState, StepStatus};
use crate::{Error, Result, SledStore, Store, mirror, registry};
use std::path::{Path, PathBuf};

/// The registry mirror's directory in the data directory.
pub const REGISTRY_MIRROR: &str = "registry";

/// The marker, in the data directory, that its store was made (and when).
const MARKER: &str = "store.created";
/// The store's own record of being made: tree and key.
const SENTINEL: (&str, &str) = ("meta", "created");

/// Opens the coordinator store of `data_dir`, making sure it is the store that was made
/// there. sled takes a log it cannot read for a torn write and starts empty, so a store
/// whose files were destroyed can open as a new, empty one: every run, model and lineage
/// record silently gone. A marker beside the store (`store.created`) and a record in it
/// tell the two apart: a store that lost its record while the marker stands is refused,
/// with the way out ([`recover`]).
pub fn open_checked(data_dir: &Path) -> Result<SledStore> {
    let path = data_dir.join("store");
    let store = SledStore::open(&path)?;
    let marker = data_dir.join(MARKER);
    let has_record = store.get(SENTINEL.0, SENTINEL.1)?.is_some();
    match (has_record, marker.exists()) {
        (true, true) => {}
        (false, true) => {
            let made = std::fs::read_to_string(&marker).unwrap_or_default();
            return Err(Error::Store(format!(
                "the store at {} has lost its contents: it was made at {} (says {}) but holds no record of it",
                path.display(),
                made.trim(),
                marker.display()
            )));
        }
        // A new store, or one made before the marker existed.
        (has_record, false) => {
            if !has_record {
                mark(&store)?;
            }
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            mirror::write_atomic(&marker, format!("{now}\n").as_bytes())
                .map_err(|e| Error::Domain(nexa_shared::Error::io("write", &marker, e)))?;
        }
    }
    Ok(store)
}

/// Writes the store's record of being made, durably.
fn mark(store: &SledStore) -> Result<()> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    store.put(SENTINEL.0, SENTINEL.1, now.as_bytes())?;
    store.flush()
}

/// What a recovery did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Where the old store was moved.
    pub moved_to: Option<PathBuf>,
    /// Pipelines whose state mirror was read.
    pub pipelines: usize,
    /// Step records rebuilt.
    pub steps: usize,
    /// Run records rebuilt.
    pub runs: usize,
    /// Sealed artifacts whose lineage was rebuilt.
    pub artifacts: usize,
    /// Models rebuilt from the registry mirror.
    pub models: usize,
    /// What could not be recovered, one sentence each.
    pub not_recovered: Vec<String>,
}

/// Rebuilds the store of the coordinator data directory `data_dir`. The store must not
/// be open elsewhere (a coordinator running on it is refused by its lock). Unless
/// `force`, a store that opens is left alone.
pub fn recover(data_dir: &Path, force: bool) -> Result<Report> {
    let path = data_dir.join("store");
    let mut report = Report::default();
    if path.exists() {
        match open_checked(data_dir) {
            Err(Error::StoreLocked(p)) => {
                return Err(Error::Store(format!(
                    "the store at {p} is in use: stop the coordinator first"
                )));
            }
            Ok(store) if !force => {
                drop(store);
                return Err(Error::Store(format!(
                    "the store at {} opens fine: nothing to recover (--force rebuilds it anyway)",
                    path.display()
                )));
            }
            Ok(store) => drop(store),
            Err(e) => tracing::warn!(error = %e, "the store cannot be opened; rebuilding it"),
        }
        let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .collect();
        let aside = data_dir.join(format!("store.broken-{stamp}"));
        std::fs::rename(&path, &aside)
            .map_err(|e| Error::Domain(nexa_shared::Error::io("rename", &path, e)))?;
        report.moved_to = Some(aside);
    }
    let store = SledStore::open(&path)?;
    mark(&store)?;
    let projects = data_dir.join("projects");
    for project in subdirs(&projects) {
        rebuild_project(&store, &project, &mut report)?;
    }
    rebuild_registry(&store, &data_dir.join(REGISTRY_MIRROR), &mut report)?;
    report.not_recovered.push(
        "worker records (enrolments, credit, quarantines, bans): workers enrol again on their next call; ban again any worker you had banned".into(),
    );
    report
        .not_recovered
        .push("the refusal counters: they start again from zero".into());
    store.flush()?;
    Ok(report)
}

/// The directories directly in `dir`, sorted.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn rebuild_project(store: &SledStore, project: &Path, report: &mut Report) -> Result<()> {
    for state_dir in subdirs(&project.join(".nexa_state")) {
        let Some(m) = mirror::read(&state_dir) else {
            if mirror::path(&state_dir).exists() {
                report.not_recovered.push(format!(
                    "{}: unreadable; its pipeline's step records are lost (its artifacts are kept and re-used by cache key)",
                    mirror::path(&state_dir).display()
                ));
            }
            continue;
        };
        let refs: Vec<&state::StepRecord> = m.steps.iter().collect();
        state::save_steps(store, &m.pipeline, &refs)?;
        report.pipelines += 1;
        report.steps += m.steps.len();
        let finished = m.steps.iter().all(|s| s.status.is_final());
        let outcome = if !finished {
            report.not_recovered.push(format!(
                "run {} of pipeline '{}' was not finished: submit the pipeline again (its sealed steps are reused)",
                m.run_id, m.pipeline
            ));
            RunState::Failed
        } else if m.steps.iter().any(|s| s.status == StepStatus::Cancelled) {
            RunState::Cancelled
        } else if m
            .steps
            .iter()
            .any(|s| matches!(s.status, StepStatus::Failed | StepStatus::Blocked))
        {
            RunState::Failed
        } else {
            RunState::Succeeded
        };
        state::save_run(
            store,
            &RunRecord {
                run_id: m.run_id.clone(),
                pipeline: m.pipeline.clone(),
                started_at: m.updated_at.clone(),
                finished_at: Some(m.updated_at.clone()),
                outcome,
            },
        )?;
        report.runs += 1;
    }
    let mut nodes = Vec::new();
    sealed_nodes(project, project, &mut nodes);
    report.artifacts += nodes.len();
    lineage::record(store, &nodes)
}

/// The lineage node of every sealed artifact under `dir` (not looking inside one).
fn sealed_nodes(project: &Path, dir: &Path, out: &mut Vec<lineage::Node>) {
    for d in subdirs(dir) {
        let name = d.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".tmp") || name.ends_with(".old") {
            continue;
        }
        if nexa_shared::artifact::is_complete(&d) {
            if let Some(n) = lineage::node_from_disk(project, &d) {
                out.push(n);
            }
            continue;
        }
        sealed_nodes(project, &d, out);
    }
}

fn rebuild_registry(store: &SledStore, dir: &Path, report: &mut Report) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        let model = std::fs::read(&f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<registry::Model>(&b).map_err(|e| e.to_string()));
        match model {
            Ok(m) if registry::mirror_path(dir, &m.name) == f => {
                store.put(registry::REGISTRY_TREE, &m.name, &serde_json::to_vec(&m)?)?;
                report.models += 1;
            }
            Ok(m) => report.not_recovered.push(format!(
                "{}: names model '{}', which is not its file name; skipped",
                f.display(),
                m.name
            )),
            Err(e) => report.not_recovered.push(format!(
                "{}: unreadable ({e}); that model is lost",
                f.display()
            )),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_lost_its_files_is_refused_not_opened_empty() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = open_checked(d.path()).expect("a new store");
        store.put("runs", "p/r1", b"{}").expect("put");
        store.flush().expect("flush");
        drop(store);
        assert!(open_checked(d.path()).is_ok(), "the same store again");
        // Its files go (a careless `rm`, a disk that lost them): sled alone would open a
        // new, empty store in their place.
        std::fs::remove_dir_all(d.path().join("store")).expect("rm");
        let Err(e) = open_checked(d.path()) else {
            panic!("an empty store was opened in place of the lost one");
        };
        assert!(e.to_string().contains("has lost its contents"), "{e}");
        let r = recover(d.path(), false).expect("recover");
        assert!(r.moved_to.is_some());
        assert!(open_checked(d.path()).is_ok(), "the rebuilt store opens");
        let again = recover(d.path(), false).expect_err("nothing to recover");
        assert!(again.to_string().contains("opens fine"), "{again}");
    }
}
