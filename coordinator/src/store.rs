//! The run-state store. sled is reached only through the [`Store`] trait, which has one
//! conformance suite ([`conformance`]) that every implementation passes, so sled can be
//! replaced.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// A small ordered key-value store with named trees.
pub trait Store: Send + Sync + 'static {
    /// Reads one value.
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// Writes several values to one tree atomically.
    fn put_batch(&self, tree: &str, entries: &[(String, Vec<u8>)]) -> Result<()>;
    /// Deletes one key.
    fn remove(&self, tree: &str, key: &str) -> Result<()>;
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// The keys that start with `prefix` and sort at or after `from`, in key order,
    /// without their values (what to remove past a point, not a read of everything).
    fn keys_from(&self, tree: &str, prefix: &str, from: &str) -> Result<Vec<String>>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;
    /// Atomically replaces `key`'s value with `new` (`None` removes it) only if it is
    /// `old` now (`None`: absent). True when it swapped; false when another writer got
    /// there first (read again and retry).
    fn compare_and_swap(
        &self,
        tree: &str,
        key: &str,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool>;

    /// Writes one value.
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<()> {
        self.put_batch(tree, &[(key.to_string(), value.to_vec())])
    }
}

/// The sled implementation.
///
/// Two ways a full disk used to end a store for good are handled here:
/// - sled 0.34 writes a snapshot to `snap.<lsn>.generating` and renames it when
///   complete, but on open it takes the newest `snap.*` file, an unfinished
///   `.generating` one included. A write cut short by a full disk (or a kill) leaves one
///   behind, and every later open fails with "empty/corrupt snapshot file found".
///   Unfinished snapshots are never valid, so [`SledStore::open`] removes them first;
///   sled then starts from the last complete snapshot and replays its log.
/// - After one I/O error (ENOSPC, say) sled refuses every later operation until it is
///   reopened. A failed operation here drops the handle, and the next operation opens
///   the store again, so a coordinator whose disk filled and emptied carries on without
///   a restart. What failed was reported as failed, never acknowledged.
pub struct SledStore {
    path: std::path::PathBuf,
    db: std::sync::RwLock<Option<sled::Db>>,
}

impl SledStore {
    /// Opens (or creates) the store at `path`. A lock held by a store that is still
    /// closing (sled's flusher outlives the handle briefly) is waited for up to 1 s.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Self::open_db(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            db: std::sync::RwLock::new(Some(db)),
        })
    }

    fn open_db(path: &Path) -> Result<sled::Db> {
        remove_unfinished_snapshots(path);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            match Self::open_once(path) {
                Err(Error::StoreLocked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<sled::Db> {
        sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            // sled's default page cache is 1 GiB; step records are small and read back
            // only on resume.
            .cache_capacity(64 << 20)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.raw_os_error() == Some(11) =>
                {
                    Error::StoreLocked(path.display().to_string())
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    Error::StoreLocked(path.display().to_string())
                }
                other => Error::Store(format!("open {}: {other}", path.display())),
            })
    }

    /// Runs `f` on the open store, opening it first if a failure closed it. An I/O
    /// failure closes it, so that the next call starts from what is on disk.
    fn with<T>(&self, f: impl FnOnce(&sled::Db) -> sled::Result<T>) -> Result<T> {
        {
            let g = self.db.read().unwrap_or_else(|p| p.into_inner());
            if let Some(db) = g.as_ref() {
                return match f(db) {
                    Ok(v) => Ok(v),
                    Err(e) => {
                        drop(g);
                        Err(self.failed(e))
                    }
                };
            }
        }
        let mut g = self.db.write().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(Self::open_db(&self.path)?);
            tracing::info!(path = %self.path.display(), "store reopened after a failure");
        }
        let Some(db) = g.as_ref() else {
            return Err(Error::Store("the store is closed".into()));
        };
        f(db).map_err(|e| {
            let err = Error::Store(e.to_string());
            if matches!(e, sled::Error::Io(_) | sled::Error::Corruption { .. }) {
                *g = None;
            }
            err
        })
    }

    /// Closes the store after an I/O failure (sled refuses everything after one).
    fn failed(&self, e: sled::Error) -> Error {
        if matches!(e, sled::Error::Io(_) | sled::Error::Corruption { .. }) {
            tracing::error!(error = %e, path = %self.path.display(), "store failed; it is reopened on next use");
            let mut g = self.db.write().unwrap_or_else(|p| p.into_inner());
            *g = None;
        }
        Error::Store(e.to_string())
    }

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.with(|db| db.size_on_disk()).unwrap_or(0)
    }

    /// What the store holds, tree by tree, against what it takes on disk (`nexa-
    /// coordinator store stats`): sled keeps a log of pages, so the disk holds more
    /// than the live records; how much more is its space amplification.
    pub fn stats(&self) -> Result<StoreStats> {
        self.with(|db| {
            let mut trees = Vec::new();
            for name in db.tree_names() {
                let tree = db.open_tree(&name)?;
                let mut t = TreeStats {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    ..TreeStats::default()
                };
                for kv in tree.iter() {
                    let (k, v) = kv?;
                    t.records += 1;
                    t.key_bytes += k.len() as u64;
                    t.value_bytes += v.len() as u64;
                }
                if t.records > 0 {
                    trees.push(t);
                }
            }
            let live: u64 = trees.iter().map(|t| t.key_bytes + t.value_bytes).sum();
            let disk = db.size_on_disk()?;
            Ok(StoreStats {
                trees,
                live_bytes: live,
                disk_bytes: disk,
                amplification: disk as f64 / live.max(1) as f64,
            })
        })
    }
}

