//! End-to-end tests of the mesh: a real `nexa-coordinator serve` and real
//! `nexa-worker join` processes on 127.0.0.1, driven by the real `nexa` CLI.

mod common;

use common::mesh::{
    Coord, TOKEN, Worker, bin, fake_gpu, fixed_listen, http_get, remote, remote_status, step,
    wait_for, wait_workers, workers_json,
};
use common::{Project, numbered_pipeline, text};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn gpu_steps_land_only_on_workers_that_can_run_them() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let cpu = Worker::start(&url, &p.path().join("cpu"), 2, None, &[]);
    let l4 = Worker::start(
        &url,
        &p.path().join("l4"),
        2,
        Some(&serde_json::json!([fake_gpu(0, "GPU-l4", "Fake L4", 24, (8, 9))]).to_string()),
        &[],
    );
    let h100 = Worker::start(
        &url,
        &p.path().join("h100"),
        2,
        Some(&serde_json::json!([fake_gpu(0, "GPU-h100", "Fake H100", 80, (9, 0))]).to_string()),
        &[],
    );
    wait_workers(&p, &coord, 3);
    p.write(
        "g.yaml",
        r#"
pipeline:
  name: gpus
  steps:
    - id: big
      uses: exec
      resources: {gpus: 1, gpu_memory: 40GiB}
      params: {run: 'echo "$CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/gpus"'}
      out: artifacts/big
    - id: small
      uses: exec
      after: []
      resources: {gpus: 1, gpu_memory: 16GiB}
      params: {run: 'echo "$CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/gpus"'}
      out: artifacts/small
    - id: cpu
      uses: exec
      after: []
      params: {run: 'echo "[$CUDA_VISIBLE_DEVICES]" > "$NEXA_OUT/gpus"'}
      out: artifacts/cpu
    - id: impossible
      uses: exec
      after: []
      resources: {gpus: 2}
      params: {run: 'true'}
      out: artifacts/impossible
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "g.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs 2 GPUs; the most any worker has is 1"),
        "{}",
        text(&out)
    );
    let st = remote_status(&p, &coord, "g.yaml");
    assert_eq!(
        step(&st, "big")["worker"],
        h100.public_key(),
        "40 GiB fits only the H100"
    );
    assert_eq!(
        step(&st, "small")["worker"],
        l4.public_key(),
        "best fit: the smaller GPU"
    );
    assert_eq!(step(&st, "impossible")["status"], "FAILED");
    let art = coord.data.join("projects/gpus/artifacts");
    assert_eq!(
        std::fs::read_to_string(art.join("big/gpus"))
            .unwrap_or_default()
            .trim(),
        "GPU-h100"
    );
    assert_eq!(
        std::fs::read_to_string(art.join("small/gpus"))
            .unwrap_or_default()
            .trim(),
        "GPU-l4"
    );
    assert_eq!(
        std::fs::read_to_string(art.join("cpu/gpus"))
            .unwrap_or_default()
            .trim(),
        "[]"
    );
    drop(cpu);
}

