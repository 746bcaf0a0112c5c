//! Replication and quorum on a real coordinator loop and sled store, the test playing
//! the workers: a liar is outvoted and never becomes the artifact; honest workers earn
//! trust and are then only spot-checked, which bounds the extra work.

use nexa_coordinator::scheduler::{EngineConfig, Progress, RunOutcome, WorkerInfo};
use nexa_coordinator::{Coordinator, SledStore};
use nexa_shared::digest;
use nexa_shared::job::{JobResult, Lease, Outcome, OutputFile};
use nexa_shared::signing::Identity;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
mod common;

/// `steps` steps with `validation` (a YAML mapping, or none), independent or (`chain`)
/// each after the previous.
fn pipeline(name: &str, steps: usize, validation: Option<&str>, chain: bool) -> String {
    let after = if chain { "" } else { "after: [], " };
    let validation = validation
        .map(|v| format!("validation: {v}, "))
        .unwrap_or_default();
    let mut y = format!("pipeline:\n  name: {name}\n  steps:\n");
    for i in 0..steps {
        y.push_str(&format!(
            "    - {{id: s{i}, uses: exec, {after}{validation}params: {{cmd: [\"true\"]}}, out: artifacts/{name}/s{i}}}\n"
        ));
    }
    y
}

/// Who took which job: (job id, worker).
type Taken = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A simulated worker: leases forever, answers `content(lease)`, signs, reports.
fn spawn_worker(
    coord: Coordinator,
    id: &'static str,
    root: &Path,
    content: fn(&Lease) -> Vec<u8>,
    leases: Arc<AtomicU64>,
) -> [u8; 32] {
    spawn_worker_on(coord, id, root, content, leases, "x86_64", None)
}

/// [`spawn_worker`] on a given CPU architecture, noting the jobs it takes in `taken`.
fn spawn_worker_on(
    coord: Coordinator,
    id: &'static str,
    root: &Path,
    content: fn(&Lease) -> Vec<u8>,
    leases: Arc<AtomicU64>,
    arch: &str,
    taken: Option<Taken>,
) -> [u8; 32] {
    let identity = Arc::new(Identity::generate());
    coord
        .register_worker(
            id,
            WorkerInfo {
                name: id.into(),
                key: identity.public_key(),
                profile: nexa_shared::hardware::Profile {
                    cores: 1,
                    memory_total: 1 << 30,
                    arch: arch.into(),
                    os: "linux".into(),
                    ..Default::default()
                },
                slots: 1,
            },
        )
        .expect("register");
    let signer = identity.clone();
    let root = root.join(id);
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(lease) = coord.lease(id).await {
            leases.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = &taken {
                t.lock()
                    .expect("lock")
                    .push((lease.job.job_id.to_string(), id.to_string()));
            }
            n += 1;
            let staging = root.join(n.to_string());
            let body = content(&lease);
            let dir = staging.join("out");
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("answer"), &body).expect("write");
            let mut r = JobResult {
                job_id: lease.job.job_id.clone(),
                generation: lease.generation,
                attempt: lease.attempt,
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                outputs: vec![OutputFile {
                    output: "out".into(),
                    path: "answer".into(),
                    size: body.len() as u64,
                    digest: digest::format(&blake3::hash(&body)).into(),
                }],
                started_ms: 1_000,
                ended_ms: 3_000,
                error: String::new(),
                staging: Some(staging),
                log: None,
                progress: None,
                worker_key: [0; 32],
                signature: Vec::new(),
            };
            signer.sign_result(&mut r);
            if coord.report(id, r).is_err() {
                break;
            }
        }
    });
    identity.public_key()
}

async fn run(coord: &Coordinator, project: &Path, yaml: &str) -> RunOutcome {
    let loaded = nexa_shared::spec::load_str("r.yaml", yaml, project).expect("valid");
    let mut h = common::submit(coord, project, loaded).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(120), h.recv()).await {
            Ok(Some(Progress::Finished(s))) => return s.outcome,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the run did not finish"),
        }
    }
}

fn honest(_: &Lease) -> Vec<u8> {
    b"42\n".to_vec()
}

