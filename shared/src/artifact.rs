//! The atomic artifact protocol (the seeds' `core/artifacts.py`, made crash-safe).
//!
//! ```text
//! <out>.tmp/            payload written here, then meta.json, everything fsynced
//! <out>  -> <out>.old   only when an older artifact is there (kept until the new one is sealed)
//! <out>.tmp -> <out>    atomic rename, parent fsynced
//! <out>/COMPLETE        the seal; only now is <out> an artifact
//! rm -r <out>.old       the old one goes
//! pointers (latest)     move only after COMPLETE
//! ```
//!
//! [`recover`] puts any crash state back to "the old artifact or the new one": a renamed
//! but unsealed artifact whose payload matches its `meta.json` is sealed, anything else
//! half-made is removed and `<out>.old` is restored.

use crate::digest::{self, TreeDigest};
use crate::error::IoContext;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The seal marker's name.
pub const COMPLETE: &str = "COMPLETE";
/// The metadata file's name.
pub const META: &str = "meta.json";
/// The provenance file of an assembled (sharded) artifact: one JSON line per shard,
/// `[index, signed fields]`, its BLAKE3 digest pinned in `meta.json` (a label of a
/// million shards' signatures would be a ~600 MB `meta.json`, built in memory).
pub const PROVENANCE: &str = ".nexa-provenance.jsonl";
/// Names inside an artifact that are not payload.
pub const NOT_PAYLOAD: &[&str] = &[META, COMPLETE, PROVENANCE];

/// One input recorded in `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetaInput {
    /// The step's name for the input.
    pub name: String,
    /// Where it came from.
    pub uri: String,
    /// Its content digest.
    pub digest: String,
}

/// `meta.json`, as the seeds define it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// What the artifact is (`dataset`, `checkpoint`, `eval_report`, `shard`, ...).
    pub kind: String,
    /// Canonical URI (`file://` + absolute path).
    pub uri: String,
    /// `blake3:<hex>` over the sorted payload tree.
    pub hash: String,
    /// Payload bytes.
    pub bytes: u64,
    /// RFC 3339 creation time (not part of any hash).
    pub created_at: String,
    /// Inputs with their digests.
    pub inputs: Vec<MetaInput>,
    /// Lineage labels: `run_id`, `step_id`, `cache_key`, `git_sha`, worker key, signature.
    pub labels: BTreeMap<String, String>,
}

/// `<out>.tmp`.
pub fn tmp_path(out: &Path) -> PathBuf {
    suffixed(out, ".tmp")
}

/// `<out>.old`.
pub fn old_path(out: &Path) -> PathBuf {
    suffixed(out, ".old")
}

fn suffixed(out: &Path, suffix: &str) -> PathBuf {
    let mut s = out.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// True when `<out>/COMPLETE` exists.
pub fn is_complete(out: &Path) -> bool {
    out.join(COMPLETE).is_file()
}

/// Reads `<out>/meta.json`.
pub fn read_meta(out: &Path) -> Result<Meta> {
    let p = out.join(META);
    let bytes = fs::read(&p).ctx("read", &p)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        context: p.display().to_string(),
        source,
    })
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx("fsync", dir)
}

fn fsync_tree(root: &Path) -> Result<()> {
    for (_, path, _) in digest::list_files(root, &[])? {
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .ctx("fsync", &path)?;
    }
    fsync_dirs(root)
}

fn fsync_dirs(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).ctx("read dir", dir)? {
        let e = e.ctx("read dir", dir)?;
        if e.file_type().ctx("stat", &e.path())?.is_dir() {
            fsync_dirs(&e.path())?;
        }
    }
    fsync_dir(dir)
}

