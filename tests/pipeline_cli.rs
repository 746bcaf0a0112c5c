//! End-to-end tests of `nexa pipeline ...` through the real binary on temp projects.

mod common;

use common::{Project, half_artifacts, numbered_pipeline, pairs, text};
use std::time::{Duration, Instant};

/// Three steps: `a` and `b` read separate inputs, `c` reads `a`'s output. Each execution
/// appends its step id to executions.log (outside the artifacts).
const ABC: &str = r#"
pipeline:
  name: abc
  steps:
    - id: a
      uses: exec
      in: {data: data/a.txt}
      params: {run: 'echo a >> ../../../../../../executions.log; tr a-z A-Z < "$NEXA_IN_DATA" > "$NEXA_OUT/upper.txt"'}
      out: artifacts/a
    - id: b
      uses: exec
      after: []
      in: {data: data/b.txt}
      params: {run: 'echo b >> "$LOG"; wc -c < "$NEXA_IN_DATA" > "$NEXA_OUT/size.txt"', env: {LOG: "@LOG@"}}
      out: artifacts/b
    - id: c
      uses: exec
      after: [a]
      in: {upper: artifacts/a/upper.txt}
      params: {cmd: [sh, -c, 'echo c >> "$LOG"; rev "$NEXA_IN_UPPER" > "$NEXA_OUT/rev.txt"'], env: {LOG: "@LOG@"}}
      out: artifacts/c
"#;

fn abc(p: &Project) -> &'static str {
    let log = p.path().join("executions.log");
    let yaml = ABC.replace("@LOG@", &log.display().to_string()).replace(
        "../../../../../../executions.log",
        &log.display().to_string(),
    );
    p.write("abc.yaml", &yaml);
    p.write("data/a.txt", "hello\n");
    p.write("data/b.txt", "world\n");
    "abc.yaml"
}