#[test]
fn a_worker_killed_mid_job_loses_its_lease_and_the_job_completes_on_another() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let mut a = Worker::start(&url, &p.path().join("a"), 1, None, &[]);
    let mut b = Worker::start(&url, &p.path().join("b"), 1, None, &[]);
    wait_workers(&p, &coord, 2);
    let log = p.path().join("attempts.log");
    p.write(
        "k.yaml",
        &format!(
            "pipeline:\n  name: lose\n  steps:\n    - id: slow\n      uses: exec\n      params: {{run: 'echo $NEXA_ATTEMPT >> {log}; [ \"$NEXA_ATTEMPT\" = 1 ] && sleep 30; echo ok > \"$NEXA_OUT/x\"'}}\n      out: artifacts/slow\n",
            log = log.display()
        ),
    );
    let client = remote(&p, &coord, &["pipeline", "run", "k.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    wait_for("the first attempt", Duration::from_secs(20), || {
        p.read("attempts.log").contains('1')
    });
    let (victim, survivor) = if a.running_job() {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    // Kill the worker and what it left running, as a power cut would.
    let pgids: Vec<i32> = std::fs::read_dir(victim.dir.join("work/jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("pgid")).ok())
        .filter_map(|t| t.lines().next().and_then(|l| l.parse().ok()))
        .collect();
    victim.sigkill();
    for g in pgids {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.read("attempts.log").lines().collect::<Vec<_>>(),
        ["1", "2"]
    );
    let st = remote_status(&p, &coord, "k.yaml");
    assert_eq!(step(&st, "slow")["status"], "COMPLETE");
    assert_eq!(step(&st, "slow")["worker"], survivor.public_key());
    let ws = workers_json(&p, &coord);
    assert!(ws.iter().any(|w| w["state"] == "lost"), "{ws:?}");
}

#[test]
fn the_coordinator_killed_mid_run_resumes_it_and_nothing_is_lost_or_doubled() {
    let p = Project::new();
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let _a = Worker::start(&url, &p.path().join("a"), 1, None, &[]);
    let _b = Worker::start(&url, &p.path().join("b"), 1, None, &[]);
    wait_workers(&p, &coord, 2);
    let log = p.path().join("executions.log");
    let yaml = numbered_pipeline("restart", 6, false, |i| {
        format!(
            "echo s{i} >> {}; sleep 0.4; echo {i} > \"$NEXA_OUT/n\"",
            log.display()
        )
    });
    p.write("r.yaml", &yaml);
    let client_log = p.path().join("client.log");
    let client = remote(&p, &coord, &["pipeline", "run", "r.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&client_log).expect("client log"),
        ))
        .spawn()
        .expect("client");
    wait_for("s2 to start", Duration::from_secs(30), || {
        p.executions().contains(&"s2".to_string())
    });
    coord.sigkill();
    let art = data.join("projects/restart/artifacts");
    let complete_before: Vec<usize> = (0..6)
        .filter(|i| art.join(format!("s{i}/COMPLETE")).exists())
        .collect();
    assert!(
        complete_before.contains(&0) && complete_before.contains(&1),
        "{complete_before:?}"
    );
    // Restart on the same data dir and port: the run resumes; workers re-enrol by
    // themselves; the client that was following the run reconnects and sees it finish.
    let coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let mut client = client;
    let mut exit = None;
    wait_for(
        "the following client to finish",
        Duration::from_secs(60),
        || {
            exit = client.try_wait().expect("client");
            exit.is_some()
        },
    );
    let said = std::fs::read_to_string(&client_log).unwrap_or_default();
    assert_eq!(exit.and_then(|e| e.code()), Some(0), "{said}");
    assert!(said.contains("reconnected to"), "{said}");
    wait_for("the resumed run to finish", Duration::from_secs(60), || {
        let st = remote_status(&p, &coord, "r.yaml");
        st["steps"].as_array().is_some_and(|s| {
            s.len() == 6
                && s.iter()
                    .all(|x| x["status"] == "COMPLETE" || x["status"] == "SKIPPED")
        })
    });
    let runs = p.executions();
    for i in 0..6 {
        let n = runs.iter().filter(|r| **r == format!("s{i}")).count();
        if complete_before.contains(&i) {
            assert_eq!(
                n, 1,
                "s{i} was COMPLETE before the crash and ran again: {runs:?}"
            );
        } else {
            assert!((1..=2).contains(&n), "s{i} ran {n} times: {runs:?}");
        }
        let out = p.nexa(&["verify", &art.join(format!("s{i}")).display().to_string()]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn unauthenticated_calls_and_bad_enrolments_are_refused() {
    let p = Project::new();
    let coord = Coord::start(
        &p.path().join("coord"),
        "127.0.0.1:0",
        &["--enrol-token", "join-me"],
    );
    let url = coord.url("http");
    // Control calls need the operator token.
    let out = p
        .cmd(&["--coordinator", &url, "--token", "wrong", "workers"])
        .output()
        .expect("workers");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong operator token"),
        "{}",
        text(&out)
    );
    let out = p
        .cmd(&["--coordinator", &url, "workers"])
        .env_remove("NEXA_TOKEN")
        .output()
        .expect("workers");
    assert!(!out.status.success());
    // A worker with the wrong enrolment token is refused and says so.
    let mut bad = Worker::start(&url, &p.path().join("bad"), 1, None, &["--token", "guess"]);
    let status = bad.child.wait().expect("wait");
    assert_eq!(status.code(), Some(1));
    assert!(bad.log().contains("enrolment refused"), "{}", bad.log());
    // With the right token it joins.
    let _good = Worker::start(
        &url,
        &p.path().join("good"),
        1,
        None,
        &["--token", "join-me"],
    );
    wait_workers(&p, &coord, 1);
}

#[test]
fn wire_level_forgeries_are_refused() {
    use nexa_proto::v1;
    use nexa_proto::v1::worker_service_client::WorkerServiceClient;
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let mut c = WorkerServiceClient::connect(url.clone())
            .await
            .expect("connect");
        // An old protocol version is refused with FAILED_PRECONDITION.
        let e = c
            .challenge(v1::ChallengeRequest {
                protocol_version: 99,
                public_key: vec![0; 32],
            })
            .await
            .expect_err("old protocol");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        // A key sent in the request is not trusted: the challenge must be signed with it.
        let id = nexa_shared::signing::Identity::generate();
        let other = nexa_shared::signing::Identity::generate();
        let key = id.public_key().to_vec();
        let enrol = |nonce: Vec<u8>, signature: Vec<u8>| v1::EnrolRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: key.clone(),
            signature,
            nonce,
            name: "w".into(),
            slots: 1,
            profile: None,
            enrol_token: String::new(),
        };
        let challenge = v1::ChallengeRequest {
            protocol_version: nexa_proto::PROTOCOL_VERSION,
            public_key: key.clone(),
        };
        let nonce = c
            .challenge(challenge.clone())
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        let e = c
            .enrol(enrol(nonce.clone(), other.sign_enrolment(&nonce)))
            .await
            .expect_err("forged");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A replayed nonce is refused too (it is single-use).
        let e = c
            .enrol(enrol(nonce.clone(), id.sign_enrolment(&nonce)))
            .await
            .expect_err("replayed nonce");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // Enrol properly, then try to upload outside the staging directory.
        let nonce = c
            .challenge(challenge)
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        let session = c
            .enrol(enrol(nonce.clone(), id.sign_enrolment(&nonce)))
            .await
            .expect("enrol")
            .into_inner()
            .session_token;
        // `msg` with the session's token.
        let authed = |msg| {
            let mut req = tonic::Request::new(msg);
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {session}").parse().expect("header"),
            );
            req
        };
        let upload = |output: &str, path: &str, data: &[u8], digest: String| {
            let chunk = v1::UploadChunk {
                job_id: "j".into(),
                generation: 1,
                output: output.into(),
                path: path.into(),
                offset: 0,
                data: data.to_vec(),
                size: data.len() as u64,
                digest,
            };
            let mut req = tonic::Request::new(tokio_stream::iter(vec![chunk]));
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {session}").parse().expect("header"),
            );
            req
        };
        let d = nexa_shared::digest::format(&blake3::hash(b"x"));
        let e = c
            .upload(upload("out", "../../evil", b"x", d.clone()))
            .await
            .expect_err("traversal");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = c
            .upload(upload("..", "f", b"x", d.clone()))
            .await
            .expect_err("bad output name");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // Well-formed, but for a job this worker holds no lease of: refused before a
        // byte is kept (the digest check with a real lease is in tests/hardening.rs).
        let e = c
            .upload(upload("out", "f", b"x", d))
            .await
            .expect_err("no lease");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        // Calls without a session are refused.
        let e = c
            .lease(v1::LeaseRequest { wait_ms: 10 })
            .await
            .expect_err("no session");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = c
            .exchange(v1::ExchangeRequest {
                results: Vec::new(),
                want: 1,
                wait_ms: 10,
            })
            .await
            .expect_err("no session");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // An exchange is bounded: more than 1,024 leases asked for is refused whole.
        let req = authed(v1::ExchangeRequest {
            results: Vec::new(),
            want: 100_000,
            wait_ms: 10,
        });
        let e = c.exchange(req).await.expect_err("too many");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // A malformed result in an exchange is refused on its own, with why.
        let req = authed(v1::ExchangeRequest {
            results: vec![v1::JobResult {
                job_id: "j".into(),
                signature: vec![1, 2, 3],
                ..Default::default()
            }],
            want: 0,
            wait_ms: 0,
        });
        let r = c.exchange(req).await.expect("judged").into_inner();
        assert_eq!(r.verdicts.len(), 1);
        assert!(!r.verdicts[0].accepted, "{r:?}");
        assert!(r.verdicts[0].reason.contains("malformed"), "{r:?}");
    });
    assert!(!p.path().join("evil").exists() && !coord.data.join("evil").exists());
}

