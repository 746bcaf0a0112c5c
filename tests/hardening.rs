//! Attacks on the landed build, one test per defect of the hardening issue: a real
//! `nexa-coordinator serve`, the real CLI, and a hand-driven worker speaking the real
//! gRPC API the way a malicious volunteer would.

mod common;

use common::mesh::{Coord, RawWorker, Via, remote, remote_status, step, wait_for};
use common::{Project, text};
use std::process::Stdio;
use std::time::Duration;

/// `nexa pipeline run FILE` against `coord`, in the background (its output kept for
/// `wait_with_output`).
fn run_in_background(p: &Project, coord: &Coord, file: &str) -> std::process::Child {
    remote(p, coord, &["pipeline", "run", file])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client")
}

/// A lease of a job that does not exist (what a worker may claim to hold).
fn made_up_lease(job_id: &str) -> nexa_shared::job::Lease {
    nexa_shared::job::Lease {
        job: nexa_shared::job::JobSpec {
            job_id: job_id.into(),
            ..Default::default()
        },
        generation: 1,
        attempt: 1,
        gpus: Vec::new(),
    }
}

/// Pipeline `name` (in `<name>.yaml`): one step reading `in/data.txt`, which holds
/// `content`.
fn reading_step(p: &Project, name: &str, content: &str) {
    p.write("in/data.txt", content);
    p.write(
        &format!("{name}.yaml"),
        &format!("pipeline:\n  name: {name}\n  steps:\n    - id: a\n      uses: exec\n      in: {{d: in/data.txt}}\n      params: {{run: 'true'}}\n      out: artifacts/a\n"),
    );
}

fn one_step(p: &Project, name: &str, retries: u32) {
    p.write(
        &format!("{name}.yaml"),
        &format!(
            "pipeline:\n  name: {name}\n  steps:\n    - id: a\n      uses: exec\n      retries: {{count: {retries}, backoff: 10ms}}\n      params: {{run: 'true'}}\n      out: artifacts/a\n"
        ),
    );
}

/// Runs a wire test against the single `Lease`/`Report` calls and against `Exchange`.
macro_rules! on_both_paths {
    ($body:ident: $single:ident, $exchange:ident) => {
        #[test]
        fn $single() {
            $body(Via::Single);
        }

        #[test]
        fn $exchange() {
            $body(Via::Exchange);
        }
    };
}

on_both_paths!(sealed_artifact_stream: a_worker_cannot_write_into_a_sealed_artifact_through_a_stream_left_open, nor_through_exchange);

