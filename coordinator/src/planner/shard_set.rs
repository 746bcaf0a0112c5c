//! A fan-out's plan, compact: a million-shard step's plan is held whole while it runs,
//! so what its shards share (the input's name, uri and file, where results go, how
//! parts are named) is in its [`ShardSet`] once, and a [`ShardUnit`] is its index, two
//! 32-byte digests, its records and its spans: ~130 bytes, where a unit of strings and
//! paths was ~1 KB.

use super::{ResolvedInput, RunContext, key_for};
use nexa_shared::artifact;
use nexa_shared::ids::CacheKey;
use nexa_shared::spec::Step;
use nexa_shared::{digest, shard};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One shard of a fanned-out step.
#[derive(Debug, Clone)]
pub struct ShardUnit {
    /// 0-based index.
    pub index: u32,
    /// Whether the part is a directory.
    pub is_dir: bool,
    /// Records in the part.
    pub records: u64,
    /// Its own cache key (the hex of these bytes).
    pub(crate) key: [u8; 32],
    /// The part's content digest.
    pub(crate) digest: blake3::Hash,
    /// A copied part's path; empty for a range part named as its set names them.
    pub(crate) path: PathBuf,
    /// A range part's spans of the set's source.
    pub(crate) spans: Option<Box<[(u64, u64)]>>,
    /// Set when already sealed under its key.
    pub cached: Option<Box<CachedShard>>,
}

impl ShardUnit {
    /// Its cache key.
    pub fn cache_key(&self) -> CacheKey {
        CacheKey::from(hex::encode(self.key))
    }

    /// The part's digest, `blake3:<hex>`.
    pub fn digest(&self) -> String {
        digest::format(&self.digest)
    }
}

/// What the planner read of a shard result already sealed under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedShard {
    /// Its payload hash.
    pub hash: String,
    /// The worker that produced it (hex public key), when recorded.
    pub worker: Option<String>,
}

/// A fanned-out step's shards and what they share.
#[derive(Debug, Clone)]
pub struct ShardSet {
    /// The sharded input's name (`shards.over`).
    pub over: String,
    /// Its uri as written; a shard's is `<uri>#part-<index>`.
    pub uri: String,
    /// Where shard results are sealed, each at `<root>/<cache key>`.
    pub root: PathBuf,
    /// The file the range parts are spans of.
    source: Arc<Path>,
    /// A range part's file name inside its directory (a split artifact's one file).
    inner: Option<String>,
    /// What follows `part-NNNNN` in a range part's name (the input's extension).
    suffix: String,
    /// The shards, in index order.
    pub units: Vec<ShardUnit>,
}

impl ShardSet {
    /// Where shard `u`'s result is sealed.
    pub fn dir(&self, u: &ShardUnit) -> PathBuf {
        self.root.join(hex::encode(u.key))
    }

    /// Shard `u`'s part as the input it stands in for (made when needed, not kept).
    pub fn input(&self, u: &ShardUnit) -> ResolvedInput {
        let path = match (&u.spans, u.path.as_os_str().is_empty()) {
            (Some(_), true) => PathBuf::from(format!("{}{}", part_name(u.index), self.suffix)),
            _ => u.path.clone(),
        };
        ResolvedInput {
            name: self.over.clone(),
            uri: format!("{}#part-{}", self.uri, u.index),
            digest: u.digest(),
            path,
            is_dir: u.is_dir,
            range: u.spans.as_ref().map(|spans| {
                Arc::new(shard::Range {
                    source: self.source.clone(),
                    spans: spans.to_vec(),
                    inner: self.inner.clone(),
                })
            }),
        }
    }

