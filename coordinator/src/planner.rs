//! Planning a ready step: resolve its inputs to content digests, compute its cache key,
//! reuse a sealed artifact when the key matches (SKIPPED), otherwise split its input into
//! shards and decide which jobs must run. Runs on the blocking pool.

use crate::state::ArtifactInfo;
use nexa_shared::artifact::{self, Miss};
use nexa_shared::cache::KeyMaterial;
use nexa_shared::dag::Dag;
use nexa_shared::handlers::{self, Availability};
use nexa_shared::ids::CacheKey;
use nexa_shared::spec::{ExecParams, Pipeline, Step};
use nexa_shared::{paths, runners, shard};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod shard_set;
use shard_set::plan_shards;
pub use shard_set::{CachedShard, ShardSet, ShardUnit};

/// Everything about a run that planning and sealing need; shared read-only.
#[derive(Debug)]
pub struct RunContext {
    /// Run id.
    pub run_id: String,
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Its graph.
    pub dag: Dag,
    /// The project (artifact) root, absolute.
    pub project: PathBuf,
    /// `.nexa_state/<pipeline>`, absolute.
    pub state_dir: PathBuf,
    /// Re-hash cached artifacts before reusing them.
    pub verify: bool,
    /// Steps whose step-level cache is ignored (`rerun --from`).
    pub forced: Vec<bool>,
    /// The project's git commit, when it is a git checkout.
    pub git_sha: Option<String>,
    /// Inputs must resolve inside the project, symlinks followed.
    pub confined: bool,
}

impl RunContext {
    /// The labels every artifact of this run carries; a runner's also name its model and
    /// dataset (`base_model`, `dataset`, `dataset_digest`).
    pub fn labels(
        &self,
        step: &Step,
        cache_key: &str,
        inputs: &[ResolvedInput],
    ) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        if runners::is_runner(&step.uses.value) {
            let input = |name: &str| inputs.iter().find(|r| r.name == name);
            let model = match step.params.get("model") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(m) => m
                    .pointer("/config/model_type")
                    .and_then(|t| t.as_str())
                    .map(|t| format!("config:{t}")),
                None => input("model")
                    .or_else(|| input("checkpoint"))
                    .map(|r| format!("{} ({})", r.uri, r.digest)),
            };
            if let Some(m) = model {
                l.insert("base_model".into(), m);
            }
            match (input("dataset"), step.params.get("dataset")) {
                (Some(d), _) => {
                    l.insert("dataset".into(), d.uri.clone());
                    l.insert("dataset_digest".into(), d.digest.clone());
                }
                (None, Some(serde_json::Value::String(d))) => {
                    l.insert("dataset".into(), d.clone());
                }
                _ => {}
            }
        }
        l.insert("pipeline".into(), self.pipeline.name.clone());
        l.insert("run_id".into(), self.run_id.clone());
        l.insert("step_id".into(), step.id.value.clone());
        l.insert("cache_key".into(), cache_key.to_string());
        if let Some(g) = &self.git_sha {
            l.insert("git_sha".into(), g.clone());
        }
        l
    }

    /// The project-relative display form of an absolute path.
    pub fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.project)
            .unwrap_or(p)
            .display()
            .to_string()
    }
}

/// An input resolved to content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInput {
    /// The step's name for it.
    pub name: String,
    /// As written in the pipeline.
    pub uri: String,
    /// `blake3:<hex>`.
    pub digest: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Directory or file.
    pub is_dir: bool,
    /// A range shard's spans of its input (`path` is then the part's name only).
    pub range: Option<Arc<shard::Range>>,
}

/// A step that must run.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// Step index.
    pub step: usize,
    /// Step cache key.
    pub cache_key: CacheKey,
    /// Inputs, sorted by name.
    pub inputs: Vec<ResolvedInput>,
    /// Output name → absolute artifact path.
    pub outputs: BTreeMap<String, PathBuf>,
    /// Shards, for fanned-out steps.
    pub shards: Option<ShardSet>,
    /// `kind` for meta.json.
    pub kind: String,
}