/// Defect 1: a worker opens an upload declaring 18 bytes, sends 5, reports a signed
/// 5-byte result and then sends the other 13 on the still-open stream. The late bytes
/// must never reach what is sealed: the short file is not in the staging tree when the
/// result is judged, the late rename is refused, and what is sealed verifies.
fn sealed_artifact_stream(via: Via) {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    one_step(&p, "tamper", 1);
    let client = run_in_background(&p, &coord, "tamper.yaml");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut w = RawWorker::enrol_via(&url, via).await;
        let l1 = w.lease(20).await;
        let full = b"eighteen bytes!!!!";
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(RawWorker::chunk(&l1, "out", "f", 0, &full[..5], full))
            .await
            .expect("send");
        let mut up = w.client.clone();
        let req = w.authed(tokio_stream::wrappers::ReceiverStream::new(rx));
        let open_stream = tokio::spawn(async move { up.upload(req).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The signed result names the 5 bytes that arrived so far.
        let r = w.result(&l1, "out", "f", &full[..5]);
        w.report(r)
            .await
            .expect("the report is taken (and judged by the engine)");
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(RawWorker::chunk(&l1, "out", "f", 5, &full[5..], full))
            .await
            .expect("send the rest");
        drop(tx);
        let late = open_stream.await.expect("join");
        let e = late.expect_err("bytes after the report must be refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        // The attempt failed (its file was not complete when judged); an honest retry
        // completes the step.
        let l2 = w.lease(20).await;
        assert!(l2.generation > l1.generation);
        w.upload(&l2, "out", "f", b"hello")
            .await
            .expect("honest upload");
        let r = w.result(&l2, "out", "f", b"hello");
        w.report(r).await.expect("report");
    });
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "tamper.yaml");
    assert_eq!(step(&st, "a")["status"], "COMPLETE");
    // What was sealed is the honest retry's payload, and it verifies.
    let art = coord.data.join("projects/tamper/artifacts/a");
    assert_eq!(std::fs::read(art.join("f")).expect("sealed file"), b"hello");
    let v = p.nexa(&["verify", &art.display().to_string()]);
    assert!(v.status.success(), "{}", text(&v));
    // No part file of the attack is left anywhere in staging.
    let leftovers: Vec<_> = walk(&coord.data.join("staging"))
        .into_iter()
        .filter(|f| std::path::Path::new(f).is_file())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

on_both_paths!(live_lease_only: uploads_and_fetches_need_a_live_lease_and_refusals_leave_nothing, and_over_exchange_too);

/// Defect 10: uploads and fetches need a live lease of the caller for that job; refused
/// uploads leave no staging directory behind.
fn live_lease_only(via: Via) {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    reading_step(&p, "lease", "secret input\n");
    let client = run_in_background(&p, &coord, "lease.yaml");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        use nexa_proto::v1;
        let mut thief = RawWorker::enrol(&url).await;
        let mut w = RawWorker::enrol_via(&url, via).await;
        // A 2 MiB upload for a job that does not exist is refused before it is kept.
        let fake = made_up_lease("no-such-job");
        let big = vec![7u8; 2 << 20];
        let e = thief
            .upload(&fake, "out", "f", &big)
            .await
            .expect_err("no lease");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        // Another enrolled worker may neither upload for w's lease nor fetch its input
        // by digest.
        let lease = w.lease(20).await;
        let mut other = thief;
        let mut holder = (w, ());
        let digest = lease.job.inputs[0].digest.to_string();
        let e = other
            .upload(&lease, "out", "f", b"x")
            .await
            .expect_err("not its lease");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        let req = other.authed(v1::FetchRequest {
            digest: digest.clone(),
        });
        let e = other.client.fetch(req).await.expect_err("not its input");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // The holder may fetch it and upload for it.
        let req = holder.0.authed(v1::FetchRequest {
            digest: digest.clone(),
        });
        let mut s = holder
            .0
            .client
            .fetch(req)
            .await
            .expect("fetch")
            .into_inner();
        let mut got = Vec::new();
        while let Some(c) = tokio_stream::StreamExt::next(&mut s).await {
            got.extend(c.expect("chunk").data);
        }
        assert_eq!(got, b"secret input\n");
        // Bytes that do not hash to their declared digest are refused as data loss.
        let mut bad = RawWorker::chunk(&lease, "out", "f", 0, b"ok", b"ok");
        bad.data = b"no".to_vec();
        let req = holder.0.authed(tokio_stream::iter(vec![bad]));
        let e = holder.0.client.upload(req).await.expect_err("tampered");
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
        holder
            .0
            .upload(&lease, "out", "f", b"ok")
            .await
            .expect("upload");
        let r = holder.0.result(&lease, "out", "f", b"ok");
        let first = holder.0.report(r.clone()).await.expect("report");
        assert!(first.accepted, "{first:?}");
        // The same result again is refused, and the response says so (13: `accepted`
        // used to be always true).
        let replay = holder.0.report(r).await.expect("report");
        assert!(!replay.accepted && !replay.reason.is_empty(), "{replay:?}");
        // Reported: the lease is over, and with it the right to fetch its input.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let req = holder.0.authed(v1::FetchRequest { digest });
        let e = holder.0.client.fetch(req).await.expect_err("lease over");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success(), "{}", text(&out));
    let refused = coord.refusals(&p);
    assert!(
        refused.get("no_lease").copied().unwrap_or(0) >= 2,
        "{refused:?}"
    );
    wait_for("staging to be cleaned", Duration::from_secs(10), || {
        !walk(&coord.data.join("staging"))
            .iter()
            .any(|f| f.contains("no-such-job"))
    });
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push(p.display().to_string());
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Defect 4: a Submit whose `in:` names an absolute path on the coordinator's host, or
/// escapes with `..`, is refused at submission with the file, line and why; nothing of
/// the host is read.
#[test]
fn a_submitted_pipeline_cannot_read_the_coordinators_own_files() {
    use nexa_proto::v1;
    use nexa_proto::v1::control_service_client::ControlServiceClient;
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let secret = coord.data.join("secret.txt");
    std::fs::write(&secret, "the coordinator's own\n").expect("secret");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut c = ControlServiceClient::connect(url).await.expect("connect");
        for (input, why) in [
            (secret.display().to_string(), "is an absolute path"),
            ("/etc/hostname".to_string(), "is an absolute path"),
            ("../../secret.txt".to_string(), "escapes the project with '..'"),
        ] {
            let yaml = format!(
                "pipeline:\n  name: steal\n  steps:\n    - id: a\n      uses: exec\n      in: {{f: {input:?}}}\n      params: {{run: 'cat \"$NEXA_IN_F\" > \"$NEXA_OUT/x\"'}}\n      out: artifacts/a\n"
            );
            let mut req = tonic::Request::new(v1::SubmitRequest {
                pipeline_yaml: yaml,
                file_name: "steal.yaml".into(),
                ..Default::default()
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", common::mesh::TOKEN)
                    .parse()
                    .expect("header"),
            );
            let e = c.submit(req).await.expect_err("must be refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(
                e.message().contains("steal.yaml:6:") && e.message().contains(why),
                "{}",
                e.message()
            );
        }
    });
    assert!(!coord.data.join("projects/steal/artifacts/a").exists());
}