/// What a seal needs besides the payload.
#[derive(Debug, Clone)]
pub struct SealRequest {
    /// `kind` for meta.json.
    pub kind: String,
    /// Inputs for meta.json.
    pub inputs: Vec<MetaInput>,
    /// Labels for meta.json.
    pub labels: BTreeMap<String, String>,
    /// When given, the payload must be exactly these files (what a worker reported);
    /// anything else refuses the seal and removes the staged payload.
    pub expected: Option<Vec<digest::FileEntry>>,
    /// A provenance file to copy in as [`PROVENANCE`] once the payload is checked and
    /// hashed (not payload; its digest belongs in `labels`).
    pub provenance: Option<PathBuf>,
}

/// Seals the payload already written in `<out>.tmp` as the artifact at `out`.
/// Returns the metadata and the hashed tree (for checking against a worker's report).
pub fn seal(out: &Path, req: SealRequest) -> Result<(Meta, TreeDigest)> {
    let mut done = seal_group(vec![(out.to_path_buf(), req)]);
    done.pop().unwrap_or_else(|| {
        Err(Error::Artifact {
            path: out.to_path_buf(),
            reason: "nothing sealed".into(),
        })
    })
}

/// How a seal makes each phase durable before the next one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// fsync exactly the files and directories the phase touched (one artifact).
    Targeted,
    /// One `syncfs` per filesystem for the whole group (many artifacts): a handful of
    /// flushes instead of five per artifact.
    Filesystem,
}

/// Seals many staged artifacts together, with the same order as [`seal`] (payload and
/// meta.json durable → rename durable → `COMPLETE` durable → old copies removed), but each
/// phase made durable once for the whole group. Results come back in request order; one
/// artifact's failure does not affect the others. The `out` paths must be distinct.
pub fn seal_group(reqs: Vec<(PathBuf, SealRequest)>) -> Vec<Result<(Meta, TreeDigest)>> {
    let mode = if reqs.len() > 1 {
        Durability::Filesystem
    } else {
        Durability::Targeted
    };
    let mut results: Vec<Result<(PathBuf, Meta, TreeDigest)>> = reqs
        .into_iter()
        .map(|(out, req)| prepare(&out, req, mode).map(|(m, t)| (out, m, t)))
        .collect();
    // Each phase is durable before the next starts (for a group: one syncfs per
    // filesystem): payloads and meta.json before any rename, the renames before any
    // COMPLETE, COMPLETE before anyone is told.
    let phases: [fn(&Path, Durability) -> Result<()>; 2] = [swap_in, touch_complete];
    if let Err(e) = sync_group(&results, mode) {
        return fail_all(results, &e);
    }
    for phase in phases {
        for r in &mut results {
            if let Ok((out, _, _)) = r
                && let Err(e) = phase(out, mode)
            {
                *r = Err(e);
            }
        }
        if let Err(e) = sync_group(&results, mode) {
            return fail_all(results, &e);
        }
    }
    results
        .into_iter()
        .map(|r| {
            let (out, meta, tree) = r?;
            let old = old_path(&out);
            if old.exists() {
                remove_tree(&old)?;
            }
            Ok((meta, tree))
        })
        .collect()
}

fn fail_all(
    results: Vec<Result<(PathBuf, Meta, TreeDigest)>>,
    e: &Error,
) -> Vec<Result<(Meta, TreeDigest)>> {
    results
        .into_iter()
        .map(|r| {
            let (out, _, _) = r?;
            Err(Error::Artifact {
                path: out,
                reason: format!("making the group durable: {e}"),
            })
        })
        .collect()
}

/// For a group, `syncfs` the filesystems of the artifacts still going (a lone artifact
/// fsyncs what it touches inside each phase instead).
fn sync_group(results: &[Result<(PathBuf, Meta, TreeDigest)>], mode: Durability) -> Result<()> {
    if mode != Durability::Filesystem {
        return Ok(());
    }
    let live: Vec<PathBuf> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(out, _, _)| out.clone()))
        .collect();
    sync_filesystems(&live)
}

