//! Range shards: a part that is a view of its input, not a copy of it.
//!
//! When an input's records are its bytes as they are (no `\r\n` line ends to turn into
//! `\n`, a final newline), every part the copying split would write is a slice of the
//! input: the CSV header's bytes, then the part's records, contiguous. The split then
//! writes nothing but its index: one streaming pass finds each part's byte spans and
//! hashes them as it goes, and a worker is staged the part by reading those spans of
//! the input (embedded: straight from the file; the mesh: the coordinator streams
//! them). The bytes a worker gets, their digest, the part's name and so every cache key
//! are those of the copied part (a property test holds the two splits to that); an
//! input whose records are rewritten by the split falls back to copies.

use super::{Cut, Format, Part, Records, part_name, too_many};
use crate::digest;
use crate::error::IoContext;
use crate::{Error, Result};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A part as byte spans of one input file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Range {
    /// The file the spans are of (for a directory input, its one record file), one
    /// path shared by every part of a split. Not stored: a split is named by its
    /// input's content, so it is filled in from the input as planned now.
    #[serde(skip, default = "no_source")]
    pub source: Arc<Path>,
    /// `(offset, length)` of each span, in order: a CSV's header, then the records.
    pub spans: Vec<(u64, u64)>,
    /// When the part is a directory holding the one file (an artifact's payload split
    /// by records): that file's path inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<String>,
}

/// A range's source before it is filled in.
fn no_source() -> Arc<Path> {
    Arc::from(Path::new(""))
}

impl Range {
    /// The part's size in bytes.
    pub fn len(&self) -> u64 {
        self.spans.iter().map(|(_, n)| n).sum()
    }

    /// Whether the part has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the part's bytes, span after span.
    pub fn reader(&self) -> Result<Spans> {
        let f = fs::File::open(&self.source).ctx("open", &self.source)?;
        Ok(Spans {
            f,
            path: self.source.to_path_buf(),
            spans: self.spans.iter().rev().copied().collect(),
            left: 0,
        })
    }

    /// Writes the part at `dest`: a file, or a directory holding [`Range::inner`].
    /// A source shorter than the spans is an error (the input changed under the run).
    pub fn write_to(&self, dest: &Path) -> Result<()> {
        let file = match &self.inner {
            Some(rel) => {
                let rel = crate::paths::check_relative_name(rel)?;
                let f = dest.join(rel);
                if let Some(parent) = f.parent() {
                    fs::create_dir_all(parent).ctx("create", parent)?;
                }
                f
            }
            None => dest.to_path_buf(),
        };
        let mut out = fs::File::create(&file).ctx("create", &file)?;
        let mut src = fs::File::open(&self.source).ctx("open", &self.source)?;
        for &(offset, len) in &self.spans {
            src.seek(SeekFrom::Start(offset))
                .ctx("seek", &self.source)?;
            // `io::copy` of a file's `Take` into a file is `copy_file_range` on Linux.
            let copied = std::io::copy(&mut (&src).take(len), &mut out).ctx("copy", &file)?;
            if copied != len {
                return Err(short(&self.source, offset, len));
            }
        }
        out.flush().ctx("write", &file)?;
        Ok(())
    }
}

/// A range part's digest from its bytes' digest and size: that of the file, or of a
/// directory holding it as `inner`.
pub(super) fn part_digest(file: String, size: u64, inner: Option<&str>) -> String {
    match inner {
        None => file,
        Some(rel) => {
            digest::tree_of(vec![digest::FileEntry {
                path: rel.to_string(),
                size,
                digest: file,
            }])
            .digest
        }
    }
}

fn short(source: &Path, offset: u64, len: u64) -> Error {
    Error::Shards(format!(
        "{}: shorter than the {len} bytes at {offset} its shard was cut from (did it change during the run?)",
        source.display()
    ))
}

