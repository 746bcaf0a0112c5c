//! `nexa-coordinator store recover`: a coordinator whose store is destroyed is rebuilt
//! from the sealed artifacts and the JSON mirrors, says what it could not recover, and
//! carries on: step states, the registry (versions, tags, history), lineage, and a
//! re-run that finds every step cached.

mod common;

use common::mesh::{Coord, Worker, bin, fixed_listen, remote, remote_status, step, wait_workers};
use common::{Project, text};
use std::process::Command;

const PIPELINE: &str = r#"pipeline:
  name: reg
  steps:
    - id: a
      uses: exec
      params: {run: 'od -An -N8 -tx8 /dev/urandom > "$NEXA_OUT/model.bin"'}
      out: artifacts/a
    - id: b
      uses: exec
      in: {m: artifacts/a/model.bin}
      shards: {over: m, count: 1}
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
"#;

#[test]
fn a_destroyed_store_is_rebuilt_from_the_artifacts_and_mirrors() {
    let p = Project::new();
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let _w = Worker::start(&url, &p.path().join("w"), 1, None, &[]);
    wait_workers(&p, &coord, 1);
    p.write("r.yaml", PIPELINE);
    let out = remote(&p, &coord, &["pipeline", "run", "r.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let before = remote_status(&p, &coord, "r.yaml");
    let hash_a = step(&before, "a")["hash"].clone();
    assert!(hash_a.is_string(), "{before}");

    coord.sigkill();
    // What the store holds, against its size on disk.
    let stats = Command::new(bin("nexa-coordinator"))
        .args(["store", "stats", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .expect("stats");
    assert!(stats.status.success(), "{}", text(&stats));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("json");
    let tree = |name: &str| {
        stats["trees"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == name))
            .unwrap_or_else(|| panic!("no tree {name}: {stats}"))
            .clone()
    };
    assert_eq!(tree("steps")["records"], 4, "{stats}");
    assert_eq!(tree("runs")["records"], 1, "{stats}");
    assert!(
        stats["amplification"].as_f64().is_some_and(|a| a > 0.0),
        "{stats}"
    );

    // The store is destroyed: every file in it overwritten with garbage.
    let store = data.join("store");
    for e in std::fs::read_dir(&store).expect("store").flatten() {
        if e.path().is_file() {
            std::fs::write(e.path(), vec![0xA5u8; 4096]).expect("garbage");
        }
    }
    // The coordinator refuses to start on it, and says what to do.
    assert!(
        Coord::try_start(&data, &listen, &["--open-enrolment"]).is_none(),
        "a coordinator started on a destroyed store"
    );
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    assert!(log.contains("store recover --data-dir"), "{log}");

    // A store that opens is left alone unless forced; a broken one is rebuilt.
    let recover = |args: &[&str]| {
        Command::new(bin("nexa-coordinator"))
            .args(["store", "recover", "--data-dir"])
            .arg(&data)
            .args(args)
            .output()
            .expect("recover")
    };
    let out = recover(&["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["pipelines"], 1, "{report}");
    assert_eq!(report["steps"], 4, "{report}");
    assert_eq!(report["runs"], 1, "{report}");
    assert_eq!(report["models"], 1, "{report}");
    // a, b, and b's one shard.
    assert!(
        report["artifacts"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    let lost = report["not_recovered"].to_string();
    assert!(lost.contains("worker records"), "{report}");
    let aside = report["moved_to"].as_str().expect("moved aside");
    assert!(std::path::Path::new(aside).is_dir(), "{aside}");
    let again = recover(&[]);
    assert!(
        !again.status.success(),
        "a healthy store was rebuilt unasked"
    );
    assert!(text(&again).contains("opens fine"), "{}", text(&again));

    // The coordinator starts on the rebuilt store and knows what it knew.
    let coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let after = remote_status(&p, &coord, "r.yaml");
    for s in ["a", "b", "register", "promote"] {
        assert_eq!(step(&after, s)["status"], "COMPLETE", "{s}: {after}");
    }
    assert_eq!(step(&after, "a")["hash"], hash_a);
    let ok = |args: &[&str]| {
        let out = remote(&p, &coord, args).output().expect("nexa");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let uri = ok(&["models", "resolve", "clf:prod"]);
    assert!(uri.trim().ends_with("projects/reg/artifacts/a"), "{uri}");
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["models", "history", "clf", "--json"])).expect("json");
    assert_eq!(history.len(), 1, "{history:?}");
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

    // The worker enrols again by itself; a re-run finds everything cached, and the
    // registry does not register the same artifact twice.
    wait_workers(&p, &coord, 1);
    let out = remote(&p, &coord, &["pipeline", "run", "r.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let rerun = remote_status(&p, &coord, "r.yaml");
    for s in ["a", "b"] {
        assert_eq!(step(&rerun, s)["status"], "SKIPPED", "{s}: {rerun}");
    }
    assert_eq!(step(&rerun, "a")["hash"], hash_a);
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["models", "history", "clf", "--json"])).expect("json");
    assert_eq!(history.len(), 1, "{history:?}");
}
