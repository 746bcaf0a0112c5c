//! Range shards on the real binaries: a fan-out over an input whose parts are byte
//! ranges of it stages those ranges instead of copied parts, and gives what the copies
//! gave, embedded and on the mesh.

mod common;

use common::mesh::{Coord, Worker, remote, wait_workers};
use common::{Project, text};
use std::collections::BTreeMap;
use std::path::Path;

/// Three fan-outs: over a record file by records, over an upstream artifact's one
/// record file by count, over a CSV by size. Every shard writes its part's name and
/// bytes, so a wrong byte, name or header changes the step's hash.
const PIPELINE: &str = r#"
pipeline:
  name: rs
  steps:
    - id: make
      uses: exec
      in: {src: data/reads.jsonl}
      params: {run: 'cp "$NEXA_IN_SRC" "$NEXA_OUT/reads.jsonl"'}
      out: artifacts/make
    - id: by_records
      uses: exec
      after: []
      in: {d: data/reads.jsonl}
      shards: {over: d, records: 7}
      params: {run: 'basename "$NEXA_IN_D" > "$NEXA_OUT/name"; tr a-z A-Z < "$NEXA_IN_D" > "$NEXA_OUT/up.jsonl"'}
      out: artifacts/by_records
    - id: by_artifact
      uses: exec
      in: {d: artifacts/make}
      shards: {over: d, count: 5}
      params: {run: 'ls "$NEXA_IN_D" > "$NEXA_OUT/names"; cat "$NEXA_IN_D/reads.jsonl" > "$NEXA_OUT/copy"'}
      out: artifacts/by_artifact
    - id: by_size
      uses: exec
      after: []
      in: {t: data/table.csv}
      shards: {over: t, size: 40}
      params: {run: 'basename "$NEXA_IN_T" > "$NEXA_OUT/name"; cat "$NEXA_IN_T" > "$NEXA_OUT/part.csv"'}
      out: artifacts/by_size
"#;

fn data(p: &Project, changed: Option<usize>) {
    let reads: String = (0..50)
        .map(|i| {
            let seq = if Some(i) == changed {
                "changed"
            } else {
                "acgt"
            };
            format!("{{\"id\": {i}, \"seq\": \"{seq}\"}}\n")
        })
        .collect();
    p.write("data/reads.jsonl", &reads);
    let table: String = std::iter::once("id,name\n".to_string())
        .chain((0..30).map(|i| format!("{i},row number {i}\n")))
        .collect();
    p.write("data/table.csv", &table);
}

/// Every sealed artifact under `root` (steps' and shards'), by path relative to it.
fn hashes(root: &Path) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    common::sealed(root, &mut all);
    let prefix = format!("{}/", root.display());
    all.into_iter()
        .map(|(k, v)| (k.trim_start_matches(&prefix).to_string(), v))
        .collect()
}

