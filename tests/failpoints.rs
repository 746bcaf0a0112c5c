//! The fail-point suite: the coordinator built with its fault-injection points
//! (`nexa-coordinator-failpoints`, see `nexa_shared::failpoint`), each point armed in
//! turn while a fan-out of random-valued steps runs on a real worker, two ways:
//!
//! - **fails**: the point's first three passes fail their operation (as a full disk or
//!   an I/O error would). The operation must fail cleanly: what was refused is retried
//!   or resubmitted, and the run finishes;
//! - **crash**: the point's first pass kills the coordinator on the spot (SIGKILL). It is
//!   restarted on the same data dir and port, and the run must finish.
//!
//! Either way, what must hold at the end, and again after a clean restart: every step
//! COMPLETE or SKIPPED, every sealed artifact verifies (deeply, through its lineage), no
//! sealed hash changed across the restart (a result accepted twice would change one),
//! and nothing half-done is left (no `.tmp`/`.old` artifact, no upload part file). Each
//! test also checks that its point really fired: a point never reached proves nothing.

mod common;

use common::mesh::{Coord, Worker, failpoints_bin, fixed_listen, remote, step};
use common::{Project, sealed};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const STEPS: [&str; 3] = ["gen", "fan", "merge"];

fn pipeline(p: &Project) {
    p.write(
        "fp.yaml",
        r#"pipeline:
  name: fp
  steps:
    - id: gen
      uses: exec
      params: {run: 'for i in $(seq 1 8); do od -An -N8 -tx8 /dev/urandom; done > "$NEXA_OUT/recs.txt"'}
      out: artifacts/gen
    - id: fan
      uses: exec
      in: {recs: artifacts/gen}
      shards: {over: recs, count: 4}
      params: {run: 'od -An -N8 -tx8 /dev/urandom > "$NEXA_OUT/v"; cat "$NEXA_IN_RECS/recs.txt" >> "$NEXA_OUT/v"'}
      out: artifacts/fan
    - id: merge
      uses: exec
      in: {parts: artifacts/fan}
      params: {run: 'find "$NEXA_IN_PARTS" -name v | sort | xargs cat > "$NEXA_OUT/all"; od -An -N8 -tx8 /dev/urandom >> "$NEXA_OUT/all"'}
      out: artifacts/merge
"#,
    );
}

/// Half-done things under `root`: unfinished artifacts and upload part files.
fn leftovers(root: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.ends_with(".old") || name.ends_with(".parts") {
            out.push(p.display().to_string());
        }
        if p.is_dir() {
            leftovers(&p, out);
        }
    }
}

fn client(p: &Project, coord: &Coord, n: usize) -> Child {
    remote(p, coord, &["pipeline", "run", "fp.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(p.path().join(format!("client{n}.log"))).expect("log"),
        ))
        .spawn()
        .expect("client")
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Fails,
    Crash,
}

