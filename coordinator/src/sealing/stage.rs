//! Sealing what workers report: check the staged files against the signed manifest,
//! then seal them with the artifact protocol. Sharded steps seal each shard on its own
//! (so each is cached on its own) and then assemble the step's artifact from the parts
//! plus a `manifest.json`. Runs on the blocking pool.

use crate::planner::{RunContext, ShardSet, ShardUnit, StepPlan};
use crate::state::ArtifactInfo;
use nexa_shared::artifact::{self, MetaInput, SealRequest};
use nexa_shared::digest::FileEntry;
use nexa_shared::job::JobResult;
use nexa_shared::{digest, paths, provenance};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Why a result could not be sealed, and whether that is the worker's doing (its
/// result is wrong) or not (the coordinator's disk, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealFailure {
    /// What went wrong, for the step's record and the log.
    pub reason: String,
    /// Set when the result itself is wrong.
    pub wrong: Option<WrongResult>,
}

/// How a worker's result was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrongResult {
    /// The uploaded bytes are not the signed manifest's.
    ManifestMismatch,
    /// The result names an output the step does not have.
    UnknownOutput,
}

impl SealFailure {
    /// A failure that is not the worker's.
    pub fn ours(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            wrong: None,
        }
    }
}

impl From<String> for SealFailure {
    fn from(reason: String) -> Self {
        Self::ours(reason)
    }
}

impl From<&str> for SealFailure {
    fn from(reason: &str) -> Self {
        Self::ours(reason)
    }
}

impl std::fmt::Display for SealFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl From<nexa_shared::Error> for SealFailure {
    fn from(e: nexa_shared::Error) -> Self {
        let wrong = matches!(e, nexa_shared::Error::ManifestMismatch { .. })
            .then_some(WrongResult::ManifestMismatch);
        Self {
            reason: e.to_string(),
            wrong,
        }
    }
}

fn meta_inputs(plan: &StepPlan) -> Vec<MetaInput> {
    plan.inputs
        .iter()
        .map(|r| MetaInput {
            name: r.name.clone(),
            uri: r.uri.clone(),
            digest: r.digest.clone(),
        })
        .collect()
}

fn expected_files(
    result: &JobResult,
    output: &str,
    prefix: &str,
) -> Result<Vec<FileEntry>, String> {
    result
        .outputs
        .iter()
        .filter(|o| o.output == output)
        .map(|o| {
            paths::check_relative_name(&o.path).map_err(|e| format!("output '{output}': {e}"))?;
            Ok(FileEntry {
                path: format!("{prefix}{}", o.path),
                size: o.size,
                digest: o.digest.to_string(),
            })
        })
        .collect()
}

fn check_output_names(plan: &StepPlan, result: &JobResult) -> Result<(), SealFailure> {
    for o in &result.outputs {
        if !plan.outputs.contains_key(&o.output) {
            return Err(SealFailure {
                reason: format!("result names unknown output '{}'", o.output),
                wrong: Some(WrongResult::UnknownOutput),
            });
        }
    }
    Ok(())
}

/// Moves a staged directory into place, copying when a rename cannot cross filesystems.
fn move_dir(src: &Path, dst: &Path) -> Result<(), String> {
    artifact::remove_tree(dst).map_err(|e| e.to_string())?;
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
    }
    if !src.exists() {
        return fs::create_dir_all(dst).map_err(|e| format!("create {}: {e}", dst.display()));
    }
    match fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(_) => copy_tree(src, dst, false),
    }
}

