//! Pipeline spec v2: parsing from YAML with positions, and validation that collects every
//! problem as `file:line:col: message`.
//!
//! The seeds' fields: `pipeline.name`, `steps[]` with `id`, `uses`, `backend`, `scheduler`,
//! `in`, `out`, `params`, `after`, `cache_hint`. Nexa's additions: `retries`, `timeout`,
//! `resources`, `shards`.

use crate::dag::Dag;
use crate::diag::{Diagnostic, Diagnostics, Pos};
use crate::handlers::{self, Availability};
use crate::paths;
use crate::units;
use crate::yaml::{Node, NodeKind};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod graph;
mod parse;
mod sections;
mod validate;
use parse::parse;
pub use sections::{SLURM_FIELDS, check_slurm_value};
pub use validate::output_paths;
use validate::validate;

/// A value with the position it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub pos: Pos,
}

/// A parsed, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// `pipeline.name`.
    pub name: String,
    /// The steps in file order.
    pub steps: Vec<Step>,
    /// The file as the user named it (for messages).
    pub file: String,
}

/// Where a step writes: nothing, one directory, or several named ones.
#[derive(Debug, Clone, PartialEq)]
pub enum Outputs {
    /// No `out`.
    None,
    /// `out: path` — one artifact, named `out`.
    Single(Spanned<String>),
    /// `out: {name: path, ...}` — one artifact per name.
    Named(BTreeMap<String, Spanned<String>>),
}

/// The name a single `out: path` is known by.
pub const DEFAULT_OUTPUT: &str = "out";

impl Outputs {
    /// `(name, written path)` pairs, sorted by name.
    pub fn entries(&self) -> Vec<(&str, &Spanned<String>)> {
        match self {
            Outputs::None => Vec::new(),
            Outputs::Single(p) => vec![(DEFAULT_OUTPUT, p)],
            Outputs::Named(m) => m.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        }
    }
}

/// Retry policy: how many extra attempts, and the first backoff (doubling each time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retries {
    /// Extra attempts after the first (0 = no retry).
    pub count: u32,
    /// Delay before the first retry; doubled for each further one, capped at 5 minutes.
    pub backoff: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            count: 0,
            backoff: Duration::from_secs(1),
        }
    }
}

impl Retries {
    /// The delay before retry number `n` (1-based).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(300))
    }
}

/// What a step needs from a worker (matched by the mesh scheduler).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// CPU slots.
    pub cpus: Option<u32>,
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// Number of GPUs.
    pub gpus: Option<u32>,
    /// Memory per GPU in bytes.
    pub gpu_memory: Option<u64>,
    /// Minimum CUDA compute capability as (major, minor).
    pub compute_capability: Option<(u32, u32)>,
}

/// Fan-out: split the input `over` into parts, one job each: `count` even parts,
/// parts of `records` records, or parts of at most `size` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Shards {
    /// The input name to split.
    pub over: Spanned<String>,
    /// How it is cut.
    pub cut: crate::shard::Cut,
}

/// How results from untrusted workers are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compare {
    /// Identical output files (by the signed digests).
    Exact,
    /// Numbers in JSON or text outputs may differ by this relative amount; everything
    /// else must be identical.
    Tolerance(f64),
}

/// Replication and quorum for a step's jobs (BOINC-style validation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validation {
    /// Replicas of each job, on distinct workers.
    pub replicas: u32,
    /// How many must agree for a result to become the artifact.
    pub quorum: u32,
    /// How results are compared.
    pub compare: Compare,
    /// Replicas only on workers of the same hardware class (GPU architecture and driver
    /// major, or CPU architecture and OS).
    pub homogeneous: bool,
}

