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

/// Fan-out: split the input `over` into `count` parts, one job each.
#[derive(Debug, Clone, PartialEq)]
pub struct Shards {
    /// The input name to split.
    pub over: Spanned<String>,
    /// How many parts.
    pub count: u32,
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

const STEP_FIELDS: &[&str] = &[
    "id",
    "uses",
    "backend",
    "scheduler",
    "in",
    "out",
    "params",
    "after",
    "cache_hint",
    "retries",
    "timeout",
    "resources",
    "shards",
    "validation",
];

fn map_entries<'a>(node: &'a Node, what: &str, d: &mut Diagnostics) -> Option<&'a [(Node, Node)]> {
    match &node.kind {
        NodeKind::Map(e) => Some(e),
        _ => {
            d.push(
                node.pos,
                format!("'{what}' must be a mapping, found {}", node.kind_name()),
            );
            None
        }
    }
}

fn string_of(node: &Node, what: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    match &node.kind {
        NodeKind::Scalar { text, .. } if !node.is_null() => Some(Spanned {
            value: text.clone(),
            pos: node.pos,
        }),
        _ => {
            d.push(
                node.pos,
                format!("'{what}' must be a string, found {}", node.kind_name()),
            );
            None
        }
    }
}

fn unknown_field(d: &mut Diagnostics, key: &Node, ctx: &str, allowed: &[&str]) {
    d.push(
        key.pos,
        format!(
            "unknown field '{}' in {ctx} (expected one of: {})",
            key.as_str().unwrap_or("?"),
            allowed.join(", ")
        ),
    );
}

fn check_duplicate_keys(entries: &[(Node, Node)], ctx: &str, d: &mut Diagnostics) {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for (k, _) in entries {
        if let Some(name) = k.as_str()
            && let Some(first) = seen.insert(name, k.pos)
        {
            d.push(
                k.pos,
                format!(
                    "duplicate key '{name}' in {ctx} (first at line {})",
                    first.line
                ),
            );
        }
    }
}

/// Parses the positioned tree into a [`Pipeline`], recording shape errors.
fn parse(file: &str, src: &str, d: &mut Diagnostics) -> Option<Pipeline> {
    let root = match crate::yaml::parse(src) {
        Ok(Some(n)) => n,
        Ok(None) => {
            d.push(
                Pos { line: 1, col: 1 },
                "empty file: expected 'pipeline:' with 'name' and 'steps'",
            );
            return None;
        }
        Err(e) => {
            d.push(e.pos, format!("invalid YAML: {}", e.message));
            return None;
        }
    };
    let top = map_entries(&root, "the document", d)?;
    check_duplicate_keys(top, "the document", d);
    let mut pipeline_node = None;
    for (k, v) in top {
        match k.as_str() {
            Some("pipeline") => pipeline_node = Some(v),
            _ => unknown_field(d, k, "the document", &["pipeline"]),
        }
    }
    let Some(pnode) = pipeline_node else {
        d.push(root.pos, "missing field 'pipeline'");
        return None;
    };
    let pentries = map_entries(pnode, "pipeline", d)?;
    check_duplicate_keys(pentries, "pipeline", d);
    let mut name = None;
    let mut steps_node = None;
    for (k, v) in pentries {
        match k.as_str() {
            Some("name") => name = string_of(v, "pipeline.name", d),
            Some("steps") => steps_node = Some(v),
            _ => unknown_field(d, k, "pipeline", &["name", "steps"]),
        }
    }
    let name = match name {
        Some(n) => {
            if n.value.is_empty()
                || !n
                    .value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                || n.value.starts_with('.')
                || n.value.len() > MAX_NAME
            {
                d.push(
                    n.pos,
                    format!(
                        "'pipeline.name' {:?} must use only letters, digits, '_', '-', '.', not start with '.' and be at most {MAX_NAME} characters (it names a state directory)",
                        n.value
                    ),
                );
            }
            n.value
        }
        None => {
            if !pentries.iter().any(|(k, _)| k.as_str() == Some("name")) {
                d.push(pnode.pos, "missing field 'pipeline.name'");
            }
            String::new()
        }
    };
    let mut steps = Vec::new();
    match steps_node {
        None => d.push(pnode.pos, "missing field 'pipeline.steps'"),
        Some(sn) => match &sn.kind {
            NodeKind::Seq(items) => {
                if items.is_empty() {
                    d.push(sn.pos, "'pipeline.steps' is empty");
                }
                for (i, item) in items.iter().enumerate() {
                    if let Some(step) = parse_step(item, i, d) {
                        steps.push(step);
                    }
                }
            }
            _ => d.push(
                sn.pos,
                format!("'pipeline.steps' must be a list, found {}", sn.kind_name()),
            ),
        },
    }
    Some(Pipeline {
        name,
        steps,
        file: file.to_string(),
    })
}

