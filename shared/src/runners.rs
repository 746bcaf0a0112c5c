//! The ML runners (`runners.train`, `runners.eval`, `runners.infer`, `runners.serve`): which Python
//! packages each needs, how their params are checked, and the driver scripts that ship
//! with this build.
//!
//! A runner step travels the same job / lease / signed result / artifact path as `exec`:
//! the planner stages the runner's driver folder as one more input (named
//! [`RUNNER_INPUT`], so its content digest is part of the cache key and editing a driver
//! re-runs exactly the steps that use it), and the worker runs
//! `$NEXA_PYTHON <driver>/run.py <uses>` with the usual `NEXA_IN_*` / `NEXA_OUT` /
//! `NEXA_PARAMS` variables. The drivers drive the tools ML users already use
//! (transformers' `Trainer`, peft) and are kept in `python/nexa_runners/`.

use crate::handlers;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `runners.train`.
pub const TRAIN: &str = "runners.train";
/// `runners.eval`.
pub const EVAL: &str = "runners.eval";
/// `runners.infer` (Nexa's addition: batch inference over shards).
pub const INFER: &str = "runners.infer";
/// `runners.serve`.
pub const SERVE: &str = "runners.serve";

/// The input name the driver folder is staged under (reserved: a step may not use it).
pub const RUNNER_INPUT: &str = "_runner";

/// A label value meaning "present, any version" in [`crate::hardware::Requirements`].
pub const ANY: &str = "*";

/// The Python environment the drivers need, pinned (also `python/requirements.txt`).
pub const REQUIREMENTS: &str = include_str!("../../python/requirements.txt");

const RUN_PY: &str = include_str!("../../python/nexa_runners/run.py");
const COMMON_PY: &str = include_str!("../../python/nexa_runners/common.py");
const DATA_PY: &str = include_str!("../../python/nexa_runners/data.py");
const TRAIN_HF_PY: &str = include_str!("../../python/nexa_runners/train_hf.py");
const TRAIN_AXOLOTL_PY: &str = include_str!("../../python/nexa_runners/train_axolotl.py");
const EVALUATE_PY: &str = include_str!("../../python/nexa_runners/evaluate.py");
const INFER_PY: &str = include_str!("../../python/nexa_runners/infer.py");
const CHECKPOINT_PY: &str = include_str!("../../python/nexa_runners/checkpoint.py");
const SERVE_PY: &str = include_str!("../../python/nexa_runners/serve.py");
const HF_RUNTIME_PY: &str = include_str!("../../python/nexa_runners/hf_runtime.py");

/// True for the `uses` names this module runs.
pub fn is_runner(uses: &str) -> bool {
    matches!(uses, TRAIN | EVAL | INFER | SERVE)
}

/// The artifact kind a runner's output is sealed as.
pub fn kind(uses: &str) -> &'static str {
    match uses {
        TRAIN => "checkpoint",
        EVAL => "eval_report",
        INFER => "predictions",
        _ => "service",
    }
}

/// The backends each runner has, and whether this build runs them. The first is the
/// default.
pub fn backends(uses: &str) -> &'static [(&'static str, handlers::Availability)] {
    use handlers::Availability::*;
    match uses {
        TRAIN => &[("hf", Available), ("axolotl", Available)],
        EVAL | INFER => &[("hf", Available)],
        SERVE => &[("hf_runtime", Available), ("vllm", Available)],
        _ => &[],
    }
}

/// The backend a step runs: the one it names, or the runner's default.
pub fn backend_of<'a>(uses: &str, backend: Option<&'a str>) -> Option<&'a str> {
    backend.or_else(|| backends(uses).first().map(|(b, _)| *b))
}

/// True for a step that is never reused from the cache: a service is a running
/// process, not content, so each run starts it afresh.
pub fn never_cached(uses: &str) -> bool {
    uses == SERVE
}

/// The Python packages (labels `python.<package>`) a runner step needs on its worker.
pub fn packages(uses: &str, backend: Option<&str>, params: &Value) -> Vec<&'static str> {
    if uses == SERVE && params.get("dry_run").and_then(Value::as_bool) == Some(true) {
        // Records the command only: any worker can.
        return Vec::new();
    }
    let mut p = vec!["torch", "transformers"];
    match backend_of(uses, backend) {
        Some("axolotl") => p.push("axolotl"),
        Some("vllm") => p = vec!["vllm"],
        _ => {}
    }
    if params.get("lora").is_some_and(|l| !l.is_null()) {
        p.push("peft");
    }
    p
}