    /// The number of shards.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

/// How the split names part `i` (`part-NNNNN`, then the input's extension).
fn part_name(i: u32) -> String {
    format!("part-{i:05}")
}

/// The 32 bytes of a hex cache key or a `blake3:` digest as the planner made them
/// (lower-case hex, so written back they are the same text).
fn bytes_of(what: &str, text: &str) -> Result<[u8; 32], String> {
    let hex_part = text.strip_prefix(digest::PREFIX).unwrap_or(text);
    let mut out = [0u8; 32];
    match hex::decode_to_slice(hex_part, &mut out) {
        Ok(()) if hex::encode(out) == hex_part => Ok(out),
        _ => Err(format!("{what} {text:?} is not 32 bytes of lower-case hex")),
    }
}

/// Splits step `step`'s input `over` as `cut` says and plans its shards: each its own
/// cache key, and its sealed result reused when there is one.
pub(super) fn plan_shards(
    ctx: &RunContext,
    step: &Step,
    inputs: &[ResolvedInput],
    over: &str,
    cut: shard::Cut,
) -> Result<ShardSet, String> {
    let input = inputs
        .iter()
        .find(|r| r.name == over)
        .ok_or_else(|| format!("shards.over names unknown input '{over}'"))?;
    let hex = input.digest.trim_start_matches(digest::PREFIX);
    // Range shards unless the operator asked for copies (the split before them).
    let (staging, suffix) = match std::env::var_os("NEXA_SHARDS_COPY") {
        Some(v) if v == "1" => (shard::Staging::Copies, "-copies"),
        _ => (shard::Staging::Ranges, ""),
    };
    let dest = ctx.state_dir.join("splits").join(format!(
        "{}-{}{suffix}",
        &hex[..hex.len().min(32)],
        cut.label()
    ));
    let split = shard::split(&input.path, cut, &dest, staging)
        .map_err(|e| format!("splitting input '{over}': {e}"))?;
    // Each shard's cache key names its index among `count` (for `count`, the number
    // asked, so keys stay what they were when a short input drops empty parts).
    let count = match cut {
        shard::Cut::Count(n) => n,
        _ => split.parts.len() as u32,
    };
    let mut set = ShardSet {
        over: over.to_string(),
        uri: input.uri.clone(),
        root: ctx.state_dir.join("shards").join(&step.id.value),
        source: Arc::from(Path::new("")),
        inner: None,
        suffix: String::new(),
        units: Vec::with_capacity(split.parts.len()),
    };
    let mut first_range = true;
    for part in split.parts {
        let key = key_for(
            step,
            inputs,
            Some((over, &part.digest)),
            Some((part.index, count)),
        );
        let dir = set.root.join(key.as_str());
        if let Err(e) = artifact::recover(&dir) {
            return Err(format!("recovering shard {}: {e}", part.index));
        }
        let cached = artifact::check_cached(&dir, &key, ctx.verify)
            .ok()
            .map(|m| {
                Box::new(CachedShard {
                    worker: m.labels.get("worker").cloned(),
                    hash: m.hash,
                })
            });
        let is_dir = part.is_dir();
        let (path, spans) = match part.range {
            Some(r) => {
                let name = part
                    .path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if first_range {
                    first_range = false;
                    set.source = r.source.clone();
                    set.inner = r.inner.clone();
                    set.suffix = name
                        .strip_prefix(&part_name(part.index))
                        .unwrap_or_default()
                        .to_string();
                }
                if r.source != set.source || r.inner != set.inner {
                    return Err(format!(
                        "splitting input '{over}': part {} is a range of {}, not of {}",
                        part.index,
                        r.source.display(),
                        set.source.display()
                    ));
                }
                // Named as the set names its parts: nothing to keep; else its name.
                let own = if name == format!("{}{}", part_name(part.index), set.suffix) {
                    PathBuf::new()
                } else {
                    PathBuf::from(name)
                };
                (own, Some(r.spans.into_boxed_slice()))
            }
            None => (part.path, None),
        };
        set.units.push(ShardUnit {
            index: part.index,
            is_dir,
            records: part.records,
            key: bytes_of("cache key", key.as_str())?,
            digest: blake3::Hash::from_bytes(bytes_of("part digest", &part.digest)?),
            path,
            spans,
            cached,
        });
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_units_key_and_digest_are_the_text_they_were_made_from() {
        let key = "ab".repeat(32);
        let d = format!("blake3:{}", "0f".repeat(32));
        let u = ShardUnit {
            index: 7,
            is_dir: false,
            records: 3,
            key: bytes_of("cache key", &key).expect("hex"),
            digest: blake3::Hash::from_bytes(bytes_of("digest", &d).expect("hex")),
            path: PathBuf::new(),
            spans: Some(vec![(0, 5), (10, 4)].into_boxed_slice()),
            cached: None,
        };
        assert_eq!(u.cache_key().as_str(), key);
        assert_eq!(u.digest(), d);
        let set = ShardSet {
            over: "data".into(),
            uri: "reads.jsonl".into(),
            root: "/s".into(),
            source: Arc::from(Path::new("/in/reads.jsonl")),
            inner: None,
            suffix: ".jsonl".into(),
            units: vec![u],
        };
        let input = set.input(&set.units[0]);
        assert_eq!(input.uri, "reads.jsonl#part-7");
        assert_eq!(input.path, PathBuf::from("part-00007.jsonl"));
        let r = input.range.expect("a range");
        assert_eq!(r.spans, vec![(0, 5), (10, 4)]);
        assert_eq!(&*r.source, Path::new("/in/reads.jsonl"));
        assert_eq!(set.dir(&set.units[0]), PathBuf::from(format!("/s/{key}")));
        // Upper-case hex would not be written back as it was read: refused.
        assert!(bytes_of("cache key", &"AB".repeat(32)).is_err());
        assert!(bytes_of("cache key", "abc").is_err());
    }
}