fn parse_step(node: &Node, index: usize, d: &mut Diagnostics) -> Option<Step> {
    let ctx = format!("steps[{index}]");
    let entries = map_entries(node, &ctx, d)?;
    check_duplicate_keys(entries, &ctx, d);
    let get = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    };
    for (k, _) in entries {
        if !k.as_str().is_some_and(|n| STEP_FIELDS.contains(&n)) {
            unknown_field(d, k, &format!("step {ctx}"), STEP_FIELDS);
        }
    }
    let id = match get("id") {
        Some(v) => string_of(v, "id", d),
        None => {
            d.push(node.pos, format!("{ctx}: missing field 'id'"));
            None
        }
    };
    if let Some(id) = &id
        && !id
            .value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        d.push(
            id.pos,
            format!(
                "step id {:?} must use only letters, digits, '_', '-', '.'",
                id.value
            ),
        );
    }
    if let Some(id) = &id
        && id.value.len() > MAX_NAME
    {
        d.push(
            id.pos,
            format!(
                "step id is {} characters; at most {MAX_NAME} are allowed (it names files and directories)",
                id.value.len()
            ),
        );
    }
    let label = id
        .as_ref()
        .map(|i| format!("step '{}'", i.value))
        .unwrap_or(ctx.clone());
    let uses = match get("uses") {
        Some(v) => string_of(v, "uses", d),
        None => {
            d.push(node.pos, format!("{label}: missing field 'uses'"));
            None
        }
    };
    if let Some(u) = &uses
        && handlers::lookup(&u.value).is_none()
    {
        d.push(
            u.pos,
            format!(
                "{label}: unknown handler 'uses: {}' (known: {})",
                u.value,
                handlers::known_names()
            ),
        );
    }
    let opt_string = |name: &str, d: &mut Diagnostics| {
        get(name).and_then(|v| {
            if v.is_null() {
                None
            } else {
                string_of(v, name, d).map(|s| s.value)
            }
        })
    };
    let backend = opt_string("backend", d);
    let scheduler = opt_string("scheduler", d);
    if let (Some(s), Some(v)) = (&scheduler, get("scheduler"))
        && !matches!(s.as_str(), "local" | "slurm" | "k8s" | "mesh")
    {
        d.push(
            v.pos,
            format!("{label}: unknown scheduler '{s}' (expected local, slurm, k8s or mesh)"),
        );
    }
    let cache_hint = opt_string("cache_hint", d);

    let mut inputs = BTreeMap::new();
    if let Some(v) = get("in")
        && !v.is_null()
        && let Some(es) = map_entries(v, "in", d)
    {
        check_duplicate_keys(es, "in", d);
        for (k, val) in es {
            let Some(name) = k.as_str() else { continue };
            if !valid_name(name) {
                d.push(
                    k.pos,
                    format!("{label}: input name '{name}' must use only letters, digits and '_' (at most {MAX_NAME})"),
                );
            }
            if let Some(p) = string_of(val, &format!("in.{name}"), d) {
                inputs.insert(name.to_string(), p);
            }
        }
    }

    let outputs = match get("out") {
        None => Outputs::None,
        Some(v) if v.is_null() => Outputs::None,
        Some(v) => match &v.kind {
            NodeKind::Scalar { .. } => string_of(v, "out", d)
                .map(Outputs::Single)
                .unwrap_or(Outputs::None),
            NodeKind::Map(es) => {
                check_duplicate_keys(es, "out", d);
                let mut m = BTreeMap::new();
                for (k, val) in es {
                    let Some(name) = k.as_str() else { continue };
                    if !valid_name(name) {
                        d.push(k.pos, format!("{label}: output name '{name}' must use only letters, digits and '_' (at most {MAX_NAME})"));
                    }
                    if let Some(p) = string_of(val, &format!("out.{name}"), d) {
                        m.insert(name.to_string(), p);
                    }
                }
                Outputs::Named(m)
            }
            NodeKind::Seq(_) => {
                d.push(
                    v.pos,
                    format!(
                        "{label}: 'out' must be a path or a mapping of name: path, found a list"
                    ),
                );
                Outputs::None
            }
        },
    };

    let params = get("params")
        .map(Node::to_json)
        .unwrap_or(serde_json::Value::Null);

    let after = match get("after") {
        None => None,
        Some(v) => match &v.kind {
            NodeKind::Seq(items) => Some(
                items
                    .iter()
                    .filter_map(|i| string_of(i, "after[]", d))
                    .collect(),
            ),
            NodeKind::Scalar { .. } if !v.is_null() => string_of(v, "after", d).map(|s| vec![s]),
            _ => {
                d.push(
                    v.pos,
                    format!("{label}: 'after' must be a list of step ids"),
                );
                None
            }
        },
    };

    let retries = get("retries")
        .map(|v| parse_retries(v, &label, d))
        .unwrap_or_default();
    let timeout = get("timeout").and_then(|v| {
        let s = string_of(v, "timeout", d)?;
        match units::parse_duration(&s.value) {
            Ok(t) if t.is_zero() => {
                d.push(v.pos, format!("{label}: 'timeout' must be more than zero"));
                None
            }
            Ok(t) => Some(t),
            Err(e) => {
                d.push(v.pos, format!("{label}: 'timeout': {e}"));
                None
            }
        }
    });
    let resources = get("resources")
        .map(|v| parse_resources(v, &label, d))
        .unwrap_or_default();
    let shards = get("shards").and_then(|v| parse_shards(v, &label, d));
    let validation = get("validation").and_then(|v| parse_validation(v, &label, d));

    // Handler-specific params, checked where the positions are known.
    if let Some(u) = &uses
        && u.value == handlers::EXEC
        && let Err(msg) = ExecParams::from_json(&params)
    {
        let pos = get("params").map(|p| p.pos).unwrap_or(node.pos);
        d.push(pos, format!("{label}: {msg}"));
    }

    if let Some(u) = &uses
        && handlers::runs_on_coordinator(&u.value)
    {
        let pos = get("params").map(|p| p.pos).unwrap_or(node.pos);
        match handlers::RegistryParams::from_json(&u.value, &params) {
            Err(msg) => d.push(pos, format!("{label}: {msg}")),
            Ok(handlers::RegistryParams::Register { uri, .. }) => {
                let named = uri.as_deref().is_none_or(|u| {
                    inputs.contains_key(u) || inputs.values().any(|w| w.value == u)
                });
                if uri.is_none() && inputs.len() != 1 {
                    d.push(
                        pos,
                        format!(
                            "{label}: '{}' registers one of its inputs: give it exactly one 'in', or name one in 'params.uri'",
                            u.value
                        ),
                    );
                } else if !named {
                    d.push(
                        pos,
                        format!(
                            "{label}: 'params.uri' must name one of the step's inputs (by name or path), so that the registered artifact is ordered and hashed like any input"
                        ),
                    );
                }
            }
            Ok(_) => {}
        }
        if !matches!(outputs, Outputs::None) {
            let pos = get("out").map(|p| p.pos).unwrap_or(node.pos);
            d.push(
                pos,
                format!(
                    "{label}: '{}' writes to the registry, not to an artifact: remove 'out'",
                    u.value
                ),
            );
        }
        if let Some(sh) = get("shards") {
            d.push(sh.pos, format!("{label}: '{}' cannot be sharded", u.value));
        }
    }

    Some(Step {
        id: id?,
        uses: uses?,
        backend,
        scheduler,
        inputs,
        outputs,
        params,
        after,
        cache_hint,
        retries,
        timeout,
        resources,
        shards,
        validation,
        pos: node.pos,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_u32(v: &Node, what: &str, label: &str, d: &mut Diagnostics) -> Option<u32> {
    match v.as_str().map(str::parse::<u32>) {
        Some(Ok(n)) => Some(n),
        _ => {
            d.push(
                v.pos,
                format!("{label}: '{what}' must be a non-negative integer"),
            );
            None
        }
    }
}

fn parse_retries(v: &Node, label: &str, d: &mut Diagnostics) -> Retries {
    let mut r = Retries::default();
    match &v.kind {
        NodeKind::Scalar { .. } => {
            if let Some(n) = parse_u32(v, "retries", label, d) {
                r.count = n;
            }
        }
        NodeKind::Map(es) => {
            for (k, val) in es {
                match k.as_str() {
                    Some("count") => {
                        if let Some(n) = parse_u32(val, "retries.count", label, d) {
                            r.count = n;
                        }
                    }
                    Some("backoff") => match val.as_str().map(units::parse_duration) {
                        Some(Ok(b)) => r.backoff = b,
                        Some(Err(e)) => d.push(val.pos, format!("{label}: 'retries.backoff': {e}")),
                        None => d.push(
                            val.pos,
                            format!("{label}: 'retries.backoff' must be a duration"),
                        ),
                    },
                    _ => unknown_field(d, k, "retries", &["count", "backoff"]),
                }
            }
        }
        NodeKind::Seq(_) => d.push(
            v.pos,
            format!("{label}: 'retries' must be a number or {{count, backoff}}"),
        ),
    }
    r
}

fn parse_resources(v: &Node, label: &str, d: &mut Diagnostics) -> Resources {
    const FIELDS: &[&str] = &["cpus", "memory", "gpus", "gpu_memory", "compute_capability"];
    let mut r = Resources::default();
    let Some(es) = map_entries(v, "resources", d) else {
        return r;
    };
    check_duplicate_keys(es, "resources", d);
    for (k, val) in es {
        let size = |d: &mut Diagnostics, what: &str| match val.as_str().map(units::parse_size) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                d.push(val.pos, format!("{label}: 'resources.{what}': {e}"));
                None
            }
            None => {
                d.push(
                    val.pos,
                    format!("{label}: 'resources.{what}' must be a size like 40GiB"),
                );
                None
            }
        };
        match k.as_str() {
            Some("cpus") => r.cpus = parse_u32(val, "resources.cpus", label, d),
            Some("gpus") => r.gpus = parse_u32(val, "resources.gpus", label, d),
            Some("memory") => r.memory = size(d, "memory"),
            Some("gpu_memory") => r.gpu_memory = size(d, "gpu_memory"),
            Some("compute_capability") => {
                let parsed = val.as_str().and_then(|s| {
                    let (a, b) = s.split_once('.').unwrap_or((s, "0"));
                    Some((a.parse().ok()?, b.parse().ok()?))
                });
                match parsed {
                    Some(cc) => r.compute_capability = Some(cc),
                    None => d.push(
                        val.pos,
                        format!("{label}: 'resources.compute_capability' must look like 8.0"),
                    ),
                }
            }
            _ => unknown_field(d, k, "resources", FIELDS),
        }
    }
    r
}

