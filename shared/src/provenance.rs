//! Who made an artifact, in a form anyone can check offline: the worker's public key,
//! its Ed25519 signature, and every field the signature covers, recorded in `meta.json`
//! labels (never in the hashed payload, so hashes stay reproducible). `nexa verify`
//! rebuilds the signed manifest from them and checks the signature and that the
//! payload's files are the ones that were signed.

use crate::artifact::{self, Meta};
use crate::digest::{self, FileEntry};
use crate::job::{JobResult, Outcome, OutputFile};
use crate::{Error, Result, signing};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

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
/// The label that held the signed fields of every shard of an assembled artifact, in
/// artifacts sealed before [`SHARDS_FILE_LABEL`] (still verified).
pub const SHARDS_LABEL: &str = "shard_provenance";
/// The label pinning an assembled artifact's provenance file
/// ([`artifact::PROVENANCE`]) by its BLAKE3 digest.
pub const SHARDS_FILE_LABEL: &str = "shard_provenance_file";
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

/// Writes an assembled artifact's provenance file, one line a shard
/// (`[index, signed fields]`), hashing what it writes: memory is one line, whatever the
/// number of shards.
pub struct ProvenanceWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hasher: blake3::Hasher,
}

impl ProvenanceWriter {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::with_capacity(1 << 16, file),
            hasher: blake3::Hasher::new(),
        })
    }

    /// Adds shard `index`, given the JSON text of its signed fields as a sealed shard's
    /// [`SIGNED_LABEL`] holds it (checked to be one JSON value on one line).
    pub fn push(&mut self, index: u32, signed_json: &str) -> Result<()> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(signed_json)
            .map_err(|e| Error::Signature(format!("shard {index}: label '{SIGNED_LABEL}': {e}")))?;
        let line = format!("[{index},{}]\n", raw.get());
        if line.matches('\n').count() != 1 {
            return Err(Error::Signature(format!(
                "shard {index}: label '{SIGNED_LABEL}' spans lines"
            )));
        }
        self.hasher.update(line.as_bytes());
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io("write", &self.path, e))
    }

    /// Flushes the file; its digest (`blake3:<hex>`), for [`SHARDS_FILE_LABEL`].
    pub fn finish(mut self) -> Result<String> {
        self.file
            .flush()
            .map_err(|e| Error::io("write", &self.path, e))?;
        Ok(digest::format(&self.hasher.finalize()))
    }
}

/// Checks one shard's signature and adds its signed files of output `name` to `want`.
fn check_shard(
    (index, s): (u32, &Signed),
    name: &str,
    want: &mut Vec<FileEntry>,
    workers: &mut BTreeSet<String>,
) -> Result<()> {
    s.verify()
        .map_err(|e| Error::Signature(format!("shard {index}: {e}")))?;
    want.extend(s.files_of(name, &format!("shard-{index:05}/")));
    if !workers.contains(&s.worker) {
        workers.insert(s.worker.clone());
    }
    Ok(())
}

/// Reads an assembled artifact's provenance file a line at a time, checking each shard
/// (see [`check_shard`]) and, at its end, that the file is the one `pinned` names.
fn check_provenance_file(
    out: &Path,
    pinned: &str,
    name: &str,
    want: &mut Vec<FileEntry>,
    workers: &mut BTreeSet<String>,
) -> Result<()> {
    let path = out.join(artifact::PROVENANCE);
    let file = std::fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut hasher = blake3::Hasher::new();
    let mut line = String::new();
    for n in 1.. {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|e| Error::io("read", &path, e))?
            == 0
        {
            break;
        }
        hasher.update(line.as_bytes());
        let (index, s): (u32, Signed) = serde_json::from_str(line.trim_end())
            .map_err(|e| Error::Signature(format!("{}:{n}: {e}", path.display())))?;
        check_shard((index, &s), name, want, workers)
            .map_err(|e| Error::Signature(format!("{}:{n}: {e}", path.display())))?;
    }
    if digest::format(&hasher.finalize()) != pinned {
        return Err(Error::Signature(format!(
            "{}: not the provenance file meta.json pins (label '{SHARDS_FILE_LABEL}')",
            path.display()
        )));
    }
    Ok(())
}

/// Re-hashes an artifact against its `meta.json`, then checks every recorded signature
/// and that the payload's files are exactly the signed ones.
pub fn verify_artifact(out: &Path) -> Result<Verified> {
    let meta = artifact::verify(out)?;
    let tree = digest::hash_tree(out, artifact::NOT_PAYLOAD)?;
    let mut workers = BTreeSet::new();
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
        workers.insert(s.worker);
    }
    let pinned = meta.labels.get(SHARDS_FILE_LABEL);
    let inline = meta.labels.get(SHARDS_LABEL);
    if pinned.is_some() || inline.is_some() {
        let name = meta.labels.get(OUTPUT_LABEL).cloned().unwrap_or_default();
        let mut want = Vec::new();
        if let Some(pinned) = pinned {
            check_provenance_file(out, pinned, &name, &mut want, &mut workers)?;
        }
        if let Some(text) = inline {
            let shards: Vec<(u32, Signed)> = serde_json::from_str(text)
                .map_err(|e| Error::Signature(format!("label '{SHARDS_LABEL}': {e}")))?;
            for (index, s) in &shards {
                check_shard((*index, s), &name, &mut want, &mut workers)?;
            }
        }
        let got: Vec<FileEntry> = tree
            .files
            .iter()
            .filter(|f| f.path != "manifest.json")
            .cloned()
            .collect();
        same_files(want, &got, &out.display().to_string())?;
    } else if out.join(artifact::PROVENANCE).exists() {
        return Err(Error::Signature(format!(
            "{}: a provenance file that meta.json does not pin",
            out.display()
        )));
    }
    Ok(Verified {
        meta,
        workers: workers.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests;