/// The bytes of a [`Range`], read span after span.
#[derive(Debug)]
pub struct Spans {
    f: fs::File,
    path: PathBuf,
    /// Spans still to read, the next one last.
    spans: Vec<(u64, u64)>,
    /// Bytes left of the span being read.
    left: u64,
}

impl Read for Spans {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            let Some((offset, len)) = self.spans.pop() else {
                return Ok(0);
            };
            self.f.seek(SeekFrom::Start(offset))?;
            self.left = len;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.f.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: ends before its shard's bytes (did it change during the run?)",
                    self.path.display()
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One part found: where it starts, its records and bytes, and its hash (finished
/// when the next part starts: a hasher is ~1.9 KB, and a million of them open at once
/// were ~2 GB).
struct Found {
    start: u64,
    records: u64,
    bytes: u64,
    hash: blake3::Hash,
}

/// Finds the parts of the record file `input` as byte ranges, in one streaming pass
/// (two for `count`, which first counts the records), writing nothing; `inner` makes
/// each part a directory holding that file name. `None` when the split would change
/// the records' bytes (CRLF line ends, no final newline): those parts are copied.
pub(super) fn find(
    input: &Path,
    format: Format,
    (cut, max): (Cut, u64),
    inner: Option<&str>,
    ext: &str,
) -> Result<Option<Vec<Part>>> {
    let sizes = match cut {
        Cut::Count(n) => match super::count_records(input, format)? {
            (_, true) => return Ok(None),
            (total, false) => super::part_sizes(total, n),
        },
        _ => Vec::new(),
    };
    let (header, mut recs) = Records::open(input, format)?;
    let header = header.map(|mut h| {
        h.push(b'\n');
        h
    });
    let head = header.as_ref().map_or(0, |h| h.len() as u64);
    let mut pos = head;
    let mut found: Vec<Found> = Vec::new();
    let start = |at: u64| {
        let mut hasher = blake3::Hasher::new();
        if let Some(h) = &header {
            hasher.update(h);
        }
        let part = Found {
            start: at,
            records: 0,
            bytes: 0,
            hash: blake3::Hash::from_bytes([0; 32]),
        };
        (part, hasher)
    };
    let close = |(mut part, hasher): (Found, blake3::Hasher)| {
        part.hash = hasher.finalize();
        part
    };
    // The part being filled, apart from the finished ones.
    let mut open: Option<(Found, blake3::Hasher)> = None;
    let mut rec = Vec::new();
    loop {
        rec.clear();
        if !recs.next(&mut rec)? {
            break;
        }
        let weight = rec.len() as u64;
        let full = open
            .as_ref()
            .is_none_or(|(o, _)| cut.is_full((&sizes, found.len()), (o.records, o.bytes), weight));
        if full {
            if let Some(done) = open.take() {
                found.push(close(done));
            }
            if found.len() as u64 >= max {
                return Err(too_many(cut, input, max));
            }
            open = Some(start(pos));
        }
        if let Some((o, hasher)) = open.as_mut() {
            hasher.update(&rec);
            o.records += 1;
            o.bytes += weight;
        }
        pos += weight;
    }
    if recs.altered {
        return Ok(None);
    }
    if let Some(done) = open.take() {
        found.push(close(done));
    }
    if found.is_empty() {
        found.push(close(start(head)));
    }
    let source: Arc<Path> = Arc::from(input);
    let parts = found
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let mut spans = Vec::with_capacity(2);
            if head > 0 {
                spans.push((0, head));
            }
            spans.push((o.start, o.bytes));
            let file = digest::format(&o.hash);
            let digest = part_digest(file, head + o.bytes, inner);
            let path = match inner {
                Some(_) => PathBuf::from(part_name(i as u32)),
                None => PathBuf::from(format!("{}{ext}", part_name(i as u32))),
            };
            Part {
                index: i as u32,
                path,
                records: o.records,
                digest,
                range: Some(Range {
                    source: source.clone(),
                    spans,
                    inner: inner.map(str::to_string),
                }),
            }
        })
        .collect();
    Ok(Some(parts))
}
