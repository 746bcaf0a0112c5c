//! Services under paused time: a serve job's GPU stays held after its job while the
//! worker reports the service, a stop travels back in the heartbeat's answer, and the
//! GPU is free once the worker stops listing the service.

use super::tests::{Harness, drain, key_of};
use super::*;

fn gpu_worker(h: &mut Harness, id: &str) {
    let mut profile = Profile {
        cores: 8,
        memory_total: 8 << 30,
        gpus: vec![nexa_shared::hardware::Gpu {
            index: 0,
            uuid: "GPU-0".into(),
            name: "Fake L4".into(),
            memory_total: 24 << 30,
            memory_free: 24 << 30,
            compute_capability: (8, 9),
            mig_enabled: false,
        }],
        ..Default::default()
    };
    for l in ["python.torch", "python.transformers", "services"] {
        profile.labels.insert(l.into(), "yes".into());
    }
    let info = WorkerInfo {
        name: id.into(),
        key: key_of(id),
        profile,
        slots: 4,
    };
    h.send(Event::RegisterWorker(id.into(), Box::new(info)));
}

const SERVE: &str = "pipeline:\n  name: svc\n  steps:\n    - id: serve\n      uses: runners.serve\n      resources: {gpus: 1}\n      params: {model: m, name: svc, port: 0}\n      out: artifacts/svc\n";
const GPU_JOB: &str = "pipeline:\n  name: g\n  steps:\n    - id: g\n      uses: exec\n      resources: {gpus: 1}\n      params: {cmd: [\"true\"]}\n      out: artifacts/g\n";

fn beat(h: &mut Harness, worker: &str, services: Vec<ServiceBeat>) -> HeartbeatAnswer {
    let (tx, mut rx) = oneshot::channel();
    let beat = Beat {
        services,
        ..Beat::default()
    };
    h.send(Event::Heartbeat(worker.into(), Box::new(beat), tx));
    rx.try_recv().expect("answered").expect("not banned")
}

fn views(h: &mut Harness) -> Vec<ServiceView> {
    let (tx, mut rx) = oneshot::channel();
    h.send(Event::Services(tx));
    rx.try_recv().expect("answered")
}

/// An operator's stop of the service `l` started, grace 5 s: whether the engine knew it.
fn stop(h: &mut Harness, l: &Lease) -> bool {
    let (tx, mut rx) = oneshot::channel();
    h.send(Event::StopService(
        "w".into(),
        l.job.job_id.clone(),
        l.generation,
        Duration::from_secs(5),
        tx,
    ));
    rx.try_recv().expect("answered")
}

#[tokio::test(start_paused = true)]
async fn a_service_holds_its_gpu_until_its_worker_stops_reporting_it_and_a_stop_rides_the_heartbeat()
 {
    let mut h = Harness::mesh(Duration::from_secs(30));
    gpu_worker(&mut h, "w");
    let mut serve = h.submit(SERVE);
    let l = h.lease("w");
    assert_eq!(l.gpus, ["GPU-0"]);
    let result = h.succeeded(&l, b"{}");
    h.report("w", result).expect("accepted");
    let (_, end) = drain(&mut serve);
    assert_eq!(end.expect("finished").outcome, RunOutcome::Succeeded);
    let me = ServiceBeat {
        job_id: l.job.job_id.clone(),
        generation: l.generation,
        healthy: true,
        detail: String::new(),
        gpu_uuids: vec!["GPU-0".into()],
    };

    // The step is done, its server is not: a GPU job waits.
    let _gpu_run = h.submit(GPU_JOB);
    let mut waiting = h.ask("w");
    assert!(waiting.try_recv().is_err(), "the GPU went to a job");
    // A heartbeat sent before the worker knew of its service does not free it.
    assert_eq!(beat(&mut h, "w", Vec::new()), HeartbeatAnswer::default());
    assert!(
        waiting.try_recv().is_err(),
        "an early heartbeat freed the GPU"
    );
    assert!(beat(&mut h, "w", vec![me.clone()]).stop_services.is_empty());
    let v = views(&mut h);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].healthy, v[0].stopping), (Some(true), false));
    assert!(!v[0].worker_lost);

    // A worker that stops heartbeating: its service is lost, not silently gone, and
    // it is back with the worker's next heartbeat.
    h.advance(Duration::from_secs(31)).await;
    let v = views(&mut h);
    assert_eq!(v.len(), 1, "a lost worker's service is still known: {v:?}");
    assert!(v[0].worker_lost, "{v:?}");
    beat(&mut h, "w", vec![me.clone()]);
    assert!(!views(&mut h)[0].worker_lost);

    // Its worker says it died: unhealthy, still holding the GPU until it is stopped.
    let dead = ServiceBeat {
        healthy: false,
        detail: "its process is gone".into(),
        ..me.clone()
    };
    beat(&mut h, "w", vec![dead.clone()]);
    let v = views(&mut h);
    assert_eq!(v[0].healthy, Some(false));
    assert_eq!(v[0].detail, "its process is gone");

    // An operator's stop reaches the worker with its grace period, every heartbeat
    // until the worker no longer lists the service.
    assert!(stop(&mut h, &l), "the engine knows it");
    for _ in 0..2 {
        let answer = beat(&mut h, "w", vec![dead.clone()]);
        assert_eq!(
            answer.stop_services,
            [(l.job.job_id.clone(), l.generation, Duration::from_secs(5))]
        );
    }
    assert!(views(&mut h)[0].stopping);
    assert!(waiting.try_recv().is_err());
    // Gone from the heartbeat: the GPU is free and the waiting job gets it.
    beat(&mut h, "w", Vec::new());
    assert!(views(&mut h).is_empty());
    let lease = waiting
        .try_recv()
        .expect("leased once the service stopped")
        .expect("a lease");
    assert_eq!(lease.gpus, ["GPU-0"]);
    assert!(!stop(&mut h, &l), "already stopped");
}

#[tokio::test(start_paused = true)]
async fn a_rerun_replaces_the_service_of_the_same_name_and_a_dry_run_holds_nothing() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    gpu_worker(&mut h, "w");
    let _first = h.submit(SERVE);
    let old = h.lease("w");
    let result = h.succeeded(&old, b"{}");
    h.report("w", result).expect("accepted");
    // The first run's service is the worker's; the second run's serve step waits for
    // the GPU, so it runs without one.
    let _second = h.submit(&SERVE.replace("resources: {gpus: 1}\n      ", ""));
    let new = h.lease("w");
    assert!(new.gpus.is_empty());
    assert!(beat(&mut h, "w", Vec::new()).stop_services.is_empty());
    let result = h.succeeded(&new, b"{}");
    h.report("w", result).expect("accepted");
    let answer = beat(&mut h, "w", Vec::new());
    assert_eq!(
        answer.stop_services,
        [(
            old.job.job_id.clone(),
            old.generation,
            Duration::from_secs(10)
        )],
        "the old service of the same name is stopped, the new one is not"
    );

    let mut h = Harness::mesh(Duration::from_secs(30));
    gpu_worker(&mut h, "w");
    let _dry = h.submit(&SERVE.replace("port: 0}", "port: 0, dry_run: true}"));
    let l = h.lease("w");
    let result = h.succeeded(&l, b"{}");
    h.report("w", result).expect("accepted");
    assert!(views(&mut h).is_empty(), "a dry run starts no service");
    let _gpu_run = h.submit(GPU_JOB);
    assert!(h.ask("w").try_recv().is_ok(), "its GPU is free at once");
}