#[test]
fn tls_works_with_the_generated_certificates() {
    let p = Project::new();
    let certs = p.path().join("certs");
    let out = Command::new(bin("nexa-coordinator"))
        .args(["certs", "--out"])
        .arg(&certs)
        .output()
        .expect("certs");
    assert!(out.status.success(), "{}", text(&out));
    let cert = certs.join("server.pem").display().to_string();
    let key = certs.join("server.key").display().to_string();
    let coord = Coord::start(
        &p.path().join("coord"),
        "127.0.0.1:0",
        &["--open-enrolment", "--tls-cert", &cert, "--tls-key", &key],
    );
    let url = coord.url("https");
    let ca = certs.join("ca.pem").display().to_string();
    let _w = Worker::start(&url, &p.path().join("w"), 1, None, &["--ca", &ca]);
    p.write("t.yaml", "pipeline:\n  name: tls\n  steps:\n    - id: a\n      uses: exec\n      params: {run: 'echo secure > \"$NEXA_OUT/x\"'}\n      out: artifacts/a\n");
    let out = p
        .cmd(&[
            "--coordinator",
            &url,
            "--token",
            TOKEN,
            "--ca",
            &ca,
            "pipeline",
            "run",
            "t.yaml",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    // Without trusting the CA, the client refuses the connection.
    let out = p
        .cmd(&["--coordinator", &url, "--token", TOKEN, "workers"])
        .output()
        .expect("workers");
    assert!(!out.status.success());
    // And plain HTTP/2 to the TLS port does not get through either.
    let out = p
        .cmd(&[
            "--coordinator",
            &coord.url("http"),
            "--token",
            TOKEN,
            "workers",
        ])
        .output()
        .expect("workers");
    assert!(!out.status.success());
}

#[test]
fn runs_share_the_workers_fairly() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let _w = Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    wait_workers(&p, &coord, 1);
    let log = p.path().join("executions.log");
    for name in ["first", "second"] {
        let yaml = numbered_pipeline(name, 4, true, |i| {
            format!(
                "echo {name} >> {}; sleep 0.3; echo {i} > \"$NEXA_OUT/n\"",
                log.display()
            )
        });
        p.write(&format!("{name}.yaml"), &yaml);
    }
    let a = remote(&p, &coord, &["pipeline", "run", "first.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a");
    wait_for("the first run to start", Duration::from_secs(20), || {
        !p.executions().is_empty()
    });
    let b = remote(&p, &coord, &["pipeline", "run", "second.yaml"])
        .output()
        .expect("b");
    assert!(b.status.success(), "{}", text(&b));
    assert!(a.wait_with_output().expect("a").status.success());
    let order = p.executions();
    let last_first = order.iter().rposition(|x| x == "first").expect("first ran");
    let first_second = order
        .iter()
        .position(|x| x == "second")
        .expect("second ran");
    assert!(
        first_second < last_first,
        "the second run waited for the whole first run: {order:?}"
    );
}

/// A job whose last progress line comes just before it ends (under the watcher's one
/// look a second): the result carries it, so it is shown and kept either way.
#[test]
fn a_jobs_last_progress_line_is_shown_and_kept_though_it_ends_at_once_embedded_and_on_the_mesh() {
    let p = Project::new();
    p.write(
        "said.yaml",
        r#"
pipeline:
  name: said
  steps:
    - id: count
      uses: exec
      params: {run: 'echo "::nexa-progress:: {\"records\": 4, \"total\": 9}"; echo "::nexa-progress:: {\"records\": 9, \"total\": 9}"; echo 9 > "$NEXA_OUT/n"'}
      out: artifacts/count
"#,
    );
    let shown = |out: &std::process::Output, st: &serde_json::Value| {
        assert!(out.status.success(), "{}", text(out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("9/9 records"),
            "{}",
            text(out)
        );
        assert_eq!(step(st, "count")["progress"]["records"], 9, "{st}");
    };
    let out = p.nexa(&["pipeline", "run", "said.yaml"]);
    shown(&out, &p.status_json("said.yaml"));

    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let _w = Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    wait_workers(&p, &coord, 1);
    let out = remote(&p, &coord, &["pipeline", "run", "said.yaml"])
        .output()
        .expect("run");
    shown(&out, &remote_status(&p, &coord, "said.yaml"));
}

/// More workers than a page holds: `nexa workers` reads them page by page, every one
/// once and in id order, and `--limit` stops early and says how many there are.
#[test]
fn workers_are_listed_page_by_page_each_once_and_limit_says_how_many_are_left() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    const N: usize = 25;
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let _held: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..N {
            v.push(common::mesh::RawWorker::enrol(&url).await);
        }
        v
    });
    let rows = |out: &std::process::Output| -> Vec<String> {
        assert!(out.status.success(), "{}", text(out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" raw "))
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    };
    let json = remote(&p, &coord, &["workers", "--json", "--chunk-size", "10"])
        .output()
        .expect("workers");
    assert!(json.status.success(), "{}", text(&json));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).expect("json");
    let ids: Vec<String> = listed
        .iter()
        .filter_map(|w| w["id"].as_str().map(String::from))
        .collect();
    assert_eq!(ids.len(), N, "every worker, across three pages");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in id order, none twice"
    );

    let table = remote(&p, &coord, &["workers", "--chunk-size", "10"])
        .output()
        .expect("workers");
    assert_eq!(rows(&table), ids);
    let out = String::from_utf8_lossy(&table.stdout);
    assert!(out.contains(&format!("{N} workers ({N} active)")), "{out}");
    // The coordinator's own page (1,000) holds them all: the same list.
    let one_page = remote(&p, &coord, &["workers"]).output().expect("workers");
    assert_eq!(rows(&one_page), ids);

    let some = remote(
        &p,
        &coord,
        &["workers", "--limit", "13", "--chunk-size", "5"],
    )
    .output()
    .expect("workers");
    assert_eq!(rows(&some), ids[..13].to_vec(), "the first 13 by id");
    let out = String::from_utf8_lossy(&some.stdout);
    assert!(out.contains(&format!("13 of {N} workers shown")), "{out}");
}