/// Copies a tree, hard-linking files when `link` is set and the filesystem allows it.
pub fn copy_tree(src: &Path, dst: &Path, link: bool) -> Result<(), String> {
    fs::create_dir_all(dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
    let files = nexa_shared::digest::list_files(src, &[]).map_err(|e| e.to_string())?;
    for (rel, path, _) in files {
        let to = dst.join(&rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        let linked = link && fs::hard_link(&path, &to).is_ok();
        if !linked {
            fs::copy(&path, &to).map_err(|e| format!("copy {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Seals the payload staged at `<out>.tmp` and describes the artifact.
fn seal_output(ctx: &RunContext, out: &Path, req: SealRequest) -> Result<ArtifactInfo, String> {
    let (meta, _) = artifact::seal(out, req).map_err(|e| e.to_string())?;
    Ok(ArtifactInfo {
        path: ctx.rel(out),
        hash: meta.hash,
        bytes: meta.bytes,
    })
}

fn worker_labels(labels: &mut BTreeMap<String, String>, result: &JobResult, output: &str) {
    labels.extend(provenance::labels_for(result, output));
    labels.insert("attempt".into(), result.attempt.to_string());
}

/// One artifact staged at `<out>.tmp`, ready to seal.
#[derive(Debug)]
pub struct Staged {
    /// The step's output name (empty for a shard).
    pub output: String,
    /// Where the artifact goes.
    pub out: std::path::PathBuf,
    /// Its meta.json contents and expected payload.
    pub req: SealRequest,
}

/// Moves an unsharded step's outputs from the job's staging directory to `<out>.tmp`,
/// one [`Staged`] per output.
pub fn stage_step(
    ctx: &RunContext,
    plan: &StepPlan,
    result: &JobResult,
) -> Result<Vec<Staged>, SealFailure> {
    check_output_names(plan, result)?;
    let staging = result
        .staging
        .as_deref()
        .ok_or("result carries no staged outputs")?;
    let step = &ctx.pipeline.steps[plan.step];
    let mut staged = Vec::new();
    for (name, out) in &plan.outputs {
        let tmp = artifact::tmp_path(out);
        move_dir(&staging.join(name), &tmp)?;
        let mut labels = ctx.labels(step, &plan.cache_key, &plan.inputs);
        worker_labels(&mut labels, result, name);
        staged.push(Staged {
            output: name.clone(),
            out: out.clone(),
            req: SealRequest {
                kind: plan.kind.clone(),
                inputs: meta_inputs(plan),
                labels,
                expected: Some(expected_files(result, name, "")?),
                provenance: None,
            },
        });
    }
    Ok(staged)
}

/// Moves one shard's outputs (`<output>/<files>`) to `<shard dir>.tmp`.
pub fn stage_shard(
    ctx: &RunContext,
    plan: &StepPlan,
    unit: &ShardUnit,
    result: &JobResult,
) -> Result<Staged, SealFailure> {
    check_output_names(plan, result)?;
    let staging = result
        .staging
        .as_deref()
        .ok_or("result carries no staged outputs")?;
    let step = &ctx.pipeline.steps[plan.step];
    let set = plan
        .shards
        .as_ref()
        .ok_or("a shard of a step with no shards")?;
    let dir = set.dir(unit);
    let tmp = artifact::tmp_path(&dir);
    artifact::remove_tree(&tmp).map_err(|e| e.to_string())?;
    fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let mut expected = Vec::new();
    for name in plan.outputs.keys() {
        move_dir(&staging.join(name), &tmp.join(name))?;
        expected.extend(expected_files(result, name, &format!("{name}/"))?);
    }
    let mut labels = ctx.labels(step, &unit.cache_key(), &plan.inputs);
    worker_labels(&mut labels, result, "");
    labels.insert("shard".into(), format!("{}/{}", unit.index, set.len()));
    let mut inputs = meta_inputs(plan);
    for i in &mut inputs {
        if i.name == set.over {
            i.uri = set.input(unit).uri;
            i.digest = unit.digest();
        }
    }
    Ok(Staged {
        output: String::new(),
        out: dir,
        req: SealRequest {
            kind: "shard".into(),
            inputs,
            labels,
            expected: Some(expected),
            provenance: None,
        },
    })
}

/// A sharded step's `manifest.json`, written as it is serialized (a `serde_json::Value`
/// of 100,000 shards took ~180 MB of heap at assembly). Fields in alphabetical order,
/// pretty-printed: the bytes a `Value` gave, so step artifact hashes did not move.
#[derive(serde::Serialize)]
struct Manifest<'a> {
    count: usize,
    output: &'a str,
    over: Option<&'a str>,
    shards: ManifestShards<'a>,
    step: &'a str,
}

/// The shards' entries of a manifest: content only (no worker, no signature), from
/// the plan's units and each sealed shard's payload hash, in index order.
struct ManifestShards<'a>(&'a [ShardUnit], &'a [blake3::Hash]);

/// One shard's manifest entry.
#[derive(serde::Serialize)]
struct ManifestShard {
    cache_key: nexa_shared::ids::CacheKey,
    hash: String,
    index: u32,
    input_digest: String,
    records: u64,
}

impl serde::Serialize for ManifestShards<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.iter().zip(self.1).map(|(u, h)| ManifestShard {
            cache_key: u.cache_key(),
            hash: digest::format(h),
            index: u.index,
            input_digest: u.digest(),
            records: u.records,
        }))
    }
}

/// Reads back every sealed shard of a step (its `meta.json`, which must be sealed
/// under the unit's cache key): its payload hash for the manifest, and its signed
/// fields, written straight to the provenance file at `provenance`. Nothing is held
/// per shard but its 32-byte hash.
fn read_shards(set: &ShardSet, provenance: &Path) -> Result<(Vec<blake3::Hash>, String), String> {
    let mut writer = provenance::ProvenanceWriter::create(provenance).map_err(|e| e.to_string())?;
    let mut hashes = Vec::with_capacity(set.len());
    for u in &set.units {
        let meta = artifact::check_cached(&set.dir(u), u.cache_key().as_str(), false)
            .map_err(|m| format!("shard {}: its sealed result is gone ({m:?})", u.index))?;
        let hash = digest::parse(&meta.hash)
            .ok()
            .filter(|h| digest::format(h) == meta.hash)
            .ok_or_else(|| {
                format!(
                    "shard {}: meta.json hash {:?} is not a BLAKE3 digest",
                    u.index, meta.hash
                )
            })?;
        hashes.push(hash);
        if let Some(signed) = meta.labels.get(provenance::SIGNED_LABEL) {
            writer.push(u.index, signed).map_err(|e| e.to_string())?;
        }
    }
    let pinned = writer.finish().map_err(|e| e.to_string())?;
    Ok((hashes, pinned))
}

fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), String> {
    use std::io::Write;
    let f = fs::File::create(path).map_err(|e| format!("write manifest: {e}"))?;
    let mut w = std::io::BufWriter::new(f);
    serde_json::to_writer_pretty(&mut w, manifest).map_err(|e| format!("write manifest: {e}"))?;
    w.flush().map_err(|e| format!("write manifest: {e}"))
}

/// Assembles a sharded step's artifacts: for each output, `shard-NNNNN/` per shard plus
/// `manifest.json`, then seals, each sealed shard's signed fields in the artifact's
/// provenance file. Stale shard results of the step are removed afterwards.
pub fn assemble(
    ctx: &RunContext,
    plan: &StepPlan,
) -> Result<BTreeMap<String, ArtifactInfo>, String> {
    nexa_shared::fail_point!("sealer.assemble");
    let step = &ctx.pipeline.steps[plan.step];
    let set = plan
        .shards
        .as_ref()
        .ok_or("assembling a step with no shards")?;
    let units = &set.units;
    let root = &set.root;
    fs::create_dir_all(root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let provenance_tmp = root.join(format!(".{}", artifact::PROVENANCE));
    let read = read_shards(set, &provenance_tmp);
    let (hashes, pinned) = match read {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&provenance_tmp);
            return Err(e);
        }
    };
    let mut sealed = BTreeMap::new();
    for (name, out) in &plan.outputs {
        let tmp = artifact::tmp_path(out);
        artifact::remove_tree(&tmp).map_err(|e| e.to_string())?;
        fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
        for unit in units {
            let src = set.dir(unit).join(name);
            let dst = tmp.join(format!("shard-{:05}", unit.index));
            if src.exists() {
                copy_tree(&src, &dst, true)?;
            } else {
                fs::create_dir_all(&dst).map_err(|e| format!("create {}: {e}", dst.display()))?;
            }
        }
        // Only content goes into the payload, so the same inputs give the same hash on
        // any machine; who ran each shard (and their signatures) goes into the
        // provenance file, which meta.json pins.
        let manifest = Manifest {
            count: units.len(),
            output: name,
            over: step.shards.as_ref().map(|s| s.over.value.as_str()),
            shards: ManifestShards(units, &hashes),
            step: &step.id.value,
        };
        write_manifest(&tmp.join("manifest.json"), &manifest)?;
        let mut labels = ctx.labels(step, &plan.cache_key, &plan.inputs);
        labels.insert("shards".into(), units.len().to_string());
        labels.insert(provenance::SHARDS_FILE_LABEL.into(), pinned.clone());
        labels.insert(provenance::OUTPUT_LABEL.into(), name.clone());
        let req = SealRequest {
            kind: plan.kind.clone(),
            inputs: meta_inputs(plan),
            labels,
            expected: None,
            provenance: Some(provenance_tmp.clone()),
        };
        let done = seal_output(ctx, out, req);
        if done.is_err() {
            let _ = fs::remove_file(&provenance_tmp);
        }
        sealed.insert(name.clone(), done?);
    }
    let _ = fs::remove_file(&provenance_tmp);
    // Keep only the shard results this artifact was built from (a set: a step of
    // 100,000 shards compared every entry with every unit, 10^10 path comparisons).
    let built: std::collections::HashSet<String> =
        units.iter().map(|u| u.cache_key().into_string()).collect();
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let keep = e.file_name().to_str().is_some_and(|n| built.contains(n));
            if !keep {
                let _ = artifact::remove_tree(&e.path());
            }
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(index: u32) -> ShardUnit {
        let mut key = [0u8; 32];
        key[31] = index as u8;
        ShardUnit {
            index,
            key,
            digest: blake3::hash(&index.to_le_bytes()),
            path: format!("part-{index}").into(),
            is_dir: false,
            spans: None,
            records: 10 + u64::from(index),
            cached: None,
        }
    }

    /// The streamed manifest is byte for byte what the `serde_json::Value` it replaced
    /// gave, so a step artifact's hash (and every cache key downstream) stays the same.
    #[test]
    fn the_streamed_manifest_has_the_bytes_the_value_gave() {
        let units: Vec<ShardUnit> = (0..3).map(unit).collect();
        let hashes: Vec<blake3::Hash> = (0..3u8).map(|i| blake3::hash(&[i])).collect();
        for over in [Some("data"), None] {
            let parts: Vec<serde_json::Value> = units
                .iter()
                .zip(&hashes)
                .map(|(u, h)| {
                    serde_json::json!({
                        "index": u.index,
                        "records": u.records,
                        "input_digest": u.digest(),
                        "cache_key": u.cache_key(),
                        "hash": digest::format(h),
                    })
                })
                .collect();
            let value = serde_json::json!({
                "step": "fan",
                "output": "out",
                "over": over,
                "count": 4,
                "shards": parts,
            });
            let want = serde_json::to_vec_pretty(&value).expect("json");
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("manifest.json");
            let manifest = Manifest {
                count: 4,
                output: "out",
                over,
                shards: ManifestShards(&units, &hashes),
                step: "fan",
            };
            write_manifest(&path, &manifest).expect("write");
            let got = fs::read(&path).expect("read");
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
    }
}