/// The split directories' files, relative to `state` (`<split>/<file>`).
fn split_files(state: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for split in std::fs::read_dir(state.join("splits"))
        .expect("splits")
        .flatten()
    {
        for f in std::fs::read_dir(split.path()).expect("split").flatten() {
            out.push(format!(
                "{}/{}",
                split.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

/// A step's sealed shard results, relative to the project.
fn shard_results(p: &Project, step: &str) -> Vec<String> {
    let root = format!(".nexa_state/rs/shards/{step}");
    let mut dirs: Vec<String> = std::fs::read_dir(p.path().join(&root))
        .expect("shard results")
        .flatten()
        .filter(|e| e.path().join("COMPLETE").exists())
        .map(|e| format!("{root}/{}", e.file_name().to_string_lossy()))
        .collect();
    dirs.sort();
    dirs
}

fn shard_statuses(p: &Project, step: &str) -> Vec<String> {
    let v = p.status_json("rs.yaml");
    let s = common::mesh::step(&v, step);
    s["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The range split writes no part, the copying split (`NEXA_SHARDS_COPY=1`) writes
/// them all, and both give the same sealed shard results and step artifacts, hash for
/// hash; one changed record then re-runs only its shard of each step that reads it.
#[test]
fn range_shards_seal_what_copied_shards_sealed_and_one_changed_record_reruns_its_shard() {
    let ranged = Project::new();
    let copied = Project::new();
    for p in [&ranged, &copied] {
        data(p, None);
        p.write("rs.yaml", PIPELINE);
    }
    let out = ranged.nexa(&["pipeline", "run", "rs.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = copied
        .cmd(&["pipeline", "run", "rs.yaml"])
        .env("NEXA_SHARDS_COPY", "1")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));

    let state = |p: &Project| p.path().join(".nexa_state/rs");
    let files = split_files(&state(&ranged));
    assert_eq!(
        files.len(),
        3,
        "three splits, each only its index: {files:?}"
    );
    assert!(
        files.iter().all(|f| f.ends_with("/parts.json")),
        "{files:?}"
    );
    let copies = split_files(&state(&copied));
    assert!(
        copies.iter().any(|f| f.ends_with("/part-00007.jsonl"))
            && copies.iter().any(|f| f.ends_with("/part-00000.csv"))
            && copies.iter().any(|f| f.ends_with("/part-00004")),
        "the copying split wrote its parts: {copies:?}"
    );

    let (a, b) = (hashes(ranged.path()), hashes(copied.path()));
    let steps = ["by_records", "by_artifact", "by_size"];
    for s in steps {
        let key = format!("artifacts/{s}");
        assert!(a.contains_key(&key), "{s} sealed: {a:?}");
    }
    assert!(
        a.keys().filter(|k| k.contains("/shards/")).count() >= 8 + 5 + 15,
        "every shard result sealed: {a:?}"
    );
    assert_eq!(
        a, b,
        "same shard results and step artifacts, by path and hash"
    );
    let name = ranged.read("artifacts/by_records/shard-00003/name");
    assert_eq!(
        name.trim(),
        "part-00003.jsonl",
        "a shard sees its part's own name"
    );
    let names = ranged.read("artifacts/by_artifact/shard-00001/names");
    assert!(names.contains("reads.jsonl"), "{names}");
    let head = ranged.read("artifacts/by_size/shard-00002/part.csv");
    assert!(
        head.starts_with("id,name\n"),
        "every CSV part has the header: {head}"
    );

    // `nexa verify --deep` holds every shard result's input to its part as it is now:
    // re-read from the input's range, or re-hashed from the copy.
    for p in [&ranged, &copied] {
        for step in steps {
            for dir in shard_results(p, step) {
                let out = p.nexa(&["verify", &dir, "--deep"]);
                assert!(out.status.success(), "{dir}: {}", text(&out));
            }
        }
    }

    // Record 30 changes: 30 / 7 = shard 4 of by_records, 30 / 10 = shard 3 of
    // by_artifact; by_size reads the table and re-runs nothing.
    data(&ranged, Some(30));
    let stale: Vec<String> = shard_results(&ranged, "by_records")
        .into_iter()
        .filter(|dir| {
            let meta = ranged.read(&format!("{dir}/meta.json"));
            meta.contains("reads.jsonl#part-4\"")
        })
        .collect();
    assert_eq!(stale.len(), 1, "{stale:?}");
    let out = ranged.nexa(&["verify", &stale[0], "--deep"]);
    assert!(!out.status.success(), "a changed part is found out");
    assert!(text(&out).contains("reads.jsonl#part-4"), "{}", text(&out));
    let out = ranged.nexa(&["pipeline", "run", "rs.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let ran = |step: &str| -> Vec<usize> {
        shard_statuses(&ranged, step)
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_str() != "SKIPPED")
            .map(|(i, _)| i)
            .collect()
    };
    assert_eq!(
        ran("by_records"),
        [4],
        "{:?}",
        shard_statuses(&ranged, "by_records")
    );
    assert_eq!(ran("by_artifact"), [3]);
    assert!(ran("by_size").is_empty());
    let up = ranged.read("artifacts/by_records/shard-00004/up.jsonl");
    assert!(up.contains("CHANGED"), "{up}");
}

/// On the mesh the coordinator streams a range shard's spans to the worker that
/// fetches it by digest: the run seals what the embedded run sealed.
#[test]
fn a_mesh_worker_is_streamed_range_shards_and_seals_what_embedded_sealed() {
    let embedded = Project::new();
    data(&embedded, None);
    embedded.write("rs.yaml", PIPELINE);
    let out = embedded.nexa(&["pipeline", "run", "rs.yaml"]);
    assert!(out.status.success(), "{}", text(&out));

    let p = Project::new();
    data(&p, None);
    p.write("rs.yaml", PIPELINE);
    let coord = Coord::open(&p.path().join("coord"));
    let _w = Worker::start(&coord.url("http"), &p.path().join("w"), 2, None, &[]);
    wait_workers(&p, &coord, 1);
    let out = remote(&p, &coord, &["pipeline", "run", "rs.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let project = coord.data.join("projects/rs");
    let splits = split_files(&project.join(".nexa_state/rs"));
    assert!(
        splits.iter().all(|f| f.ends_with("/parts.json")),
        "{splits:?}"
    );
    let steps = |h: BTreeMap<String, String>| -> BTreeMap<String, String> {
        h.into_iter()
            .filter(|(k, _)| k.starts_with("artifacts/"))
            .collect()
    };
    let (mesh, local) = (steps(hashes(&project)), steps(hashes(embedded.path())));
    assert_eq!(mesh.len(), local.len(), "{mesh:?}");
    assert_eq!(mesh, local, "the same artifacts, hash for hash");
}
