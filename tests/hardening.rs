//! Attacks on the landed build, one test per defect of the hardening issue: a real
//! `nexa-coordinator serve`, the real CLI, and a hand-driven worker speaking the real
//! gRPC API the way a malicious volunteer would.

mod common;

use common::mesh::{Coord, RawWorker, remote, remote_status, step, wait_for};
use common::{Project, text};
use std::process::Stdio;
use std::time::Duration;

fn one_step(p: &Project, name: &str, retries: u32) {
    p.write(
        &format!("{name}.yaml"),
        &format!(
            "pipeline:\n  name: {name}\n  steps:\n    - id: a\n      uses: exec\n      retries: {{count: {retries}, backoff: 10ms}}\n      params: {{run: 'true'}}\n      out: artifacts/a\n"
        ),
    );
}

/// Defect 1: a worker opens an upload declaring 18 bytes, sends 5, reports a signed
/// 5-byte result and then sends the other 13 on the still-open stream. The late bytes
/// must never reach what is sealed: the short file is not in the staging tree when the
/// result is judged, the late rename is refused, and what is sealed verifies.
#[test]
fn a_worker_cannot_write_into_a_sealed_artifact_through_a_stream_left_open() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    one_step(&p, "tamper", 1);
    let client = remote(&p, &coord, &["pipeline", "run", "tamper.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut w = RawWorker::enrol(&url).await;
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
        w.client
            .report(w.authed(r))
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
        w.client.report(w.authed(r)).await.expect("report");
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

/// Defect 10: uploads and fetches need a live lease of the caller for that job; refused
/// uploads leave no staging directory behind.
#[test]
fn uploads_and_fetches_need_a_live_lease_and_refusals_leave_nothing() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    p.write("in/data.txt", "secret input\n");
    p.write(
        "lease.yaml",
        "pipeline:\n  name: lease\n  steps:\n    - id: a\n      uses: exec\n      in: {d: in/data.txt}\n      params: {run: 'true'}\n      out: artifacts/a\n",
    );
    let client = remote(&p, &coord, &["pipeline", "run", "lease.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        use nexa_proto::v1;
        let mut thief = RawWorker::enrol(&url).await;
        let mut w = RawWorker::enrol(&url).await;
        // A 2 MiB upload for a job that does not exist is refused before it is kept.
        let fake = nexa_shared::job::Lease {
            job: nexa_shared::job::JobSpec {
                job_id: "no-such-job".into(),
                ..Default::default()
            },
            generation: 1,
            attempt: 1,
            gpus: Vec::new(),
        };
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
        let digest = lease.job.inputs[0].digest.clone();
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
        holder
            .0
            .client
            .report(holder.0.authed(r))
            .await
            .expect("report");
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