fn exercise(point: &str, mode: Mode) {
    let p = Project::new();
    pipeline(&p);
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let log_path = data.with_extension("log");
    let armed = match mode {
        Mode::Fails => format!("{point}=3*return"),
        Mode::Crash => format!("{point}=1*return(crash)"),
    };
    let exe = failpoints_bin();
    let start_plain = || Coord::start(&data, &listen, &["--open-enrolment"]);
    let mut restarts = 0;
    // A point on the start-up path may fire before the coordinator listens.
    let mut coord = match Coord::try_start_exe(
        &exe,
        &[("FAILPOINTS", &armed)],
        &data,
        &listen,
        &["--open-enrolment"],
    ) {
        Some(c) => c,
        None => {
            restarts += 1;
            start_plain()
        }
    };
    let url = coord.url("http");
    // Not waited for: the worker's enrolment is one of the operations a point may fail.
    let _w = Worker::start(&url, &p.path().join("w"), 2, None, &[]);

    let mut clients = 0;
    let mut run = client(&p, &coord, clients);
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        assert!(
            Instant::now() < deadline,
            "{point} ({mode:?}): the run did not finish.\ncoordinator log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        if let Ok(Some(_)) = coord.child.try_wait() {
            // The crash point fired (or the coordinator refused to go on): restart it,
            // without fail points, on the same data dir and port.
            restarts += 1;
            assert!(restarts <= 3, "{point}: the coordinator keeps dying");
            coord = start_plain();
        }
        if let Some(status) = run.try_wait().expect("client") {
            if status.success() {
                break;
            }
            // A refused operation reaches the client as a clear error; nothing of it was
            // accepted, so submitting again is safe.
            let said = std::fs::read_to_string(p.path().join(format!("client{clients}.log")))
                .unwrap_or_default();
            clients += 1;
            assert!(
                clients <= 3,
                "{point} ({mode:?}): the run failed {clients} times; last client said:\n{said}"
            );
            eprintln!("{point} ({mode:?}): client {clients} failed, submitting again:\n{said}");
            run = client(&p, &coord, clients);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        log.contains(&format!("fail point {point} fired")),
        "{point} ({mode:?}) never fired: the suite proves nothing about it.\n{log}"
    );
    if mode == Mode::Crash {
        assert!(
            restarts >= 1,
            "{point}: the crash point fired but nothing died"
        );
    }

    let check = |coord: &Coord, when: &str| -> BTreeMap<String, String> {
        let out = remote(&p, coord, &["pipeline", "status", "fp.yaml", "--json"])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "{point} ({mode:?}) {when}: status: {}\ncoordinator log:\n{}",
            common::text(&out),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        for s in STEPS {
            let status = step(&st, s)["status"].as_str().unwrap_or_default();
            assert!(
                status == "COMPLETE" || status == "SKIPPED",
                "{point} ({mode:?}) {when}: {s} is {status}: {st}"
            );
        }
        let mut now = BTreeMap::new();
        sealed(&data.join("projects"), &mut now);
        assert!(
            now.len() >= 3,
            "{point} ({mode:?}) {when}: only {} sealed artifacts",
            now.len()
        );
        let merge = now
            .keys()
            .find(|k| k.ends_with("artifacts/merge"))
            .unwrap_or_else(|| panic!("{point} {when}: no sealed merge in {now:?}"))
            .clone();
        // Lineage names inputs relative to the project's root on the coordinator.
        let root = Path::new(&merge)
            .parent()
            .and_then(Path::parent)
            .expect("project root");
        let v = p
            .cmd(&["verify", "--deep", "artifacts/merge"])
            .current_dir(root)
            .output()
            .expect("verify");
        assert!(
            v.status.success(),
            "{point} ({mode:?}) {when}: verify --deep {merge}: {}",
            common::text(&v)
        );
        for path in now.keys() {
            let v = p.nexa(&["verify", path]);
            assert!(
                v.status.success(),
                "{point} ({mode:?}) {when}: verify {path}: {}",
                common::text(&v)
            );
        }
        let mut left = Vec::new();
        leftovers(&data, &mut left);
        assert!(
            left.is_empty(),
            "{point} ({mode:?}) {when}: half-done things left: {left:?}"
        );
        now
    };
    let before = check(&coord, "after the run");
    // What the store holds survives a clean restart: same statuses, same hashes.
    drop(coord);
    let coord = start_plain();
    let after = check(&coord, "after a restart");
    assert_eq!(before, after, "{point} ({mode:?}): sealed hashes changed");
    eprintln!(
        "{point} ({mode:?}): fired; run finished after {restarts} restart(s) and {clients} resubmission(s); {} artifacts verified",
        after.len()
    );
}

macro_rules! points {
    ($($fails:ident, $crash:ident => $point:literal;)*) => {
        $(
            #[test]
            fn $fails() {
                exercise($point, Mode::Fails);
            }

            #[test]
            fn $crash() {
                exercise($point, Mode::Crash);
            }
        )*
    };
}

