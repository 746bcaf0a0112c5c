//! The coordinator refuses results it cannot trust: forged signatures, stale lease
//! generations, replays, and uploads that do not match the signed manifest; and it tells
//! a worker to kill a stale attempt by its generation, never a newer lease of that job. A real
//! coordinator loop on a real sled store; the test plays the worker.

use nexa_coordinator::scheduler::RunOutcome;
use nexa_coordinator::{Coordinator, SledStore};
use nexa_shared::signing::{self, Identity};
mod common;

use common::{result_for, worker_info};
use std::sync::Arc;
use std::time::Duration;

async fn wait_refusals(
    c: &Coordinator,
    f: impl Fn(nexa_coordinator::scheduler::Refusals) -> bool,
) -> nexa_coordinator::scheduler::Refusals {
    for _ in 0..200 {
        let r = c.refusals().await.expect("refusals");
        if f(r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.refusals().await.expect("refusals")
}

/// Reports `result` from `w1`: alone and without waiting (`Report`), or as a batch of
/// one, waiting for its verdict (what `Exchange` does).
async fn send(coord: &Coordinator, batched: bool, result: nexa_shared::job::JobResult) {
    if batched {
        let verdicts = coord
            .report_batch("w1", vec![result])
            .await
            .expect("report");
        assert_eq!(verdicts.len(), 1, "one verdict per result");
    } else {
        coord.report("w1", result).expect("report");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_results_are_refused_and_counted() {
    untrusted_results(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_results_are_refused_and_counted_in_batches_too() {
    untrusted_results(true).await;
}

async fn untrusted_results(batched: bool) {
    let project = tempfile::tempdir().expect("tempdir");
    let yaml = "pipeline:\n  name: trust\n  steps:\n    - id: a\n      uses: exec\n      retries: {count: 5, backoff: 10ms}\n      params: {cmd: [\"true\"]}\n      out: artifacts/a\n";
    let loaded = nexa_shared::spec::load_str("t.yaml", yaml, project.path()).expect("valid");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let (coord, _task) =
        Coordinator::start(store, nexa_coordinator::scheduler::EngineConfig::embedded());
    let honest = Identity::generate();
    let forger = Identity::generate();
    let profile = nexa_shared::hardware::Profile {
        cores: 2,
        memory_total: 1 << 30,
        ..Default::default()
    };
    coord
        .register_worker(
            "w1",
            nexa_coordinator::scheduler::WorkerInfo {
                name: "w1".into(),
                key: honest.public_key(),
                profile,
                slots: 2,
            },
        )
        .expect("register");
    let mut run = common::submit(&coord, project.path(), loaded).await;
    let staging_root = project.path().join("staging");

    // 1. A forged signature: signed by a key that is not the worker's enrolled key.
    let l1 = common::lease(&coord, 10).await;
    let mut forged = result_for(&l1, &staging_root.join("1"), b"hello");
    forger.sign_result(&mut forged);
    send(&coord, batched, forged.clone()).await;
    // A result claiming the enrolled key but signed by another is refused too.
    forged.worker_key = honest.public_key();
    assert!(signing::verify_result(&honest.public_key(), &forged).is_err());
    let r = wait_refusals(&coord, |r| r.signature >= 1).await;
    assert_eq!(r.signature, 1);

    // The job is retried under a new, higher generation.
    let l2 = common::lease(&coord, 10).await;
    assert!(l2.generation > l1.generation);
    assert_eq!(l2.attempt, 2);

    // The worker still runs the old attempt beside the new one (same job, same worker):
    // its heartbeat is told to kill exactly the old generation, not the job by name.
    let kill = coord
        .heartbeat(
            "w1",
            vec![
                (l1.job.job_id.clone(), l1.generation),
                (l2.job.job_id.clone(), l2.generation),
            ],
            None,
        )
        .await
        .expect("heartbeat")
        .expect("not banned");
    assert_eq!(kill, vec![(l1.job.job_id.clone(), l1.generation)]);

    // 2. A result for the old generation (a late or replayed answer) is refused.
    let mut stale = result_for(&l1, &staging_root.join("2"), b"hello");
    honest.sign_result(&mut stale);
    send(&coord, batched, stale).await;
    let r = wait_refusals(&coord, |r| r.stale >= 1).await;
    assert_eq!(r.stale, 1);

    // 3. A correctly signed manifest whose uploaded bytes were tampered with.
    let mut tampered = result_for(&l2, &staging_root.join("3"), b"hello");
    honest.sign_result(&mut tampered);
    std::fs::write(staging_root.join("3/out/x.txt"), b"HELLO").expect("tamper");
    send(&coord, batched, tampered).await;
    let r = wait_refusals(&coord, |r| r.digest >= 1).await;
    assert_eq!(r.digest, 1);
    assert!(
        !project.path().join("artifacts/a").exists(),
        "nothing sealed from a tampered upload"
    );

    // 4. The honest answer is accepted and sealed with the worker's key and signature.
    let l3 = common::lease(&coord, 10).await;
    let mut good = result_for(&l3, &staging_root.join("4"), b"hello");
    honest.sign_result(&mut good);
    send(&coord, batched, good.clone()).await;
    let summary = common::finished(&mut run, 10).await;
    assert_eq!(summary.outcome, RunOutcome::Succeeded);
    let meta = nexa_shared::artifact::verify(&project.path().join("artifacts/a"))
        .expect("sealed and verified");
    assert_eq!(meta.labels["worker"], hex_of(&honest.public_key()));
    assert_eq!(meta.labels["signature"], hex_of(&good.signature));

    // 5. Replaying the accepted result is refused: the job is finished (and so no
    // longer known: counted apart from stale generations of live jobs).
    send(&coord, batched, good).await;
    let r = wait_refusals(&coord, |r| r.unknown_job >= 1).await;
    assert_eq!((r.stale, r.unknown_job), (1, 1));
    coord.shutdown();
}

/// One batch mixing a forged, a tampered and an honest result: each is judged as it
/// would be alone. The honest one is sealed, the other two are refused, counted, and
/// their jobs leased again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_forged_and_honest_results_admits_only_the_honest() {
    let project = tempfile::tempdir().expect("tempdir");
    let mut yaml = String::from("pipeline:\n  name: mixed\n  steps:\n");
    for s in ["a", "b", "c"] {
        yaml.push_str(&format!(
            "    - id: {s}\n      uses: exec\n      after: []\n      retries: {{count: 3, backoff: 10ms}}\n      params: {{cmd: [\"true\"]}}\n      out: artifacts/{s}\n"
        ));
    }
    let loaded = nexa_shared::spec::load_str("m.yaml", &yaml, project.path()).expect("valid");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let (coord, _task) =
        Coordinator::start(store, nexa_coordinator::scheduler::EngineConfig::embedded());
    let honest = Identity::generate();
    let forger = Identity::generate();
    let info = nexa_coordinator::scheduler::WorkerInfo {
        slots: 3,
        ..worker_info(&honest)
    };
    coord.register_worker("w1", info).expect("register");
    let mut run = common::submit(&coord, project.path(), loaded).await;
    let want = nexa_coordinator::scheduler::Want {
        slots: 3,
        wait: true,
    };
    // The planner queues the three jobs as it goes: what is queued when the ask is
    // answered comes in one answer, the rest in the next asks.
    let mut leases = tokio::time::timeout(Duration::from_secs(10), coord.lease_many("w1", want))
        .await
        .expect("leases in time");
    while leases.len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = nexa_coordinator::scheduler::Want {
            slots: 3 - leases.len(),
            wait: false,
        };
        leases.extend(coord.lease_many("w1", now).await);
    }
    let staging = project.path().join("staging");
    let mut forged = result_for(&leases[0], &staging.join("a"), b"x");
    forger.sign_result(&mut forged);
    let mut tampered = result_for(&leases[1], &staging.join("b"), b"x");
    honest.sign_result(&mut tampered);
    std::fs::write(staging.join("b/out/x.txt"), b"y").expect("tamper");
    let mut good = result_for(&leases[2], &staging.join("c"), b"x");
    honest.sign_result(&mut good);
    let verdicts = coord
        .report_batch("w1", vec![forged, tampered, good])
        .await
        .expect("report");
    assert_eq!(verdicts.len(), 3);
    assert!(verdicts[0].is_err(), "forged: {verdicts:?}");
    assert!(verdicts[2].is_ok(), "honest: {verdicts:?}");
    let r = wait_refusals(&coord, |r| r.signature >= 1 && r.digest >= 1).await;
    assert_eq!((r.signature, r.digest), (1, 1));
    // The refused two are leased again; honest answers finish the run.
    let mut again = tokio::time::timeout(Duration::from_secs(10), coord.lease_many("w1", want))
        .await
        .expect("leases in time");
    while again.len() < 2 {
        again.push(common::lease(&coord, 10).await);
    }
    let mut ids: Vec<String> = again.iter().map(|l| l.job.job_id.to_string()).collect();
    ids.sort();
    let mut refused: Vec<String> = leases[..2]
        .iter()
        .map(|l| l.job.job_id.to_string())
        .collect();
    refused.sort();
    assert_eq!(ids, refused, "exactly the refused jobs run again");
    let mut answers = Vec::new();
    for (i, l) in again.iter().enumerate() {
        let mut r = result_for(l, &staging.join(format!("r{i}")), b"x");
        honest.sign_result(&mut r);
        answers.push(r);
    }
    let verdicts = coord.report_batch("w1", answers).await.expect("report");
    assert!(verdicts.iter().all(Result::is_ok), "{verdicts:?}");
    let summary = common::finished(&mut run, 10).await;
    assert_eq!(summary.outcome, RunOutcome::Succeeded);
    for s in ["a", "b", "c"] {
        let meta = nexa_shared::artifact::verify(&project.path().join("artifacts").join(s))
            .expect("sealed and verified");
        assert_eq!(meta.labels["worker"], hex_of(&honest.public_key()));
    }
    coord.shutdown();
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Defect 3 of the hardening issue: a run is cancelled while its job is leased to a
/// worker that has gone silent. The lease expires; the job must not be leased again (a
/// worker that joins later gets nothing), the silent worker's late result is not sealed,
/// and the run ends Cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_is_never_leased_or_sealed_again() {
    let project = tempfile::tempdir().expect("tempdir");
    let yaml = "pipeline:\n  name: cancel\n  steps:\n    - id: a\n      uses: exec\n      retries: 3\n      params: {cmd: [\"true\"]}\n      out: artifacts/a\n";
    let loaded = nexa_shared::spec::load_str("c.yaml", yaml, project.path()).expect("valid");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let config = nexa_coordinator::scheduler::EngineConfig {
        lease_ttl: Some(Duration::from_millis(300)),
        ..nexa_coordinator::scheduler::EngineConfig::embedded()
    };
    let (coord, _task) = Coordinator::start(store, config);
    let silent = Identity::generate();
    coord
        .register_worker("w1", worker_info(&silent))
        .expect("register");
    let mut run = common::submit(&coord, project.path(), loaded).await;
    let l1 = common::lease(&coord, 10).await;
    coord.cancel(&run.run_id).expect("cancel");
    // w1 goes silent past its lease; a fresh worker joins and asks for work.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = Identity::generate();
    coord
        .register_worker("w2", worker_info(&late))
        .expect("register");
    let got = tokio::time::timeout(Duration::from_secs(2), coord.lease("w2")).await;
    assert!(
        got.is_err(),
        "a cancelled run's job was leased again: {got:?}"
    );
    // The silent worker's result arrives late: it is not sealed.
    let mut r = result_for(&l1, &project.path().join("staging/1"), b"late");
    silent.sign_result(&mut r);
    coord.report("w1", r).expect("report");
    let summary = common::finished(&mut run, 10).await;
    assert_eq!(summary.outcome, RunOutcome::Cancelled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !project.path().join("artifacts/a").exists(),
        "nothing of a cancelled run is sealed"
    );
    coord.shutdown();
}
