//! A store that refuses writes (a full disk, an I/O error) loses nothing and makes the
//! engine tell nobody what it could not persist: a run whose final state the store
//! refused is not reported finished; it is reported once the store takes it, with every
//! step record written. A real sled store behind a switch that refuses writes to the
//! run-state trees while it is on; the test plays the worker.

mod common;

use common::{result_for, worker_info};
use nexa_coordinator::scheduler::{Progress, RunOutcome};
use nexa_coordinator::state::{self, StepStatus};
use nexa_coordinator::{Coordinator, Error, Result, SledStore, Store};
use nexa_shared::signing::Identity;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// sled, with writes to the step and run trees refused while `refusing` is set.
struct Refusing {
    inner: SledStore,
    refusing: AtomicBool,
}

impl Refusing {
    fn check(&self, tree: &str) -> Result<()> {
        if self.refusing.load(Ordering::SeqCst)
            && (tree == state::STEPS_TREE || tree == state::SHARDS_TREE || tree == state::RUNS_TREE)
        {
            return Err(Error::Store("No space left on device (os error 28)".into()));
        }
        Ok(())
    }
}

impl Store for Refusing {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get(tree, key)
    }
    fn put_batch(&self, tree: &str, entries: &[(String, Vec<u8>)]) -> Result<()> {
        self.check(tree)?;
        self.inner.put_batch(tree, entries)
    }
    fn remove(&self, tree: &str, key: &str) -> Result<()> {
        self.check(tree)?;
        self.inner.remove(tree, key)
    }
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.scan_prefix(tree, prefix)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn compare_and_swap(
        &self,
        tree: &str,
        key: &str,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        self.check(tree)?;
        self.inner.compare_and_swap(tree, key, old, new)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_final_state_the_store_refused_is_not_reported_until_it_is_saved() {
    let project = tempfile::tempdir().expect("tempdir");
    let yaml = "pipeline:\n  name: full\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [\"true\"]}\n      out: artifacts/a\n";
    let loaded = nexa_shared::spec::load_str("f.yaml", yaml, project.path()).expect("valid");
    let store = Arc::new(Refusing {
        inner: SledStore::open(&project.path().join("store")).expect("store"),
        refusing: AtomicBool::new(false),
    });
    let (coord, _task) = Coordinator::start(
        store.clone(),
        nexa_coordinator::scheduler::EngineConfig::embedded(),
    );
    let id = Identity::generate();
    coord
        .register_worker("w1", worker_info(&id))
        .expect("register");
    let mut run = common::submit(&coord, project.path(), loaded).await;
    let lease = tokio::time::timeout(Duration::from_secs(10), coord.lease("w1"))
        .await
        .expect("a lease in time")
        .expect("a lease");

    // The disk fills just as the result comes in.
    store.refusing.store(true, Ordering::SeqCst);
    let mut result = result_for(&lease, &project.path().join("staging"), b"hello");
    id.sign_result(&mut result);
    coord.report("w1", result).expect("report");

    // Sealed, but the store refuses the run's final state: nobody is told it finished.
    let told = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            match run.recv().await {
                Some(Progress::Finished(_)) | None => return,
                Some(_) => {}
            }
        }
    })
    .await;
    assert!(
        told.is_err(),
        "the run was reported finished while the store refused its final state"
    );

    // Space returns: the next tick writes it, and only then is the run reported.
    store.refusing.store(false, Ordering::SeqCst);
    let summary = loop {
        match tokio::time::timeout(Duration::from_secs(5), run.recv()).await {
            Ok(Some(Progress::Finished(s))) => break s,
            Ok(Some(_)) => continue,
            other => panic!("run did not finish once the store took it: {other:?}"),
        }
    };
    assert_eq!(summary.outcome, RunOutcome::Succeeded);
    let steps = state::load_steps(store.as_ref(), "full").expect("steps");
    assert_eq!(steps["a"].status, StepStatus::Complete, "{steps:?}");
    let runs = store.scan_prefix(state::RUNS_TREE, "full/").expect("runs");
    assert_eq!(runs.len(), 1, "the run's record was written");
    let rec: state::RunRecord = serde_json::from_slice(&runs[0].1).expect("run record");
    assert_eq!(rec.outcome, nexa_coordinator::state::RunState::Succeeded);
    assert!(rec.finished_at.is_some());
    coord.shutdown();
}
