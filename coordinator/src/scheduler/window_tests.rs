//! A fan-out's shard jobs are made a window at a time: never more than the window
//! alive, every shard still run once and sealed, and a cancelled run's shards that
//! never had a job are cancelled with it.

use super::tests::{Harness, drain, steps};
use super::*;

/// A mesh-like engine whose fan-outs keep at most `window` jobs alive.
fn windowed(window: usize) -> Harness {
    Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(600)),
        unfit_grace: Duration::from_secs(60),
        shard_window: window,
        ..EngineConfig::embedded()
    })
}

/// A 23-shard fan-out (one record a shard) submitted on `h`.
fn fan_out(h: &mut Harness) -> RunHandle {
    let data: String = (0..23).map(|i| format!("{i}\n")).collect();
    std::fs::write(h.project.path().join("data.txt"), data).expect("write");
    h.submit(&steps(
        "win",
        1,
        "      in: {d: data.txt}\n      shards: {over: d, records: 1}\n",
    ))
}

#[tokio::test(start_paused = true)]
async fn a_fan_out_holds_at_most_its_window_of_jobs_and_still_runs_every_shard_once() {
    let mut h = windowed(4);
    let mut run = fan_out(&mut h);
    assert_eq!(h.engine.jobs.len(), 4, "the first window, not 23 jobs");
    assert_eq!(
        h.engine.snapshot().jobs.queued,
        23,
        "all 23 count as queued"
    );
    h.enrol("w1", 3);
    let mut seen = std::collections::BTreeSet::new();
    let mut most = 0;
    loop {
        let leases = h.ask_many("w1", 3, false).all();
        if leases.is_empty() {
            break;
        }
        for l in leases {
            most = most.max(h.engine.jobs.len());
            let (index, count) = l.job.shard.expect("a shard");
            assert_eq!(count, 23);
            assert!(seen.insert(index), "shard {index} leased twice");
            let ok = h.succeeded(&l, format!("{index}").as_bytes());
            h.report("w1", ok).expect("admitted");
        }
    }
    assert!(most <= 4, "at most the window alive: {most}");
    assert_eq!(seen.len(), 23, "every shard ran: {seen:?}");
    let (_, end) = drain(&mut run);
    assert_eq!(end.expect("finished").outcome, RunOutcome::Succeeded);
    let art = h.project.path().join("artifacts/win-0");
    let manifest = std::fs::read_to_string(art.join("manifest.json")).expect("manifest");
    assert_eq!(manifest.matches("\"index\"").count(), 23, "{manifest}");
    for i in 0..23 {
        let x = art.join(format!("shard-{i:05}/x.txt"));
        assert_eq!(
            std::fs::read_to_string(&x).expect("shard output"),
            i.to_string()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_fan_out_cancels_the_shards_that_never_had_a_job() {
    let mut h = windowed(4);
    let mut run = fan_out(&mut h);
    h.enrol("w1", 2);
    let leases = h.ask_many("w1", 2, false).all();
    assert_eq!(leases.len(), 2);
    let ok = h.succeeded(&leases[0], b"0");
    h.report("w1", ok).expect("admitted");
    let id = h.engine.runs.keys().next().cloned().expect("a run");
    h.send(Event::Cancel(id.to_string()));
    // The leased shard's worker reports it killed.
    let mut killed = h.succeeded(&leases[1], b"");
    killed.outcome = nexa_shared::job::Outcome::Cancelled;
    killed.outputs.clear();
    let _ = h.report("w1", killed);
    let (_, end) = drain(&mut run);
    let end = end.expect("the run ends");
    assert_eq!(end.outcome, RunOutcome::Cancelled);
    let shards = &end.steps[0].shards;
    assert_eq!(shards.len(), 23);
    assert_eq!(shards[0].status, StepStatus::Complete);
    assert!(
        shards
            .iter()
            .skip(1)
            .all(|s| s.status == StepStatus::Cancelled),
        "{shards:?}"
    );
    assert!(h.engine.jobs.is_empty(), "no job left behind");
    assert_eq!(h.engine.unmade_jobs(), 0);
}