/// Defect 5, remote: an input that is a symlink out of the project (to a file, or to a
/// directory) is refused with the link named; nothing is sent.
#[test]
fn a_symlinked_input_leading_out_of_the_project_is_refused_by_name() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("shadow"), "root:secret\n").expect("write");
    std::os::unix::fs::symlink(outside.path().join("shadow"), p.path().join("link.txt"))
        .expect("symlink");
    std::os::unix::fs::symlink(outside.path(), p.path().join("linkdir")).expect("symlink");
    for input in ["link.txt", "linkdir"] {
        p.write(
            "s.yaml",
            &format!(
                "pipeline:\n  name: sym\n  steps:\n    - id: a\n      uses: exec\n      in: {{f: {input}}}\n      params: {{run: 'true'}}\n      out: artifacts/a\n"
            ),
        );
        let out = remote(&p, &coord, &["pipeline", "run", "s.yaml"])
            .output()
            .expect("run");
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("input 'f' ({input}) is a symlink to"))
                && err.contains("outside the project"),
            "{err}"
        );
    }
    // Nothing reached the coordinator's blob store.
    let blobs = walk(&coord.data.join("blobs"));
    assert!(
        !blobs
            .iter()
            .any(|b| std::fs::read(b).is_ok_and(|c| c == b"root:secret\n")),
        "{blobs:?}"
    );
}