fn parse_shards(v: &Node, label: &str, d: &mut Diagnostics) -> Option<Shards> {
    let es = map_entries(v, "shards", d)?;
    check_duplicate_keys(es, "shards", d);
    let mut over = None;
    let mut count = None;
    for (k, val) in es {
        match k.as_str() {
            Some("over") => over = string_of(val, "shards.over", d),
            Some("count") => count = parse_u32(val, "shards.count", label, d),
            _ => unknown_field(d, k, "shards", &["over", "count"]),
        }
    }
    if over.is_none() && !es.iter().any(|(k, _)| k.as_str() == Some("over")) {
        d.push(
            v.pos,
            format!("{label}: 'shards' needs 'over' (an input name)"),
        );
    }
    if count.is_none() && !es.iter().any(|(k, _)| k.as_str() == Some("count")) {
        d.push(v.pos, format!("{label}: 'shards' needs 'count'"));
    }
    if count == Some(0) || count.is_some_and(|c| c > 100_000) {
        d.push(
            v.pos,
            format!("{label}: 'shards.count' must be between 1 and 100000"),
        );
        return None;
    }
    Some(Shards {
        over: over?,
        count: count?,
    })
}

impl std::str::FromStr for Validation {
    type Err = String;

    /// `replicas=N,quorum=K[,tolerance=R][,homogeneous]`, as an operator gives a
    /// coordinator-wide default (`nexa-coordinator serve --validate ...`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut replicas = None;
        let mut quorum = None;
        let mut compare = Compare::Exact;
        let mut homogeneous = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("'{k}' needs a whole number, not '{v}'"))
            };
            match k {
                "replicas" => replicas = Some(num(v)?),
                "quorum" => quorum = Some(num(v)?),
                "tolerance" => match v.parse::<f64>() {
                    Ok(t) if t.is_finite() && t >= 0.0 => compare = Compare::Tolerance(t),
                    _ => return Err(format!("'tolerance' needs a relative amount, not '{v}'")),
                },
                "exact" => compare = Compare::Exact,
                "homogeneous" => homogeneous = true,
                other => {
                    return Err(format!(
                        "unknown validation setting '{other}' (replicas, quorum, tolerance, exact, homogeneous)"
                    ));
                }
            }
        }
        let replicas = replicas.unwrap_or(2);
        let quorum = quorum.unwrap_or(replicas / 2 + 1);
        if !(1..=16).contains(&replicas) || quorum == 0 || quorum > replicas {
            return Err(format!(
                "validation needs 1 <= quorum <= replicas <= 16 (got replicas {replicas}, quorum {quorum})"
            ));
        }
        Ok(Validation {
            replicas,
            quorum,
            compare,
            homogeneous,
        })
    }
}

