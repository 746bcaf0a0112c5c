//! A fanned-out step's progress costs the store what changed, not the whole step again:
//! each write-behind round writes the shards that changed, so a run of N shards writes
//! O(N) shard records, not O(N²) (a 4,000-shard step once grew sled to 1.4 GB). A real
//! sled store, counting what is written to it; the test plays a one-slot worker.

mod common;

use common::{Watched, result_for, worker_info};
use nexa_coordinator::scheduler::RunOutcome;
use nexa_coordinator::state::{self, StepStatus};
use nexa_coordinator::{Coordinator, SledStore};
use nexa_shared::signing::Identity;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_writes_each_shard_a_few_times_not_every_shard_at_every_change() {
    const SHARDS: usize = 200;
    let project = tempfile::tempdir().expect("tempdir");
    let items: String = (0..SHARDS).map(|i| format!("{i}\n")).collect();
    std::fs::write(project.path().join("items.txt"), items).expect("items");
    let yaml = format!(
        "pipeline:\n  name: fan\n  steps:\n    - id: fan\n      uses: exec\n      in: {{items: items.txt}}\n      shards: {{over: items, count: {SHARDS}}}\n      params: {{cmd: [\"true\"]}}\n      out: artifacts/fan\n"
    );
    let loaded = nexa_shared::spec::load_str("f.yaml", &yaml, project.path()).expect("valid");
    // Counting the bytes put into the step and shard trees.
    let written = Arc::new(AtomicU64::new(0));
    let store = Arc::new(Watched {
        inner: SledStore::open(&project.path().join("store")).expect("store"),
        watch: {
            let written = written.clone();
            move |tree: &str, bytes: usize| {
                if tree == state::STEPS_TREE || tree == state::SHARDS_TREE {
                    written.fetch_add(bytes as u64, Ordering::SeqCst);
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
    for n in 0..SHARDS {
        let lease = common::lease(&coord, 20).await;
        let staging = project.path().join(format!("staging/{n}"));
        let mut result = result_for(&lease, &staging, format!("{n}").as_bytes());
        id.sign_result(&mut result);
        coord.report("w1", result).expect("report");
    }
    let summary = common::finished(&mut run, 30).await;
    assert_eq!(summary.outcome, RunOutcome::Succeeded);

    let steps = state::load_steps(store.as_ref(), "fan").expect("steps");
    let fan = &steps["fan"];
    assert_eq!(fan.status, StepStatus::Complete);
    assert_eq!(fan.shards.len(), SHARDS, "every shard read back");
    assert!(
        fan.shards
            .iter()
            .enumerate()
            .all(|(k, s)| s.index as usize == k && s.status == StepStatus::Complete),
        "{:?}",
        fan.shards
    );
    // The whole step with its shards, as one record: what every round wrote before.
    let whole = serde_json::to_vec(fan).expect("json").len() as u64;
    let written = written.load(Ordering::SeqCst);
    eprintln!("{written} bytes written to the step and shard trees for a {whole}-byte step");
    assert!(
        written < 10 * whole,
        "{written} bytes written for a {whole}-byte step: every round rewrote every shard"
    );
    coord.shutdown();
}

/// A step written whole (a run's start and end) goes into the store in bounded batches:
/// one sled batch of every shard of a 100,000-shard step held ~550 MB of heap.
#[test]
fn a_big_fan_out_is_written_in_bounded_batches_and_reads_back_whole() {
    const SHARDS: u32 = 10_007;
    let dir = tempfile::tempdir().expect("tempdir");
    let largest = Arc::new(AtomicU64::new(0));
    let store = Watched {
        inner: SledStore::open(&dir.path().join("store")).expect("store"),
        watch: {
            let largest = largest.clone();
            move |tree: &str, bytes: usize| {
                if tree == state::SHARDS_TREE {
                    largest.fetch_max(bytes as u64, Ordering::SeqCst);
                }
                Ok(())
            }
        },
    };
    let shard = |index| state::ShardRecord {
        index,
        status: StepStatus::Pending,
        cache_key: None,
        hash: None,
        worker: None,
        attempts: 0,
        error: None,
    };
    let step = state::StepRecord {
        shards: (0..SHARDS).map(shard).collect(),
        ..state::StepRecord::pending("fan", "r1")
    };
    let whole = serde_json::to_vec(&step.shards).expect("json").len() as u64;
    state::save_steps(&store, "p", &[&step]).expect("save");
    let largest = largest.load(Ordering::SeqCst);
    assert!(
        largest * 4 < whole,
        "{SHARDS} shards ({whole} bytes) went into the store in a batch of {largest} bytes"
    );
    let back = state::load_steps(&store, "p").expect("load");
    assert_eq!(back["fan"].shards, step.shards);
}