/// The `pip install` line that gives a worker these packages, with this build's pins.
pub fn pip_line(packages: &[&str]) -> String {
    let pinned: Vec<String> = packages
        .iter()
        .map(|p| {
            REQUIREMENTS
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&format!("{p}==")))
                .map_or_else(|| (*p).to_string(), str::to_string)
        })
        .collect();
    format!("pip install {}", pinned.join(" "))
}

/// True when every one of `packages` is pinned in [`REQUIREMENTS`] (so the repo's
/// `python/setup.sh` installs it).
pub fn in_setup(packages: &[&str]) -> bool {
    packages.iter().all(|p| {
        REQUIREMENTS
            .lines()
            .any(|l| l.trim().starts_with(&format!("{p}==")))
    })
}

/// The label a worker carries for a Python package.
pub fn label(package: &str) -> String {
    format!("python.{package}")
}

const TRAIN_PARAMS: &[&str] = &[
    "model",
    "tokenizer",
    "dataset",
    "dataset_config",
    "dataset_split",
    "task",
    "text_column",
    "label_column",
    "num_labels",
    "max_length",
    "train_samples",
    "eval_samples",
    "eval_fraction",
    "batch_size",
    "eval_batch_size",
    "epochs",
    "max_steps",
    "grad_accumulation",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "seed",
    "fp16",
    "bf16",
    "gradient_checkpointing",
    "tokenizer_vocab_size",
    "lora",
    "network",
    "tags",
];
const AXOLOTL_PARAMS: &[&str] = &["recipe", "config", "model", "text_column", "network"];
const EVAL_PARAMS: &[&str] = &[
    "text_column",
    "label_column",
    "batch_size",
    "max_length",
    "max_samples",
    "task",
    "network",
];
const SERVE_PARAMS: &[&str] = &[
    "model",
    "name",
    "host",
    "port",
    "tensor_parallel",
    "dry_run",
    "ready_timeout",
    "network",
];
const INFER_PARAMS: &[&str] = &[
    "text_column",
    "id_column",
    "batch_size",
    "max_length",
    "task",
    "network",
];