fn parse_validation(v: &Node, label: &str, d: &mut Diagnostics) -> Option<Validation> {
    let es = map_entries(v, "validation", d)?;
    check_duplicate_keys(es, "validation", d);
    let mut replicas = None;
    let mut quorum = None;
    let mut compare = Compare::Exact;
    let mut homogeneous = false;
    for (k, val) in es {
        match k.as_str() {
            Some("replicas") => replicas = parse_u32(val, "validation.replicas", label, d),
            Some("quorum") => quorum = parse_u32(val, "validation.quorum", label, d),
            Some("homogeneous") => match val.as_str() {
                Some("true") => homogeneous = true,
                Some("false") => homogeneous = false,
                _ => d.push(
                    val.pos,
                    format!("{label}: 'validation.homogeneous' must be true or false"),
                ),
            },
            Some("compare") => {
                match (val.as_str(), &val.kind) {
                    (Some("exact"), _) => compare = Compare::Exact,
                    (_, NodeKind::Map(m))
                        if m.len() == 1 && m[0].0.as_str() == Some("tolerance") =>
                    {
                        match m[0].1.as_str().map(str::parse::<f64>) {
                        Some(Ok(t)) if t.is_finite() && t >= 0.0 => compare = Compare::Tolerance(t),
                        _ => d.push(
                            m[0].1.pos,
                            format!(
                                "{label}: 'validation.compare.tolerance' must be a relative amount such as 0.001"
                            ),
                        ),
                    }
                    }
                    _ => d.push(
                        val.pos,
                        format!(
                            "{label}: 'validation.compare' must be exact or {{tolerance: <rel>}}"
                        ),
                    ),
                }
            }
            _ => unknown_field(
                d,
                k,
                "validation",
                &["replicas", "quorum", "compare", "homogeneous"],
            ),
        }
    }
    let replicas = replicas.unwrap_or(2);
    let quorum = quorum.unwrap_or(replicas / 2 + 1);
    if !(1..=16).contains(&replicas) || quorum == 0 || quorum > replicas {
        d.push(
            v.pos,
            format!(
                "{label}: 'validation' needs 1 <= quorum <= replicas <= 16 (got replicas {replicas}, quorum {quorum})"
            ),
        );
        return None;
    }
    Some(Validation {
        replicas,
        quorum,
        compare,
        homogeneous,
    })
}