fn liar(_: &Lease) -> Vec<u8> {
    b"41\n".to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_is_outvoted_and_its_result_never_becomes_the_artifact() {
    let project = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let (coord, _task) = Coordinator::start(store, EngineConfig::embedded());
    let leases = Arc::new(AtomicU64::new(0));
    let scratch = project.path().join("workers");
    spawn_worker(coord.clone(), "h1", &scratch, honest, leases.clone());
    spawn_worker(coord.clone(), "h2", &scratch, honest, leases.clone());
    let bad = spawn_worker(coord.clone(), "liar", &scratch, liar, leases.clone());
    let outcome = run(
        &coord,
        project.path(),
        &pipeline("vote", 6, Some("{replicas: 3, quorum: 2}"), true),
    )
    .await;
    assert_eq!(outcome, RunOutcome::Succeeded);
    for i in 0..6 {
        let art = project.path().join(format!("artifacts/vote/s{i}"));
        assert_eq!(
            std::fs::read_to_string(art.join("answer")).expect("answer"),
            "42\n"
        );
        let meta = nexa_shared::artifact::read_meta(&art).expect("meta");
        assert_ne!(
            meta.labels.get("worker").map(String::as_str),
            Some(hex::encode(bad).as_str()),
            "the liar's result was sealed"
        );
        nexa_shared::provenance::verify_artifact(&art).expect("verifies");
    }
    let ws = coord.list_workers().await.expect("workers");
    let of = |id: &str| ws.iter().find(|w| w.id == id).expect("worker").clone();
    // One unit at a time: every replica is leased at once, so the liar answers each
    // one, in time or late, and is outvoted every time.
    let liar = of("liar");
    let t = &liar.trust["exec"];
    assert_eq!((t.valid, t.streak), (0, 0), "the liar earned nothing");
    assert_eq!(t.invalid, 6, "{t:?}");
    assert_eq!(liar.credit.cpu_seconds, 0.0, "no credit for outvoted work");
    for h in ["h1", "h2"] {
        let w = of(h);
        assert_eq!(w.trust["exec"].invalid, 0);
        assert!(w.trust["exec"].valid >= 1);
        assert!(w.credit.cpu_seconds >= 2.0, "{:?}", w.credit);
    }
    let r = coord.refusals().await.expect("refusals");
    assert_eq!(r.outvoted, t.invalid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_workers_are_spot_checked_and_the_extra_work_stays_small() {
    let project = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let (coord, _task) = Coordinator::start(store, EngineConfig::embedded());
    let leases = Arc::new(AtomicU64::new(0));
    let scratch = project.path().join("workers");
    spawn_worker(coord.clone(), "h1", &scratch, honest, leases.clone());
    spawn_worker(coord.clone(), "h2", &scratch, honest, leases.clone());

    // Untrusted, every job runs twice.
    let outcome = run(
        &coord,
        project.path(),
        &pipeline("warmup", 30, Some("{replicas: 2, quorum: 2}"), false),
    )
    .await;
    assert_eq!(outcome, RunOutcome::Succeeded);
    let (units, replicas) = coord.replication().await.expect("figures");
    assert_eq!(
        (units, replicas),
        (30, 60),
        "full replication while untrusted"
    );
    let ws = coord.list_workers().await.expect("workers");
    assert!(
        ws.iter().all(|w| w.trust["exec"].trusted()),
        "both honest workers are trusted after 15 validated results each: {:?}",
        ws.iter().map(|w| &w.trust).collect::<Vec<_>>()
    );

    // Trusted: 1,000 jobs, mostly run once, still spot-checked now and then.
    let before = leases.load(Ordering::Relaxed);
    let outcome = run(
        &coord,
        project.path(),
        &pipeline("trusted", 1000, Some("{replicas: 2, quorum: 2}"), false),
    )
    .await;
    assert_eq!(outcome, RunOutcome::Succeeded);
    let (units2, replicas2) = coord.replication().await.expect("figures");
    let (units, replicas) = (units2 - units, replicas2 - replicas);
    assert_eq!(units, 1000);
    let extra = replicas as f64 / units as f64 - 1.0;
    let leased = leases.load(Ordering::Relaxed) - before;
    println!(
        "replication overhead once trusted: {:.1}% ({replicas} replica jobs for {units} jobs, {leased} leases)",
        extra * 100.0
    );
    assert!(extra <= 0.10, "extra work {:.1}% > 10%", extra * 100.0);
    assert!(extra > 0.0, "trusted workers are still spot-checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_wide_default_replicates_steps_that_ask_for_nothing() {
    let project = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let config = EngineConfig {
        default_validation: Some("replicas=2,quorum=2".parse().expect("valid")),
        ..EngineConfig::embedded()
    };
    let (coord, _task) = Coordinator::start(store, config);
    let leases = Arc::new(AtomicU64::new(0));
    let scratch = project.path().join("workers");
    spawn_worker(coord.clone(), "h1", &scratch, honest, leases.clone());
    spawn_worker(coord.clone(), "h2", &scratch, honest, leases.clone());
    let y = pipeline("plain", 5, None, false);
    assert_eq!(run(&coord, project.path(), &y).await, RunOutcome::Succeeded);
    assert_eq!(coord.replication().await.expect("figures"), (5, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homogeneous_replicas_stay_within_one_hardware_class() {
    let project = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(&project.path().join("store")).expect("store"));
    let (coord, _task) = Coordinator::start(store, EngineConfig::embedded());
    let leases = Arc::new(AtomicU64::new(0));
    let taken: Taken = Default::default();
    let scratch = project.path().join("workers");
    for (id, arch) in [("x1", "x86_64"), ("x2", "x86_64"), ("arm", "aarch64")] {
        spawn_worker_on(
            coord.clone(),
            id,
            &scratch,
            honest,
            leases.clone(),
            arch,
            Some(taken.clone()),
        );
    }
    let y = pipeline(
        "homo",
        12,
        Some("{replicas: 2, quorum: 2, homogeneous: true}"),
        false,
    );
    assert_eq!(run(&coord, project.path(), &y).await, RunOutcome::Succeeded);
    let taken = taken.lock().expect("lock").clone();
    // The lone aarch64 worker can never make a quorum of its class: it gets nothing;
    // every unit ran on the two x86_64 workers.
    assert!(taken.iter().all(|(_, w)| w != "arm"), "{taken:?}");
    for i in 0..12 {
        let unit = format!("s{i}~");
        let mut on: Vec<&str> = taken
            .iter()
            .filter(|(j, _)| j.contains(&format!("/{unit}")))
            .map(|(_, w)| w.as_str())
            .collect();
        on.sort();
        assert_eq!(on, ["x1", "x2"], "unit s{i}: {taken:?}");
    }
}