/// `syncfs` once for each filesystem holding one of `outs`.
fn sync_filesystems(outs: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let parents: std::collections::BTreeSet<&Path> = outs
        .iter()
        .map(|o| o.parent().unwrap_or(Path::new(".")))
        .collect();
    let mut devices = std::collections::BTreeSet::new();
    for dir in parents {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let f = fs::File::open(dir).ctx("open", dir)?;
        let dev = f.metadata().ctx("stat", dir)?.dev();
        if devices.insert(dev) {
            rustix::fs::syncfs(&f).map_err(|e| Error::io("syncfs", dir, e.into()))?;
        }
    }
    Ok(())
}

/// Phase 1: checks and hashes `<out>.tmp`, writes meta.json, makes the payload read-only.
fn prepare(out: &Path, req: SealRequest, mode: Durability) -> Result<(Meta, TreeDigest)> {
    let tmp = tmp_path(out);
    if !tmp.is_dir() {
        return Err(Error::Artifact {
            path: out.to_path_buf(),
            reason: format!("nothing staged at {}", tmp.display()),
        });
    }
    for name in NOT_PAYLOAD {
        let p = tmp.join(name);
        if p.exists() {
            return Err(Error::Artifact {
                path: out.to_path_buf(),
                reason: format!("payload must not contain a file named {name}"),
            });
        }
    }
    own_files(&tmp)?;
    let tree = digest::hash_tree(&tmp, NOT_PAYLOAD)?;
    if let Some(mut expected) = req.expected {
        expected.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        if expected != tree.files {
            let reason = describe_mismatch(&expected, &tree.files);
            remove_tree(&tmp)?;
            return Err(Error::ManifestMismatch {
                path: out.to_path_buf(),
                reason,
            });
        }
    }
    let abs = std::path::absolute(out).ctx("resolve", out)?;
    let meta = Meta {
        kind: req.kind,
        uri: format!("file://{}", abs.display()),
        hash: tree.digest.clone(),
        bytes: tree.bytes,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        inputs: req.inputs,
        labels: req.labels,
    };
    let meta_bytes = serde_json::to_vec_pretty(&meta).map_err(|source| Error::Json {
        context: "meta.json".into(),
        source,
    })?;
    if let Some(src) = &req.provenance {
        let dst = tmp.join(PROVENANCE);
        fs::copy(src, &dst).ctx("copy", src)?;
    }
    let meta_path = tmp.join(META);
    fs::write(&meta_path, meta_bytes).ctx("write", &meta_path)?;
    crate::fail_point!(
        "seal.prepare",
        Error::io(
            "write",
            &meta_path,
            crate::failpoint::injected("seal.prepare")
        )
    );
    make_read_only(&tmp)?;
    if mode == Durability::Targeted {
        fsync_tree(&tmp)?;
    }
    Ok((meta, tree))
}

