//! The ML runners for real, on the CPU, offline: the shipped `general_e2e` and `distill`
//! pipelines train with transformers' Trainer, evaluate, label over shards and register,
//! through the real `nexa` binary. The Python side is the repo's venv
//! (`python/setup.sh`: installed once, cached by its requirements' hash; CI installs it
//! before the tests).

mod common;

use common::{Project, pairs, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The interpreter of the repo's venv for `requirements` (`python/setup.sh`: installed
/// once, then instant).
fn venv(requirements: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("python/setup.sh"))
        .arg(root.join("python").join(requirements))
        .output()
        .expect("run python/setup.sh");
    assert!(
        out.status.success(),
        "python/setup.sh failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The interpreter with torch and transformers.
fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| venv("requirements.txt"))
}

/// The interpreter of the axolotl venv (axolotl pins its own torch and transformers).
fn python_axolotl() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| venv("requirements-axolotl.txt"))
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// A project holding a copy of the repo's `pipelines/` (its data and configs included).
fn project() -> Project {
    let p = Project::new();
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"),
        &p.path().join("pipelines"),
    );
    p
}

fn run(p: &Project, args: &[&str]) -> std::process::Output {
    p.cmd(args)
        .env("NEXA_PYTHON", python())
        .output()
        .expect("run nexa")
}

/// Stops the named services when the test ends, however it ends.
struct Services<'a>(&'a Project, &'a [&'a str]);

impl Drop for Services<'_> {
    fn drop(&mut self) {
        for name in self.1 {
            let _ = self.0.nexa(&["serve", "stop", name, "--grace", "2s"]);
        }
    }
}

/// The repo's general_e2e without its serve step (for runs that need no server).
fn without_serve(p: &Project) {
    let yaml = p.read("pipelines/general_e2e.yaml");
    let cut = yaml.find("\n    - id: serve").expect("a serve step");
    p.write("pipelines/general_e2e.yaml", &yaml[..cut + 1]);
}