/// The planner's decision.
#[derive(Debug)]
pub enum Plan {
    /// Reuse the sealed artifacts.
    Skipped {
        /// The key they were sealed under.
        cache_key: CacheKey,
        /// Output name → artifact.
        outputs: BTreeMap<String, ArtifactInfo>,
    },
    /// Run jobs.
    Run(Arc<StepPlan>),
    /// Cannot run (missing input, handler not available, ...): not retryable.
    Failed {
        /// The key, when it got that far.
        cache_key: Option<CacheKey>,
        /// Why.
        error: String,
    },
}

fn fail(cache_key: Option<CacheKey>, error: String) -> Plan {
    Plan::Failed { cache_key, error }
}

/// Plans step `i`. `done[j]` holds the sealed outputs of every finished step `j`.
pub fn plan_step(
    ctx: &RunContext,
    i: usize,
    done: &BTreeMap<usize, BTreeMap<String, ArtifactInfo>>,
) -> Plan {
    nexa_shared::fail_point!("planner.plan");
    let step = &ctx.pipeline.steps[i];
    let mut inputs = Vec::new();
    for (name, written) in &step.inputs {
        match resolve_input(ctx, i, name, &written.value, done) {
            Ok(r) => inputs.push(r),
            Err(e) => return fail(None, e),
        }
    }
    let outputs: BTreeMap<String, PathBuf> = step
        .outputs
        .entries()
        .into_iter()
        .filter_map(|(n, p)| {
            paths::contained(&ctx.project, &p.value)
                .ok()
                .map(|rel| (n.to_string(), ctx.project.join(rel)))
        })
        .collect();
    if runners::is_runner(&step.uses.value) {
        // The driver is one more input: its digest is in the cache key, so editing it
        // re-runs exactly the steps that use it.
        match runner_input(ctx, &step.uses.value, step.backend.as_deref()) {
            Ok(r) => {
                inputs.push(r);
                inputs.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Err(e) => return fail(None, e),
        }
    }
    let cache_key = key_for(step, &inputs, None, None);
    if handlers::lookup(&step.uses.value) != Some(Availability::Available) {
        return fail(
            Some(cache_key),
            handlers::not_available_message(&step.uses.value),
        );
    }
    if let Some(why) = runners::unavailable(&step.uses.value, step.backend.as_deref()) {
        return fail(Some(cache_key), why);
    }
    for out in outputs.values() {
        if let Err(e) = artifact::recover(out) {
            return fail(Some(cache_key), format!("recovering {}: {e}", ctx.rel(out)));
        }
    }
    if !ctx.forced[i] && !outputs.is_empty() && !runners::never_cached(&step.uses.value) {
        let mut reused = BTreeMap::new();
        for (name, out) in &outputs {
            match artifact::check_cached(out, &cache_key, ctx.verify) {
                Ok(meta) => {
                    reused.insert(
                        name.clone(),
                        ArtifactInfo {
                            path: ctx.rel(out),
                            hash: meta.hash,
                            bytes: meta.bytes,
                        },
                    );
                }
                Err(Miss::HashMismatch) => {
                    tracing::warn!(step = %step.id.value, artifact = %ctx.rel(out), "cached artifact failed --verify; re-running");
                    break;
                }
                Err(_) => break,
            }
        }
        if reused.len() == outputs.len() {
            return Plan::Skipped {
                cache_key,
                outputs: reused,
            };
        }
    }
    let kind = if runners::is_runner(&step.uses.value) {
        runners::kind(&step.uses.value).to_string()
    } else {
        ExecParams::from_json(&step.params)
            .ok()
            .and_then(|p| p.kind)
            .unwrap_or_else(|| "dataset".to_string())
    };
    let shards = match &step.shards {
        None => None,
        Some(sh) => match plan_shards(ctx, step, &inputs, &sh.over.value, sh.cut) {
            Ok(set) => Some(set),
            Err(e) => return fail(Some(cache_key), e),
        },
    };
    Plan::Run(Arc::new(StepPlan {
        step: i,
        cache_key,
        inputs,
        outputs,
        shards,
        kind,
    }))
}

pub(crate) fn key_for(
    step: &Step,
    inputs: &[ResolvedInput],
    replace: Option<(&str, &str)>,
    shard: Option<(u32, u32)>,
) -> CacheKey {
    let material = KeyMaterial {
        uses: &step.uses.value,
        backend: step.backend.as_deref(),
        params: &step.params,
        outputs: step.outputs.entries().into_iter().map(|(n, _)| n).collect(),
        cache_hint: step.cache_hint.as_deref(),
        inputs: inputs
            .iter()
            .map(|r| match replace {
                Some((name, digest)) if name == r.name => (r.name.as_str(), digest),
                _ => (r.name.as_str(), r.digest.as_str()),
            })
            .collect(),
        shards: step.shards.as_ref().map(|s| match s.cut {
            shard::Cut::Count(n) => (s.over.value.as_str(), n),
            _ => (s.over.value.as_str(), 0),
        }),
        cut: step.shards.as_ref().and_then(|s| match s.cut {
            shard::Cut::Count(_) => None,
            cut => Some(cut.label()),
        }),
        shard,
    };
    material.key()
}

fn resolve_input(
    ctx: &RunContext,
    i: usize,
    name: &str,
    written: &str,
    done: &BTreeMap<usize, BTreeMap<String, ArtifactInfo>>,
) -> Result<ResolvedInput, String> {
    if let Some(up) = ctx.dag.upstream[i].get(name) {
        let producer = &ctx.pipeline.steps[up.step].id.value;
        let art = done
            .get(&up.step)
            .and_then(|o| o.get(&up.output))
            .ok_or_else(|| {
                format!(
                    "input '{name}': step '{producer}' has no sealed output '{}'",
                    up.output
                )
            })?;
        let base = ctx.project.join(&art.path);
        return match &up.subpath {
            None => Ok(ResolvedInput {
                name: name.into(),
                uri: written.into(),
                digest: art.hash.clone(),
                path: base,
                is_dir: true,
                range: None,
            }),
            Some(sub) => {
                let path = base.join(sub);
                let (digest, _, is_dir) = artifact::input_digest(&path).map_err(|e| {
                    format!(
                        "input '{name}': {written} is not in the artifact of step '{producer}': {e}"
                    )
                })?;
                Ok(ResolvedInput {
                    name: name.into(),
                    uri: written.into(),
                    digest,
                    path,
                    is_dir,
                    range: None,
                })
            }
        };
    }
    let path = if Path::new(written).is_absolute() {
        PathBuf::from(written)
    } else {
        ctx.project.join(written)
    };
    if ctx.confined {
        confine(&ctx.project, &path).map_err(|why| format!("input '{name}': {written} {why}"))?;
    } else if paths::normalize(Path::new(written)).is_none() {
        return Err(format!(
            "input '{name}': {written} escapes the project with '..'"
        ));
    }
    if !path.exists() {
        return Err(format!("input '{name}': {written} does not exist"));
    }
    let (digest, _, is_dir) =
        artifact::input_digest(&path).map_err(|e| format!("input '{name}': {e}"))?;
    Ok(ResolvedInput {
        name: name.into(),
        uri: written.into(),
        digest,
        path,
        is_dir,
        range: None,
    })
}

/// The runner's driver folder, written under the run's state directory, as an input.
fn runner_input(
    ctx: &RunContext,
    uses: &str,
    backend: Option<&str>,
) -> Result<ResolvedInput, String> {
    let dir = runners::materialise(&ctx.state_dir.join("runners"), uses, backend)
        .map_err(|e| format!("staging the driver of '{uses}': {e}"))?;
    let (digest, _, is_dir) =
        artifact::input_digest(&dir).map_err(|e| format!("hashing the driver of '{uses}': {e}"))?;
    Ok(ResolvedInput {
        name: runners::RUNNER_INPUT.into(),
        uri: format!("nexa:{uses}"),
        digest,
        path: dir,
        is_dir,
        range: None,
    })
}

/// Checks that `path`, symlinks followed, lies inside `project`.
fn confine(project: &Path, path: &Path) -> Result<(), String> {
    if !path.starts_with(project) || paths::normalize(path).is_none() {
        return Err("is outside the project; a submitted pipeline reads only its own files".into());
    }
    let (Ok(real), Ok(root)) = (path.canonicalize(), project.canonicalize()) else {
        // Missing: reported as such by the caller.
        return Ok(());
    };
    if !real.starts_with(&root) {
        return Err(format!(
            "resolves to {}, outside the project (a symlink?)",
            real.display()
        ));
    }
    Ok(())
}
