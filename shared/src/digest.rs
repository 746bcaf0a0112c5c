//! Content digests: BLAKE3, written `blake3:<hex>`.
//!
//! A file's digest is the plain BLAKE3 of its bytes (so it equals `b3sum`'s). A directory's
//! digest is BLAKE3 over a domain-separated list of its files sorted by relative path,
//! each entry carrying the path, size and file digest, so the same tree always hashes the
//! same on every machine. Symlinks are refused; empty directories do not count.

use crate::error::IoContext;
use crate::{Error, Result};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The prefix of every digest string.
pub const PREFIX: &str = "blake3:";

/// Files at least this big are hashed in chunks on all cores.
const PARALLEL_THRESHOLD: u64 = 4 * 1024 * 1024;

/// The read buffer for big files: a fixed cost whatever the file's size. Big enough that
/// each chunk is worth splitting across cores (BLAKE3 wants well over 128 KiB).
const PARALLEL_CHUNK: usize = 4 * 1024 * 1024;

/// Formats a BLAKE3 hash as `blake3:<hex>`.
pub fn format(hash: &blake3::Hash) -> String {
    format!("{PREFIX}{}", hash.to_hex())
}

/// Parses `blake3:<hex>` back into a hash.
pub fn parse(text: &str) -> Result<blake3::Hash> {
    let hex = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| Error::Parse(format!("digest {text:?} must start with {PREFIX}")))?;
    blake3::Hash::from_hex(hex).map_err(|e| Error::Parse(format!("digest {text:?}: {e}")))
}

/// Hashes one file; returns its digest and size.
///
/// The file is streamed through a fixed buffer (64 KiB, or for big files two 4 MiB
/// buffers, one read while the other is hashed on all cores), never memory-mapped: a
/// 10 GB sparse output costs 8 MiB of memory, not
/// 10 GB of mapped pages, and a file truncated while it is hashed is a read error here,
/// not a SIGBUS that kills the process.
pub fn hash_file(path: &Path) -> Result<(blake3::Hash, u64)> {
    let mut f = fs::File::open(path).ctx("open", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= PARALLEL_THRESHOLD {
        hash_pipelined(&mut f, &mut hasher).ctx("read", path)?;
    } else {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).ctx("read", path)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok((hasher.finalize(), hasher.count()))
}

/// Hashes a big file on all cores while a reader thread fills the next buffer: two
/// buffers of [`PARALLEL_CHUNK`] pass between them, so reading overlaps hashing and the
/// memory used is fixed.
fn hash_pipelined(f: &mut fs::File, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::sync::mpsc::sync_channel;
    let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(2);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        let _ = empty_tx.send(vec![0u8; PARALLEL_CHUNK]);
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<()> {
            while let Ok(mut buf) = empty_rx.recv() {
                let n = read_full(f, &mut buf)?;
                if full_tx.send((buf, n)).is_err() || n == 0 {
                    break;
                }
            }
            Ok(())
        });
        while let Ok((buf, n)) = full_rx.recv() {
            if n == 0 {
                break;
            }
            hasher.update_rayon(&buf[..n]);
            if empty_tx.send(buf).is_err() {
                break;
            }
        }
        // The reader ends on end of file, on an error, or when its channel closes.
        drop(empty_tx);
        drop(full_rx);
        reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the reader thread panicked")))
    })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// One file of a hashed tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// Path relative to the tree root, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `blake3:<hex>` of the content.
    pub digest: String,
}

/// A hashed directory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// `blake3:<hex>` of the tree.
    pub digest: String,
    /// Total bytes of all files.
    pub bytes: u64,
    /// The files, sorted by path.
    pub files: Vec<FileEntry>,
}

