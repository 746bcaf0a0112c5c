use super::*;

fn diags(src: &str) -> Vec<String> {
    check_str("p.yaml", src, Path::new("/proj"))
        .into_iter()
        .map(|d| d.to_string())
        .collect()
}

fn has(all: &[String], needle: &str) -> bool {
    all.iter().any(|d| d.contains(needle))
}

#[test]
fn a_valid_pipeline_loads_with_implicit_and_input_edges() {
    let src = r#"
pipeline:
  name: demo
  steps:
    - id: a
      uses: exec
      params: {cmd: [echo, hi]}
      out: artifacts/a
    - id: b
      uses: exec
      after: []
      params: {run: "echo b"}
      out: {x: artifacts/bx, y: artifacts/by}
    - id: c
      uses: exec
      after: []
      in: {first: artifacts/a, second: artifacts/by/file.txt}
      shards: {over: first, count: 4}
      retries: {count: 2, backoff: 10ms}
      timeout: 1h30m
      resources: {gpus: 1, gpu_memory: 40GiB, compute_capability: "8.0", memory: 512MiB}
      params: {cmd: [cat], env: {K: 1}}
      out: artifacts/c
    - id: d
      uses: runners.serve
      params: {model: distilbert-base-uncased}
      out: artifacts/d
"#;
    let l = load_str("p.yaml", src, Path::new("/proj")).expect("valid");
    assert_eq!(l.pipeline.name, "demo");
    assert_eq!(l.dag.deps, vec![vec![], vec![], vec![0, 1], vec![2]]);
    let c = &l.pipeline.steps[2];
    assert_eq!(c.retries.count, 2);
    assert_eq!(c.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(c.resources.gpu_memory, Some(40 << 30));
    assert_eq!(c.resources.compute_capability, Some((8, 0)));
    assert_eq!(
        c.shards.as_ref().map(|s| s.cut),
        Some(crate::shard::Cut::Count(4))
    );
    let up = &l.dag.upstream[2]["second"];
    assert_eq!((up.step, up.output.as_str()), (1, "y"));
    assert_eq!(up.subpath.as_deref(), Some(Path::new("file.txt")));
}

#[test]
fn every_error_is_collected_with_line_and_column() {
    let src = r#"pipeline:
  name: demo
  colour: blue
  steps:
    - id: a
      uses: exec
      params: {cmd: [true]}
      out: artifacts/a
      tags: [x]
    - id: a
      uses: exec
      params: {cmd: [true]}
      out: artifacts/a2
    - id: b
      uses: runners.teleport
      out: artifacts/b
    - id: c
      uses: exec
      params: {cmd: [true]}
      after: [ghost]
      out: artifacts/a
    - id: d
      uses: exec
      params: {cmd: [true]}
      out: ../outside
    - id: e
      uses: exec
      params: {cmd: [true]}
      out: /etc/nexa
    - id: f
      uses: exec
      params: {cmd: [true]}
      after: [g]
      out: artifacts/f
    - id: g
      uses: exec
      params: {cmd: [true]}
      after: [f]
      out: artifacts/g
    - id: h
      uses: exec
      params: {oops: 1}
      timeout: soon
      resources: {gpu_memory: 40 parsecs}
      out: artifacts/h
"#;
    let d = diags(src);
    let expect = [
        "p.yaml:3:3: unknown field 'colour' in pipeline",
        "p.yaml:9:7: unknown field 'tags' in step",
        "p.yaml:10:11: duplicate step id 'a' (first defined at line 5)",
        "p.yaml:15:13: step 'b': unknown handler 'uses: runners.teleport'",
        "p.yaml:20:15: step 'c': 'after' names unknown step 'ghost'",
        "p.yaml:21:12: steps 'a' and 'c' write the same 'out' path: artifacts/a",
        "p.yaml:25:12: step 'd': output 'out' path unsafe path \"../outside\": escapes the project with '..'",
        "p.yaml:29:12: step 'e': output 'out' path unsafe path \"/etc/nexa\": absolute path outside the artifact root",
        "p.yaml:30:11: dependency cycle: f -> g -> f",
        "p.yaml:42:15: step 'h': unknown field 'params.oops'",
        "p.yaml:43:16: step 'h': 'timeout': invalid duration",
        "p.yaml:44:31: step 'h': 'resources.gpu_memory': invalid size",
    ];
    for e in expect {
        assert!(has(&d, e), "missing {e:?} in:\n{}", d.join("\n"));
    }
    assert_eq!(
        d.len(),
        expect.len(),
        "unexpected extra diagnostics:\n{}",
        d.join("\n")
    );
}

#[test]
fn syntax_errors_and_wrong_shapes_have_positions() {
    let d = diags("pipeline:\n  name: x\n  steps: [\n");
    assert!(
        d[0].starts_with("p.yaml:") && d[0].contains("invalid YAML"),
        "{d:?}"
    );
    let d = diags(
        "pipeline:\n  name: x\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [x]}\n      in: [a, b]\n",
    );
    assert!(
        has(&d, "p.yaml:7:11: 'in' must be a mapping, found a list"),
        "{d:?}"
    );
    let d = diags("pipeline:\n  steps: []\n");
    assert!(has(&d, "missing field 'pipeline.name'"), "{d:?}");
    assert!(has(&d, "'pipeline.steps' is empty"), "{d:?}");
}

#[test]
fn shards_must_name_an_input_and_steps_may_not_read_their_own_output() {
    let src = "pipeline:\n  name: x\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [x]}\n      in: {d: data.txt, own: artifacts/a/f}\n      shards: {over: nope, count: 2}\n      out: artifacts/a\n";
    let d = diags(src);
    assert!(
        has(&d, "p.yaml:8:22: step 'a': 'shards.over' names 'nope'"),
        "{d:?}"
    );
    assert!(
        has(
            &d,
            "p.yaml:7:30: step 'a': input 'own' reads the step's own output"
        ),
        "{d:?}"
    );
}

#[test]
fn shards_cut_by_count_records_or_size_and_exactly_one_of_them() {
    use crate::shard::Cut;
    let with = |cut: &str| {
        format!(
            "pipeline:\n  name: x\n  steps:\n    - id: a\n      uses: exec\n      params: {{cmd: [x]}}\n      in: {{d: data.txt}}\n      shards: {{over: d, {cut}}}\n      out: artifacts/a\n"
        )
    };
    for (cut, want) in [
        ("count: 8", Cut::Count(8)),
        ("records: 200", Cut::Records(200)),
        ("size: 64MiB", Cut::Bytes(64 << 20)),
        ("size: 4096", Cut::Bytes(4096)),
    ] {
        let l = load_str("p.yaml", &with(cut), Path::new("/proj")).expect(cut);
        assert_eq!(
            l.pipeline.steps[0].shards.as_ref().map(|s| s.cut),
            Some(want)
        );
    }
    for (cut, says) in [
        (
            "count: 2, records: 5",
            "p.yaml:8:15: step 'a': 'shards' takes one of 'count', 'records' and 'size', not both 'count' and 'records'",
        ),
        (
            "records: 0",
            "p.yaml:8:34: step 'a': 'shards.records' must be at least 1",
        ),
        (
            "size: 0",
            "p.yaml:8:31: step 'a': 'shards.size' must be a size above zero",
        ),
        ("size: lots", "p.yaml:8:31: step 'a': 'shards.size': "),
        (
            "count: 1000001",
            "p.yaml:8:32: step 'a': 'shards.count' must be between 1 and 1000000",
        ),
        (
            "bytes: 5",
            "p.yaml:8:25: unknown field 'bytes' in shards (expected one of: over, count, records, size)",
        ),
    ] {
        let d = diags(&with(cut));
        assert!(has(&d, says), "{cut}: {d:?}");
    }
    let d = diags(&with("").replace(", }", "}"));
    assert!(
        has(&d, "'shards' needs one of 'count', 'records', 'size'"),
        "{d:?}"
    );
}

#[test]
fn implicit_order_and_empty_after() {
    let src = "pipeline:\n  name: x\n  steps:\n    - {id: a, uses: exec, params: {cmd: [x]}}\n    - {id: b, uses: exec, params: {cmd: [x]}}\n    - {id: c, uses: exec, params: {cmd: [x]}, after: []}\n    - {id: d, uses: exec, params: {cmd: [x]}, after: [a, b]}\n";
    let l = load_str("p.yaml", src, Path::new("/proj")).expect("valid");
    assert_eq!(l.dag.deps, vec![vec![], vec![0], vec![], vec![0, 1]]);
}

#[test]
fn registry_steps_check_their_params_and_take_no_out() {
    let src = r#"pipeline:
  name: x
  steps:
    - id: ok
      uses: core.registry.register
      in: {m: artifacts/m}
      params: {name: clf, meta: {a: 1}, bump: minor}
    - id: two_inputs
      uses: core.registry.register
      in: {m: artifacts/m, n: artifacts/n}
      params: {name: clf}
    - id: stray_uri
      uses: core.registry.register
      in: {m: artifacts/m}
      params: {name: clf, uri: artifacts/other}
    - id: bad_bump
      uses: core.registry.register
      in: {m: artifacts/m}
      params: {name: clf, bump: huge}
    - id: with_out
      uses: core.registry.promote
      params: {name: clf, version: latest, tag: prod}
      out: artifacts/p
    - id: no_tag
      uses: core.registry.promote
      params: {name: clf, version: latest, colour: red}
"#;
    let d = diags(src);
    assert!(!has(&d, "step 'ok'"), "{d:?}");
    assert!(
        has(
            &d,
            "p.yaml:11:15: step 'two_inputs': 'core.registry.register' registers one of its inputs"
        ),
        "{d:?}"
    );
    assert!(
        has(
            &d,
            "p.yaml:15:15: step 'stray_uri': 'params.uri' must name one of the step's inputs"
        ),
        "{d:?}"
    );
    assert!(
        has(
            &d,
            "step 'bad_bump': 'params.bump' must be patch, minor or major, not 'huge'"
        ),
        "{d:?}"
    );
    assert!(
        has(
            &d,
            "p.yaml:23:12: step 'with_out': 'core.registry.promote' writes to the registry"
        ),
        "{d:?}"
    );
    assert!(has(&d, "step 'no_tag': unknown param 'colour'"), "{d:?}");
}

#[test]
fn a_pool_wide_validation_parses_from_a_flag() {
    let v: Validation = "replicas=3,quorum=2,tolerance=0.01,homogeneous"
        .parse()
        .expect("valid");
    assert_eq!(
        v,
        Validation {
            replicas: 3,
            quorum: 2,
            compare: Compare::Tolerance(0.01),
            homogeneous: true
        }
    );
    let v: Validation = "replicas=2".parse().expect("valid");
    assert_eq!((v.replicas, v.quorum, v.compare), (2, 2, Compare::Exact));
    assert!("replicas=2,quorum=3".parse::<Validation>().is_err());
    assert!("copies=2".parse::<Validation>().is_err());
}

#[test]
fn step_validation_is_read_and_checked() {
    let src = "pipeline:\n  name: x\n  steps:\n    - id: a\n      uses: exec\n      params: {cmd: [x]}\n      validation: {replicas: 3, quorum: 2, compare: {tolerance: 0.001}, homogeneous: true}\n    - id: b\n      uses: exec\n      params: {cmd: [x]}\n      validation: {replicas: 2, quorum: 5, colour: red}\n";
    let d = diags(src);
    assert!(
        has(
            &d,
            "step 'b': 'validation' needs 1 <= quorum <= replicas <= 16"
        ),
        "{d:?}"
    );
    assert!(has(&d, "unknown field 'colour'"), "{d:?}");
    assert!(!has(&d, "step 'a'"), "{d:?}");
}

#[test]
fn container_params_are_checked_with_their_position() {
    let ok = r#"pipeline:
  name: boxed
  steps:
    - id: a
      uses: exec
      params: {image: "registry.example/team/tool@sha256:0123", network: true, run: "true"}
      out: artifacts/a
"#;
    let l = load_str("p.yaml", ok, Path::new("/proj")).expect("valid");
    let p = ExecParams::from_json(&l.pipeline.steps[0].params).expect("params");
    assert_eq!(
        p.image.as_deref(),
        Some("registry.example/team/tool@sha256:0123")
    );
    assert!(p.network);
    for (bad, want) in [
        (r#"image: "--privileged""#, "is not an image reference"),
        (r#"image: "debian bookworm""#, "is not an image reference"),
        ("image: 3", "'params.image' must be a string"),
        (
            r#"network: "yes""#,
            "'params.network' must be true or false",
        ),
    ] {
        let src = format!(
            "pipeline:\n  name: b\n  steps:\n    - id: a\n      uses: exec\n      params: {{{bad}, run: \"true\"}}\n      out: artifacts/a\n"
        );
        let d = diags(&src);
        assert!(has(&d, want), "{bad}: {d:?}");
        assert!(d.iter().any(|x| x.starts_with("p.yaml:6:")), "{bad}: {d:?}");
    }
}

#[test]
fn a_nul_byte_is_refused_not_a_silent_end_of_file() {
    let src = "pipeline:\n  name: n\n  steps:\n    - id: a\n      uses: exec\n      params: {run: 'true'}\n\0    - id: b\n      uses: exec\n      params: {run: 'true'}\n";
    let all = diags(src);
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(
        all[0].starts_with("p.yaml:7:1: invalid YAML: a NUL byte"),
        "{all:?}"
    );
}

#[test]
fn an_alias_bomb_is_refused_with_file_line_and_column() {
    let mut src = String::from("x0: &a0 [q, q, q, q, q, q, q, q, q, q]\n");
    for i in 1..9 {
        let row = vec![format!("*a{}", i - 1); 10].join(", ");
        src.push_str(&format!("x{i}: &a{i} [{row}]\n"));
    }
    src.push_str("pipeline:\n  name: n\n  steps: []\n");
    let all = diags(&src);
    assert!(has(&all, "p.yaml:6:") && has(&all, "alias bomb"), "{all:?}");
}

#[test]
fn names_and_out_paths_too_long_for_the_file_system_are_refused_up_front() {
    let long = "s".repeat(300);
    let deep = vec!["d"; 3000].join("/");
    let src = format!(
        "pipeline:\n  name: {long}\n  steps:\n    - id: {long}\n      uses: exec\n      params: {{run: 'true'}}\n      out: artifacts/{long}\n    - id: b\n      uses: exec\n      params: {{run: 'true'}}\n      out: {deep}\n    - id: c\n      uses: exec\n      params: {{run: 'true'}}\n      out: {{{long}: artifacts/c}}\n"
    );
    let all = diags(&src);
    assert!(
        has(&all, "p.yaml:2:9: 'pipeline.name'") && has(&all, "at most 100"),
        "{all:?}"
    );
    assert!(
        has(&all, "p.yaml:4:11: step id is 300 characters"),
        "{all:?}"
    );
    assert!(
        has(&all, "p.yaml:7:12: step '") && has(&all, "300-byte component"),
        "{all:?}"
    );
    assert!(
        has(
            &all,
            "p.yaml:11:12: step 'b': output 'out' path is 5999 bytes long"
        ),
        "{all:?}"
    );
    assert!(has(&all, "p.yaml:15:13: step 'c': output name"), "{all:?}");
}

#[test]
fn slurm_overrides_go_with_scheduler_slurm_name_known_fields_and_refuse_what_would_break_a_batch_script()
 {
    let src = r#"
pipeline:
  name: cluster
  steps:
    - id: ok
      uses: exec
      scheduler: slurm
      slurm: {partition: gpu, account: proj-42, qos: normal, constraint: "a100&ib"}
      params: {cmd: [true]}
      out: artifacts/ok
    - id: local
      uses: exec
      slurm: {partition: gpu}
      params: {cmd: [true]}
      out: artifacts/local
    - id: bad
      uses: exec
      scheduler: slurm
      slurm: {partition: "gpu\n#SBATCH --uid=0", colour: red}
      params: {cmd: [true]}
      out: artifacts/bad
"#;
    let d = diags(src);
    let expect = [
        "p.yaml:13:14: step 'local': 'slurm' options go with 'scheduler: slurm'",
        "p.yaml:19:26: step 'bad': 'slurm.partition': \"gpu\\n#SBATCH --uid=0\" is not a Slurm name",
        "p.yaml:19:50: unknown field 'colour' in step 'bad''s slurm (expected one of: partition, account, qos, constraint)",
    ];
    for e in expect {
        assert!(has(&d, e), "missing {e:?} in:\n{}", d.join("\n"));
    }
    assert_eq!(d.len(), expect.len(), "extra: {}", d.join("\n"));
    let fine = src.split("    - id: local").next().unwrap_or_default();
    let loaded = load_str("p.yaml", fine, Path::new("/proj")).expect("loads");
    let step = &loaded.pipeline.steps[0];
    assert_eq!(step.slurm.get("partition").map(String::as_str), Some("gpu"));
    assert_eq!(
        step.slurm.get("constraint").map(String::as_str),
        Some("a100&ib")
    );
    assert_eq!(step.slurm.len(), 4);
}