/// One tree's records and their bytes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TreeStats {
    /// The tree (`steps`, `runs`, `workers`, `lineage`, ...).
    pub name: String,
    /// Records in it.
    pub records: u64,
    /// Their keys' bytes.
    pub key_bytes: u64,
    /// Their values' bytes.
    pub value_bytes: u64,
}

/// The store's contents against its size on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStats {
    /// The trees that hold records.
    pub trees: Vec<TreeStats>,
    /// Keys and values of every record.
    pub live_bytes: u64,
    /// What sled's files take.
    pub disk_bytes: u64,
    /// `disk_bytes / live_bytes`.
    pub amplification: f64,
}

/// The error an armed fail point injects into a store operation.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected(point: &str) -> Error {
    Error::Store(nexa_shared::failpoint::injected(point).to_string())
}

/// Removes sled snapshots that were never finished (see [`SledStore`]).
fn remove_unfinished_snapshots(path: &Path) {
    let Ok(dir) = std::fs::read_dir(path) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::warn!(file = %e.path().display(), "removed an unfinished store snapshot")
                }
                Err(err) => {
                    tracing::error!(error = %err, file = %e.path().display(), "removing an unfinished store snapshot")
                }
            }
        }
    }
}

impl Store for SledStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.with(|db| Ok(db.open_tree(tree)?.get(key)?.map(|v| v.to_vec())))
    }

    fn put_batch(&self, tree: &str, entries: &[(String, Vec<u8>)]) -> Result<()> {
        nexa_shared::fail_point!("store.write", injected("store.write"));
        self.with(|db| {
            let t = db.open_tree(tree)?;
            // A one-entry batch is a plain insert: a sled batch seals a log buffer.
            if let [(k, v)] = entries {
                t.insert(k.as_bytes(), v.as_slice())?;
                return Ok(());
            }
            let mut b = sled::Batch::default();
            for (k, v) in entries {
                b.insert(k.as_bytes(), v.as_slice());
            }
            t.apply_batch(b)
        })
    }

    fn remove(&self, tree: &str, key: &str) -> Result<()> {
        nexa_shared::fail_point!("store.write", injected("store.write"));
        self.with(|db| db.open_tree(tree)?.remove(key).map(|_| ()))
    }

    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.with(|db| {
            let t = db.open_tree(tree)?;
            t.scan_prefix(prefix)
                .map(|r| {
                    let (k, v) = r?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                })
                .collect()
        })
    }

    fn keys_from(&self, tree: &str, prefix: &str, from: &str) -> Result<Vec<String>> {
        self.with(|db| {
            let t = db.open_tree(tree)?;
            let mut keys = Vec::new();
            for r in t.range(from.as_bytes()..) {
                let (k, _) = r?;
                if !k.starts_with(prefix.as_bytes()) {
                    break;
                }
                keys.push(String::from_utf8_lossy(&k).into_owned());
            }
            Ok(keys)
        })
    }

    fn flush(&self) -> Result<()> {
        nexa_shared::fail_point!("store.flush", injected("store.flush"));
        self.with(|db| db.flush().map(|_| ()))
    }

    fn compare_and_swap(
        &self,
        tree: &str,
        key: &str,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        nexa_shared::fail_point!("store.write", injected("store.write"));
        self.with(|db| {
            let t = db.open_tree(tree)?;
            Ok(t.compare_and_swap(key.as_bytes(), old, new)?.is_ok())
        })
    }
}

/// An in-memory implementation, for tests and benchmarks that measure everything but
/// the disk.
#[derive(Default)]
pub struct MemStore {
    trees: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
}