/// One step of a pipeline.
#[derive(Debug, Clone)]
pub struct Step {
    /// Unique id.
    pub id: Spanned<String>,
    /// Handler name.
    pub uses: Spanned<String>,
    /// Backend selection (handler-specific).
    pub backend: Option<String>,
    /// Scheduler selection (`local`, `slurm`, `k8s`); not part of the cache key.
    pub scheduler: Option<String>,
    /// Named inputs: paths to files, directories or other steps' outputs.
    pub inputs: BTreeMap<String, Spanned<String>>,
    /// Outputs.
    pub outputs: Outputs,
    /// Handler parameters, as JSON.
    pub params: serde_json::Value,
    /// Explicit dependencies; `None` means "the previous step".
    pub after: Option<Vec<Spanned<String>>>,
    /// Free text mixed into the cache key.
    pub cache_hint: Option<String>,
    /// Retry policy.
    pub retries: Retries,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Hardware requirements.
    pub resources: Resources,
    /// Fan-out.
    pub shards: Option<Shards>,
    /// Replication and quorum.
    pub validation: Option<Validation>,
    /// Overrides for the Slurm pilots that run a `scheduler: slurm` step: `partition`,
    /// `account`, `qos`, `constraint` (see [`SLURM_FIELDS`]); not in the cache key.
    pub slurm: BTreeMap<String, String>,
    /// Where the step starts in the file.
    pub pos: Pos,
}

impl Step {
    /// The container image an `exec` step runs in (`params.image`), if it names one.
    pub fn image(&self) -> Option<&str> {
        if self.uses.value != handlers::EXEC {
            return None;
        }
        self.params.get("image").and_then(|i| i.as_str())
    }
}

/// The `exec` handler's parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecCommand {
    /// `cmd: [argv...]`.
    Argv(Vec<String>),
    /// `run: "shell script"`, run by `/bin/sh -c`.
    Script(String),
}

/// Parsed `exec` params.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecParams {
    /// The artifact `kind` to record in meta.json (default `dataset`).
    pub kind: Option<String>,
    /// What to run.
    pub command: ExecCommand,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// A container image to run the command in (`params.image`); the worker's docker
    /// executor runs it sandboxed. `None`: the worker's own executor decides.
    pub image: Option<String>,
    /// `params.network: true` asks for a network inside the container; the default is
    /// none, and a worker grants it only when its volunteer allowed it.
    pub network: bool,
}

/// Checks a container image reference: registry/name:tag or @digest characters only,
/// starting with a letter or digit (so it can never be read as a `docker` option).
pub fn check_image(image: &str) -> std::result::Result<(), String> {
    let ok_chars = image
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'));
    let ok_start = image
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if image.len() > 255 || !ok_chars || !ok_start {
        return Err(format!(
            "'params.image' {image:?} is not an image reference (like debian:bookworm or \
             registry.example/team/tool@sha256:...)"
        ));
    }
    Ok(())
}

impl ExecParams {
    /// Reads exec params from the JSON form stored in a step or a job.
    pub fn from_json(params: &serde_json::Value) -> std::result::Result<Self, String> {
        let obj = params
            .as_object()
            .ok_or("exec needs params with 'cmd' (a list) or 'run' (a script)")?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "cmd" | "run" | "env" | "kind" | "image" | "network"
            ) {
                return Err(format!(
                    "unknown field 'params.{key}' for exec (expected cmd, run, env, kind, \
                     image, network)"
                ));
            }
        }
        let command = match (obj.get("cmd"), obj.get("run")) {
            (Some(_), Some(_)) => return Err("exec takes 'cmd' or 'run', not both".into()),
            (None, None) => {
                return Err("exec needs 'params.cmd' (a list) or 'params.run' (a script)".into());
            }
            (Some(cmd), None) => {
                let list = cmd
                    .as_array()
                    .ok_or("'params.cmd' must be a list of strings")?;
                if list.is_empty() {
                    return Err("'params.cmd' must not be empty".into());
                }
                ExecCommand::Argv(
                    list.iter()
                        .map(scalar_string)
                        .collect::<Option<Vec<_>>>()
                        .ok_or("'params.cmd' must be a list of strings")?,
                )
            }
            (None, Some(run)) => ExecCommand::Script(
                run.as_str()
                    .ok_or("'params.run' must be a string")?
                    .to_string(),
            ),
        };
        let mut env = BTreeMap::new();
        if let Some(e) = obj.get("env") {
            let map = e.as_object().ok_or("'params.env' must be a mapping")?;
            for (k, v) in map {
                let v =
                    scalar_string(v).ok_or_else(|| format!("'params.env.{k}' must be a scalar"))?;
                env.insert(k.clone(), v);
            }
        }
        let kind = obj.get("kind").and_then(|k| k.as_str()).map(str::to_string);
        let image = match obj.get("image") {
            None => None,
            Some(v) => {
                let image = v.as_str().ok_or("'params.image' must be a string")?;
                check_image(image)?;
                Some(image.to_string())
            }
        };
        let network = match obj.get("network") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or("'params.network' must be true or false")?,
        };
        Ok(Self {
            kind,
            command,
            env,
            image,
            network,
        })
    }
}

