//! `nexa lineage` and `nexa verify --deep` on real runs of the real binary.

mod common;

use common::{Project, text};

fn ok(p: &Project, args: &[&str]) -> String {
    let out = p.nexa(args);
    assert!(out.status.success(), "nexa {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// a → b → c → d, each reading the previous step's file; a reads a project file.
const CHAIN: &str = r#"
pipeline:
  name: chain
  steps:
    - id: a
      uses: exec
      in: {raw: data/raw.txt}
      params: {run: 'tr a-z A-Z < "$NEXA_IN_RAW" > "$NEXA_OUT/x"'}
      out: artifacts/a
    - id: b
      uses: exec
      in: {x: artifacts/a/x}
      params: {run: 'cat "$NEXA_IN_X" "$NEXA_IN_X" > "$NEXA_OUT/x"'}
      out: artifacts/b
    - id: c
      uses: exec
      in: {x: artifacts/b/x}
      params: {run: 'wc -c < "$NEXA_IN_X" > "$NEXA_OUT/x"'}
      out: artifacts/c
    - id: d
      uses: exec
      in: {x: artifacts/c/x, raw: data/raw.txt}
      params: {run: 'cat "$NEXA_IN_X" "$NEXA_IN_RAW" > "$NEXA_OUT/x"'}
      out: artifacts/d
"#;

fn uris(g: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = g["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            n["uri"]
                .as_str()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn lineage_answers_both_ways_across_pipelines_and_verify_deep_finds_the_broken_link() {
    let p = Project::new();
    p.write("data/raw.txt", "hello lineage\n");
    p.write("chain.yaml", CHAIN);
    ok(&p, &["pipeline", "run", "chain.yaml"]);
    // A second pipeline builds on the first one's output.
    p.write(
        "report.yaml",
        "pipeline:\n  name: report\n  steps:\n    - id: r\n      uses: exec\n      in: {d: artifacts/d}\n      params: {run: 'ls \"$NEXA_IN_D\" > \"$NEXA_OUT/listing\"'}\n      out: artifacts/r\n",
    );
    ok(&p, &["pipeline", "run", "report.yaml"]);

    let up: serde_json::Value = serde_json::from_str(&ok(
        &p,
        &["lineage", "artifacts/d", "--up", "--format", "json"],
    ))
    .expect("json");
    assert_eq!(uris(&up), ["a", "b", "c", "d"]);
    let a_uri = format!("file://{}", p.path().join("artifacts/a").display());
    assert_eq!(up["levels"][&a_uri], 3);
    let node_d = up["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["step"] == "d"))
        .expect("d");
    assert_eq!(node_d["pipeline"], "chain");
    assert!(
        node_d["job"].as_str().is_some_and(|j| j.ends_with("/d")),
        "the producing job is in the lineage: {node_d}"
    );
    assert!(node_d["run_id"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(
        node_d["worker"].as_str().map(str::len),
        Some(64),
        "the signing worker's key is in the lineage"
    );
    let external: Vec<&str> = up["external"]
        .as_array()
        .expect("external")
        .iter()
        .filter_map(|x| x["path"].as_str())
        .collect();
    assert!(external.contains(&"data/raw.txt"), "{external:?}");

    // Downwards from a, across into the other pipeline; --depth stops the walk.
    let down: serde_json::Value = serde_json::from_str(&ok(
        &p,
        &["lineage", "artifacts/a", "--down", "--format", "json"],
    ))
    .expect("json");
    assert_eq!(uris(&down), ["a", "b", "c", "d", "r"]);
    let shallow: serde_json::Value = serde_json::from_str(&ok(
        &p,
        &[
            "lineage",
            "artifacts/a",
            "--down",
            "--depth",
            "2",
            "--format",
            "json",
        ],
    ))
    .expect("json");
    assert_eq!(uris(&shallow), ["a", "b", "c"]);
    let tree = ok(&p, &["lineage", "artifacts/r"]);
    assert!(tree.contains("← d: artifacts/d"), "{tree}");
    assert!(tree.contains("← raw: data/raw.txt  [file]"), "{tree}");
    let dot = ok(&p, &["lineage", "artifacts/a", "--down", "--format", "dot"]);
    assert!(dot.starts_with("digraph lineage"), "{dot}");

    let deep = ok(&p, &["verify", "--deep", "artifacts/r"]);
    assert!(deep.contains("5 artifact(s)"), "{deep}");

    // A payload byte changed on disk three steps up from d (four from r).
    let x = p.path().join("artifacts/a/x");
    let mut perm = std::fs::metadata(&x).expect("stat").permissions();
    use std::os::unix::fs::PermissionsExt;
    perm.set_mode(0o644);
    std::fs::set_permissions(&x, perm).expect("chmod");
    let mut bytes = std::fs::read(&x).expect("read");
    bytes[0] ^= 1;
    std::fs::write(&x, bytes).expect("tamper");
    let out = p.nexa(&["verify", "--deep", "artifacts/d"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("FAILED 3 step(s) up: artifacts/a:") && first.contains("does not match"),
        "{err}"
    );
    // The plain check of d itself still passes: only the deep one sees the ancestry.
    assert!(p.nexa(&["verify", "artifacts/d"]).status.success());
}
