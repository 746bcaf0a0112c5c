//! Who made an artifact, in a form anyone can check offline: the worker's public key,
//! its Ed25519 signature, and every field the signature covers, recorded in `meta.json`
//! labels (never in the hashed payload, so hashes stay reproducible). `nexa verify`
//! rebuilds the signed manifest from them and checks the signature and that the
//! payload's files are the ones that were signed.

use crate::artifact::{self, Meta};
use crate::digest::{self, FileEntry};
use crate::job::{JobResult, Outcome, OutputFile};
use crate::{Error, Result, signing};
use std::collections::BTreeMap;
use std::path::Path;

/// The signed fields of one job result, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signed {
    /// The worker's public key (hex).
    pub worker: String,
    /// The signature (hex).
    pub signature: String,
    /// Job id.
    pub job_id: crate::ids::JobId,
    /// Lease generation.
    pub generation: u64,
    /// Attempt.
    pub attempt: u32,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Start (ms since the epoch).
    pub started_ms: u64,
    /// End (ms since the epoch).
    pub ended_ms: u64,
    /// Every output file the job reported, all outputs together.
    pub outputs: Vec<OutputFile>,
}

impl Signed {
    /// The signed fields of an accepted result.
    pub fn of(r: &JobResult) -> Self {
        Self {
            worker: hex::encode(r.worker_key),
            signature: hex::encode(&r.signature),
            job_id: r.job_id.clone(),
            generation: r.generation,
            attempt: r.attempt,
            exit_code: r.exit_code,
            started_ms: r.started_ms,
            ended_ms: r.ended_ms,
            outputs: r.outputs.clone(),
        }
    }

    /// Checks the signature against the recorded key.
    pub fn verify(&self) -> Result<[u8; 32]> {
        let key: [u8; 32] = hex::decode(&self.worker)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| Error::Signature("recorded worker key is not 32 hex bytes".into()))?;
        let signature = hex::decode(&self.signature)
            .map_err(|_| Error::Signature("recorded signature is not hex".into()))?;
        let r = JobResult {
            job_id: self.job_id.clone(),
            generation: self.generation,
            attempt: self.attempt,
            outcome: Outcome::Succeeded,
            exit_code: self.exit_code,
            outputs: self.outputs.clone(),
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            error: String::new(),
            staging: None,
            log: None,
            progress: None,
            worker_key: key,
            signature,
        };
        signing::verify_result(&key, &r)?;
        Ok(key)
    }

    /// The files of output `name` as signed, with paths under `prefix`.
    pub fn files_of(&self, name: &str, prefix: &str) -> Vec<FileEntry> {
        self.outputs
            .iter()
            .filter(|o| o.output == name)
            .map(|o| FileEntry {
                path: format!("{prefix}{}", o.path),
                size: o.size,
                digest: o.digest.to_string(),
            })
            .collect()
    }
}

/// The label holding one result's signed fields.
pub const SIGNED_LABEL: &str = "signed";
/// The label holding the signed fields of every shard of an assembled artifact.
pub const SHARDS_LABEL: &str = "shard_provenance";
/// The label naming which output of the job this artifact is.
pub const OUTPUT_LABEL: &str = "output";

/// Labels for an artifact sealed from one job's output `name`.
pub fn labels_for(r: &JobResult, name: &str) -> BTreeMap<String, String> {
    let s = Signed::of(r);
    let mut l = BTreeMap::new();
    l.insert("worker".into(), s.worker.clone());
    l.insert("signature".into(), s.signature.clone());
    l.insert(OUTPUT_LABEL.into(), name.to_string());
    l.insert(
        SIGNED_LABEL.into(),
        serde_json::to_string(&s).unwrap_or_default(),
    );
    l
}

/// What `verify_artifact` checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The artifact's metadata.
    pub meta: Meta,
    /// Public keys (hex) of the workers whose signatures were checked.
    pub workers: Vec<String>,
}

fn same_files(mut want: Vec<FileEntry>, got: &[FileEntry], what: &str) -> Result<()> {
    want.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    if want != got {
        return Err(Error::Signature(format!(
            "{what}: the payload's files are not the ones the worker signed"
        )));
    }
    Ok(())
}

/// Re-hashes an artifact against its `meta.json`, then checks every recorded signature
/// and that the payload's files are exactly the signed ones.
pub fn verify_artifact(out: &Path) -> Result<Verified> {
    let meta = artifact::verify(out)?;
    let tree = digest::hash_tree(out, artifact::NOT_PAYLOAD)?;
    let mut workers = Vec::new();
    if let Some(text) = meta.labels.get(SIGNED_LABEL) {
        let s: Signed = serde_json::from_str(text)
            .map_err(|e| Error::Signature(format!("label '{SIGNED_LABEL}': {e}")))?;
        s.verify()?;
        let name = meta.labels.get(OUTPUT_LABEL).cloned().unwrap_or_default();
        let prefix = if meta.kind == "shard" {
            format!("{name}/")
        } else {
            String::new()
        };
        let want = if meta.kind == "shard" {
            // A shard artifact holds every output of its job.
            s.outputs
                .iter()
                .map(|o| FileEntry {
                    path: format!("{}/{}", o.output, o.path),
                    size: o.size,
                    digest: o.digest.to_string(),
                })
                .collect()
        } else {
            s.files_of(&name, &prefix)
        };
        same_files(want, &tree.files, &out.display().to_string())?;
        workers.push(s.worker);
    }
    if let Some(text) = meta.labels.get(SHARDS_LABEL) {
        let shards: Vec<(u32, Signed)> = serde_json::from_str(text)
            .map_err(|e| Error::Signature(format!("label '{SHARDS_LABEL}': {e}")))?;
        let name = meta.labels.get(OUTPUT_LABEL).cloned().unwrap_or_default();
        let mut want = Vec::new();
        for (index, s) in &shards {
            s.verify()
                .map_err(|e| Error::Signature(format!("shard {index}: {e}")))?;
            want.extend(s.files_of(&name, &format!("shard-{index:05}/")));
            workers.push(s.worker.clone());
        }
        let got: Vec<FileEntry> = tree
            .files
            .iter()
            .filter(|f| f.path != "manifest.json")
            .cloned()
            .collect();
        same_files(want, &got, &out.display().to_string())?;
    }
    workers.sort();
    workers.dedup();
    Ok(Verified { meta, workers })
}