/// Lists the regular files under `root` sorted by relative path, skipping top-level names
/// in `exclude`. Symlinks and other special files are errors.
pub fn list_files(root: &Path, exclude: &[&str]) -> Result<Vec<(String, PathBuf, u64)>> {
    let mut out = Vec::new();
    walk(root, root, exclude, &mut out)?;
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

fn walk(
    root: &Path,
    dir: &Path,
    exclude: &[&str],
    out: &mut Vec<(String, PathBuf, u64)>,
) -> Result<()> {
    for entry in fs::read_dir(dir).ctx("read dir", dir)? {
        let entry = entry.ctx("read dir", dir)?;
        let path = entry.path();
        let ft = entry.file_type().ctx("stat", &path)?;
        let rel = path
            .strip_prefix(root)
            .map_err(|_| Error::UnsafePath(path.display().to_string(), "outside the tree"))?;
        let rel_str = rel
            .to_str()
            .ok_or_else(|| {
                Error::UnsafePath(rel.display().to_string(), "file names must be UTF-8")
            })?
            .to_string();
        if dir == root && exclude.contains(&rel_str.as_str()) {
            continue;
        }
        if ft.is_symlink() {
            return Err(Error::UnsafePath(
                rel_str,
                "symlinks are not allowed in artifacts",
            ));
        } else if ft.is_dir() {
            walk(root, &path, exclude, out)?;
        } else if ft.is_file() {
            let size = entry.metadata().ctx("stat", &path)?.len();
            out.push((rel_str, path, size));
        } else {
            return Err(Error::UnsafePath(rel_str, "not a regular file"));
        }
    }
    Ok(())
}

/// Hashes a directory tree (see the module docs), skipping top-level names in `exclude`.
pub fn hash_tree(root: &Path, exclude: &[&str]) -> Result<TreeDigest> {
    let listed = list_files(root, exclude)?;
    let mut files = Vec::with_capacity(listed.len());
    for (rel, path, _) in listed {
        let (h, size) = hash_file(&path)?;
        files.push(FileEntry {
            path: rel,
            size,
            digest: format(&h),
        });
    }
    Ok(tree_of(files))
}

/// Combines already-hashed files (sorted or not) into a tree digest.
pub fn tree_of(mut files: Vec<FileEntry>) -> TreeDigest {
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let mut h = blake3::Hasher::new();
    h.update(b"nexa/v1/tree\0");
    let mut bytes = 0u64;
    for f in &files {
        h.update(&(f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update(&f.size.to_le_bytes());
        h.update(f.digest.as_bytes());
        bytes += f.size;
    }
    TreeDigest {
        digest: format(&h.finalize()),
        bytes,
        files,
    }
}

/// The digest of a file or a directory, with its size and whether it was a directory.
pub fn hash_path(path: &Path) -> Result<(String, u64, bool)> {
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.is_dir() {
        let t = hash_tree(path, &[])?;
        Ok((t.digest, t.bytes, true))
    } else {
        // Inputs may be symlinks to files the user keeps elsewhere: follow them.
        let (h, size) = hash_file(path)?;
        Ok((format(&h), size, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_digest_ignores_creation_order_and_excludes() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(a.path().join("x")).expect("mkdir");
        fs::write(a.path().join("x/2.txt"), "two").expect("write");
        fs::write(a.path().join("1.txt"), "one").expect("write");
        fs::write(b.path().join("1.txt"), "one").expect("write");
        fs::create_dir_all(b.path().join("x")).expect("mkdir");
        fs::write(b.path().join("x/2.txt"), "two").expect("write");
        fs::write(b.path().join("meta.json"), "{}").expect("write");
        let ta = hash_tree(a.path(), &["meta.json"]).expect("hash");
        let tb = hash_tree(b.path(), &["meta.json"]).expect("hash");
        assert_eq!(ta, tb);
        assert_eq!(ta.bytes, 6);
        fs::write(b.path().join("x/2.txt"), "twO").expect("write");
        assert_ne!(
            hash_tree(b.path(), &["meta.json"]).expect("hash").digest,
            ta.digest
        );
    }

    #[test]
    fn file_digest_is_plain_blake3() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        fs::write(&p, b"abc").expect("write");
        let (h, n) = hash_file(&p).expect("hash");
        assert_eq!(h, blake3::hash(b"abc"));
        assert_eq!(n, 3);
        assert_eq!(parse(&format(&h)).expect("parse"), h);
        assert!(parse("sha256:00").is_err());
    }

    #[test]
    fn big_files_stream_in_chunks_and_hash_like_one_buffer() {
        // Sizes around the chunk boundary, and a sparse file with data after a hole.
        let d = tempfile::tempdir().expect("tempdir");
        for size in [
            PARALLEL_THRESHOLD as usize,
            PARALLEL_CHUNK * 2,
            PARALLEL_CHUNK * 2 + 12_345,
        ] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let p = d.path().join(format!("f{size}"));
            fs::write(&p, &bytes).expect("write");
            let (h, n) = hash_file(&p).expect("hash");
            assert_eq!((h, n), (blake3::hash(&bytes), size as u64), "size {size}");
        }
        let sparse = d.path().join("sparse");
        let f = fs::File::create(&sparse).expect("create");
        f.set_len(3 * PARALLEL_CHUNK as u64 + 7).expect("set_len");
        drop(f);
        let mut expect = vec![0u8; 3 * PARALLEL_CHUNK + 7];
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&sparse)
                .expect("open");
            f.seek(SeekFrom::Start(PARALLEL_CHUNK as u64 * 2 + 1))
                .expect("seek");
            f.write_all(b"tail").expect("write");
        }
        expect[PARALLEL_CHUNK * 2 + 1..PARALLEL_CHUNK * 2 + 5].copy_from_slice(b"tail");
        assert_eq!(hash_file(&sparse).expect("hash").0, blake3::hash(&expect));
    }

    #[test]
    fn symlinks_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("l")).expect("symlink");
        assert!(hash_tree(d.path(), &[]).is_err());
    }
}