/// Phase 2: moves an existing artifact to `<out>.old` and renames `<out>.tmp` to `out`.
fn swap_in(out: &Path, mode: Durability) -> Result<()> {
    let tmp = tmp_path(out);
    let old = old_path(out);
    if out.exists() {
        if old.exists() {
            remove_tree(&old)?;
        }
        fs::rename(out, &old).ctx("rename", out)?;
    }
    // The moment between the two renames: no artifact at `out` (a kept one is at .old).
    crate::fail_point!(
        "seal.swap_in",
        Error::io("rename", &tmp, crate::failpoint::injected("seal.swap_in"))
    );
    fs::rename(&tmp, out).ctx("rename", &tmp)?;
    if mode == Durability::Targeted {
        fsync_dir(out.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

fn describe_mismatch(expected: &[digest::FileEntry], got: &[digest::FileEntry]) -> String {
    for e in expected {
        match got.iter().find(|g| g.path == e.path) {
            None => return format!("{} is missing", e.path),
            Some(g) if g != e => {
                return format!(
                    "{} is {} bytes {} but the manifest says {} bytes {}",
                    e.path, g.size, g.digest, e.size, e.digest
                );
            }
            Some(_) => {}
        }
    }
    for g in got {
        if !expected.iter().any(|e| e.path == g.path) {
            return format!("{} is not in the manifest", g.path);
        }
    }
    "file lists differ".into()
}

/// Phase 3: the seal marker.
fn touch_complete(out: &Path, mode: Durability) -> Result<()> {
    let c = out.join(COMPLETE);
    crate::fail_point!(
        "seal.complete",
        Error::io("write", &c, crate::failpoint::injected("seal.complete"))
    );
    let f = fs::File::create(&c).ctx("write", &c)?;
    if mode == Durability::Targeted {
        f.sync_all().ctx("fsync", &c)?;
        fsync_dir(out)?;
    }
    Ok(())
}

/// Gives every payload file an inode of its own: a file with more than one link (a job
/// that ran `ln /etc/passwd $NEXA_OUT/passwd`, or linked its input) is replaced by a
/// copy, so that sealing (the chmod, and later the seal's immutability) never touches a
/// file outside the artifact, and the artifact never changes when that file does.
/// Symlinks and special files are refused by the walk. Links that sealing cannot change
/// are kept (a sharded step's assembly links its sealed, read-only parts): read-only
/// files owned by whoever owns the payload directory.
fn own_files(root: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(root).ctx("stat", root)?.uid();
    for (rel, path, _) in digest::list_files(root, &[])? {
        let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
        let sealed_part = meta.mode() & 0o222 == 0 && meta.uid() == owner;
        if meta.nlink() <= 1 || sealed_part {
            continue;
        }
        let copy = path.with_file_name(format!(
            ".nexa-own-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        fs::copy(&path, &copy).ctx("copy", &path)?;
        fs::rename(&copy, &path).ctx("rename", &copy)?;
        tracing::debug!(file = %rel, links = meta.nlink(), "hard-linked output copied before sealing");
    }
    Ok(())
}

/// Marks the payload files read-only: a sealed artifact is immutable.
fn make_read_only(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (_, path, _) in digest::list_files(root, &[])? {
        let mut perm = fs::metadata(&path).ctx("stat", &path)?.permissions();
        perm.set_mode(perm.mode() & 0o555);
        fs::set_permissions(&path, perm).ctx("chmod", &path)?;
    }
    Ok(())
}

/// Removes a directory tree (artifact payloads are read-only files in writable dirs).
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// What [`recover`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was out of place.
    Clean,
    /// A stale `<out>.tmp` was removed.
    RemovedTmp,
    /// A renamed but unsealed artifact verified and was sealed.
    SealedNew,
    /// A half artifact was removed and the old one restored.
    RestoredOld,
    /// A half artifact was removed; there was no old one.
    RemovedHalf,
}

/// Brings `out` back to a clean state after a crash (see the module docs). Must not run
/// while a seal of the same `out` is in progress.
pub fn recover(out: &Path) -> Result<Recovery> {
    let mut what = Recovery::Clean;
    let tmp = tmp_path(out);
    if tmp.exists() {
        remove_tree(&tmp)?;
        what = Recovery::RemovedTmp;
    }
    let old = old_path(out);
    if out.exists() && !is_complete(out) {
        let verified = read_meta(out).ok().and_then(|m| {
            let t = digest::hash_tree(out, NOT_PAYLOAD).ok()?;
            (t.digest == m.hash && t.bytes == m.bytes).then_some(())
        });
        if verified.is_some() {
            touch_complete(out, Durability::Targeted)?;
            what = Recovery::SealedNew;
        } else {
            remove_tree(out)?;
            what = Recovery::RemovedHalf;
        }
    }
    if old.exists() {
        if out.exists() {
            remove_tree(&old)?;
        } else {
            fs::rename(&old, out).ctx("rename", &old)?;
            what = Recovery::RestoredOld;
        }
    }
    Ok(what)
}

/// The content digest of an input path: a sealed artifact counts by its payload (without
/// `meta.json` and `COMPLETE`, so it equals the artifact's `hash`), anything else by
/// [`digest::hash_path`]. Returns `(digest, bytes, is_dir)`.
pub fn input_digest(path: &Path) -> Result<(String, u64, bool)> {
    if path.is_dir() && is_complete(path) {
        let t = digest::hash_tree(path, NOT_PAYLOAD)?;
        return Ok((t.digest, t.bytes, true));
    }
    digest::hash_path(path)
}

/// The files of an input directory that are its content (see [`input_digest`]).
pub fn input_files(path: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let exclude: &[&str] = if is_complete(path) { NOT_PAYLOAD } else { &[] };
    digest::list_files(path, exclude)
}

/// Why a cached artifact cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No artifact or no `COMPLETE`.
    Absent,
    /// Sealed under another cache key.
    KeyChanged,
    /// Payload missing or not the recorded size.
    PayloadChanged(String),
    /// `--verify` re-hashed it and the hash differs.
    HashMismatch,
}

/// Checks whether the artifact at `out` can be reused for `cache_key`: `COMPLETE`, same
/// key, payload present with the recorded size, and (with `verify`) the same hash.
pub fn check_cached(out: &Path, cache_key: &str, verify: bool) -> std::result::Result<Meta, Miss> {
    if !is_complete(out) {
        return Err(Miss::Absent);
    }
    let meta = read_meta(out).map_err(|_| Miss::Absent)?;
    if meta.labels.get("cache_key").map(String::as_str) != Some(cache_key) {
        return Err(Miss::KeyChanged);
    }
    if verify {
        let t =
            digest::hash_tree(out, NOT_PAYLOAD).map_err(|e| Miss::PayloadChanged(e.to_string()))?;
        if t.digest != meta.hash {
            return Err(Miss::HashMismatch);
        }
    } else {
        let files = digest::list_files(out, NOT_PAYLOAD)
            .map_err(|e| Miss::PayloadChanged(e.to_string()))?;
        let size: u64 = files.iter().map(|f| f.2).sum();
        if size != meta.bytes {
            return Err(Miss::PayloadChanged(format!(
                "payload is {size} bytes, meta.json says {}",
                meta.bytes
            )));
        }
    }
    Ok(meta)
}

/// Re-hashes a sealed artifact and compares with its `meta.json`.
pub fn verify(out: &Path) -> Result<Meta> {
    if !is_complete(out) {
        return Err(Error::Artifact {
            path: out.to_path_buf(),
            reason: "not sealed (no COMPLETE)".into(),
        });
    }
    let meta = read_meta(out)?;
    let t = digest::hash_tree(out, NOT_PAYLOAD)?;
    if t.digest != meta.hash || t.bytes != meta.bytes {
        return Err(Error::Artifact {
            path: out.to_path_buf(),
            reason: format!(
                "payload hash {} does not match meta.json {}",
                t.digest, meta.hash
            ),
        });
    }
    Ok(meta)
}

/// Points the symlink `link` at the sealed artifact `target`, atomically. Refuses a target
/// without `COMPLETE`: pointers move only after the seal.
pub fn set_pointer(link: &Path, target: &Path) -> Result<()> {
    if !is_complete(target) {
        return Err(Error::Artifact {
            path: target.to_path_buf(),
            reason: "a pointer may only name a sealed artifact".into(),
        });
    }
    let dir = link.parent().unwrap_or(Path::new("."));
    let rel = pathdiff(target, dir);
    let staged = suffixed(link, ".ptr-tmp");
    let _ = fs::remove_file(&staged);
    std::os::unix::fs::symlink(&rel, &staged).ctx("symlink", &staged)?;
    fs::rename(&staged, link).ctx("rename", &staged)?;
    fsync_dir(dir)
}

fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let (Ok(t), Ok(b)) = (std::path::absolute(target), std::path::absolute(base)) else {
        return target.to_path_buf();
    };
    let tc: Vec<_> = t.components().collect();
    let bc: Vec<_> = b.components().collect();
    let common = tc.iter().zip(&bc).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..bc.len() {
        out.push("..");
    }
    for c in &tc[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
