//! The engine's side of a cluster provider: a provided scheduler's steps wait past the
//! unfit grace, their waiting jobs are reported by shape, a provider can fail them, and
//! a pilot near the end of its walltime gets only what ends in time.

use super::tests::{Harness, drain, key_of};
use super::*;

/// Enrols a Slurm pilot whose allocation ends `ends_in` from now.
fn enrol_pilot(h: &mut Harness, id: &str, ends_in: Duration) {
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + ends_in.as_secs();
    let info = WorkerInfo {
        name: id.into(),
        key: key_of(id),
        profile: Profile {
            cores: 8,
            memory_total: 8 << 30,
            labels: [
                (hardware::SCHEDULER_LABEL.to_string(), "slurm".to_string()),
                (hardware::WALLTIME_END_LABEL.to_string(), end.to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        },
        slots: 4,
    };
    h.send(Event::RegisterWorker(id.into(), Box::new(info)));
}

const TWO_SHAPES: &str = r#"
pipeline:
  name: cluster
  steps:
    - id: wide
      uses: exec
      scheduler: slurm
      after: []
      timeout: 10m
      resources: {cpus: 2}
      slurm: {partition: big}
      params: {cmd: [echo, wide]}
      out: artifacts/wide
    - id: small
      uses: exec
      scheduler: slurm
      after: []
      params: {cmd: [echo, small]}
      out: artifacts/small
"#;

#[tokio::test(start_paused = true)]
async fn a_provided_schedulers_steps_wait_are_reported_by_shape_and_fail_only_when_the_provider_says()
 {
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(30)),
        unfit_grace: Duration::from_secs(5),
        provided_schedulers: vec!["slurm".into()],
        ..EngineConfig::embedded()
    });
    h.enrol("ordinary", 4);
    let mut run = h.submit(TWO_SHAPES);
    h.advance(Duration::from_secs(60)).await;
    assert!(
        drain(&mut run).1.is_none(),
        "no pilot yet, but a provider: the steps wait past the unfit grace"
    );
    let mut demand = h.engine.demand("slurm");
    demand.sort_by_key(|d| d.requirements.cpus);
    assert_eq!(demand.len(), 2, "{demand:?}");
    assert_eq!(
        (
            demand[0].requirements.cpus,
            demand[0].queued,
            demand[0].timeout
        ),
        (1, 1, None)
    );
    let wide = &demand[1];
    assert_eq!((wide.requirements.cpus, wide.queued), (2, 1));
    assert_eq!(wide.timeout, Some(Duration::from_secs(600)));
    assert_eq!(
        wide.requirements
            .labels
            .get("slurm.partition")
            .map(String::as_str),
        Some("big"),
        "the step's override reaches the provider and the matching"
    );
    assert_eq!(
        wide.steps,
        vec![(run.run_id.to_string(), 0, "wide".to_string())]
    );
    assert!(h.engine.demand("k8s").is_empty());

    // The provider learns Slurm will never start the wide step's pilot.
    h.send(Event::FailSteps(
        vec![(run.run_id.to_string(), 0)],
        "Slurm will never start this step's pilot: Reason=PartitionConfig".into(),
    ));
    assert_eq!(
        h.engine.demand("slurm").len(),
        1,
        "only the small step waits now"
    );
    // A pilot whose allocation ends in 100 s takes the small step (no timeout).
    enrol_pilot(&mut h, "pilot", Duration::from_secs(100));
    let lease = h.lease("pilot");
    assert_eq!(lease.job.step_id, "small");
    h.report("pilot", h.succeeded(&lease, b"small"))
        .expect("admitted");
    let end = drain(&mut run).1.expect("finished");
    assert_eq!(end.outcome, RunOutcome::Failed);
    let wide = end.steps.iter().find(|s| s.id == "wide").expect("wide");
    assert!(
        wide.error
            .as_deref()
            .unwrap_or("")
            .contains("Reason=PartitionConfig"),
        "{wide:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pilot_near_the_end_of_its_walltime_gets_only_a_job_that_ends_in_time() {
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(30)),
        unfit_grace: Duration::from_secs(5),
        provided_schedulers: vec!["slurm".into()],
        ..EngineConfig::embedded()
    });
    let mut run = h.submit(&TWO_SHAPES.replace(
        "      resources: {cpus: 2}\n      slurm: {partition: big}\n",
        "",
    ));
    // 10 minutes of timeout do not fit in 5 minutes of allocation.
    enrol_pilot(&mut h, "ending", Duration::from_secs(300));
    let first = h.lease("ending");
    assert_eq!(first.job.step_id, "small", "the one without a timeout");
    let mut waiting = h.ask("ending");
    assert!(
        waiting.try_recv().is_err(),
        "the 10-minute job is not leased to a pilot with 5 minutes left"
    );
    enrol_pilot(&mut h, "fresh", Duration::from_secs(3600));
    let wide = h.lease("fresh");
    assert_eq!(wide.job.step_id, "wide");
    h.report("ending", h.succeeded(&first, b"small"))
        .expect("admitted");
    h.report("fresh", h.succeeded(&wide, b"wide"))
        .expect("admitted");
    assert_eq!(
        drain(&mut run).1.expect("finished").outcome,
        RunOutcome::Succeeded
    );
}