fn json(p: &Project, rel: &str) -> serde_json::Value {
    serde_json::from_str(&p.read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn accuracy(p: &Project, rel: &str) -> f64 {
    json(p, rel)["accuracy"].as_f64().expect("accuracy")
}

#[test]
fn general_e2e_trains_evaluates_registers_promotes_and_serves_a_classifier_that_beats_chance() {
    let p = project();
    let _stop = Services(&p, &["reviews-classifier"]);
    let ran = run(&p, &["pipeline", "run", "pipelines/general_e2e.yaml"]);
    assert!(ran.status.success(), "{}", text(&ran));
    // Progress: from the driver's lines, through the worker, to the bar and the status.
    let shown = String::from_utf8_lossy(&ran.stderr);
    assert!(
        shown
            .lines()
            .any(|l| l.contains("train_hf") && l.contains("step 300/300, loss")),
        "{shown}"
    );
    assert!(shown.contains("400/400 records"), "{shown}");
    let st = p.status_json("pipelines/general_e2e.yaml");
    assert_eq!(st["steps"][0]["progress"]["step"], 300, "{st}");
    assert!(
        st["steps"][0]["progress"]["loss"].as_f64().is_some(),
        "{st}"
    );

    // The checkpoint: a save_pretrained folder with its metrics and arguments.
    let ck = "artifacts/checkpoints/hf_baseline";
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.json",
        "training_args.json",
        "COMPLETE",
    ] {
        assert!(p.path().join(ck).join(f).is_file(), "{ck}/{f} missing");
    }
    let meta = json(&p, &format!("{ck}/meta.json"));
    assert_eq!(meta["kind"], "checkpoint");
    assert_eq!(meta["labels"]["base_model"], "config:bert");
    assert_eq!(
        meta["labels"]["dataset"],
        "pipelines/data/reviews/train.jsonl"
    );
    assert!(
        meta["labels"]["dataset_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("blake3:")),
        "{meta}"
    );
    let metrics = json(&p, &format!("{ck}/metrics.json"));
    let curve = metrics["loss_curve"].as_array().expect("loss curve");
    assert!(curve.len() >= 5, "{metrics}");
    let first = curve[0]["loss"].as_f64().expect("loss");
    let last = curve[curve.len() - 1]["loss"].as_f64().expect("loss");
    assert!(last < first * 0.7, "the loss fell: {first} -> {last}");
    assert_eq!(metrics["steps"], 300);
    assert!(
        metrics["samples_per_second"]
            .as_f64()
            .is_some_and(|s| s > 0.0)
    );
    assert!(
        metrics["eval"]["accuracy"]
            .as_f64()
            .is_some_and(|a| a >= 0.75)
    );

    // The evaluation on the held-out test set, with what a person reads.
    let ev = "artifacts/eval/hf_baseline";
    let acc = accuracy(&p, &format!("{ev}/eval_report.json"));
    assert!(acc >= 0.75, "held-out accuracy {acc}");
    let report = json(&p, &format!("{ev}/eval_report.json"));
    for k in ["precision", "recall", "f1"] {
        assert!(report[k].as_f64().is_some_and(|v| v > 0.5), "{k}: {report}");
    }
    assert_eq!(report["samples"], 400);
    assert_eq!(
        p.read(&format!("{ev}/predictions.jsonl")).lines().count(),
        400
    );
    assert!(
        p.read(&format!("{ev}/confusion_matrix.svg"))
            .starts_with("<svg")
    );
    assert!(p.read(&format!("{ev}/report.md")).contains("accuracy"));
    assert_eq!(json(&p, &format!("{ev}/meta.json"))["kind"], "eval_report");

    // Registered and promoted.
    let out = p.nexa(&["models", "resolve", "reviews-classifier:prod"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hf_baseline"),
        "{}",
        text(&out)
    );

    // Served: healthy, answering, and stopped from a new process.
    assert!(
        String::from_utf8_lossy(&ran.stdout).contains("nexa serve stop reviews-classifier"),
        "{}",
        text(&ran)
    );
    let h = json(&p, "artifacts/serve/reviews-classifier/handle.json");
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["backend"], "hf_runtime");
    assert_eq!(
        h["model_digest"],
        json(&p, "artifacts/checkpoints/hf_baseline/meta.json")["hash"]
    );
    assert_eq!(
        json(&p, "artifacts/serve/reviews-classifier/meta.json")["kind"],
        "service"
    );
    let endpoint = h["endpoint"].as_str().expect("endpoint").to_string();
    assert_eq!(http(&endpoint, "GET", "/health", "").0, 200);
    let (status, models) = http(&endpoint, "GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "reviews-classifier");
    let (status, got) = http(
        &endpoint,
        "POST",
        "/v1/classify",
        r#"{"model": "reviews-classifier", "input": ["Overall the kettle was wonderful. It was a gift.", "Such a dreadful purchase. The box was blue."]}"#,
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["data"][0]["label"], "1", "{got}");
    assert_eq!(got["data"][1]["label"], "0", "{got}");
    let (status, err) = http(
        &endpoint,
        "POST",
        "/v1/completions",
        r#"{"model": "reviews-classifier", "prompt": "x"}"#,
    );
    assert_eq!(status, 400);
    assert_eq!(err["error"]["type"], "BadRequestError", "{err}");

    // From a new process: listed healthy, then stopped for good.
    let out = p.nexa(&["serve", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("healthy"),
        "{}",
        text(&out)
    );
    let out = p.nexa(&["serve", "stop", "reviews-classifier"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopped (SIGTERM)"),
        "{}",
        text(&out)
    );
    let pid = h["pid"].as_i64().expect("pid");
    let gone =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"));
    assert!(gone, "the server process is gone");
    assert!(
        std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err(),
        "nothing listens on {endpoint} any more"
    );
    let out = p.nexa(&["serve", "health", "reviews-classifier"]);
    assert!(!out.status.success(), "{}", text(&out));

    // Everything is cached but the service (a process, started afresh each run); an
    // edited eval driver re-runs exactly the eval step.
    let out = run(&p, &["pipeline", "run", "pipelines/general_e2e.yaml"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 complete, 4 skipped"),
        "{}",
        text(&out)
    );
    let drivers = p.path().join("drivers");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("python/nexa_runners"),
        &drivers,
    );
    let eval_py = drivers.join("evaluate.py");
    let edited = std::fs::read_to_string(&eval_py).expect("read") + "\n# edited\n";
    std::fs::write(&eval_py, edited).expect("write");
    let out = p
        .cmd(&["pipeline", "run", "pipelines/general_e2e.yaml"])
        .env("NEXA_PYTHON", python())
        .env("NEXA_RUNNERS_DIR", &drivers)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |id: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("train_hf").contains("SKIPPED"), "{stdout}");
    assert!(line("eval_hf").contains("COMPLETE"), "{stdout}");

    // A serve step that fails (its port is taken) leaves no handle behind: the artifact
    // an earlier run sealed names a server this run stopped, and is not taken for a
    // live one.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let yaml = p
        .read("pipelines/general_e2e.yaml")
        .replace("port: 0}", &format!("port: {port}, ready_timeout: 60}}"));
    p.write("pipelines/general_e2e.yaml", &yaml);
    let out = run(&p, &["pipeline", "run", "pipelines/general_e2e.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("serving reviews-classifier"),
        "{}",
        text(&out)
    );
    let out = p.nexa(&["serve", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("reviews-classifier"),
        "{}",
        text(&out)
    );
}

/// Rewrites a JSONL file with its labels shuffled (a fixed permutation).
fn shuffle_labels(path: &Path) {
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let mut labels: Vec<serde_json::Value> = rows.iter().map(|r| r["label"].clone()).collect();
    // A fixed pseudo-random permutation (an LCG), so the control is the same every run.
    let mut s: u64 = 0x5eed;
    for i in (1..labels.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        labels.swap(i, (s >> 33) as usize % (i + 1));
    }
    let text: String = rows
        .into_iter()
        .zip(labels)
        .map(|(mut r, l)| {
            r["label"] = l;
            format!("{r}\n")
        })
        .collect();
    std::fs::write(path, text).expect("write");
}

#[test]
fn with_shuffled_labels_the_same_pipeline_stays_near_chance_so_the_accuracy_means_learning() {
    let p = project();
    without_serve(&p);
    for f in ["train.jsonl", "test.jsonl"] {
        shuffle_labels(&p.path().join("pipelines/data/reviews").join(f));
    }
    let out = run(&p, &["pipeline", "run", "pipelines/general_e2e.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let acc = accuracy(&p, "artifacts/eval/hf_baseline/eval_report.json");
    assert!(
        (0.35..=0.65).contains(&acc),
        "shuffled-label accuracy {acc}"
    );
}

const SMALL_TRAIN: &str = r#"
pipeline:
  name: small
  steps:
    - id: train
      uses: runners.train
      in: {dataset: pipelines/data/reviews/train.jsonl}
      params:
        model: {config: {model_type: bert, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}
        max_length: 48
        batch_size: 32
        max_steps: 200
        learning_rate: 0.002
        logging_steps: 10
        seed: 7
      out: artifacts/small
"#;

#[test]
fn the_same_inputs_and_seed_give_the_same_metrics_on_cpu() {
    let runs: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let p = project();
            p.write("small.yaml", SMALL_TRAIN);
            let out = run(&p, &["pipeline", "run", "small.yaml"]);
            assert!(out.status.success(), "{}", text(&out));
            json(&p, "artifacts/small/metrics.json")
        })
        .collect();
    let loss = |m: &serde_json::Value| m["train_loss"].as_f64().expect("train_loss");
    assert!(
        (loss(&runs[0]) - loss(&runs[1])).abs() < 1e-6,
        "{} vs {}",
        loss(&runs[0]),
        loss(&runs[1])
    );
    assert_eq!(runs[0]["eval"]["accuracy"], runs[1]["eval"]["accuracy"]);
    assert_eq!(runs[0]["loss_curve"].as_array().map(Vec::len), Some(20));
    assert!(
        runs[0]["eval"]["accuracy"]
            .as_f64()
            .is_some_and(|a| a > 0.6)
    );
}

#[test]
fn a_runner_step_missing_its_model_or_dataset_is_refused_with_file_and_line() {
    let p = Project::new();
    p.write(
        "bad.yaml",
        "pipeline:\n  name: bad\n  steps:\n    - id: train\n      uses: runners.train\n      backend: hf\n      params: {epochs: 1}\n      out: artifacts/ckpt\n    - id: ev\n      uses: runners.eval\n      in: {checkpoint: artifacts/ckpt}\n      out: artifacts/ev\n",
    );
    let out = p.nexa(&["pipeline", "validate", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:7:"), "{err}");
    assert!(err.contains("needs a model"), "{err}");
    assert!(err.contains("needs a dataset"), "{err}");
    assert!(
        err.contains("bad.yaml:9:") && err.contains("'config'"),
        "{err}"
    );
}

#[test]
fn without_torch_the_step_fails_at_once_with_the_exact_pip_line() {
    let p = project();
    let bare = PathBuf::from("python3");
    let out = p
        .cmd(&["pipeline", "run", "pipelines/general_e2e.yaml"])
        .env("NEXA_PYTHON", &bare)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pip install torch==2.15.0"), "{err}");
    assert!(err.contains("python.torch"), "{err}");
    assert_eq!(
        p.statuses("pipelines/general_e2e.yaml")[0],
        ("train_hf".to_string(), "FAILED".to_string())
    );
}

#[test]
fn infer_over_four_shards_seals_each_and_a_failed_shard_reruns_alone() {
    let p = project();
    p.write("small.yaml", SMALL_TRAIN);
    let records = p.path().join("records.jsonl");
    let good = p.read("pipelines/data/reviews/unlabelled.jsonl");
    let lines: Vec<&str> = good.lines().take(200).collect();
    // Record 130 (in the third of four parts) is broken.
    let mut broken = lines.clone();
    broken[130] = "{not json";
    std::fs::write(&records, broken.join("\n") + "\n").expect("write");
    p.write(
        "infer.yaml",
        &(SMALL_TRAIN.to_string()
            + r#"    - id: label
      uses: runners.infer
      in: {checkpoint: artifacts/small, dataset: records.jsonl}
      shards: {over: dataset, count: 4}
      params: {batch_size: 32, max_length: 48}
      out: artifacts/labels
"#)
        .replace("name: small", "name: infer"),
    );
    let out = run(&p, &["pipeline", "run", "infer.yaml", "--slots", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 of 4 shards failed"), "{}", text(&out));
    assert!(err.contains("not JSON"), "{}", text(&out));
    let shard_status = |p: &Project| -> Vec<String> {
        p.status_json("infer.yaml")["steps"][1]["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .map(|s| s["status"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        shard_status(&p),
        ["COMPLETE", "COMPLETE", "FAILED", "COMPLETE"]
    );

    // Mend the record: only the failed shard runs again (the others are sealed and
    // cached on their own), and the step seals all four.
    std::fs::write(&records, lines.join("\n") + "\n").expect("write");
    let out = run(&p, &["pipeline", "run", "infer.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        shard_status(&p),
        ["SKIPPED", "SKIPPED", "COMPLETE", "SKIPPED"],
        "only shard 2 ran again"
    );
    let total: usize = (0..4)
        .map(|i| {
            p.read(&format!("artifacts/labels/shard-{i:05}/predictions.jsonl"))
                .lines()
                .count()
        })
        .sum();
    assert_eq!(total, 200);
    assert_eq!(
        json(&p, "artifacts/labels/meta.json")["kind"],
        "predictions"
    );
}

#[test]
fn distill_labels_with_the_teacher_trains_a_smaller_student_and_compares_them() {
    let p = project();
    let out = run(&p, &["pipeline", "run", "pipelines/distill.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.statuses("pipelines/distill.yaml"),
        pairs(&[
            ("teacher", "COMPLETE"),
            ("label", "COMPLETE"),
            ("student", "COMPLETE"),
            ("eval_teacher", "COMPLETE"),
            ("eval_student", "COMPLETE"),
            ("compare", "COMPLETE"),
        ])
    );
    let c = json(&p, "artifacts/distill/report/comparison.json");
    let teacher = c["teacher"]["accuracy"].as_f64().expect("teacher");
    let student = c["student"]["accuracy"].as_f64().expect("student");
    assert!(teacher >= 0.75, "{c}");
    assert!(
        student >= 0.7,
        "the student learned from the teacher's labels: {c}"
    );
    assert!(
        c["student_vs_teacher"]["size_ratio"]
            .as_f64()
            .is_some_and(|r| r < 0.5)
    );
    assert!(
        p.read("artifacts/distill/report/report.md")
            .contains("| student |")
    );
}

#[test]
fn on_the_mesh_a_gpu_train_step_goes_only_to_the_gpu_worker_and_the_embedded_cache_carries_over() {
    use common::mesh::{Coord, Worker, fake_gpu, remote, remote_status, step, wait_workers};
    let p = project();
    // A service is started embedded only (a mesh worker refuses runners.serve).
    without_serve(&p);
    // Embedded first: the cache that will move to the mesh.
    let out = run(&p, &["pipeline", "run", "pipelines/general_e2e.yaml"]);
    assert!(out.status.success(), "{}", text(&out));

    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let env = [("NEXA_PYTHON", python())];
    let _cpu = Worker::start_env(&url, &p.path().join("cpu"), 2, None, &[], &env);
    let gpu = Worker::start_env(
        &url,
        &p.path().join("gpu"),
        2,
        Some(&serde_json::json!([fake_gpu(0, "GPU-fake", "Fake L4", 24, (8, 9))]).to_string()),
        &[],
        &env,
    );
    wait_workers(&p, &coord, 2);
    common::mesh::wait_probed(&p, &coord, 2);
    let workers = common::mesh::workers_json(&p, &coord);
    assert!(
        workers
            .iter()
            .all(|w| w.to_string().contains("python.torch")),
        "both workers carry python.torch: {workers:?}"
    );

    // The same pipeline, its train step asking for a GPU.
    let gpu_yaml = p
        .read("pipelines/general_e2e.yaml")
        .replace(
            "      timeout: 30m\n",
            "      timeout: 30m\n      resources: {gpus: 1}\n",
        )
        .replace("name: general_e2e", "name: general_e2e_gpu");
    assert!(gpu_yaml.contains("resources: {gpus: 1}"));
    p.write("pipelines/general_e2e_gpu.yaml", &gpu_yaml);
    let out = remote(
        &p,
        &coord,
        &["pipeline", "run", "pipelines/general_e2e_gpu.yaml"],
    )
    .output()
    .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "pipelines/general_e2e_gpu.yaml");
    assert_eq!(step(&st, "train_hf")["worker"], gpu.public_key(), "{st}");
    // Progress crossed the mesh with the heartbeats.
    assert_eq!(step(&st, "train_hf")["progress"]["total"], 300, "{st}");
    let art = coord.data.join("projects/general_e2e_gpu/artifacts");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(art.join("eval/hf_baseline/eval_report.json")).expect("report"),
    )
    .expect("json");
    assert!(
        report["accuracy"].as_f64().is_some_and(|a| a >= 0.75),
        "{report}"
    );

    // The embedded run's artifacts, moved to the coordinator's project: the mesh finds
    // them under the same cache keys and runs nothing.
    let keys = |st: &serde_json::Value, id: &str| step(st, id)["cache_key"].clone();
    let embedded = p.status_json("pipelines/general_e2e.yaml");
    copy_tree(
        &p.path().join("artifacts"),
        &coord.data.join("projects/general_e2e/artifacts"),
    );
    let out = remote(
        &p,
        &coord,
        &["pipeline", "run", "pipelines/general_e2e.yaml"],
    )
    .output()
    .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let st = remote_status(&p, &coord, "pipelines/general_e2e.yaml");
    for id in ["train_hf", "eval_hf"] {
        assert_eq!(step(&st, id)["status"], "SKIPPED", "{id}: {st}");
        assert_eq!(keys(&st, id), keys(&embedded, id), "{id}");
    }
}

/// A plain HTTP/1.1 request: (status, body as JSON or Null).
fn http(endpoint: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let json = buf
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Trains a 1-layer GPT-2 built from a config for `steps` steps into `artifacts/lm`.
fn train_tiny_lm(p: &Project, steps: u32) {
    p.write(
        "lm.yaml",
        &format!(
            r#"
pipeline:
  name: lm
  steps:
    - id: lm
      uses: runners.train
      in: {{dataset: pipelines/data/reviews/train.jsonl}}
      params:
        model: {{config: {{model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2}}}}
        task: causal-lm
        max_length: 48
        batch_size: 16
        max_steps: {steps}
        learning_rate: 0.003
        logging_steps: 10
      out: artifacts/lm
"#
        ),
    );
    let out = run(p, &["pipeline", "run", "lm.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn serve_start_runs_an_openai_compatible_lm_server_and_a_dead_one_is_reported_unhealthy() {
    let p = project();
    train_tiny_lm(&p, 30);
    let ppl = json(&p, "artifacts/lm/metrics.json")["eval"]["perplexity"].as_f64();
    assert!(ppl.is_some_and(|v| v > 1.0), "{ppl:?}");

    let out = run(
        &p,
        &[
            "serve",
            "start",
            "--backend",
            "hf_runtime",
            "--model",
            "artifacts/lm",
            "--name",
            "tiny-lm",
            "--port",
            "0",
        ],
    );
    let _stop = Services(&p, &["tiny-lm"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let endpoint = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("tiny-lm "))
        .expect("start prints the name and endpoint")
        .trim()
        .to_string();
    let (status, c) = http(
        &endpoint,
        "POST",
        "/v1/completions",
        r#"{"model": "tiny-lm", "prompt": "The kettle is", "max_tokens": 5}"#,
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["choices"][0]["text"].is_string(), "{c}");
    let used = c["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=5).contains(&used), "{c}");
    let (status, chat) = http(
        &endpoint,
        "POST",
        "/v1/chat/completions",
        r#"{"model": "tiny-lm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let (status, err) = http(
        &endpoint,
        "POST",
        "/v1/completions",
        r#"{"model": "gpt-4", "prompt": "x"}"#,
    );
    assert_eq!(status, 404);
    assert_eq!(err["error"]["type"], "NotFoundError", "{err}");
    assert_eq!(err["error"]["code"], 404);

    // A server that dies is reported unhealthy, not silently gone.
    let h = json(&p, "artifacts/serve/tiny-lm/handle.json");
    let pid = h["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    common::mesh::wait_for(
        "the server to die",
        std::time::Duration::from_secs(10),
        || std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err(),
    );
    let out = p.nexa(&["serve", "health", "tiny-lm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unhealthy"),
        "{}",
        text(&out)
    );
    let out = p.nexa(&["serve", "stop", "tiny-lm"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already stopped"),
        "{}",
        text(&out)
    );
}

#[test]
fn vllm_is_built_with_the_seeds_arguments_and_refused_where_no_worker_has_it() {
    let p = project();
    let out = p.nexa(&[
        "serve",
        "start",
        "--backend",
        "vllm",
        "--model",
        "meta-llama/Llama-3.2-1B",
        "--name",
        "llama",
        "--port",
        "8011",
        "--tensor-parallel",
        "2",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let h = json(&p, "artifacts/serve/llama/handle.json");
    assert_eq!(h["status"], "dry_run");
    let cmd: Vec<&str> = h["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(
        cmd[1..],
        [
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "meta-llama/Llama-3.2-1B",
            "--host",
            "127.0.0.1",
            "--port",
            "8011",
            "--served-model-name",
            "llama",
            "--tensor-parallel-size",
            "2"
        ]
    );
    // For real, it needs a worker with vllm: none here, and the error says what to do.
    let out = p.nexa(&[
        "serve",
        "start",
        "--backend",
        "vllm",
        "--model",
        "meta-llama/Llama-3.2-1B",
        "--name",
        "llama2",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("label python.vllm") && err.contains("pip install vllm"),
        "{err}"
    );
}

#[test]
fn axolotl_trains_a_lora_adapter_on_a_tiny_model_and_refuses_a_bad_config_before_training() {
    let p = project();
    let ax = |file: &str| {
        p.cmd(&["pipeline", "run", file])
            .env("NEXA_PYTHON", python_axolotl())
            .output()
            .expect("run nexa")
    };
    let out = ax("pipelines/tiny_axolotl_demo.yaml");
    assert!(out.status.success(), "{}", text(&out));
    let lora = "artifacts/axolotl/lora";
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "axolotl_config.yml",
        "metrics.json",
    ] {
        assert!(p.path().join(lora).join(f).is_file(), "{lora}/{f} missing");
    }
    assert_eq!(json(&p, &format!("{lora}/meta.json"))["kind"], "checkpoint");
    let m = json(&p, &format!("{lora}/metrics.json"));
    assert_eq!(m["steps"], 5, "{m}");
    assert_eq!(m["adapter"], "lora");
    let adapter = json(&p, &format!("{lora}/adapter_config.json"));
    assert_eq!(adapter["r"], 4, "the recipe's lora_r: {adapter}");
    // Nexa set the staged paths, the recipe and params.config were merged.
    let merged = p.read(&format!("{lora}/axolotl_config.yml"));
    assert!(
        merged.contains("max_steps: 5") && merged.contains("lora_r: 4"),
        "{merged}"
    );
    assert!(!merged.contains("pipelines/axolotl"), "{merged}");

    // A bad value: axolotl's loader refuses it, and nothing is trained.
    let bad = p
        .read("pipelines/tiny_axolotl_demo.yaml")
        .replace(
            "config: {max_steps: 5}",
            "config: {max_steps: 5, micro_batch_size: lots}",
        )
        .replace("artifacts/axolotl/lora", "artifacts/axolotl/bad");
    p.write("bad.yaml", &bad);
    let out = ax("bad.yaml");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("axolotl refused the config"), "{err}");
    assert!(err.contains("micro_batch_size"), "{err}");
    assert!(!p.path().join("artifacts/axolotl/bad").exists());
    // The kept log is this failed run's (not the earlier one's), and trained nothing.
    let log = p.read(".nexa_state/tiny_axolotl_demo/logs/lora.log");
    assert!(log.contains("axolotl refused the config"), "{log}");
    assert!(!log.contains("Starting trainer"), "{log}");
}

#[test]
fn a_lora_run_on_csv_saves_the_merged_model_and_its_adapter_and_eval_reads_parquet() {
    let p = project();
    // The reviews as CSV (training) and Parquet (evaluation), written here.
    let rows: Vec<serde_json::Value> = p
        .read("pipelines/data/reviews/train.jsonl")
        .lines()
        .take(600)
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let mut csv = String::from("id,label,text\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},\"{}\"\n",
            r["id"].as_str().expect("id"),
            r["label"],
            r["text"].as_str().expect("text").replace('"', "\"\"")
        ));
    }
    p.write("data/train.csv", &csv);
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import json, sys, pyarrow as pa, pyarrow.parquet as pq\n\
             rows = [json.loads(l) for l in open(sys.argv[1])][:200]\n\
             pq.write_table(pa.Table.from_pylist(rows), sys.argv[2])",
        )
        .arg(p.path().join("pipelines/data/reviews/test.jsonl"))
        .arg(p.path().join("data/test.parquet"))
        .output()
        .expect("write parquet");
    assert!(out.status.success(), "{}", text(&out));
    p.write(
        "lora.yaml",
        r#"
pipeline:
  name: lora
  steps:
    - id: base
      uses: runners.train
      in: {dataset: data/train.csv}
      params:
        model: {config: {model_type: bert, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}}
        max_length: 48
        batch_size: 32
        max_steps: 150
        learning_rate: 0.002
      out: artifacts/base
    - id: tune
      uses: runners.train
      in: {model: artifacts/base, dataset: data/train.csv}
      params:
        lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [query, value]}
        max_length: 48
        batch_size: 32
        max_steps: 30
        learning_rate: 0.002
      out: artifacts/tuned
    - id: eval
      uses: runners.eval
      in: {checkpoint: artifacts/tuned, dataset: data/test.parquet}
      params: {max_length: 48}
      out: artifacts/eval
"#,
    );
    let out = run(&p, &["pipeline", "run", "lora.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [
        "config.json",
        "model.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(p.path().join("artifacts/tuned").join(f).is_file(), "{f}");
    }
    let m = json(&p, "artifacts/tuned/metrics.json");
    assert_eq!(m["lora"], true, "{m}");
    assert_eq!(m["base_model"], "input:model", "{m}");
    let adapter = json(&p, "artifacts/tuned/adapter/adapter_config.json");
    assert_eq!(adapter["r"], 4, "{adapter}");
    let labels = json(&p, "artifacts/tuned/meta.json")["labels"].clone();
    assert!(
        labels["base_model"]
            .as_str()
            .is_some_and(|b| b.starts_with("artifacts/base (blake3:")),
        "{labels}"
    );
    let report = json(&p, "artifacts/eval/eval_report.json");
    assert_eq!(report["samples"], 200, "{report}");
    assert!(
        report["accuracy"].as_f64().is_some_and(|a| a >= 0.7),
        "{report}"
    );
}

#[test]
fn a_hub_model_without_the_network_fails_naming_what_to_prefetch() {
    let p = project();
    let home = p.path().join("hf-home");
    p.write(
        "hub.yaml",
        "pipeline:\n  name: hub\n  steps:\n    - id: train\n      uses: runners.train\n      in: {dataset: pipelines/data/reviews/train.jsonl}\n      params: {model: distilbert-base-uncased, max_steps: 1}\n      out: artifacts/ckpt\n",
    );
    let out = p
        .cmd(&["pipeline", "run", "hub.yaml"])
        .env("NEXA_PYTHON", python())
        // An empty hub cache: the model is not there, and the step has no network.
        .env("HF_HOME", &home)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot load model 'distilbert-base-uncased'"),
        "{err}"
    );
    assert!(
        err.contains("huggingface-cli download distilbert-base-uncased")
            && err.contains("params.network: true"),
        "{err}"
    );
    assert!(!p.path().join("artifacts/ckpt").exists());
}

/// `nexa serve list --json --coordinator`: the named service's row.
fn mesh_service(p: &Project, coord: &common::mesh::Coord, name: &str) -> serde_json::Value {
    let out = common::mesh::remote(p, coord, &["serve", "list", "--json"])
        .output()
        .expect("serve list");
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    rows.into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn on_the_mesh_a_service_holds_its_gpu_reports_its_health_in_heartbeats_and_stops_from_a_new_process()
 {
    use common::mesh::{Coord, Worker, fake_gpu, remote, wait_for, wait_workers};
    use std::time::Duration;
    let p = project();
    train_tiny_lm(&p, 5);

    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let env = [("NEXA_PYTHON", python())];
    // The one GPU worker hosts services; the other does not, and never gets one.
    let host = Worker::start_env(
        &url,
        &p.path().join("host"),
        2,
        Some(&serde_json::json!([fake_gpu(0, "GPU-svc", "Fake L4", 24, (8, 9))]).to_string()),
        &["--services", "--name", "host"],
        &env,
    );
    let _plain = Worker::start_env(
        &url,
        &p.path().join("plain"),
        2,
        None,
        &["--name", "plain"],
        &env,
    );
    wait_workers(&p, &coord, 2);
    let start = |name: &str, gpus: &str| {
        let out = remote(
            &p,
            &coord,
            &[
                "serve",
                "start",
                "--model",
                "artifacts/lm",
                "--name",
                name,
                "--port",
                "0",
                "--gpus",
                gpus,
            ],
        )
        .env("NEXA_PYTHON", python())
        .output()
        .expect("serve start");
        assert!(out.status.success(), "{}\n{}", text(&out), host.log());
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("start prints the name and endpoint: {stdout}"))
            .trim()
            .to_string()
    };
    let endpoint = start("mesh-lm", "1");
    let row = mesh_service(&p, &coord, "mesh-lm");
    assert_eq!(row["state"], "healthy", "{row}");
    assert_eq!(row["worker"], "host", "{row}");
    assert_eq!(row["gpus"], "GPU-svc", "the job's GPU: {row}");
    let (status, c) = http(
        &endpoint,
        "POST",
        "/v1/completions",
        r#"{"model": "mesh-lm", "prompt": "The kettle is", "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "text_completion", "{c}");

    // While it runs, the service holds its GPU: a GPU job waits for it.
    p.write(
        "gpu_job.yaml",
        r#"
pipeline:
  name: gpu_job
  steps:
    - id: g
      uses: exec
      params: {run: 'echo "$CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/gpu.txt"'}
      resources: {gpus: 1}
      out: artifacts/g
"#,
    );
    let mut gpu_run = remote(&p, &coord, &["pipeline", "run", "gpu_job.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gpu run");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        gpu_run.try_wait().expect("wait").is_none(),
        "the GPU job ran while the service held the only GPU"
    );

    // A server that dies is reported unhealthy by its worker's heartbeats.
    let _second = start("mesh-lm-2", "0");
    let second = mesh_service(&p, &coord, "mesh-lm-2");
    assert_eq!(second["state"], "healthy", "{second}");
    let pid = second["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for("the dead server reported", Duration::from_secs(15), || {
        mesh_service(&p, &coord, "mesh-lm-2")["state"] == "unhealthy"
    });
    let row = mesh_service(&p, &coord, "mesh-lm-2");
    assert!(
        row["detail"].as_str().is_some_and(|d| d.contains("gone")),
        "{row}"
    );
    let out = remote(&p, &coord, &["serve", "health", "mesh-lm-2"])
        .output()
        .expect("health");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // `stop` from a new process: the worker ends the server and frees its GPU, and the
    // waiting GPU job runs.
    let out = remote(&p, &coord, &["serve", "stop", "mesh-lm", "--grace", "5s"])
        .output()
        .expect("stop");
    assert!(out.status.success(), "{}\n{}", text(&out), host.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mesh-lm: stopped"),
        "{}",
        text(&out)
    );
    assert!(
        std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err(),
        "the server still answers after stop"
    );
    let done = gpu_run.wait_with_output().expect("gpu run");
    assert!(done.status.success(), "{}", text(&done));
    assert_eq!(
        std::fs::read_to_string(coord.data.join("projects/gpu_job/artifacts/g/gpu.txt"))
            .expect("gpu.txt")
            .trim(),
        "GPU-svc"
    );
    let out = remote(&p, &coord, &["serve", "stop", "mesh-lm-2"])
        .output()
        .expect("stop");
    assert!(out.status.success(), "{}", text(&out));
    let out = remote(&p, &coord, &["serve", "list"])
        .output()
        .expect("list");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no services");
}

#[test]
fn the_axolotl_driver_refuses_a_run_that_saved_no_weights_and_takes_sharded_ones() {
    // axolotl itself always saves on a CPU run, so the refusal is exercised on the
    // driver's own check, over real folders: what a run left is either weights (one
    // file or save_pretrained's shards) or a refusal, never a sealed empty checkpoint.
    let p = Project::new();
    let script = r#"
import os, sys, train_axolotl as t
d = sys.argv[1]
open(os.path.join(d, "config.json"), "w").write("{}")
open(os.path.join(d, "README.md"), "w").write("x")
try:
    t.require_weights(d)
    print("sealed an empty checkpoint")
    sys.exit(1)
except t.RunnerError as e:
    assert "refusing to seal an empty checkpoint" in str(e), e
for n in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]:
    open(os.path.join(d, n), "w").write("x")
t.require_weights(d)
assert t.weights_in(d) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], t.weights_in(d)
e = os.path.join(d, "lora"); os.mkdir(e)
open(os.path.join(e, "adapter_model.safetensors"), "w").write("x")
assert t.weights_in(e) == ["adapter_model.safetensors"]
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(p.path())
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/nexa_runners"))
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