points! {
    store_write_fails, store_write_crash => "store.write";
    store_flush_fails, store_flush_crash => "store.flush";
    seal_prepare_fails, seal_prepare_crash => "seal.prepare";
    seal_swap_in_fails, seal_swap_in_crash => "seal.swap_in";
    seal_complete_fails, seal_complete_crash => "seal.complete";
    upload_write_fails, upload_write_crash => "upload.write";
    upload_rename_fails, upload_rename_crash => "upload.rename";
    report_judge_fails, report_judge_crash => "report.judge";
    mirror_write_fails, mirror_write_crash => "mirror.write";
}

/// The fail-point pipeline in a new project, and a coordinator built with its fail
/// points, armed with `spec`, on a data dir of that project.
fn armed_run(spec: &str) -> (Project, std::path::PathBuf, Coord) {
    let p = Project::new();
    pipeline(&p);
    let data = p.path().join("coord");
    let coord = Coord::try_start_exe(
        &failpoints_bin(),
        &[("FAILPOINTS", spec)],
        &data,
        "127.0.0.1:0",
        &["--open-enrolment"],
    )
    .expect("coordinator");
    (p, data, coord)
}

/// How the client `run` ended, within a minute; else it is killed and the test fails
/// with `hangs()`.
fn finished(run: &mut Child, hangs: impl Fn() -> String) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = run.try_wait().expect("client") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("{}", hangs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scheduler task that panics (the planner; a sharded step's assembly; a group on the
/// sealing thread) fails its step with the reason, and the run ends: it used to send
/// nothing back, and the run waited for it for ever.
#[test]
fn a_panicking_planner_or_assembly_fails_its_step_instead_of_hanging_the_run() {
    for (point, failing) in [
        ("planner.plan", "gen"),
        ("sealer.assemble", "fan"),
        ("sealer.group", "gen"),
    ] {
        let (p, data, coord) = armed_run(&format!("{point}=panic"));
        let _w = Worker::start(&coord.url("http"), &p.path().join("w"), 2, None, &[]);
        let mut run = client(&p, &coord, 0);
        let status = finished(&mut run, || {
            format!(
                "{point}: the run hangs after the task panicked.\n{}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            )
        });
        let said = std::fs::read_to_string(p.path().join("client0.log")).unwrap_or_default();
        assert!(!status.success(), "{point}: the run succeeded:\n{said}");
        let out = remote(&p, &coord, &["pipeline", "status", "fp.yaml", "--json"])
            .output()
            .expect("status");
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        let s = step(&st, failing);
        assert_eq!(s["status"], "FAILED", "{point}: {st}");
        assert!(
            s["error"].as_str().unwrap_or_default().contains("panicked"),
            "{point}: the step's error should say the task panicked: {st}"
        );
    }
}

/// A coordinator from before `Exchange` (the call armed to answer UNIMPLEMENTED): the
/// worker notices on its first call, falls back to one `Lease` and one `Report` call per
/// job, and the run finishes as on any coordinator.
#[test]
fn a_worker_falls_back_to_single_calls_on_a_coordinator_without_exchange() {
    let (p, data, coord) = armed_run("exchange.call=return");
    let w = Worker::start(&coord.url("http"), &p.path().join("w"), 2, None, &[]);
    let mut run = client(&p, &coord, 0);
    let status = finished(&mut run, || format!("the run hangs:\n{}", w.log()));
    let said = std::fs::read_to_string(p.path().join("client0.log")).unwrap_or_default();
    assert!(status.success(), "{said}\nworker:\n{}", w.log());
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    assert!(log.contains("fail point exchange.call fired"), "{log}");
    assert!(w.log().contains("does not know Exchange"), "{}", w.log());
    let out = remote(&p, &coord, &["pipeline", "status", "fp.yaml", "--json"])
        .output()
        .expect("status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    for s in STEPS {
        assert_eq!(step(&st, s)["status"], "COMPLETE", "{st}");
    }
}