#[tokio::test(start_paused = true)]
async fn embedded_with_a_provider_a_slurm_step_is_queued_for_pilots_not_failed_at_once() {
    // The embedded engine fails an unfit step at once (no grace); a provided
    // scheduler's step is queued instead, for the pilots the provider submits.
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(6)),
        provided_schedulers: vec!["slurm".into()],
        resident_workers: vec!["local".into()],
        ..EngineConfig::embedded()
    });
    h.enrol("local", 2);
    let mut run = h.submit(&TWO_SHAPES.replace(
        "      resources: {cpus: 2}\n      slurm: {partition: big}\n",
        "",
    ));
    assert!(drain(&mut run).1.is_none(), "not failed");
    assert_eq!(
        h.engine
            .demand("slurm")
            .iter()
            .map(|d| d.queued)
            .sum::<usize>(),
        2,
        "both steps wait in the queue for pilots"
    );
    // The resident worker sends no heartbeats: it is never lost.
    h.advance(Duration::from_secs(60)).await;
    assert!(h.engine.workers.get("local").is_some_and(|w| !w.lost));
    enrol_pilot(&mut h, "pilot", Duration::from_secs(3600));
    let a = h.lease("pilot");
    h.report("pilot", h.succeeded(&a, b"a")).expect("admitted");
    let b = h.lease("pilot");
    h.report("pilot", h.succeeded(&b, b"b")).expect("admitted");
    assert_eq!(
        drain(&mut run).1.expect("finished").outcome,
        RunOutcome::Succeeded
    );
}

#[tokio::test(start_paused = true)]
async fn jobs_of_a_provided_scheduler_that_start_waiting_wake_the_provider_and_others_do_not() {
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(30)),
        unfit_grace: Duration::from_secs(5),
        provided_schedulers: vec!["slurm".into()],
        ..EngineConfig::embedded()
    });
    let waker = h.engine.demand_waker.clone();
    h.enrol("ordinary", 4);
    let mut local = h.submit(&one_shape().replace("scheduler: slurm", "scheduler: local"));
    assert!(!woken(&waker).await, "local steps are not the provider's");
    let a = h.lease("ordinary");
    h.report("ordinary", h.succeeded(&a, b"a"))
        .expect("admitted");
    let b = h.lease("ordinary");
    h.report("ordinary", h.succeeded(&b, b"b"))
        .expect("admitted");
    assert!(drain(&mut local).1.is_some());

    // (Other commands: the same ones would be cached, scheduler is not in the key.)
    let _run = h.submit(&TWO_SHAPES.replace("echo, ", "echo, again-"));
    assert!(
        woken(&waker).await,
        "slurm jobs queued: the provider is woken"
    );
    assert!(
        !woken(&waker).await,
        "one wake for one burst of queued jobs"
    );
    // A pilot's lease expires: its job waits again, and the provider hears of it.
    enrol_pilot(&mut h, "pilot", Duration::from_secs(3600));
    let _lease = h.lease("pilot");
    assert!(!woken(&waker).await);
    h.advance(Duration::from_secs(31)).await;
    assert!(woken(&waker).await, "a requeued job wakes the provider too");
}