/// Defect 5, embedded: a job that hard-links a host file into its output completes, but
/// sealing copies it: the host file keeps its mode and its inode is not shared.
#[test]
fn sealing_a_hard_linked_output_never_changes_the_file_it_links_to() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let p = Project::new();
    let host = tempfile::tempdir().expect("host");
    let victim = host.path().join("passwd");
    std::fs::write(&victim, "root:x:0:0\n").expect("write");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p.write(
        "h.yaml",
        &format!(
            "pipeline:\n  name: hl\n  steps:\n    - id: a\n      uses: exec\n      params: {{run: 'ln {} \"$NEXA_OUT/passwd\"'}}\n      out: artifacts/a\n",
            victim.display()
        ),
    );
    let out = p.nexa(&["pipeline", "run", "h.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let meta = std::fs::metadata(&victim).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(meta.nlink(), 1);
    let sealed = p.path().join("artifacts/a/passwd");
    assert_eq!(std::fs::read(&sealed).expect("sealed"), b"root:x:0:0\n");
    assert_ne!(std::fs::metadata(&sealed).expect("stat").ino(), meta.ino());
}

/// A tmpfs of its own, unmounted when dropped (mounting needs root or passwordless sudo,
/// as the sandbox tests' base image does; CI runs as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let opts = format!("size={size}");
        let direct = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .status();
        let ok = direct.is_ok_and(|s| s.success())
            || std::process::Command::new("sudo")
                .args(["-n", "mount", "-t", "tmpfs", "-o", &opts, "tmpfs"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test fills a small tmpfs: it needs root or passwordless sudo to mount one"
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Writes into `name` until the file system is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join(name)).expect("fill file");
        let block = vec![0xabu8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::process::Command::new("sudo")
            .args(["-n", "umount", "-l"])
            .arg(&self.0)
            .status();
    }
}

async fn raw_submit(url: &str, name: &str) -> Result<(), tonic::Status> {
    use nexa_proto::v1;
    let mut c = v1::control_service_client::ControlServiceClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let yaml = format!(
        "pipeline:\n  name: {name}\n  steps:\n    - id: a\n      uses: exec\n      params: {{run: 'echo {name} > \"$NEXA_OUT/x\"'}}\n      out: artifacts/a\n"
    );
    let mut req = tonic::Request::new(v1::SubmitRequest {
        pipeline_yaml: yaml,
        file_name: format!("{name}.yaml"),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", common::mesh::TOKEN)
            .parse()
            .expect("header"),
    );
    c.submit(req).await.map(|_| ())
}

/// Defect 2: the data disk fills. The coordinator stops taking work below its floor
/// (refused, `/readyz` 503, the floor in the metrics), is SIGKILLed, started on the full
/// disk, the space freed, started again: three times over. The store is never dead, the
/// run from before is still there, and new work runs once space is back.
#[test]
fn a_full_disk_refuses_new_work_and_never_kills_the_store() {
    let p = Project::new();
    let disk = Tmpfs::mount(&p.path().join("disk"), "48m");
    let data = disk.0.clone();
    let listen = common::mesh::fixed_listen();
    let flags = [
        "--open-enrolment",
        "--min-free",
        "8MiB",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut coord = Coord::try_start(&data, &listen, &flags).expect("starts on an empty disk");
    let url = coord.url("http");
    let _w = common::mesh::Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    p.write(
        "before.yaml",
        "pipeline:\n  name: before\n  steps:\n    - id: a\n      uses: exec\n      params: {run: 'echo kept > \"$NEXA_OUT/x\"'}\n      out: artifacts/a\n",
    );
    let out = remote(&p, &coord, &["pipeline", "run", "before.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let rt = tokio::runtime::Runtime::new().expect("rt");
    for round in 0..3 {
        disk.fill("fill");
        // Below the floor: not ready, the floor in the metrics, and work refused.
        wait_for("readyz to turn 503", Duration::from_secs(10), || {
            coord.http_get("/readyz").0 == 503
        });
        let (_, metrics) = coord.http_get("/metrics");
        assert!(metrics.contains("\nnexa_disk_low 1"), "{metrics}");
        assert!(
            metrics.contains("\nnexa_disk_floor_bytes 8388608"),
            "{metrics}"
        );
        let e = rt
            .block_on(raw_submit(&url, &format!("during{round}")))
            .expect_err("nothing is acknowledged below the floor");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("under its floor"), "{}", e.message());
        // Killed, and started again on the full disk: it may refuse to start, but it
        // must not damage the store.
        coord.sigkill();
        let on_full = Coord::try_start(&data, &listen, &flags);
        // Either it refuses to start (its store cannot open with no space: a clear error
        // and exit), or it starts and is not ready.
        if let Some(mut c) = on_full {
            let log = || std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.child.try_wait() {
                    assert!(!status.success());
                    assert!(log().contains("No space left on device"), "{}", log());
                    break;
                }
                let ready = std::panic::catch_unwind(|| c.http_get("/readyz").0);
                if ready.ok() == Some(503) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{}", log());
                std::thread::sleep(Duration::from_millis(50));
            }
            c.sigkill();
        }
        std::fs::remove_file(data.join("fill")).expect("free space");
        coord = Coord::try_start(&data, &listen, &flags).unwrap_or_else(|| {
            panic!(
                "round {round}: the coordinator does not start once space is back:\n{}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            )
        });
        wait_for("readyz to turn 200", Duration::from_secs(10), || {
            coord.http_get("/readyz").0 == 200
        });
        let st = remote_status(&p, &coord, "before.yaml");
        assert_eq!(step(&st, "a")["status"], "COMPLETE", "round {round}: {st}");
        // New work runs again.
        let name = format!("after{round}");
        p.write(
            &format!("{name}.yaml"),
            &format!("pipeline:\n  name: {name}\n  steps:\n    - id: a\n      uses: exec\n      params: {{run: 'echo {round} > \"$NEXA_OUT/x\"'}}\n      out: artifacts/a\n"),
        );
        let out = remote(&p, &coord, &["pipeline", "run", &format!("{name}.yaml")])
            .output()
            .expect("run");
        assert!(out.status.success(), "round {round}: {}", text(&out));
    }
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` Submits at once of a pipeline file of `bytes` (one YAML comment), each on its own
/// connection, with the token `token(i)` gives the i-th (none for `None`); the peak RSS
/// of the coordinator `pid` before and after, and the statuses they got.
fn concurrent_submits(
    url: &str,
    pid: u32,
    n: usize,
    bytes: usize,
    token: impl Fn(usize) -> Option<String>,
) -> (u64, u64, Vec<tonic::Status>) {
    use nexa_proto::v1;
    std::thread::sleep(Duration::from_millis(500));
    let before = vm_kib(pid, "VmHWM:");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let statuses = rt.block_on(async {
        let big = format!("#{}", "x".repeat(bytes));
        let mut calls = Vec::new();
        for i in 0..n {
            let url = url.to_string();
            let yaml = big.clone();
            let token = token(i);
            calls.push(tokio::spawn(async move {
                let mut c = v1::control_service_client::ControlServiceClient::connect(url)
                    .await
                    .expect("connect")
                    .max_encoding_message_size(usize::MAX);
                let mut req = tonic::Request::new(v1::SubmitRequest {
                    pipeline_yaml: yaml,
                    file_name: format!("big{i}.yaml"),
                    ..Default::default()
                });
                if let Some(t) = token {
                    req.metadata_mut().insert(
                        "authorization",
                        format!("Bearer {t}").parse().expect("header"),
                    );
                }
                c.submit(req).await.expect_err("refused")
            }));
        }
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.expect("join"));
        }
        out
    });
    (before, vm_kib(pid, "VmHWM:"), statuses)
}

/// Defect 9: the control service's 64 MiB message limit used to be applied before the
/// token check, so unauthenticated 63 MB Submits cost the coordinator their size each.
/// The token is checked on the headers first now: the bodies are never read.
#[test]
fn unauthenticated_large_submits_cost_the_coordinator_no_memory() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let (before, after, statuses) =
        concurrent_submits(&coord.url("http"), coord.child.id(), 8, 60 << 20, |i| {
            (i % 2 == 0).then(|| "guess".to_string())
        });
    for e in statuses {
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }
    // 8 bodies of 60 MiB would be 480 MiB; allow the noise of a busy process.
    assert!(
        after < before + 64 * 1024,
        "peak RSS went from {before} KiB to {after} KiB"
    );
}

/// Defect 9, the rest: authenticated large Submits are capped too. 12 concurrent 32 MiB
/// Submits (each refused as invalid once read) used to be decoded all at once; at most
/// `LARGE_REQUESTS_AT_ONCE` are read at a time now, the others wait unread.
#[test]
fn concurrent_large_authenticated_submits_are_read_a_few_at_a_time() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let (before, after, statuses) =
        concurrent_submits(&coord.url("http"), coord.child.id(), 12, 32 << 20, |_| {
            Some(common::mesh::TOKEN.to_string())
        });
    for e in statuses {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    eprintln!("peak RSS {before} KiB -> {after} KiB for 12 concurrent 32 MiB Submits");
    // Without the cap: +422 MB here (12 bodies buffered and decoded at once); two at a
    // time: about +115 MB.
    assert!(
        after < before + 250 * 1024,
        "peak RSS went from {before} KiB to {after} KiB"
    );
}

/// Defect 12: a step sharded over an upstream artifact whose payload is one record file
/// gets one record per shard (never an empty shard); two slots staging inputs at once,
/// and two inputs with the same content under different names, stage fine; nothing is
/// charged to the honest worker, and the run finishes.
#[test]
fn fan_out_over_an_artifact_and_concurrent_staging_finish_without_blaming_the_worker() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let _w = common::mesh::Worker::start(&url, &p.path().join("w"), 2, None, &[]);
    common::mesh::wait_workers(&p, &coord, 1);
    p.write("data/one.txt", "same\n");
    p.write("data/two.txt", "same\n");
    p.write(
        "f.yaml",
        r#"pipeline:
  name: fan
  steps:
    - id: a
      uses: exec
      params: {run: 'printf "r1\nr2\nr3\nr4\n" > "$NEXA_OUT/recs.txt"'}
      out: artifacts/a
    - id: b
      uses: exec
      in: {recs: artifacts/a}
      shards: {over: recs, count: 6}
      params: {run: 'wc -l < "$NEXA_IN_RECS/recs.txt" | tr -d " " > "$NEXA_OUT/n"'}
      out: artifacts/b
    - id: c
      uses: exec
      after: []
      in: {x: data/one.txt, y: data/two.txt}
      params: {run: 'cat "$NEXA_IN_X" "$NEXA_IN_Y" > "$NEXA_OUT/xy"'}
      out: artifacts/c
    - id: d
      uses: exec
      after: []
      in: {x: data/two.txt, y: data/one.txt}
      params: {run: 'cat "$NEXA_IN_X" "$NEXA_IN_Y" > "$NEXA_OUT/yx"'}
      out: artifacts/d
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "f.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let b = coord.data.join("projects/fan/artifacts/b");
    let counts: Vec<String> = walk(&b)
        .into_iter()
        .filter(|f| f.ends_with("/n"))
        .map(|f| std::fs::read_to_string(f).expect("read").trim().to_string())
        .collect();
    assert_eq!(counts, vec!["1"; 4], "one record per shard, 4 shards");
    let st = remote_status(&p, &coord, "f.yaml");
    for s in ["a", "b", "c", "d"] {
        assert_eq!(step(&st, s)["status"], "COMPLETE", "{st}");
    }
    assert!(
        coord.workers(&p).iter().all(|w| w["state"] == "active"),
        "{:?}",
        coord.workers(&p)
    );
}

/// Defect 12, blame: a step whose command fails on every worker fails the step, but
/// quarantines nobody, and the workers run the next pipeline.
#[test]
fn a_step_that_fails_everywhere_is_the_steps_fault_not_the_workers() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let _w1 = common::mesh::Worker::start(&url, &p.path().join("w1"), 1, None, &[]);
    let _w2 = common::mesh::Worker::start(&url, &p.path().join("w2"), 1, None, &[]);
    common::mesh::wait_workers(&p, &coord, 2);
    let mut steps = String::new();
    for i in 0..6 {
        steps.push_str(&format!(
            "    - id: bad{i}\n      uses: exec\n      after: []\n      retries: {{count: 3, backoff: 10ms}}\n      params: {{run: 'exit 3'}}\n      out: artifacts/bad{i}\n"
        ));
    }
    p.write(
        "bad.yaml",
        &format!("pipeline:\n  name: bad\n  steps:\n{steps}"),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "bad.yaml"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", text(&out));
    let workers = coord.workers(&p);
    assert!(
        workers.iter().all(|w| w["state"] == "active"),
        "{workers:?}"
    );
    p.write(
        "good.yaml",
        "pipeline:\n  name: good\n  steps:\n    - id: a\n      uses: exec\n      params: {run: 'echo ok > \"$NEXA_OUT/x\"'}\n      out: artifacts/a\n",
    );
    let out = remote(&p, &coord, &["pipeline", "run", "good.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
}

/// Defect 11: a re-enrolment ends the old session; a banned worker can neither
/// heartbeat nor enrol again; asking for challenges for someone else's key never voids
/// the one they were issued.
#[test]
fn sessions_end_on_reenrolment_and_ban_and_challenges_cannot_be_voided() {
    use nexa_proto::v1;
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        // A victim asks for a challenge; an attacker who read its public key asks for
        // a thousand more for the same key. The victim's nonce still enrols.
        let victim = nexa_shared::signing::Identity::generate();
        let mut c = v1::worker_service_client::WorkerServiceClient::connect(url.clone())
            .await
            .expect("connect");
        let ask = v1::ChallengeRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: victim.public_key().to_vec(),
        };
        let nonce = c
            .challenge(ask.clone())
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        for _ in 0..1000 {
            c.challenge(ask.clone()).await.expect("challenge");
        }
        let enrol = |nonce: Vec<u8>| v1::EnrolRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: victim.public_key().to_vec(),
            signature: victim.sign_enrolment(&nonce),
            nonce,
            name: "victim".into(),
            slots: 1,
            profile: None,
            enrol_token: String::new(),
        };
        let first = c
            .enrol(enrol(nonce))
            .await
            .expect("the victim's challenge held")
            .into_inner();
        // Enrolling again ends the first session.
        let nonce = c
            .challenge(ask.clone())
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        let second = c.enrol(enrol(nonce)).await.expect("enrol").into_inner();
        let hb = |token: &str| {
            let mut req = tonic::Request::new(v1::HeartbeatRequest::default());
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
            req
        };
        let e = c
            .heartbeat(hb(&first.session_token))
            .await
            .expect_err("old session");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        c.heartbeat(hb(&second.session_token))
            .await
            .expect("new session works");
        // Banned: its heartbeats are refused, so its leases are not extended.
        let out = p
            .cmd(&[
                "--coordinator",
                &url,
                "--token",
                common::mesh::TOKEN,
                "workers",
                "--ban",
                &second.worker_id,
            ])
            .output()
            .expect("ban");
        assert!(out.status.success(), "{}", text(&out));
        let e = c
            .heartbeat(hb(&second.session_token))
            .await
            .expect_err("banned");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // It may enrol again (it stays listed), but its heartbeats stay refused until an
        // operator re-activates it.
        let nonce = c
            .challenge(ask)
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        let third = c.enrol(enrol(nonce)).await.expect("enrol").into_inner();
        let e = c
            .heartbeat(hb(&third.session_token))
            .await
            .expect_err("still banned");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let out = p
            .cmd(&[
                "--coordinator",
                &url,
                "--token",
                common::mesh::TOKEN,
                "workers",
                "--activate",
                &third.worker_id,
            ])
            .output()
            .expect("activate");
        assert!(out.status.success(), "{}", text(&out));
        c.heartbeat(hb(&third.session_token))
            .await
            .expect("active again");
    });
}

/// Defect 13: two `nexa-worker join` with one key on one machine: no "File exists" race
/// on the key, and the second says why it cannot share the key.
#[test]
fn a_second_worker_on_the_same_key_says_why_and_the_first_keeps_working() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let dir = p.path().join("w");
    let first = common::mesh::Worker::start(&url, &dir, 1, None, &[]);
    common::mesh::wait_workers(&p, &coord, 1);
    let out = std::process::Command::new(common::mesh::bin("nexa-worker-test"))
        .arg("join")
        .arg(&url)
        .arg("--work-dir")
        .arg(p.path().join("w2"))
        .arg("--key")
        .arg(dir.join("worker.key"))
        .output()
        .expect("second worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another nexa-worker"), "{err}");
    drop(first);
}

/// Defect 13: a graceful SIGTERM with a worker long-polling and a CLI following a run
/// stops promptly, and the coordinator restarts on the same address at once; the
/// refusal counters survive the restart.
#[test]
fn sigterm_stops_promptly_and_the_counters_survive_a_restart() {
    let p = Project::new();
    let data = p.path().join("coord");
    let listen = common::mesh::fixed_listen();
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let _w = common::mesh::Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    common::mesh::wait_workers(&p, &coord, 1);
    // A refusal to count: an upload for a job nobody leased.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut raw = RawWorker::enrol(&url).await;
        let fake = made_up_lease("nobody");
        raw.upload(&fake, "out", "f", b"x")
            .await
            .expect_err("no lease");
    });
    wait_for("the refusal to be counted", Duration::from_secs(10), || {
        coord.refusals(&p).get("no_lease").copied().unwrap_or(0) == 1
    });
    p.write(
        "slow.yaml",
        "pipeline:\n  name: slow\n  steps:\n    - id: a\n      uses: exec\n      params: {run: 'sleep 30'}\n      out: artifacts/a\n",
    );
    let mut follower = run_in_background(&p, &coord, "slow.yaml");
    std::thread::sleep(Duration::from_secs(1));
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coord.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    let status = coord.child.wait().expect("wait");
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(4), "graceful stop took {took:?}");
    // Restarted on the same address right away; the counter is still there.
    coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    assert_eq!(coord.refusals(&p).get("no_lease").copied(), Some(1));
    let _ = follower.kill();
    let _ = follower.wait();
}

/// Defect 13: one job's uploads are limited in total, not only per file.
#[test]
fn a_jobs_uploads_are_limited_in_total() {
    let p = Project::new();
    let coord = Coord::start(
        &p.path().join("coord"),
        "127.0.0.1:0",
        &["--open-enrolment", "--max-job-output", "1MiB"],
    );
    let url = coord.url("http");
    one_step(&p, "big", 0);
    let client = run_in_background(&p, &coord, "big.yaml");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut w = RawWorker::enrol(&url).await;
        let l = w.lease(20).await;
        let half = vec![1u8; 600 << 10];
        w.upload(&l, "out", "a", &half)
            .await
            .expect("first 600 KiB");
        let e = w
            .upload(&l, "out", "b", &half)
            .await
            .expect_err("past the job's total");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    });
    drop(client);
}

on_both_paths!(late_stale_report: a_late_stale_report_leaves_the_newer_lease_its_inputs, also_over_exchange);

/// Found by the soak: a stale attempt reporting late (after its lease expired and the
/// same job was leased again to the same worker) must not take the inputs away from the
/// newer lease.
fn late_stale_report(via: Via) {
    use nexa_proto::v1;
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    reading_step(&p, "stale", "input\n");
    let client = run_in_background(&p, &coord, "stale.yaml");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut w = RawWorker::enrol_via(&url, via).await;
        let old = w.lease(20).await;
        // No heartbeats: the lease (900 ms) expires; w heartbeats again (running
        // nothing, so it is back but the old lease stays expired) and gets the job again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let hb = w.authed(v1::HeartbeatRequest::default());
        w.client.heartbeat(hb).await.expect("heartbeat");
        let new = w.lease(20).await;
        assert!(new.generation > old.generation);
        let r = w.result(&old, "out", "f", b"late");
        let stale = w.report(r).await.expect("report");
        assert!(!stale.accepted);
        let digest = new.job.inputs[0].digest.to_string();
        let req = w.authed(v1::FetchRequest { digest });
        let mut s = w
            .client
            .fetch(req)
            .await
            .expect("the newer lease may fetch")
            .into_inner();
        let mut got = Vec::new();
        while let Some(c) = tokio_stream::StreamExt::next(&mut s).await {
            got.extend(c.expect("chunk").data);
        }
        assert_eq!(got, b"input\n");
    });
    drop(client);
}