/// The project-relative path of every output of every step, resolved and contained.
/// Steps whose paths are unsafe are left out (validation reports them).
pub fn output_paths(p: &Pipeline, root: &Path) -> Vec<(usize, String, PathBuf)> {
    let mut out = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        for (name, path) in s.outputs.entries() {
            if let Ok(rel) = paths::contained(root, &path.value) {
                out.push((i, name.to_string(), rel));
            }
        }
    }
    out
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

/// Why an `out` path is too long for the file system, if it is.
fn out_too_long(rel: &Path) -> Option<String> {
    let bytes = rel.as_os_str().len();
    if bytes > MAX_OUT_PATH {
        return Some(format!(
            "is {bytes} bytes long; at most {MAX_OUT_PATH} are allowed"
        ));
    }
    let depth = rel.components().count();
    if depth > MAX_OUT_DEPTH {
        return Some(format!(
            "is {depth} directories deep; at most {MAX_OUT_DEPTH} are allowed"
        ));
    }
    rel.components()
        .map(|c| c.as_os_str().len())
        .find(|&n| n > MAX_OUT_COMPONENT)
        .map(|n| format!("has a {n}-byte component; at most {MAX_OUT_COMPONENT} bytes are allowed"))
}

fn validate(p: &Pipeline, root: &Path, d: &mut Diagnostics) -> Dag {
    // Duplicate ids.
    let mut ids: HashMap<&str, &Step> = HashMap::new();
    for s in &p.steps {
        if let Some(first) = ids.get(s.id.value.as_str()) {
            d.push(
                s.id.pos,
                format!(
                    "duplicate step id '{}' (first defined at line {})",
                    s.id.value, first.id.pos.line
                ),
            );
        } else {
            ids.insert(&s.id.value, s);
        }
    }
    // Unknown `after` targets.
    for s in &p.steps {
        for a in s.after.iter().flatten() {
            if a.value == s.id.value {
                d.push(
                    a.pos,
                    format!("step '{}': 'after' names the step itself", s.id.value),
                );
            } else if !ids.contains_key(a.value.as_str()) {
                d.push(
                    a.pos,
                    format!(
                        "step '{}': 'after' names unknown step '{}'",
                        s.id.value, a.value
                    ),
                );
            }
        }
    }
    // Output paths: contained, and no two steps writing the same place.
    let mut outs: Vec<(usize, PathBuf, Pos)> = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        for (name, path) in s.outputs.entries() {
            match paths::contained(root, &path.value) {
                Ok(rel) => {
                    if let Some(why) = out_too_long(&rel) {
                        d.push(
                            path.pos,
                            format!("step '{}': output '{name}' path {why}", s.id.value),
                        );
                    }
                    if rel.starts_with(".nexa_state") {
                        d.push(
                            path.pos,
                            format!(
                                "step '{}': 'out' must not write into .nexa_state",
                                s.id.value
                            ),
                        );
                    }
                    outs.push((i, rel, path.pos));
                }
                Err(e) => d.push(
                    path.pos,
                    format!("step '{}': output '{name}' path {e}", s.id.value),
                ),
            }
        }
    }
    // Sorted component-wise, every path that lies inside another follows it directly.
    let mut sorted: Vec<usize> = (0..outs.len()).collect();
    sorted.sort_by(|&x, &y| outs[x].1.cmp(&outs[y].1).then(outs[x].2.cmp(&outs[y].2)));
    for (k, &x) in sorted.iter().enumerate() {
        for &y in &sorted[k + 1..] {
            if !outs[y].1.starts_with(&outs[x].1) {
                break;
            }
            // Report at whichever was written later in the file.
            let (a, b) = if outs[x].2 <= outs[y].2 {
                (x, y)
            } else {
                (y, x)
            };
            let (ia, pa, _) = &outs[a];
            let (ib, pb, posb) = &outs[b];
            let what = if pa == pb {
                "the same"
            } else {
                "an overlapping"
            };
            let msg = if ia == ib {
                format!(
                    "step '{}' writes {what} 'out' path twice: {}",
                    p.steps[*ib].id.value,
                    pb.display()
                )
            } else {
                format!(
                    "steps '{}' and '{}' write {what} 'out' path: {}",
                    p.steps[*ia].id.value,
                    p.steps[*ib].id.value,
                    pb.display()
                )
            };
            d.push(*posb, msg);
        }
    }
    // Shards must split one of the step's inputs, into an output.
    for s in &p.steps {
        if let Some(sh) = &s.shards
            && !s.inputs.contains_key(&sh.over.value)
        {
            d.push(
                sh.over.pos,
                format!(
                    "step '{}': 'shards.over' names '{}', which is not one of its inputs ({})",
                    s.id.value,
                    sh.over.value,
                    s.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if handlers::lookup(&s.uses.value) == Some(Availability::Available)
            && s.shards.is_some()
            && matches!(s.outputs, Outputs::None)
        {
            d.push(
                s.pos,
                format!("step '{}': a sharded step needs an 'out'", s.id.value),
            );
        }
    }
    let dag = Dag::build(p, root);
    for (pos, msg) in &dag.self_reads {
        d.push(*pos, msg.clone());
    }
    for cycle in dag.cycles() {
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| p.steps[i].id.value.as_str())
            .collect();
        let first = cycle[0];
        d.push(
            p.steps[first].id.pos,
            format!("dependency cycle: {}", names.join(" -> ")),
        );
    }
    dag
}

#[cfg(test)]
mod tests;
