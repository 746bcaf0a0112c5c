//! A store that refuses writes (a full disk, an I/O error) loses nothing and makes the
//! engine tell nobody what it could not persist: a run whose final state the store
//! refused is not reported finished; it is reported once the store takes it, with every
//! step record written. A real sled store behind a switch that refuses writes to the
//! run-state trees while it is on; the test plays the worker.

mod common;

use common::{Watched, result_for, worker_info};
use nexa_coordinator::scheduler::{Progress, RunOutcome};
use nexa_coordinator::state::{self, StepStatus};
use nexa_coordinator::{Coordinator, Error, SledStore, Store};
use nexa_shared::signing::Identity;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_final_state_the_store_refused_is_not_reported_until_it_is_saved() {
    let project = tempfile::tempdir().expect("tempdir");
    let yaml = "pipeline:\n  name: full\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [\"true\"]}\n      out: artifacts/a\n";
    let loaded = nexa_shared::spec::load_str("f.yaml", yaml, project.path()).expect("valid");
    // Writes to the run-state trees refused while `refusing` is set.
    let refusing = Arc::new(AtomicBool::new(false));
    let store = Arc::new(Watched {
        inner: SledStore::open(&project.path().join("store")).expect("store"),
        watch: {
            let refusing = refusing.clone();
            move |tree: &str, _: usize| {
                let run_state = [state::STEPS_TREE, state::SHARDS_TREE, state::RUNS_TREE];
                if refusing.load(Ordering::SeqCst) && run_state.contains(&tree) {
                    return Err(Error::Store("No space left on device (os error 28)".into()));
                }
                Ok(())
            }
        },
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
    let lease = common::lease(&coord, 10).await;

    // The disk fills just as the result comes in.
    refusing.store(true, Ordering::SeqCst);
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
    refusing.store(false, Ordering::SeqCst);
    let summary = common::finished(&mut run, 5).await;
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