/// Checks a runner step's params and inputs; each problem is one message (the caller
/// adds the position).
pub fn check(uses: &str, backend: Option<&str>, params: &Value, inputs: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    if inputs.contains(&RUNNER_INPUT) {
        errors.push(format!(
            "input name '{RUNNER_INPUT}' is reserved (Nexa stages the runner's driver under it)"
        ));
    }
    let known = backends(uses);
    if let Some(b) = backend
        && !known.iter().any(|(k, _)| *k == b)
    {
        let names: Vec<&str> = known.iter().map(|(k, _)| *k).collect();
        errors.push(format!(
            "'{uses}' has no backend '{b}' (expected {})",
            names.join(" or ")
        ));
    }
    let obj = match params {
        Value::Null => serde_json::Map::new(),
        Value::Object(o) => o.clone(),
        _ => {
            errors.push("'params' must be a mapping".into());
            return errors;
        }
    };
    let axolotl = uses == TRAIN && backend_of(uses, backend) == Some("axolotl");
    let allowed = match uses {
        TRAIN if axolotl => AXOLOTL_PARAMS,
        TRAIN => TRAIN_PARAMS,
        EVAL => EVAL_PARAMS,
        INFER => INFER_PARAMS,
        _ => SERVE_PARAMS,
    };
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            errors.push(format!(
                "unknown param '{k}' for '{uses}' (expected {})",
                allowed.join(", ")
            ));
        }
    }
    let has = |name: &str| inputs.contains(&name);
    let task = obj.get("task").and_then(Value::as_str);
    if let Some(t) = task
        && !matches!(t, "sequence-classification" | "causal-lm")
    {
        errors.push(format!(
            "'params.task' must be sequence-classification or causal-lm, not '{t}'"
        ));
    }
    match uses {
        TRAIN if axolotl => {
            let recipe = obj
                .get("recipe")
                .and_then(Value::as_str)
                .unwrap_or("recipe");
            if !has(recipe) && !obj.get("config").is_some_and(Value::is_object) {
                errors.push(
                    "runners.train backend axolotl needs a recipe: an input named 'recipe' (or \
                     the input params.recipe names), or params.config"
                        .into(),
                );
            }
            if obj.get("config").is_some_and(|c| !c.is_object()) {
                errors.push("'params.config' must be a mapping (axolotl config keys)".into());
            }
        }
        TRAIN => {
            match obj.get("model") {
                None if !has("model") => errors.push(
                    "runners.train needs a model: an input named 'model' (a save_pretrained \
                     folder) or 'params.model' (a hub id such as distilbert-base-uncased, or \
                     {config: {model_type: ...}} to train one from scratch)"
                        .into(),
                ),
                Some(_) if has("model") => errors.push(
                    "the model is given twice: as the input 'model' and as 'params.model'".into(),
                ),
                Some(Value::String(s)) if s.is_empty() => {
                    errors.push("'params.model' must not be empty".into());
                }
                Some(Value::String(_)) | None => {}
                Some(Value::Object(m)) => match m.get("config") {
                    Some(Value::Object(c)) if c.get("model_type").is_some_and(Value::is_string) => {
                    }
                    _ => errors.push(
                        "'params.model' as a mapping must be {config: {model_type: ..., ...}}"
                            .into(),
                    ),
                },
                Some(_) => errors
                    .push("'params.model' must be a hub id or {config: {model_type: ...}}".into()),
            }
            match obj.get("dataset") {
                None if !has("dataset") => errors.push(
                    "runners.train needs a dataset: an input named 'dataset' (JSONL, CSV or \
                     Parquet files) or 'params.dataset' (a hub id such as glue, with \
                     dataset_config)"
                        .into(),
                ),
                Some(_) if has("dataset") => errors.push(
                    "the dataset is given twice: as the input 'dataset' and as 'params.dataset'"
                        .into(),
                ),
                Some(Value::String(_)) | None => {}
                Some(_) => errors.push("'params.dataset' must be a hub id".into()),
            }
            if let Some(l) = obj.get("lora")
                && !l.is_object()
            {
                errors.push(
                    "'params.lora' must be a mapping {r, alpha, dropout, target_modules}".into(),
                );
            }
        }
        EVAL => {
            if !has("checkpoint") {
                errors.push(
                    "runners.eval needs an input named 'checkpoint' (a save_pretrained folder)"
                        .into(),
                );
            }
            if !has("config") && !has("dataset") {
                errors.push(
                    "runners.eval needs an input named 'config' (a YAML naming the dataset, \
                     split, metrics and batch size) or 'dataset' (JSONL, CSV or Parquet files)"
                        .into(),
                );
            }
        }
        INFER => {
            for need in ["checkpoint", "dataset"] {
                if !has(need) {
                    errors.push(format!("runners.infer needs an input named '{need}'"));
                }
            }
        }
        SERVE => {
            let named = obj
                .get("model")
                .is_some_and(|m| m.as_str().is_some_and(|s| !s.is_empty()));
            if !named && !has("model") && !has("checkpoint") {
                errors.push(
                    "runners.serve needs a model: an input named 'model' or 'checkpoint' (a \
                     save_pretrained folder), or 'params.model' (a hub id)"
                        .into(),
                );
            }
            if let Some(port) = obj.get("port")
                && port.as_u64().is_none_or(|p| p > 65_535)
            {
                errors.push("'params.port' must be a port number (0: any free port)".into());
            }
            if let Some(tp) = obj.get("tensor_parallel")
                && tp.as_u64().is_none_or(|t| t < 1)
            {
                errors.push("'params.tensor_parallel' must be a whole number, at least 1".into());
            }
            if let Some(name) = obj.get("name")
                && !name.as_str().is_some_and(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                })
            {
                errors.push("'params.name' must be 1-64 letters, digits, '-', '_' or '.'".into());
            }
        }
        _ => {}
    }
    errors
}

/// Why a runner step cannot run in this build, if it cannot (a backend that is still to
/// come).
pub fn unavailable(uses: &str, backend: Option<&str>) -> Option<String> {
    let b = backend_of(uses, backend)?;
    let avail = backends(uses).iter().find(|(k, _)| *k == b)?.1;
    (avail != handlers::Availability::Available).then(|| {
        format!(
            "'{uses}' backend '{b}' is not available yet in this build (use 'exec' to run it \
             meanwhile)"
        )
    })
}

/// The params the worker's job gets: the step's, with its backend added (the driver
/// needs it; the cache key has it already).
pub fn job_params(uses: &str, backend: Option<&str>, params: &Value) -> Value {
    let mut obj = params.as_object().cloned().unwrap_or_default();
    if let Some(b) = backend_of(uses, backend) {
        obj.insert("backend".into(), Value::String(b.to_string()));
    }
    Value::Object(obj)
}