/// [`TWO_SHAPES`] without the wide step's resources and Slurm override.
fn one_shape() -> String {
    TWO_SHAPES.replace(
        "      resources: {cpus: 2}\n      slurm: {partition: big}\n",
        "",
    )
}

/// Whether `w` holds a wake-up now (taking it).
async fn woken(w: &tokio::sync::Notify) -> bool {
    tokio::time::timeout(Duration::ZERO, w.notified())
        .await
        .is_ok()
}

#[tokio::test(start_paused = true)]
async fn a_step_waits_for_a_worker_still_probing_its_runtimes_and_runs_once_its_labels_arrive() {
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(30)),
        unfit_grace: Duration::from_secs(2),
        ..EngineConfig::embedded()
    });
    // Enrolled before its runtimes were probed: no labels yet.
    let mut probing = Profile {
        cores: 8,
        memory_total: 8 << 30,
        runtimes_pending: true,
        ..Default::default()
    };
    register(&mut h, probing.clone());
    // The step needs a label only a probe could add (any label works the same way).
    let yaml = one_shape().replace("scheduler: slurm", "scheduler: k8s");
    let mut run = h.submit(&yaml);
    let mut waiting = h.ask("w");
    h.advance(Duration::from_secs(10)).await;
    assert!(
        drain(&mut run).1.is_none(),
        "not failed as unfit while the only worker is still probing"
    );
    assert!(waiting.try_recv().is_err(), "nothing it can run yet");
    // The probe's labels arrive in a heartbeat: the waiting slot gets a job at once.
    probing.runtimes_pending = false;
    probing
        .labels
        .insert(hardware::SCHEDULER_LABEL.into(), "k8s".into());
    beat_with(&mut h, probing.clone());
    let lease = waiting
        .try_recv()
        .expect("leased on the heartbeat that brought the labels")
        .expect("a lease");
    h.report("w", h.succeeded(&lease, b"x")).expect("admitted");
    let other = h.lease("w");
    h.report("w", h.succeeded(&other, b"y")).expect("admitted");
    assert_eq!(
        drain(&mut run).1.expect("finished").outcome,
        RunOutcome::Succeeded
    );

    // A probe that found nothing: the step fails as unfit at the next look.
    let mut bare = Profile {
        cores: 8,
        memory_total: 8 << 30,
        runtimes_pending: true,
        ..Default::default()
    };
    register(&mut h, bare.clone());
    // Other commands: the same ones would be cached.
    let mut run = h.submit(&yaml.replace("echo, ", "echo, again-"));
    h.advance(Duration::from_secs(5)).await;
    assert!(drain(&mut run).1.is_none(), "still probing");
    bare.runtimes_pending = false;
    beat_with(&mut h, bare);
    h.advance(Duration::from_secs(1)).await;
    let end = drain(&mut run).1.expect("failed once the probe was done");
    assert_eq!(end.outcome, RunOutcome::Failed);
}

/// Enrols worker `w` (4 slots) with `profile`.
fn register(h: &mut Harness, profile: Profile) {
    h.send(Event::RegisterWorker(
        "w".into(),
        Box::new(WorkerInfo {
            name: "w".into(),
            key: key_of("w"),
            profile,
            slots: 4,
        }),
    ));
}

/// A heartbeat from worker `w` carrying `profile`.
fn beat_with(h: &mut Harness, profile: Profile) {
    let (tx, _rx) = oneshot::channel();
    h.send(Event::Heartbeat(
        "w".into(),
        Box::new(Beat {
            profile: Some(profile),
            ..Beat::default()
        }),
        tx,
    ));
}