impl MemStore {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> T) -> T {
        let mut g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl Store for MemStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.with(|t| t.get(tree).and_then(|m| m.get(key)).cloned()))
    }

    fn put_batch(&self, tree: &str, entries: &[(String, Vec<u8>)]) -> Result<()> {
        self.with(|t| {
            let m = t.entry(tree.to_string()).or_default();
            for (k, v) in entries {
                m.insert(k.clone(), v.clone());
            }
        });
        Ok(())
    }

    fn remove(&self, tree: &str, key: &str) -> Result<()> {
        self.with(|t| t.get_mut(tree).map(|m| m.remove(key)));
        Ok(())
    }

    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self.with(|t| {
            t.get(tree)
                .map(|m| {
                    m.range(prefix.to_string()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    fn keys_from(&self, tree: &str, prefix: &str, from: &str) -> Result<Vec<String>> {
        Ok(self.with(|t| {
            t.get(tree)
                .map(|m| {
                    m.range(from.to_string()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn compare_and_swap(
        &self,
        tree: &str,
        key: &str,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        Ok(self.with(|t| {
            let m = t.entry(tree.to_string()).or_default();
            if m.get(key).map(Vec::as_slice) != old {
                return false;
            }
            match new {
                Some(v) => m.insert(key.to_string(), v.to_vec()),
                None => m.remove(key),
            };
            true
        }))
    }
}

/// The conformance suite every [`Store`] must pass.
pub fn conformance(s: &dyn Store) -> Result<()> {
    fn check(cond: bool, what: &str) -> Result<()> {
        if cond {
            Ok(())
        } else {
            Err(Error::Store(format!("conformance: {what}")))
        }
    }
    check(
        s.get("t", "missing")?.is_none(),
        "missing key reads as None",
    )?;
    s.put("t", "a/1", b"one")?;
    s.put_batch(
        "t",
        &[
            ("a/2".into(), b"two".to_vec()),
            ("b/1".into(), b"three".to_vec()),
        ],
    )?;
    s.put("other", "a/1", b"elsewhere")?;
    check(
        s.get("t", "a/1")?.as_deref() == Some(b"one".as_slice()),
        "put then get",
    )?;
    let scanned = s.scan_prefix("t", "a/")?;
    check(
        scanned
            == vec![
                ("a/1".to_string(), b"one".to_vec()),
                ("a/2".to_string(), b"two".to_vec()),
            ],
        "scan_prefix returns only the prefix, in key order",
    )?;
    s.put("t", "a/1", b"uno")?;
    check(
        s.get("t", "a/1")?.as_deref() == Some(b"uno".as_slice()),
        "overwrite",
    )?;
    s.remove("t", "a/1")?;
    check(s.get("t", "a/1")?.is_none(), "remove")?;
    check(
        s.get("other", "a/1")?.as_deref() == Some(b"elsewhere".as_slice()),
        "trees are separate",
    )?;
    check(
        s.compare_and_swap("cas", "k", None, Some(b"1"))?,
        "compare_and_swap creates an absent key",
    )?;
    check(
        !s.compare_and_swap("cas", "k", None, Some(b"2"))?,
        "compare_and_swap refuses when the key exists but None was expected",
    )?;
    check(
        !s.compare_and_swap("cas", "k", Some(b"0"), Some(b"2"))?,
        "compare_and_swap refuses a stale expected value",
    )?;
    check(
        s.compare_and_swap("cas", "k", Some(b"1"), Some(b"2"))?
            && s.get("cas", "k")?.as_deref() == Some(b"2".as_slice()),
        "compare_and_swap swaps the expected value",
    )?;
    check(
        s.compare_and_swap("cas", "k", Some(b"2"), None)? && s.get("cas", "k")?.is_none(),
        "compare_and_swap to None removes",
    )?;
    s.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_each_trees_records_and_bytes_against_the_disk() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(&d.path().join("store")).expect("open");
        let steps: Vec<(String, Vec<u8>)> = (0..1000)
            .map(|i| (format!("run/{i:04}"), vec![7u8; 100]))
            .collect();
        s.put_batch("steps", &steps).expect("put");
        s.put("runs", "r1", b"{}").expect("put");
        s.put("empty", "gone", b"x").expect("put");
        s.remove("empty", "gone").expect("remove");
        s.flush().expect("flush");
        let st = s.stats().expect("stats");
        let names: Vec<&str> = st.trees.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["runs", "steps"], "trees with records only");
        let t = &st.trees[1];
        assert_eq!(
            (t.records, t.key_bytes, t.value_bytes),
            (1000, 8000, 100_000)
        );
        assert_eq!(st.live_bytes, 8000 + 100_000 + 2 + 2);
        assert!(st.disk_bytes > 0);
        let amp = st.disk_bytes as f64 / st.live_bytes as f64;
        assert!((st.amplification - amp).abs() < 1e-9, "{st:?}");
    }

    #[test]
    fn mem_store_conforms() {
        conformance(&MemStore::default()).expect("conforms");
    }

    #[test]
    fn sled_store_conforms_and_survives_reopen() {
        let d = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(&d.path().join("db")).expect("open");
            conformance(&s).expect("conforms");
        }
        let s = SledStore::open(&d.path().join("db")).expect("reopen");
        assert_eq!(
            s.get("t", "a/2").expect("get").as_deref(),
            Some(b"two".as_slice())
        );
    }

    #[test]
    fn an_unfinished_snapshot_left_by_a_full_disk_does_not_kill_the_store() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("db");
        {
            let s = SledStore::open(&path).expect("open");
            s.put("runs", "r1", b"kept").expect("put");
            s.flush().expect("flush");
        }
        // What a snapshot write cut short by ENOSPC (or a kill) leaves behind.
        std::fs::write(path.join("snap.FFFFFFFFFFFFFFFF.generating"), b"").expect("write");
        let s = SledStore::open(&path).expect("opens despite the unfinished snapshot");
        assert_eq!(
            s.get("runs", "r1").expect("get").as_deref(),
            Some(b"kept".as_slice())
        );
        assert!(!path.join("snap.FFFFFFFFFFFFFFFF.generating").exists());
    }
}