/// The driver files a runner needs, as `(file name, text)`: only its backend's, so
/// editing one backend's driver re-runs only the steps that use that backend.
fn files(uses: &str, backend: Option<&str>) -> Vec<(&'static str, &'static str)> {
    let mut f = vec![
        ("run.py", RUN_PY),
        ("common.py", COMMON_PY),
        ("requirements.txt", REQUIREMENTS),
    ];
    match uses {
        TRAIN if backend_of(uses, backend) == Some("axolotl") => {
            f.push(("train_axolotl.py", TRAIN_AXOLOTL_PY));
        }
        TRAIN => f.extend([("data.py", DATA_PY), ("train_hf.py", TRAIN_HF_PY)]),
        EVAL => f.extend([
            ("data.py", DATA_PY),
            ("checkpoint.py", CHECKPOINT_PY),
            ("evaluate.py", EVALUATE_PY),
        ]),
        INFER => f.extend([
            ("data.py", DATA_PY),
            ("checkpoint.py", CHECKPOINT_PY),
            ("infer.py", INFER_PY),
        ]),
        SERVE => f.extend([
            ("checkpoint.py", CHECKPOINT_PY),
            ("serve.py", SERVE_PY),
            ("hf_runtime.py", HF_RUNTIME_PY),
        ]),
        _ => {}
    }
    f
}

/// Writes the driver folder of `uses` under `root` (once per content: the folder's name
/// carries a digest of what it holds) and returns its path. With `NEXA_RUNNERS_DIR` set
/// to a folder holding the same file names (this repo's `python/nexa_runners`), those
/// files are used instead of the built-in ones, so a driver can be edited and re-run
/// without a rebuild.
pub fn materialise(root: &Path, uses: &str, backend: Option<&str>) -> crate::Result<PathBuf> {
    let overrides = std::env::var_os("NEXA_RUNNERS_DIR").map(PathBuf::from);
    let mut contents: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, text) in files(uses, backend) {
        let bytes = match &overrides {
            Some(dir) if name != "requirements.txt" => {
                let p = dir.join(name);
                std::fs::read(&p).map_err(|e| crate::Error::io("read", &p, e))?
            }
            _ => text.as_bytes().to_vec(),
        };
        contents.push((name, bytes));
    }
    let mut h = blake3::Hasher::new();
    for (name, bytes) in &contents {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let hex = h.finalize().to_hex();
    let dir = root.join(format!("{}-{}", uses.replace('.', "-"), &hex[..16]));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(|e| crate::Error::io("create", root, e))?;
    let tmp = crate::artifact::tmp_path(&dir);
    crate::artifact::remove_tree(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| crate::Error::io("create", &tmp, e))?;
    for (name, bytes) in &contents {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).map_err(|e| crate::Error::io("write", &p, e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another run wrote the same content first.
        Err(_) if dir.is_dir() => {
            let _ = crate::artifact::remove_tree(&tmp);
            Ok(dir)
        }
        Err(e) => Err(crate::Error::io("rename", &tmp, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_train_step_without_a_model_or_dataset_is_refused_not_guessed() {
        let e = check(TRAIN, Some("hf"), &json!({}), &[]);
        assert!(e.iter().any(|m| m.contains("needs a model")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("needs a dataset")), "{e:?}");
        let ok = check(
            TRAIN,
            None,
            &json!({"model": {"config": {"model_type": "bert"}}}),
            &["dataset"],
        );
        assert!(ok.is_empty(), "{ok:?}");
        let typo = check(
            TRAIN,
            None,
            &json!({"model": "x", "dataset": "y", "epoch": 1}),
            &[],
        );
        assert!(
            typo.iter().any(|m| m.contains("unknown param 'epoch'")),
            "{typo:?}"
        );
        let backend = check(
            TRAIN,
            Some("keras"),
            &json!({"model": "x", "dataset": "y"}),
            &[],
        );
        assert!(
            backend.iter().any(|m| m.contains("no backend 'keras'")),
            "{backend:?}"
        );
    }

    #[test]
    fn packages_follow_the_backend_and_lora_and_pip_lines_carry_the_pins() {
        assert_eq!(packages(TRAIN, None, &json!({})), ["torch", "transformers"]);
        assert_eq!(
            packages(TRAIN, Some("hf"), &json!({"lora": {"r": 8}})),
            ["torch", "transformers", "peft"]
        );
        let line = pip_line(&["torch", "peft"]);
        assert!(line.starts_with("pip install torch=="), "{line}");
        assert!(line.contains(" peft=="), "{line}");
    }

    #[test]
    fn the_driver_folder_is_written_once_per_content() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = materialise(d.path(), TRAIN, None).expect("write");
        let b = materialise(d.path(), TRAIN, None).expect("write");
        assert_eq!(a, b);
        assert!(a.join("run.py").is_file() && a.join("train_hf.py").is_file());
        let e = materialise(d.path(), EVAL, None).expect("write");
        assert_ne!(a, e);
        assert!(!e.join("train_hf.py").exists());
        let ax = materialise(d.path(), TRAIN, Some("axolotl")).expect("write");
        assert!(ax.join("train_axolotl.py").is_file() && !ax.join("train_hf.py").exists());
    }
}