fn scalar_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A loaded pipeline with its DAG.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Its dependency graph.
    pub dag: Dag,
}

/// Reads, parses and validates a pipeline file. `root` is the project (artifact) root
/// that relative paths are resolved against.
pub fn load_file(path: &Path, root: &Path) -> Result<Loaded> {
    let src = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    load_str(&path.display().to_string(), &src, root)
}

/// Parses and validates pipeline text; `file` names it in messages.
pub fn load_str(file: &str, src: &str, root: &Path) -> Result<Loaded> {
    let mut d = Diagnostics::new(file);
    let pipeline = parse(file, src, &mut d);
    let dag = pipeline.as_ref().map(|p| validate(p, root, &mut d));
    match (pipeline, dag) {
        (Some(pipeline), Some(dag)) if d.is_empty() => Ok(Loaded { pipeline, dag }),
        _ => Err(Error::Invalid(d.into_sorted())),
    }
}

/// For a pipeline submitted to a coordinator, which reads only what was uploaded with
/// it: every input that no step produces must be a path inside the project, written
/// relative to it. Each one that is not is reported with its position and why.
pub fn check_confined_inputs(file: &str, l: &Loaded) -> Result<()> {
    let mut d = Diagnostics::new(file);
    for (i, s) in l.pipeline.steps.iter().enumerate() {
        for (name, written) in &s.inputs {
            if l.dag.upstream[i].contains_key(name) {
                continue;
            }
            let p = Path::new(&written.value);
            let why = if p.is_absolute() {
                "is an absolute path; a submitted pipeline reads only files inside its project (uploaded with it)"
            } else if paths::normalize(p).is_none() {
                "escapes the project with '..'"
            } else {
                continue;
            };
            d.push(
                written.pos,
                format!(
                    "step '{}': input '{name}' {:?} {why}",
                    s.id.value, written.value
                ),
            );
        }
    }
    if d.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(d.into_sorted()))
    }
}

/// The diagnostics of an invalid file, or an empty list when it is valid.
pub fn check_str(file: &str, src: &str, root: &Path) -> Vec<Diagnostic> {
    match load_str(file, src, root) {
        Ok(_) => Vec::new(),
        Err(Error::Invalid(d)) => d,
        Err(e) => vec![Diagnostic {
            file: file.into(),
            pos: Pos::default(),
            message: e.to_string(),
        }],
    }
}

/// Semantic checks across steps; returns the DAG (possibly partial when invalid).
/// The longest pipeline name, step id, input or output name (they name files and
/// directories, with suffixes such as `.shard-00000.log` added).
pub const MAX_NAME: usize = 100;
/// The longest component of an `out` path, in bytes (file systems allow 255; `.tmp` and
/// similar suffixes are added).
pub const MAX_OUT_COMPONENT: usize = 200;
/// The most components an `out` path may have.
pub const MAX_OUT_DEPTH: usize = 32;
/// The longest `out` path, in bytes.
pub const MAX_OUT_PATH: usize = 1024;

#[cfg(test)]
mod tests;