#[test]
fn second_run_is_all_skipped_and_status_json_has_the_contract_fields() {
    let p = Project::new();
    let f = abc(&p);
    let out = p.nexa(&["pipeline", "run", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.read("artifacts/c/rev.txt"), "OLLEH\n");
    assert_eq!(
        p.statuses(f),
        pairs(&[("a", "COMPLETE"), ("b", "COMPLETE"), ("c", "COMPLETE")])
    );
    assert_eq!(p.executions().len(), 3);

    let out = p.nexa(&["pipeline", "run", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses(f),
        pairs(&[("a", "SKIPPED"), ("b", "SKIPPED"), ("c", "SKIPPED")])
    );
    assert_eq!(p.executions().len(), 3, "nothing re-executed");

    let v = p.status_json(f);
    assert_eq!(v["pipeline"], "abc");
    let c = &v["steps"][2];
    assert_eq!(c["id"], "c");
    assert_eq!(c["artifact"], "artifacts/c");
    assert!(
        c["hash"]
            .as_str()
            .unwrap_or_default()
            .starts_with("blake3:")
    );
    assert_eq!(c["cache_key"].as_str().map(str::len), Some(64));
    // The mirror the seeds describe exists beside the store.
    let mirror: serde_json::Value =
        serde_json::from_str(&p.read(".nexa_state/abc/pipeline_state.json")).expect("mirror json");
    assert_eq!(mirror["steps"][2]["status"], "SKIPPED");
    // meta.json per the artifact protocol.
    let meta: serde_json::Value =
        serde_json::from_str(&p.read("artifacts/c/meta.json")).expect("meta");
    for k in [
        "kind",
        "uri",
        "hash",
        "bytes",
        "created_at",
        "inputs",
        "labels",
    ] {
        assert!(meta.get(k).is_some(), "meta.json lacks {k}");
    }
    assert_eq!(meta["labels"]["step_id"], "c");
    assert_eq!(meta["hash"], c["hash"]);
    assert!(p.path().join("artifacts/c/COMPLETE").is_file());
    // `nexa verify` re-checks it.
    let out = p.nexa(&["verify", "artifacts/c"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn one_changed_input_byte_reruns_exactly_its_downstream() {
    let p = Project::new();
    let f = abc(&p);
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    p.write("data/a.txt", "hellp\n");
    let out = p.nexa(&["pipeline", "run", f]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses(f),
        pairs(&[("a", "COMPLETE"), ("b", "SKIPPED"), ("c", "COMPLETE")])
    );
    assert_eq!(p.executions()[3..], ["a", "c"]);
    assert_eq!(p.read("artifacts/c/rev.txt"), "PLLEH\n");

    // Same content at the same path: nothing runs (the key is over content, not mtime).
    p.write("data/b.txt", "world\n");
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    assert_eq!(p.executions().len(), 5);

    // A change upstream that leaves a's output byte-identical stops there: c is SKIPPED
    // because its key is over the content it reads, not over a's inputs.
    p.write("data/a.txt", "hellP\n");
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    assert_eq!(
        p.statuses(f),
        pairs(&[("a", "COMPLETE"), ("b", "SKIPPED"), ("c", "SKIPPED")])
    );
    assert_eq!(p.executions()[5..], ["a"]);
}

#[test]
fn verify_rehashes_and_reruns_a_tampered_artifact() {
    let p = Project::new();
    let f = abc(&p);
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    // Same size, different byte: only --verify notices.
    let file = p.path().join("artifacts/b/size.txt");
    let mut perm = std::fs::metadata(&file).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&file, perm).expect("chmod");
    let original = p.read("artifacts/b/size.txt");
    p.write("artifacts/b/size.txt", &original.replace('6', "7"));
    assert!(!p.nexa(&["verify", "artifacts/b"]).status.success());
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    assert_eq!(
        p.executions().len(),
        3,
        "a size-preserving change is not seen without --verify"
    );
    let out = p.nexa(&["pipeline", "run", f, "--verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses(f),
        pairs(&[("a", "SKIPPED"), ("b", "COMPLETE"), ("c", "SKIPPED")])
    );
    assert_eq!(p.read("artifacts/b/size.txt"), original);
}

#[test]
fn a_failing_step_blocks_downstream_and_rerun_from_finishes() {
    let p = Project::new();
    let flag = p.path().join("flag");
    p.write(
        "f.yaml",
        &format!(
            r#"
pipeline:
  name: failing
  steps:
    - id: first
      uses: exec
      params: {{run: 'echo ok > "$NEXA_OUT/x"'}}
      out: artifacts/first
    - id: flaky
      uses: exec
      params: {{run: 'echo checking; test -f {flag} || {{ echo "flag missing" >&2; exit 3; }}; echo fine > "$NEXA_OUT/y"'}}
      out: artifacts/flaky
    - id: after
      uses: exec
      params: {{run: 'echo done > "$NEXA_OUT/z"'}}
      out: artifacts/after
"#,
            flag = flag.display()
        ),
    );
    let out = p.nexa(&["pipeline", "run", "f.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nexa pipeline rerun f.yaml --from flaky"),
        "{err}"
    );
    assert!(
        err.contains("exit status 3") && err.contains("flag missing"),
        "{err}"
    );
    assert_eq!(
        p.statuses("f.yaml"),
        pairs(&[
            ("first", "COMPLETE"),
            ("flaky", "FAILED"),
            ("after", "BLOCKED")
        ])
    );
    assert!(
        p.read(".nexa_state/failing/logs/flaky.log")
            .contains("checking")
    );

    std::fs::write(&flag, "").expect("flag");
    let out = p.nexa(&["pipeline", "rerun", "f.yaml", "--from", "flaky"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses("f.yaml"),
        pairs(&[
            ("first", "SKIPPED"),
            ("flaky", "COMPLETE"),
            ("after", "COMPLETE")
        ])
    );
}

#[test]
fn one_failed_shard_reruns_alone_and_a_changed_record_reruns_its_shard_only() {
    let p = Project::new();
    let log = p.path().join("executions.log");
    let flag = p.path().join("flag");
    p.write(
        "records.jsonl",
        &(0..8)
            .map(|i| format!("{{\"n\": {i}}}\n"))
            .collect::<String>(),
    );
    p.write(
        "s.yaml",
        &format!(
            r#"
pipeline:
  name: sharded
  steps:
    - id: count
      uses: exec
      in: {{records: records.jsonl}}
      shards: {{over: records, count: 4}}
      params:
        run: |
          echo "shard $NEXA_SHARD_INDEX" >> {log}
          if [ "$NEXA_SHARD_INDEX" = 2 ] && [ ! -f {flag} ]; then echo "shard 2 broke" >&2; exit 1; fi
          wc -l < "$NEXA_IN_RECORDS" > "$NEXA_OUT/lines.txt"
      out: artifacts/count
    - id: total
      uses: exec
      in: {{parts: artifacts/count}}
      params: {{run: 'cat "$NEXA_IN_PARTS"/shard-*/lines.txt | paste -sd+ | bc > "$NEXA_OUT/total.txt" || cat "$NEXA_IN_PARTS"/shard-*/lines.txt > "$NEXA_OUT/total.txt"'}}
      out: artifacts/total
"#,
            log = log.display(),
            flag = flag.display()
        ),
    );
    let out = p.nexa(&["pipeline", "run", "s.yaml", "--slots", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 of 4 shards failed"),
        "{}",
        text(&out)
    );
    let v = p.status_json("s.yaml");
    let shard_status: Vec<&str> = v["steps"][0]["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(shard_status, ["COMPLETE", "COMPLETE", "FAILED", "COMPLETE"]);
    assert_eq!(p.executions().len(), 4);

    std::fs::write(&flag, "").expect("flag");
    let out = p.nexa(&["pipeline", "run", "s.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.executions()[4..],
        ["shard 2"],
        "only the failed shard re-ran"
    );
    assert_eq!(
        p.statuses("s.yaml"),
        pairs(&[("count", "COMPLETE"), ("total", "COMPLETE")])
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&p.read("artifacts/count/manifest.json")).expect("manifest");
    assert_eq!(manifest["shards"].as_array().map(Vec::len), Some(4));
    assert_eq!(p.read("artifacts/count/shard-00002/lines.txt").trim(), "2");

    // Change one record in the third part: only that shard runs again.
    let mut records = p.read("records.jsonl");
    records = records.replace("{\"n\": 5}", "{\"n\": 50}");
    p.write("records.jsonl", &records);
    let out = p.nexa(&["pipeline", "run", "s.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.executions()[5..], ["shard 2"]);
}

/// `shards: {records: N}` and `{size: …}` cut the input at record boundaries into
/// parts of N records or at most that many bytes; each shard is cached on its own, and
/// a record added at the end re-runs only the last part.
#[test]
fn shards_by_records_or_size_cut_at_record_boundaries_and_rerun_only_what_changed() {
    let p = Project::new();
    let log = p.path().join("executions.log");
    // Lines of 2, 4, 6, ... 20 bytes with their newlines.
    let lines: String = (1..=10)
        .map(|i| format!("{}\n", "x".repeat(2 * i - 1)))
        .collect();
    p.write("lines.txt", &lines);
    p.write(
        "cut.yaml",
        &format!(
            r#"
pipeline:
  name: cut
  steps:
    - id: by_records
      uses: exec
      in: {{d: lines.txt}}
      shards: {{over: d, records: 3}}
      params: {{run: 'echo "records $NEXA_SHARD_INDEX" >> {log}; cp "$NEXA_IN_D" "$NEXA_OUT/part.txt"'}}
      out: artifacts/by_records
    - id: by_size
      uses: exec
      after: []
      in: {{d: lines.txt}}
      shards: {{over: d, size: 30}}
      params: {{run: 'echo "size $NEXA_SHARD_INDEX" >> {log}; cp "$NEXA_IN_D" "$NEXA_OUT/part.txt"'}}
      out: artifacts/by_size
"#,
            log = log.display()
        ),
    );
    let out = p.nexa(&["pipeline", "run", "cut.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let parts = |step: &str| -> Vec<Vec<usize>> {
        let mut dirs: Vec<_> = std::fs::read_dir(p.path().join("artifacts").join(step))
            .expect("artifact")
            .flatten()
            .map(|e| e.path())
            .filter(|d| d.is_dir())
            .collect();
        dirs.sort();
        dirs.iter()
            .map(|d| {
                std::fs::read_to_string(d.join("part.txt"))
                    .expect("part")
                    .lines()
                    .map(str::len)
                    .collect()
            })
            .collect()
    };
    // Lengths without newlines: 1, 3, 5, ... 19.
    assert_eq!(
        parts("by_records"),
        [vec![1, 3, 5], vec![7, 9, 11], vec![13, 15, 17], vec![19]]
    );
    // At most 30 bytes with newlines: 2+4+6+8=20 (+10 is 30: fits), then 12+14, ...
    assert_eq!(
        parts("by_size"),
        [
            vec![1, 3, 5, 7, 9],
            vec![11, 13],
            vec![15],
            vec![17],
            vec![19]
        ]
    );
    let ran = p.executions().len();
    assert_eq!(ran, 4 + 5);

    // One record more at the end: only the last part of each changes.
    p.write("lines.txt", &format!("{lines}yy\n"));
    let out = p.nexa(&["pipeline", "run", "cut.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut again = p.executions()[ran..].to_vec();
    again.sort();
    assert_eq!(again, ["records 3", "size 4"], "only the last parts re-ran");
    assert_eq!(parts("by_records")[3], [19, 2]);
    assert_eq!(parts("by_size")[4], [19, 2]);
    let v = p.status_json("cut.yaml");
    assert_eq!(v["steps"][1]["shards"].as_array().map(Vec::len), Some(5));
}

#[test]
fn sigkill_mid_run_then_resume_reruns_no_complete_step_and_leaves_no_half_artifact() {
    let p = Project::new();
    let log = p.path().join("executions.log");
    let yaml = numbered_pipeline("killme", 6, false, |i| {
        format!(
            "echo s{i} >> {}; head -c 200000 /dev/zero > \"$NEXA_OUT/blob\"; sleep 0.4; echo {i} > \"$NEXA_OUT/n\"",
            log.display()
        )
    });
    p.write("k.yaml", &yaml);
    let mut child = p
        .cmd(&["pipeline", "run", "k.yaml"])
        .spawn()
        .expect("spawn");
    // Wait until s2 has started, then SIGKILL the whole nexa process.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.executions().contains(&"s2".to_string()) {
        assert!(Instant::now() < deadline, "s2 never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let _ = child.wait();
    let before: Vec<String> = p.executions();
    let complete_before: Vec<usize> = (0..6)
        .filter(|i| p.path().join(format!("artifacts/s{i}/COMPLETE")).exists())
        .collect();
    assert!(
        complete_before.contains(&0) && complete_before.contains(&1),
        "{complete_before:?}"
    );

    let out = p.nexa(&["pipeline", "resume", "k.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = p.executions();
    let rerun: Vec<&String> = after[before.len()..].iter().collect();
    for i in &complete_before {
        assert!(
            !rerun.contains(&&format!("s{i}")),
            "COMPLETE step s{i} re-ran: {rerun:?}"
        );
    }
    for (i, (id, st)) in p.statuses("k.yaml").into_iter().enumerate() {
        let expect = if complete_before.contains(&i) {
            "SKIPPED"
        } else {
            "COMPLETE"
        };
        assert_eq!(
            (id.as_str(), st.as_str()),
            (format!("s{i}").as_str(), expect)
        );
    }
    assert!(
        half_artifacts(p.path()).is_empty(),
        "{:?}",
        half_artifacts(p.path())
    );
    for i in 0..6 {
        let out = p.nexa(&["verify", &format!("artifacts/s{i}")]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn ctrl_c_cancels_cleanly_and_resume_finishes() {
    let p = Project::new();
    let log = p.path().join("executions.log");
    p.write(
        "c.yaml",
        &format!(
            "pipeline:\n  name: cancel\n  steps:\n    - id: long\n      uses: exec\n      params: {{run: 'echo long >> {log}; [ -f {log}.2 ] || {{ touch {log}.2; sleep 30; }}; echo x > \"$NEXA_OUT/x\"'}}\n      out: artifacts/long\n    - id: next\n      uses: exec\n      params: {{run: 'echo y > \"$NEXA_OUT/y\"'}}\n      out: artifacts/next\n",
            log = log.display()
        ),
    );
    let child = p
        .cmd(&["pipeline", "run", "c.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.executions().is_empty() {
        assert!(Instant::now() < deadline, "step never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("sigint");
    let out = child.wait_with_output().expect("wait");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert_eq!(
        p.statuses("c.yaml"),
        pairs(&[("long", "CANCELLED"), ("next", "CANCELLED")])
    );
    let out = p.nexa(&["pipeline", "resume", "c.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses("c.yaml"),
        pairs(&[("long", "COMPLETE"), ("next", "COMPLETE")])
    );
}

#[test]
fn timeouts_kill_the_whole_process_group_and_retries_back_off() {
    let p = Project::new();
    let pidfile = p.path().join("bg.pid");
    let counter = p.path().join("count");
    p.write(
        "t.yaml",
        &format!(
            r#"
pipeline:
  name: timing
  steps:
    - id: hang
      uses: exec
      timeout: 1s
      params: {{run: 'sleep 60 & echo $! > {pidfile}; wait'}}
      out: artifacts/hang
    - id: retry
      uses: exec
      after: []
      retries: {{count: 2, backoff: 100ms}}
      params: {{run: 'echo x >> {counter}; [ $(wc -l < {counter}) -ge 2 ] || exit 1; echo ok > "$NEXA_OUT/ok"'}}
      out: artifacts/retry
"#,
            pidfile = pidfile.display(),
            counter = counter.display()
        ),
    );
    let out = p.nexa(&["pipeline", "run", "t.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timeout"),
        "{}",
        text(&out)
    );
    assert_eq!(
        p.statuses("t.yaml"),
        pairs(&[("hang", "FAILED"), ("retry", "COMPLETE")])
    );
    assert_eq!(p.read("count").lines().count(), 2, "one retry");
    let pid: i32 = p.read("bg.pid").trim().parse().expect("pid");
    // The background sleep was in the job's process group: it is gone (or a zombie).
    std::thread::sleep(Duration::from_millis(100));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z"),
        "background process survived: {state}"
    );
}

#[test]
fn a_slurm_step_with_no_pilot_fails_clearly_and_never_runs_on_the_local_pool() {
    // --no-slurm: where sbatch is on PATH (CI), the run would submit pilots itself
    // (tests/slurm.rs tests that).
    let p = Project::new();
    p.write(
        "t.yaml",
        "pipeline:\n  name: later\n  steps:\n    - id: train\n      uses: exec\n      scheduler: slurm\n      params: {run: 'touch \"$NEXA_OUT/x\"'}\n      out: artifacts/ckpt\n",
    );
    let out = p.nexa(&["pipeline", "run", "t.yaml", "--no-slurm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("has scheduler: slurm, and no enrolled worker is one of its workers (label scheduler=slurm)"),
        "{}",
        text(&out)
    );
    assert_eq!(p.statuses("t.yaml"), pairs(&[("train", "FAILED")]));
    assert!(!p.path().join("artifacts/ckpt").exists());
}

#[test]
fn validate_reports_every_error_with_line_and_column_and_exits_2() {
    let p = Project::new();
    p.write(
        "bad.yaml",
        "pipeline:\n  name: bad\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [x]}\n      out: ../escape\n      colour: red\n    - id: b\n      uses: nope\n      after: [a, ghost]\n    - id: c\n      uses: exec\n      params: {cmd: [x]}\n      after: [d]\n    - id: d\n      uses: exec\n      params: {cmd: [x]}\n      after: [c]\n",
    );
    let out = p.nexa(&["pipeline", "validate", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.yaml:7:12: step 'a': output 'out' path unsafe path \"../escape\"",
        "bad.yaml:8:7: unknown field 'colour'",
        "bad.yaml:10:13: step 'b': unknown handler 'uses: nope'",
        "bad.yaml:11:18: step 'b': 'after' names unknown step 'ghost'",
        "bad.yaml:12:11: dependency cycle: c -> d -> c",
        "bad.yaml: 5 errors",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in\n{err}");
    }
    // run refuses it the same way, before touching anything.
    let out = p.nexa(&["pipeline", "run", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!p.path().join(".nexa_state").exists());
    let out = p.nexa(&["pipeline", "validate", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn viz_draws_text_dot_and_mermaid() {
    let p = Project::new();
    let f = abc(&p);
    let t = String::from_utf8_lossy(&p.nexa(&["pipeline", "viz", f]).stdout).to_string();
    assert!(
        t.contains("pipeline abc (3 steps)") && t.contains("c (exec)  <- a"),
        "{t}"
    );
    let d = String::from_utf8_lossy(&p.nexa(&["pipeline", "viz", f, "--format", "dot"]).stdout)
        .to_string();
    assert!(
        d.starts_with("digraph \"abc\"") && d.contains("\"a\" -> \"c\";"),
        "{d}"
    );
    let m = String::from_utf8_lossy(
        &p.nexa(&["pipeline", "viz", f, "--format", "mermaid"])
            .stdout,
    )
    .to_string();
    assert!(
        m.starts_with("flowchart LR") && m.contains("s0 --> s2"),
        "{m}"
    );
    // Each ends its last line (a drawing piped into a file or a shell prompt).
    for out in [&t, &d, &m] {
        assert!(out.ends_with('\n'), "{out:?}");
    }
}

#[test]
fn the_quickstart_runs_and_its_report_is_right() {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "pipelines/quickstart.yaml",
        "pipelines/quickstart/protstats.py",
        "pipelines/quickstart/proteins.fasta",
    ] {
        p.write(f, &std::fs::read_to_string(root.join(f)).expect("read"));
    }
    let out = p.nexa(&["pipeline", "run", "pipelines/quickstart.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_str(&p.read("artifacts/quickstart/report/summary.json")).expect("summary");
    assert_eq!(summary["sequences"], 399);
    assert_eq!(summary["dropped"], 1);
    assert_eq!(summary["shards"], 4);
    let residues: u64 = p
        .read("pipelines/quickstart/proteins.fasta")
        .lines()
        .filter(|l| !l.starts_with('>'))
        .map(|l| l.trim().len() as u64)
        .sum();
    assert!(
        summary["residues"]
            .as_u64()
            .is_some_and(|r| r < residues && r > residues * 9 / 10)
    );
    // The report was registered and promoted by the pipeline's registry steps.
    let models = |args: &[&str]| {
        let mut all = vec!["models"];
        all.extend_from_slice(args);
        let out = p.nexa(&all);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        models(&["resolve", "protein-report:prod"])
            .trim()
            .ends_with("artifacts/quickstart/report")
    );
    let out = p.nexa(&["pipeline", "run", "pipelines/quickstart.yaml"]);
    assert!(out.status.success());
    assert!(
        p.statuses("pipelines/quickstart.yaml")
            .iter()
            .all(|(_, s)| s == "SKIPPED")
    );
    // A changed script re-runs everything but makes the same report: no new version.
    let script = p.read("pipelines/quickstart/protstats.py");
    p.write(
        "pipelines/quickstart/protstats.py",
        &format!("{script}\n# v2\n"),
    );
    let out = p.nexa(&["pipeline", "run", "pipelines/quickstart.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(models(&["show", "protein-report"]).contains("1 version(s)"));
    // New data makes a new report: a new version, promoted in its turn.
    let fasta = p.read("pipelines/quickstart/proteins.fasta");
    p.write(
        "pipelines/quickstart/proteins.fasta",
        &format!(
            "{fasta}>extra\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ\n"
        ),
    );
    let out = p.nexa(&["pipeline", "run", "pipelines/quickstart.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&models(&["history", "protein-report", "--json"])).expect("json");
    let held: Vec<(&str, bool)> = history
        .iter()
        .map(|h| (h["version"].as_str().unwrap_or_default(), h["to"].is_null()))
        .collect();
    assert_eq!(held, [("0.1.0", false), ("0.1.1", true)]);
}

#[test]
fn named_outputs_are_separate_artifacts_and_csv_shards_keep_their_header() {
    let p = Project::new();
    p.write("table.csv", "name,score\na,1\nb,2\nc,3\n");
    p.write(
        "n.yaml",
        r#"
pipeline:
  name: named
  steps:
    - id: split
      uses: exec
      in: {table: table.csv}
      shards: {over: table, count: 2}
      params: {run: 'head -1 "$NEXA_IN_TABLE" > "$NEXA_OUT_HEADER/h.txt"; tail -n +2 "$NEXA_IN_TABLE" | wc -l > "$NEXA_OUT_ROWS/n.txt"'}
      out: {header: artifacts/header, rows: artifacts/rows}
    - id: use_rows
      uses: exec
      in: {rows: artifacts/rows}
      params: {cmd: [sh, -c, 'cat "${NEXA_IN_ROWS}"/shard-*/n.txt > "${NEXA_OUT}/all.txt"']}
      out: artifacts/use_rows
"#,
    );
    let out = p.nexa(&["pipeline", "run", "n.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.read("artifacts/header/shard-00000/h.txt"), "name,score\n");
    assert_eq!(p.read("artifacts/header/shard-00001/h.txt"), "name,score\n");
    assert_eq!(
        p.read("artifacts/use_rows/all.txt")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["2", "1"]
    );
    let v = p.status_json("n.yaml");
    let outs = v["steps"][0]["outputs"].as_object().expect("outputs");
    assert_eq!(outs.len(), 2);
    assert!(
        p.path().join("artifacts/rows/COMPLETE").is_file()
            && p.path().join("artifacts/header/COMPLETE").is_file()
    );
}

#[test]
fn jobs_left_running_by_a_killed_nexa_are_reaped_on_the_next_start() {
    let p = Project::new();
    let pidfile = p.path().join("job.pid");
    let flag = p.path().join("flag");
    p.write(
        "o.yaml",
        &format!(
            "pipeline:\n  name: orphan\n  steps:\n    - id: slow\n      uses: exec\n      params: {{run: 'echo $$ > {pid}; [ -f {flag} ] || sleep 60; echo done > \"$NEXA_OUT/x\"'}}\n      out: artifacts/slow\n",
            pid = pidfile.display(),
            flag = flag.display()
        ),
    );
    let mut child = p
        .cmd(&["pipeline", "run", "o.yaml"])
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.read("job.pid").trim().is_empty() {
        assert!(Instant::now() < deadline, "job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: i32 = p.read("job.pid").trim().parse().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let _ = child.wait();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
    };
    assert!(
        alive(pid),
        "the orphaned job should still be running before the next start"
    );
    std::fs::write(&flag, "").expect("flag");
    let out = p.nexa(&["pipeline", "resume", "o.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!alive(pid), "the orphaned job survived the next start");
}

#[test]
fn gpu_steps_get_exactly_their_gpus_and_impossible_ones_fail_fast_saying_why() {
    let p = Project::new();
    p.write(
        "g.yaml",
        r#"
pipeline:
  name: gpus
  steps:
    - id: small
      uses: exec
      resources: {gpus: 1, gpu_memory: 20GiB}
      params: {run: 'echo "$CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/gpus"'}
      out: artifacts/small
    - id: hopper
      uses: exec
      after: []
      resources: {gpus: 1, compute_capability: "9.0"}
      params: {run: 'echo "$CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/gpus"'}
      out: artifacts/hopper
    - id: cpu
      uses: exec
      after: []
      params: {run: 'echo "[$CUDA_VISIBLE_DEVICES]" > "$NEXA_OUT/gpus"'}
      out: artifacts/cpu
    - id: huge
      uses: exec
      after: []
      resources: {gpus: 1, gpu_memory: 100GiB}
      params: {run: 'true'}
      out: artifacts/huge
"#,
    );
    let gib = 1u64 << 30;
    let fake = serde_json::json!([
        {"index": 0, "uuid": "GPU-fake-80", "name": "Fake H100", "memory_total": 80 * gib, "memory_free": 80 * gib, "compute_capability": [9, 0], "mig_enabled": false},
        {"index": 1, "uuid": "GPU-fake-24", "name": "Fake L4", "memory_total": 24 * gib, "memory_free": 24 * gib, "compute_capability": [8, 9], "mig_enabled": false},
    ]);
    let out = p
        .cmd(&["pipeline", "run", "g.yaml"])
        .env("NEXA_FAKE_GPUS", fake.to_string())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        p.read("artifacts/small/gpus").trim(),
        "GPU-fake-24",
        "best fit: the smaller GPU"
    );
    assert_eq!(p.read("artifacts/hopper/gpus").trim(), "GPU-fake-80");
    assert_eq!(
        p.read("artifacts/cpu/gpus").trim(),
        "[]",
        "a CPU step sees no GPU"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs ≥ 100.0 GiB GPU memory; largest enrolled is 80.0 GiB"),
        "{err}"
    );
    assert_eq!(
        p.statuses("g.yaml"),
        pairs(&[
            ("small", "COMPLETE"),
            ("hopper", "COMPLETE"),
            ("cpu", "COMPLETE"),
            ("huge", "FAILED")
        ])
    );

    // Without GPUs (no NVML here, no fake), a GPU step fails at once and says why.
    let q = Project::new();
    q.write("g.yaml", &p.read("g.yaml"));
    let out = q
        .cmd(&["pipeline", "run", "g.yaml"])
        .env_remove("NEXA_FAKE_GPUS")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.contains("GPU-") {
        assert!(
            err.contains("needs 1 GPU; the most any worker has is 0"),
            "{err}"
        );
    }
}

#[test]
fn verify_checks_hashes_and_the_workers_signatures_offline() {
    let p = Project::new();
    let f = abc(&p);
    assert!(p.nexa(&["pipeline", "run", f]).status.success());
    p.write("rows.jsonl", "1\n2\n3\n4\n5\n");
    p.write(
        "s.yaml",
        "pipeline:\n  name: sv\n  steps:\n    - id: sh\n      uses: exec\n      in: {rows: rows.jsonl}\n      shards: {over: rows, count: 3}\n      params: {run: 'wc -l < \"$NEXA_IN_ROWS\" > \"$NEXA_OUT/n\"'}\n      out: artifacts/sh\n",
    );
    assert!(p.nexa(&["pipeline", "run", "s.yaml"]).status.success());
    for art in ["artifacts/c", "artifacts/sh"] {
        let out = p.nexa(&["verify", art]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("none recorded"),
            "{}",
            text(&out)
        );
    }
    // The sharded step's signatures are in its provenance file (one line a shard),
    // pinned by meta.json, not in a meta.json label; a forged line is caught.
    let meta = p.read("artifacts/sh/meta.json");
    assert!(
        meta.contains("\"shard_provenance_file\": \"blake3:")
            && !meta.contains("\"shard_provenance\""),
        "{meta}"
    );
    let prov_path = p.path().join("artifacts/sh/.nexa-provenance.jsonl");
    let prov = p.read("artifacts/sh/.nexa-provenance.jsonl");
    assert_eq!(prov.lines().count(), 3, "{prov}");
    let mut perm = std::fs::metadata(&prov_path).expect("stat").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&perm) & 0o222,
        0,
        "sealed read-only"
    );
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&prov_path, perm).expect("chmod");
    std::fs::write(&prov_path, prov.replace("\"attempt\":1", "\"attempt\":2")).expect("write");
    let out = p.nexa(&["verify", "artifacts/sh"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("provenance"),
        "{}",
        text(&out)
    );
    // A forged signature in meta.json is caught, though the payload hash still matches.
    let meta_path = p.path().join("artifacts/c/meta.json");
    let mut perm = std::fs::metadata(&meta_path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&meta_path, perm).expect("chmod");
    let mut meta: serde_json::Value =
        serde_json::from_str(&p.read("artifacts/c/meta.json")).expect("meta");
    let signed: String = meta["labels"]["signed"]
        .as_str()
        .expect("signed label")
        .to_string();
    let mut s: serde_json::Value = serde_json::from_str(&signed).expect("signed json");
    s["generation"] = serde_json::json!(s["generation"].as_u64().unwrap_or(0) + 1);
    meta["labels"]["signed"] = serde_json::Value::String(s.to_string());
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).expect("json")).expect("write");
    let out = p.nexa(&["verify", "artifacts/c"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_failed_steps_log_is_kept_before_the_run_reports_its_end() {
    // The failure message names .nexa_state/<pipeline>/logs/<step>.log: by the time
    // `nexa pipeline run` returns, that file must hold this run's log, not be missing
    // or an earlier run's.
    let p = Project::new();
    p.write(
        "f.yaml",
        "pipeline:\n  name: failing\n  steps:\n    - id: noisy\n      uses: exec\n      params: {run: 'head -c 60000000 /dev/zero | tr \"\\\\0\" x; echo; echo \"marker $NEXA_RUN_ID\"; exit 3'}\n      out: artifacts/noisy\n",
    );
    for _ in 0..2 {
        let out = p.nexa(&["pipeline", "run", "f.yaml"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let run_id = p.status_json("f.yaml")["steps"][0]["run_id"]
            .as_str()
            .expect("run id")
            .to_string();
        let log =
            std::fs::read(p.path().join(".nexa_state/failing/logs/noisy.log")).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(200)..]).into_owned();
        assert!(
            tail.contains(&format!("marker {run_id}")),
            "the kept log is this run's ({run_id}): ...{tail}"
        );
    }
}