#[test]
fn the_real_worker_never_honours_fake_gpus() {
    let fake = serde_json::json!([fake_gpu(0, "GPU-fake", "Fake", 80, (9, 0))]).to_string();
    let profile = |name: &str| -> serde_json::Value {
        let out = Command::new(bin(name))
            .args(["profile", "--json"])
            .env("NEXA_FAKE_GPUS", &fake)
            .output()
            .expect("profile");
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let real = profile("nexa-worker");
    assert!(
        !real["gpus"]
            .as_array()
            .expect("gpus")
            .iter()
            .any(|g| g["uuid"] == "GPU-fake"),
        "{real}"
    );
    let test = profile("nexa-worker-test");
    assert_eq!(test["gpus"][0]["uuid"], "GPU-fake");
}

#[test]
fn a_worker_hosting_services_cannot_be_sandbox_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("nexa-worker"))
        .args([
            "join",
            "http://127.0.0.1:9",
            "--services",
            "--executor",
            "docker",
        ])
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--key")
        .arg(dir.path().join("worker.key"))
        .output()
        .expect("join");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not go with --executor docker"),
        "{}",
        text(&out)
    );
}

#[test]
fn banned_and_drained_workers_get_no_new_work() {
    let p = Project::new();
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let a = Worker::start(&url, &p.path().join("a"), 2, None, &[]);
    let b = Worker::start(&url, &p.path().join("b"), 2, None, &[]);
    wait_workers(&p, &coord, 2);
    let id_of = |coord: &Coord, w: &Worker| -> String {
        let key = w.public_key();
        workers_json(&p, coord)
            .into_iter()
            .find(|x| x["public_key"] == key)
            .and_then(|x| x["id"].as_str().map(str::to_string))
            .expect("worker listed")
    };
    let out = remote(&p, &coord, &["workers", "--ban", &id_of(&coord, &a)])
        .output()
        .expect("ban");
    assert!(out.status.success(), "{}", text(&out));
    // The ban is stored: it survives a coordinator SIGKILL and the worker's re-enrolment.
    coord.sigkill();
    let coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let enrolments = |w: &Worker| w.log().matches("enrolled").count();
    wait_for(
        "both workers to enrol again",
        Duration::from_secs(30),
        || enrolments(&a) >= 2 && enrolments(&b) >= 2,
    );
    let ws = workers_json(&p, &coord);
    let state_of = |key: &str| {
        ws.iter()
            .find(|x| x["public_key"] == key)
            .map(|x| x["state"].clone())
    };
    assert_eq!(state_of(&a.public_key()), Some("banned".into()), "{ws:?}");
    assert_eq!(state_of(&b.public_key()), Some("active".into()), "{ws:?}");
    p.write(
        "b.yaml",
        &numbered_pipeline("banned", 4, true, |i| format!("echo {i} > \"$NEXA_OUT/n\"")),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "b.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "b.yaml");
    for i in 0..4 {
        assert_eq!(
            step(&st, &format!("s{i}"))["worker"],
            b.public_key(),
            "s{i} ran on the banned worker"
        );
    }
    let ws = workers_json(&p, &coord);
    assert!(ws.iter().any(|w| w["state"] == "banned"), "{ws:?}");
    // Drain the other and re-activate the banned one: new work goes to the latter.
    let out = remote(
        &p,
        &coord,
        &[
            "workers",
            "--drain",
            &id_of(&coord, &b),
            "--activate",
            &id_of(&coord, &a),
        ],
    )
    .output()
    .expect("drain");
    assert!(out.status.success(), "{}", text(&out));
    p.write("c.yaml", "pipeline:\n  name: drained\n  steps:\n    - id: x\n      uses: exec\n      params: {run: 'echo x > \"$NEXA_OUT/x\"'}\n      out: artifacts/x\n");
    let out = remote(&p, &coord, &["pipeline", "run", "c.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        step(&remote_status(&p, &coord, "c.yaml"), "x")["worker"],
        a.public_key()
    );
}

#[test]
fn a_worker_that_stalls_briefly_keeps_its_lease_and_one_that_stalls_too_long_loses_it() {
    let p = Project::new();
    // Heartbeats every 300 ms; a lease lives three of them (900 ms).
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let w = Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    wait_workers(&p, &coord, 1);
    let pipeline = |name: &str, first_sleep: u32| {
        let log = p.path().join(format!("{name}.log"));
        p.write(
            &format!("{name}.yaml"),
            &format!(
                "pipeline:\n  name: {name}\n  steps:\n    - id: s\n      uses: exec\n      params: {{run: 'echo $NEXA_ATTEMPT >> {log}; [ \"$NEXA_ATTEMPT\" = 1 ] && sleep {first_sleep}; echo ok > \"$NEXA_OUT/x\"'}}\n      out: artifacts/s\n",
                log = log.display()
            ),
        );
    };

    // Runs pipeline `name`, freezes the worker for `stall` once the first attempt has
    // started, and waits for the run to succeed.
    let run_with_stall = |name: &str, stall: Duration| {
        let client = remote(&p, &coord, &["pipeline", "run", &format!("{name}.yaml")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client");
        wait_for("the first attempt", Duration::from_secs(20), || {
            p.read(&format!("{name}.log")).contains('1')
        });
        w.freeze(stall);
        let out = client.wait_with_output().expect("client");
        assert!(out.status.success(), "{}", text(&out));
    };

    // One late heartbeat (the process frozen for 400 ms: more than the 300 ms interval,
    // well under the 900 ms ttl): the worker is not declared dead and the job completes
    // on its first attempt.
    pipeline("brief", 3);
    run_with_stall("brief", Duration::from_millis(400));
    assert_eq!(p.read("brief.log").lines().collect::<Vec<_>>(), ["1"]);
    assert_eq!(coord.refusals(&p).get("lease_expired"), Some(&0));
    assert!(coord.workers(&p).iter().all(|w| w["state"] == "active"));

    // Frozen for 2.5 s, well past the ttl: the lease expires and the job is requeued
    // (here to the same worker, the only one, once it is back). The stalled attempt's
    // late result is refused as coming from an old generation, and counted.
    pipeline("long", 6);
    run_with_stall("long", Duration::from_millis(2500));
    assert_eq!(p.read("long.log").lines().collect::<Vec<_>>(), ["1", "2"]);
    let refused = coord.refusals(&p);
    assert_eq!(refused.get("lease_expired"), Some(&1), "{refused:?}");
    wait_for(
        "the stale result to be refused",
        Duration::from_secs(10),
        || {
            coord
                .refusals(&p)
                .get("stale_generation")
                .copied()
                .unwrap_or(0)
                >= 1
        },
    );
    let st = remote_status(&p, &coord, "long.yaml");
    assert_eq!(step(&st, "s")["status"], "COMPLETE");
}

#[test]
fn refreshed_profiles_keep_free_gpu_memory_current_for_scheduling() {
    let p = Project::new();
    // Heartbeats every 100 ms; the worker re-reads its hardware every 15th (1.5 s).
    let coord = Coord::start(
        &p.path().join("coord"),
        "127.0.0.1:0",
        &["--open-enrolment", "--heartbeat-ms", "100"],
    );
    let url = coord.url("http");
    let gpus_file = p.path().join("gpus.json");
    let write_gpus = |free_gib: u64| {
        let mut g = fake_gpu(0, "GPU-l4", "Fake L4", 24, (8, 9));
        g["memory_free"] = serde_json::json!(free_gib << 30);
        std::fs::write(&gpus_file, serde_json::json!([g]).to_string()).expect("gpus file");
    };
    write_gpus(24);
    let _w = Worker::start(
        &url,
        &p.path().join("w"),
        1,
        Some(&format!("@{}", gpus_file.display())),
        &[],
    );
    wait_workers(&p, &coord, 1);
    let free_gib = || {
        coord.workers(&p)[0]["profile"]["gpus"][0]["memory_free"]
            .as_u64()
            .unwrap_or(0)
            >> 30
    };
    assert_eq!(free_gib(), 24);
    // Someone else's process takes 22 GiB of the GPU: the next refresh shows it.
    write_gpus(2);
    wait_for("the refreshed profile", Duration::from_secs(10), || {
        free_gib() == 2
    });
    p.write(
        "g.yaml",
        "pipeline:\n  name: fresh\n  steps:\n    - id: g\n      uses: exec\n      resources: {gpus: 1, gpu_memory: 8GiB}\n      params: {run: 'echo \"$CUDA_VISIBLE_DEVICES\" > \"$NEXA_OUT/gpu\"'}\n      out: artifacts/g\n",
    );
    let client = remote(&p, &coord, &["pipeline", "run", "g.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    // The step could run on this GPU (24 GiB), so it waits instead of failing, but it
    // is not given a GPU with 2 GiB free.
    std::thread::sleep(Duration::from_secs(4));
    let st = remote_status(&p, &coord, "g.yaml");
    assert_ne!(step(&st, "g")["status"], "COMPLETE", "{st}");
    assert_ne!(step(&st, "g")["status"], "FAILED", "{st}");
    // The other process ends: the next refresh frees the GPU and the step runs.
    write_gpus(24);
    let out = client.wait_with_output().expect("client");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(coord.data.join("projects/fresh/artifacts/g/gpu"))
            .unwrap_or_default()
            .trim(),
        "GPU-l4"
    );
}

#[test]
fn a_lying_worker_is_outvoted_over_the_mesh_and_credit_goes_to_the_honest() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let h1 = Worker::start(&url, &p.path().join("honest-1"), 1, None, &[]);
    let h2 = Worker::start(&url, &p.path().join("honest-2"), 1, None, &[]);
    // A host that computes wrong answers (here: anything run under its work dir).
    let liar = Worker::start(&url, &p.path().join("w-liar-7"), 1, None, &[]);
    wait_workers(&p, &coord, 3);
    let mut y = String::from("pipeline:\n  name: vote\n  steps:\n");
    for i in 0..3 {
        y.push_str(&format!(
            "    - id: s{i}\n      uses: exec\n      validation: {{replicas: 3, quorum: 2}}\n      params: {{run: 'sleep 0.2; case \"$PWD\" in *w-liar-7*) echo 41;; *) echo 42;; esac > \"$NEXA_OUT/answer\"'}}\n      out: artifacts/s{i}\n"
        ));
    }
    p.write("v.yaml", &y);
    let out = remote(&p, &coord, &["pipeline", "run", "v.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "v.yaml");
    let art = coord.data.join("projects/vote/artifacts");
    for i in 0..3 {
        assert_eq!(
            std::fs::read_to_string(art.join(format!("s{i}/answer")))
                .unwrap_or_default()
                .trim(),
            "42"
        );
        assert_ne!(step(&st, &format!("s{i}"))["worker"], liar.public_key());
    }
    let ws = workers_json(&p, &coord);
    let of = |w: &Worker| {
        let key = w.public_key();
        ws.iter()
            .find(|x| x["public_key"] == key)
            .cloned()
            .expect("listed")
    };
    assert_eq!(of(&liar)["invalid"], 3, "{ws:?}");
    assert_eq!(of(&liar)["valid"], 0);
    for h in [&h1, &h2] {
        assert_eq!(of(h)["valid"], 3, "{ws:?}");
        assert_eq!(of(h)["invalid"], 0);
    }
    assert_eq!(coord.refusals(&p).get("outvoted"), Some(&3));
    // The credit leaderboard: the honest workers first, the liar last with nothing.
    let out = remote(&p, &coord, &["workers", "--credit", "--json"])
        .output()
        .expect("credit");
    assert!(out.status.success(), "{}", text(&out));
    let board: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(board.len(), 3);
    assert_eq!(board[2]["id"], of(&liar)["id"]);
    assert_eq!(board[2]["cpu_seconds"], 0.0);
    assert!(
        board[0]["cpu_seconds"].as_f64().is_some_and(|c| c >= 0.6),
        "{board:?}"
    );
    let text_board = remote(&p, &coord, &["workers", "--credit"])
        .output()
        .expect("credit");
    assert!(String::from_utf8_lossy(&text_board.stdout).contains("GPU-s"));
}

#[test]
fn registry_and_lineage_survive_a_coordinator_sigkill() {
    let p = Project::new();
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let _w = Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    wait_workers(&p, &coord, 1);
    p.write(
        "r.yaml",
        r#"pipeline:
  name: reg
  steps:
    - id: a
      uses: exec
      params: {run: 'echo weights > "$NEXA_OUT/model.bin"'}
      out: artifacts/a
    - id: b
      uses: exec
      in: {m: artifacts/a/model.bin}
      params: {run: 'wc -c < "$NEXA_IN_M" > "$NEXA_OUT/size"'}
      out: artifacts/b
    - id: register
      uses: core.registry.register
      in: {model: artifacts/a}
      params: {name: clf, meta: {accuracy: 0.9}}
    - id: promote
      uses: core.registry.promote
      after: [register]
      params: {name: clf, version: latest, tag: prod}
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "r.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    coord.sigkill();
    let coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let ok = |args: &[&str]| {
        let out = remote(&p, &coord, args).output().expect("nexa");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["models", "history", "clf", "--json"])).expect("json");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["version"], "0.1.0");
    assert!(history[0]["to"].is_null());
    let uri = ok(&["models", "resolve", "clf:prod"]);
    assert!(uri.trim().ends_with("projects/reg/artifacts/a"), "{uri}");
    let up: serde_json::Value = serde_json::from_str(&ok(&[
        "lineage",
        "artifacts/b",
        "--pipeline",
        "reg",
        "--format",
        "json",
    ]))
    .expect("json");
    let steps: Vec<&str> = up["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["step"].as_str())
        .collect();
    assert_eq!(steps, ["b", "a"], "{up}");
    assert!(
        up["nodes"][0]["worker"]
            .as_str()
            .is_some_and(|w| w.len() == 64),
        "the signing worker is recorded: {up}"
    );
    let down = ok(&["lineage", "artifacts/a", "--pipeline", "reg", "--down"]);
    assert!(down.contains("→ m: artifacts/b"), "{down}");
    // Running it again finds everything done, the registry steps included.
    let out = remote(&p, &coord, &["pipeline", "run", "r.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "r.yaml");
    for s in ["a", "b", "register", "promote"] {
        assert_eq!(step(&st, s)["status"], "SKIPPED", "{st}");
    }
}

#[test]
fn the_metrics_port_serves_prometheus_text_health_and_readiness() {
    let p = Project::new();
    let coord = Coord::start(
        &p.path().join("coord"),
        "127.0.0.1:0",
        &["--open-enrolment", "--metrics-listen", "127.0.0.1:0"],
    );
    let url = coord.url("http");
    let _cpu = Worker::start(&url, &p.path().join("cpu"), 2, None, &[]);
    let _gpu = Worker::start(
        &url,
        &p.path().join("gpu"),
        1,
        Some(&serde_json::json!([fake_gpu(0, "GPU-l4", "Fake L4", 24, (8, 9))]).to_string()),
        &[],
    );
    wait_workers(&p, &coord, 2);
    assert_eq!(coord.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(coord.http_get("/readyz").0, 200);
    p.write(
        "m.yaml",
        &numbered_pipeline("metered", 4, true, |i| {
            format!("echo {i} > \"$NEXA_OUT/n\"")
        }),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "m.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let (code, body) = coord.http_get("/metrics");
    assert_eq!(code, 200);
    let value = |series: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    assert_eq!(value("nexa_workers{state=\"active\"}"), 2.0);
    assert_eq!(value("nexa_workers_by_gpu_model{model=\"Fake L4\"}"), 1.0);
    assert_eq!(value("nexa_gpus_available"), 1.0);
    assert_eq!(
        value("nexa_gpu_memory_available_bytes"),
        (24u64 << 30) as f64
    );
    assert_eq!(
        value("nexa_jobs_finished_total{outcome=\"succeeded\"}"),
        4.0
    );
    assert_eq!(value("nexa_dispatch_latency_seconds_count"), 4.0);
    assert_eq!(value("nexa_job_duration_seconds_count"), 4.0);
    assert_eq!(value("nexa_queue_depth"), 0.0);
    assert_eq!(
        value("nexa_results_refused_total{reason=\"lease_expired\"}"),
        0.0
    );
    assert!(value("nexa_store_size_bytes") > 0.0);
    // The tick at least runs in the background, and nothing of it panicked.
    assert!(value("nexa_background_tasks") >= 1.0);
    assert_eq!(value("nexa_background_task_panics_total"), 0.0);
    // Each step uploaded its output and its log.
    assert!(value("nexa_artifact_bytes_total{direction=\"in\"}") >= 8.0);
    // Low cardinality: no run, job or worker id ever becomes a label.
    let st = remote_status(&p, &coord, "m.yaml");
    let run_id = step(&st, "s0")["run_id"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    assert!(!body.contains(&run_id), "a run id leaked into the metrics");
    assert!(
        !body.contains("worker=\""),
        "a worker label leaked into the metrics"
    );
}

#[test]
fn a_worker_serves_its_own_metrics_and_readiness() {
    let p = Project::new();
    let mut coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let w = Worker::start(
        &url,
        &p.path().join("w"),
        2,
        None,
        &["--metrics-listen", "127.0.0.1:0"],
    );
    wait_workers(&p, &coord, 1);
    let addr = w.metrics_addr();
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    p.write(
        "w.yaml",
        r#"pipeline:
  name: wm
  steps:
    - id: a
      uses: exec
      after: []
      params: {run: 'echo a > "$NEXA_OUT/x"'}
      out: artifacts/a
    - id: b
      uses: exec
      after: []
      params: {run: 'echo b > "$NEXA_OUT/x"'}
      out: artifacts/b
    - id: bad
      uses: exec
      after: []
      retries: 0
      params: {run: 'exit 3'}
      out: artifacts/bad
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "w.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "nexa_worker_jobs_finished_total{outcome=\"succeeded\"} 2",
        "nexa_worker_jobs_finished_total{outcome=\"failed\"} 1",
        "nexa_worker_job_duration_seconds_count 3",
        "nexa_worker_jobs_running 0",
        "nexa_worker_slots 2",
        "nexa_worker_sandboxed 0",
        "nexa_worker_connected 1",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }
    assert!(!body.contains("wm/"), "a run or job id leaked into a label");
    // Without its coordinator the worker is alive but not ready.
    coord.sigkill();
    wait_for("the worker to notice", Duration::from_secs(20), || {
        http_get(&addr, "/readyz").0 == 503
    });
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (_, body) = http_get(&addr, "/metrics");
    assert!(body.contains("nexa_worker_connected 0"), "{body}");
    assert!(
        !body.contains("nexa_worker_heartbeat_failures_total 0"),
        "{body}"
    );
}

#[test]
fn a_worker_enrols_and_runs_jobs_while_it_probes_its_runtimes_and_their_labels_follow() {
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    // A job interpreter that answers only once the test opens the gate: the worker's
    // probe of its packages (which runs it) is held back as long as the test likes.
    let gate = p.path().join("gate");
    let python = p.path().join("gated-python");
    std::fs::write(
        &python,
        format!(
            // (At most 60 s, so that a failed test leaves no loop behind.)
            "#!/bin/sh\ni=0\nwhile [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\nexec python3 \"$@\"\n",
            gate.display()
        ),
    )
    .expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let python = python.display().to_string();
    let env = [("NEXA_PYTHON", python.as_str())];
    let _w = Worker::start_env(
        &url,
        &p.path().join("w"),
        1,
        None,
        &["--name", "probing"],
        &env,
    );
    // A worker told not to probe (a Slurm pilot for steps that need no runtime).
    let _bare = Worker::start_env(
        &url,
        &p.path().join("bare"),
        1,
        None,
        &["--name", "bare", "--no-probe"],
        &env,
    );
    wait_workers(&p, &coord, 2);
    let named = |p: &Project, name: &str| {
        workers_json(p, &coord)
            .into_iter()
            .find(|w| w["name"] == name)
            .map(|w| w["profile"].clone())
            .expect("enrolled")
    };
    let profile = |p: &Project| named(p, "probing");
    let before = profile(&p);
    assert_eq!(before["runtimes_pending"], true, "{before}");
    assert!(before["labels"].get("python").is_none(), "{before}");
    let bare = named(&p, "bare");
    assert_eq!(bare["runtimes_pending"], false, "{bare}");
    // It takes work while its probe is still held.
    p.write(
        "plain.yaml",
        &numbered_pipeline("plain", 2, true, |i| format!("echo {i} > \"$NEXA_OUT/x\"")),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "plain.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(profile(&p)["runtimes_pending"], true);
    // The probe finishes: its labels reach the coordinator in a heartbeat sent at once.
    std::fs::write(&gate, "").expect("open the gate");
    wait_for("the probed labels", Duration::from_secs(15), || {
        let now = profile(&p);
        now["runtimes_pending"] == false && now["labels"]["python"].is_string()
    });
    let bare = named(&p, "bare");
    assert!(
        bare["labels"].get("python").is_none(),
        "never probed: {bare}"
    );
}
