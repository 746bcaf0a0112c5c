//! Fan-out: split one input into parts by records: N even parts (`count`), parts of
//! N records (`records`), or parts of at most N bytes, cut at record boundaries
//! (`size`; a record larger than that is a part of its own).
//!
//! Formats, chosen by the input: a directory (its files, sorted, dealt in contiguous
//! runs), CSV/TSV (`.csv`, `.tsv`: the header is repeated in every part), FASTA (`.fa`,
//! `.fasta`, `.faa`, `.fna`: a record is a `>` header with its sequence lines), and
//! anything else one record per line (plain text, JSONL). Parts are contiguous and as
//! even as possible, so concatenating the parts' results in order gives the input order.
//! Quoted CSV fields containing newlines are not supported.

use crate::digest;
use crate::error::IoContext;
use crate::{Error, Result};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

mod range;
pub use range::{Range, Spans};

/// How an input is cut into records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One record per line (text, JSONL).
    Lines,
    /// CSV or TSV with a header line.
    Csv,
    /// FASTA records.
    Fasta,
    /// A directory of files.
    Dir,
}

impl Format {
    /// Picks the format for `path`.
    pub fn detect(path: &Path) -> Format {
        if path.is_dir() {
            return Format::Dir;
        }
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv" | "tsv") => Format::Csv,
            Some("fa" | "fasta" | "faa" | "fna") => Format::Fasta,
            _ => Format::Lines,
        }
    }
}

/// One part of a split input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    /// 0-based index.
    pub index: u32,
    /// The part's path (a file, or a directory for [`Format::Dir`]).
    pub path: PathBuf,
    /// Records (or files) in the part.
    pub records: u64,
    /// Content digest of the part.
    pub digest: String,
    /// When the part is a view of its input (a range shard), its spans; its `path`
    /// is then only its name inside the split directory, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
}

impl Part {
    /// Whether the part is a directory.
    pub fn is_dir(&self) -> bool {
        match &self.range {
            Some(r) => r.inner.is_some(),
            None => self.path.is_dir(),
        }
    }

    /// Writes the part's bytes at `dest` (a test's or a tool's look at a part).
    pub fn write_to(&self, dest: &Path) -> Result<()> {
        match &self.range {
            Some(r) => r.write_to(dest),
            None => {
                crate::artifact::remove_tree(dest)?;
                copy_tree(&self.path, dest)
            }
        }
    }
}

/// Copies a file, or a directory's files, from `src` to `dest`.
fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    if !src.is_dir() {
        fs::copy(src, dest).ctx("copy", src)?;
        return Ok(());
    }
    for (rel, p, _) in digest::list_files(src, &[])? {
        let to = dest.join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).ctx("create", parent)?;
        }
        fs::copy(&p, &to).ctx("copy", &p)?;
    }
    Ok(())
}

/// How a split stages its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// As byte ranges of the input where the parts are exactly such ranges (see
    /// [`Range`]), copies where they are not.
    Ranges,
    /// Every part copied into the split directory (the split before range shards;
    /// `NEXA_SHARDS_COPY=1`).
    Copies,
}

/// The result of a split, recorded as `parts.json` in the split directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    /// The format used.
    pub format: Format,
    /// The parts in order.
    pub parts: Vec<Part>,
}

/// How a step's input is cut into shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// This many parts, as even as possible by records.
    Count(u32),
    /// Parts of this many records (the last one the rest).
    Records(u64),
    /// Parts of at most this many bytes of records (header excluded), cut between
    /// records; a record larger than that is a part of its own.
    Bytes(u64),
}

/// The most shards one step may have.
pub const MAX_SHARDS: u64 = 1_000_000;

impl Cut {
    /// The records (or files) in each part, given each one's size in bytes.
    pub fn sizes(self, weights: &[u64]) -> Vec<u64> {
        let total = weights.len() as u64;
        match self {
            Cut::Count(n) => part_sizes(total, n),
            Cut::Records(n) => {
                let n = n.max(1);
                let mut v = vec![n; (total / n) as usize];
                if !total.is_multiple_of(n) || v.is_empty() {
                    v.push(total % n);
                }
                v
            }
            Cut::Bytes(limit) => {
                let mut v = Vec::new();
                let (mut records, mut bytes) = (0u64, 0u64);
                for &w in weights {
                    if records > 0 && bytes + w > limit {
                        v.push(records);
                        (records, bytes) = (0, 0);
                    }
                    records += 1;
                    bytes += w;
                }
                if records > 0 || v.is_empty() {
                    v.push(records);
                }
                v
            }
        }
    }

    /// A short name of the cut, for the split's directory (`4`, `r200`, `b67108864`).
    pub fn label(self) -> String {
        match self {
            Cut::Count(n) => n.to_string(),
            Cut::Records(n) => format!("r{n}"),
            Cut::Bytes(n) => format!("b{n}"),
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Count(n) => write!(f, "{n} shards"),
            Cut::Records(n) => write!(f, "shards of {n} records"),
            Cut::Bytes(n) => write!(f, "shards of {}", crate::units::format_size(*n)),
        }
    }
}

/// Sizes of `count` contiguous parts of `total` records, as even as possible.
pub fn part_sizes(total: u64, count: u32) -> Vec<u64> {
    let count = u64::from(count.max(1));
    (0..count)
        .map(|i| total / count + u64::from(i < total % count))
        .collect()
}

/// Splits `input` into parts as `cut` says under `dest` (created atomically; when
/// `dest` already holds a finished split it is reused, since `dest` is named by
/// content and cut). More than [`MAX_SHARDS`] parts is an error.
pub fn split(input: &Path, cut: Cut, dest: &Path, staging: Staging) -> Result<Split> {
    split_bounded(input, (cut, staging), dest, MAX_SHARDS)
}

/// [`split`] with at most `max` parts.
fn split_bounded(
    input: &Path,
    (cut, staging): (Cut, Staging),
    dest: &Path,
    max: u64,
) -> Result<Split> {
    if let Some(s) = finished(input, dest) {
        return Ok(s);
    }
    let tmp = crate::artifact::tmp_path(dest);
    crate::artifact::remove_tree(&tmp)?;
    fs::create_dir_all(&tmp).ctx("create", &tmp)?;
    let format = Format::detect(input);
    let ext = extension(input);
    let ranged = match staging {
        Staging::Ranges => find_ranges(input, format, (cut, max)),
        Staging::Copies => Ok(None),
    };
    let parts = match ranged {
        Ok(Some(parts)) => Ok(parts),
        Err(e) => Err(e),
        Ok(None) => match format {
            Format::Dir => split_dir(input, cut, &tmp, max),
            _ => split_records(input, format, (cut, max), &tmp, &ext),
        },
    };
    let mut parts = match parts {
        Ok(p) => p,
        Err(e) => {
            // Half a split is never kept: the next try starts afresh anyway.
            let _ = crate::artifact::remove_tree(&tmp);
            return Err(e);
        }
    };
    // A shard is never empty: with fewer records than shards, the empty parts (always
    // the last ones) are dropped. An empty input keeps one empty part, so the step
    // still runs once.
    while parts.len() > 1 && parts.last().is_some_and(|p| p.records == 0) {
        if let Some(p) = parts.pop()
            && p.range.is_none()
        {
            let _ = fs::remove_dir_all(&p.path).or_else(|_| fs::remove_file(&p.path));
        }
    }
    for p in &mut parts {
        if p.range.is_none() {
            let (d, _, _) = digest::hash_path(&p.path)?;
            p.digest = d;
        }
        // The index names each part by its name in the split directory.
        p.path = p.path.file_name().map(PathBuf::from).unwrap_or_default();
    }
    let mut split = Split { format, parts };
    // Compact (a million-part index is read back at every plan), and written as it is
    // serialized, never held whole.
    let index = tmp.join("parts.json");
    let file = fs::File::create(&index).ctx("create", &index)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 16, file);
    serde_json::to_writer(&mut w, &split).map_err(|source| Error::Json {
        context: "parts.json".into(),
        source,
    })?;
    std::io::Write::flush(&mut w).ctx("write", &index)?;
    crate::artifact::remove_tree(dest)?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).ctx("create", parent)?;
    }
    fs::rename(&tmp, dest).ctx("rename", &tmp)?;
    for p in &mut split.parts {
        p.path = dest.join(&p.path);
    }
    Ok(split)
}

/// The finished split of `input` at `dest`, if there is one: its parts' paths under
/// `dest`, its ranges read from `input` as it is now.
pub fn finished(input: &Path, dest: &Path) -> Option<Split> {
    // Read as it is parsed: a million parts' index is ~150 MB of JSON.
    let file = fs::File::open(dest.join("parts.json")).ok()?;
    let mut s: Split =
        serde_json::from_reader(std::io::BufReader::with_capacity(1 << 16, file)).ok()?;
    // Every range of a split is of the same file: one path for all of them.
    let mut source: Option<(Option<String>, std::sync::Arc<Path>)> = None;
    for p in &mut s.parts {
        p.path = dest.join(&p.path);
        if let Some(r) = &mut p.range {
            r.source = match &source {
                Some((inner, path)) if *inner == r.inner => path.clone(),
                _ => {
                    let path: std::sync::Arc<Path> = match &r.inner {
                        Some(rel) => input.join(rel).into(),
                        None => input.into(),
                    };
                    source = Some((r.inner.clone(), path.clone()));
                    path
                }
            };
        }
    }
    Some(s)
}

impl Part {
    /// The part's digest as its bytes are now (re-read from the input for a range, from
    /// the copy otherwise): what `nexa verify --deep` holds a shard's input to.
    pub fn digest_now(&self) -> Result<String> {
        let Some(r) = &self.range else {
            return Ok(digest::hash_path(&self.path)?.0);
        };
        let mut h = blake3::Hasher::new();
        let copied = std::io::copy(&mut r.reader()?, &mut h).ctx("read", &r.source)?;
        let file = digest::format(&h.finalize());
        Ok(range::part_digest(file, copied, r.inner.as_deref()))
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| format!(".{e}"))
        .unwrap_or_default()
}

/// The parts as ranges of the input's one record file, where they are exactly that
/// (a record file, or a directory holding one; see [`Range`]); `None` otherwise.
fn find_ranges(input: &Path, format: Format, bounds: (Cut, u64)) -> Result<Option<Vec<Part>>> {
    if format != Format::Dir {
        return range::find(input, format, bounds, None, &extension(input));
    }
    let files = crate::artifact::input_files(input)?;
    match files.as_slice() {
        [(rel, src, _)] if bounds.0 != Cut::Count(1) => {
            range::find(src, Format::detect(src), bounds, Some(rel), &extension(src))
        }
        _ => Ok(None),
    }
}

fn part_name(i: u32) -> String {
    format!("part-{i:05}")
}

/// An input's records, read one at a time in constant memory: a record is written out
/// as its lines, each without its line end (`\n` or `\r\n`) and followed by `\n`.
/// Lines and CSV: one line each, trailing empty lines dropped (a CSV's first line is
/// its header, not a record); FASTA: a line and those up to the next `>` line.
struct Records {
    r: BufReader<fs::File>,
    path: PathBuf,
    format: Format,
    /// A line read ahead: the next FASTA record's first, or the non-empty line that
    /// ends a run of empty ones.
    stash: Option<Vec<u8>>,
    /// Empty lines seen and not yet given out as records.
    empties: u64,
    /// Whether a record's bytes differ from the input's (a `\r\n` line end, a last
    /// line without its newline): then a part is not a range of the input.
    altered: bool,
}

impl Records {
    /// Opens `input`; returns its CSV header (if any) and its records.
    fn open(input: &Path, format: Format) -> Result<(Option<Vec<u8>>, Records)> {
        let f = fs::File::open(input).ctx("open", input)?;
        let mut r = Records {
            r: BufReader::with_capacity(1 << 20, f),
            path: input.to_path_buf(),
            format,
            stash: None,
            empties: 0,
            altered: false,
        };
        let header = match format {
            Format::Csv => r.line()?,
            _ => None,
        };
        Ok((header, r))
    }

    fn line(&mut self) -> Result<Option<Vec<u8>>> {
        let mut l = Vec::new();
        if self.r.read_until(b'\n', &mut l).ctx("read", &self.path)? == 0 {
            return Ok(None);
        }
        if l.last() == Some(&b'\n') {
            l.pop();
            if l.last() == Some(&b'\r') {
                l.pop();
                self.altered = true;
            }
        } else {
            self.altered = true;
        }
        Ok(Some(l))
    }

    /// Appends the next record to `out`; false at the end.
    fn next(&mut self, out: &mut Vec<u8>) -> Result<bool> {
        if self.format == Format::Fasta {
            let first = match self.stash.take() {
                Some(l) => l,
                None => match self.line()? {
                    Some(l) => l,
                    None => return Ok(false),
                },
            };
            out.extend_from_slice(&first);
            out.push(b'\n');
            loop {
                match self.line()? {
                    None => return Ok(true),
                    Some(l) if l.starts_with(b">") => {
                        self.stash = Some(l);
                        return Ok(true);
                    }
                    Some(l) => {
                        out.extend_from_slice(&l);
                        out.push(b'\n');
                    }
                }
            }
        }
        if self.stash.is_some() && self.empties > 0 {
            self.empties -= 1;
            out.push(b'\n');
            return Ok(true);
        }
        if let Some(l) = self.stash.take() {
            out.extend_from_slice(&l);
            out.push(b'\n');
            return Ok(true);
        }
        loop {
            match self.line()? {
                // Trailing empty lines are not records.
                None => return Ok(false),
                Some(l) if l.is_empty() => self.empties += 1,
                Some(l) if self.empties > 0 => {
                    self.stash = Some(l);
                    self.empties -= 1;
                    out.push(b'\n');
                    return Ok(true);
                }
                Some(l) => {
                    out.extend_from_slice(&l);
                    out.push(b'\n');
                    return Ok(true);
                }
            }
        }
    }
}

/// The parts' sizes, refused when there would be too many.
fn sizes_within_bounds(cut: Cut, weights: &[u64], input: &Path, max: u64) -> Result<Vec<u64>> {
    let sizes = cut.sizes(weights);
    if sizes.len() as u64 > max {
        return Err(too_many(cut, input, max));
    }
    Ok(sizes)
}

fn too_many(cut: Cut, input: &Path, max: u64) -> Error {
    Error::Shards(format!(
        "{}: {cut} would make more than {max} shards",
        input.display()
    ))
}

/// The records in `input` and whether reading them changed their bytes (see
/// `Records::altered`): the first pass of a `count` cut.
fn count_records(input: &Path, format: Format) -> Result<(u64, bool)> {
    let (_, mut recs) = Records::open(input, format)?;
    let (mut total, mut rec) = (0u64, Vec::new());
    while recs.next(&mut rec)? {
        total += 1;
        rec.clear();
    }
    Ok((total, recs.altered))
}

impl Cut {
    /// Whether the open part (the `index`th, holding `records` records of `bytes`
    /// bytes) is full before a record of `weight` bytes; `sizes` are a `count` cut's
    /// part sizes. The one rule of both splits, so they cut the same parts.
    fn is_full(
        self,
        (sizes, index): (&[u64], usize),
        (records, bytes): (u64, u64),
        weight: u64,
    ) -> bool {
        match self {
            Cut::Count(_) => records >= sizes.get(index).copied().unwrap_or(u64::MAX),
            Cut::Records(n) => records >= n.max(1),
            Cut::Bytes(limit) => bytes + weight > limit,
        }
    }
}

/// One part being written.
struct Open {
    w: std::io::BufWriter<fs::File>,
    path: PathBuf,
    records: u64,
    bytes: u64,
}

/// Splits a record file in one streaming pass (two for `count`, which first counts
/// the records): memory stays that of one record and the parts' list, whatever the
/// input's size. The parts' bytes are the same as reading every record first.
fn split_records(
    input: &Path,
    format: Format,
    (cut, max): (Cut, u64),
    tmp: &Path,
    ext: &str,
) -> Result<Vec<Part>> {
    let sizes = match cut {
        Cut::Count(n) => part_sizes(count_records(input, format)?.0, n),
        _ => Vec::new(),
    };
    let (header, mut recs) = Records::open(input, format)?;
    let mut parts: Vec<Part> = Vec::new();
    let mut open: Option<Open> = None;
    let start = |i: usize| -> Result<Open> {
        let path = tmp.join(format!("{}{ext}", part_name(i as u32)));
        let mut w = std::io::BufWriter::with_capacity(
            1 << 20,
            fs::File::create(&path).ctx("create", &path)?,
        );
        if let Some(h) = &header {
            w.write_all(h).ctx("write", &path)?;
            w.write_all(b"\n").ctx("write", &path)?;
        }
        Ok(Open {
            w,
            path,
            records: 0,
            bytes: 0,
        })
    };
    let finish = |o: Open, parts: &mut Vec<Part>| -> Result<()> {
        let mut w = o.w;
        w.flush().ctx("write", &o.path)?;
        parts.push(Part {
            index: parts.len() as u32,
            path: o.path,
            records: o.records,
            digest: String::new(),
            range: None,
        });
        Ok(())
    };
    let mut rec = Vec::new();
    loop {
        rec.clear();
        if !recs.next(&mut rec)? {
            break;
        }
        let weight = rec.len() as u64;
        let full = open
            .as_ref()
            .is_none_or(|o| cut.is_full((&sizes, parts.len()), (o.records, o.bytes), weight));
        if full {
            if let Some(o) = open.take() {
                finish(o, &mut parts)?;
            }
            if parts.len() as u64 >= max {
                return Err(too_many(cut, input, max));
            }
            open = Some(start(parts.len())?);
        }
        if let Some(o) = open.as_mut() {
            o.w.write_all(&rec).ctx("write", &o.path)?;
            o.records += 1;
            o.bytes += weight;
        }
    }
    match open.take() {
        Some(o) => finish(o, &mut parts)?,
        // An empty input: one empty part, so the step still runs once.
        None => finish(start(0)?, &mut parts)?,
    }
    Ok(parts)
}

fn split_dir(input: &Path, cut: Cut, tmp: &Path, max: u64) -> Result<Vec<Part>> {
    // A sealed artifact's content is its payload: never its meta.json or COMPLETE.
    let files = crate::artifact::input_files(input)?;
    // A directory holding one record file (an upstream artifact's payload, typically)
    // splits that file's records: each part is a directory with the same file name
    // holding a slice of them.
    if let [(rel, src, _)] = files.as_slice()
        && cut != Cut::Count(1)
    {
        let format = Format::detect(src);
        let inner = tmp.join(".records");
        fs::create_dir_all(&inner).ctx("create", &inner)?;
        let mut parts = split_records(src, format, (cut, max), &inner, &extension(src))?;
        for p in &mut parts {
            let dir = tmp.join(part_name(p.index));
            let to = dir.join(rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).ctx("create", parent)?;
            }
            fs::rename(&p.path, &to).ctx("rename", &p.path)?;
            p.path = dir;
        }
        fs::remove_dir_all(&inner).ctx("remove", &inner)?;
        return Ok(parts);
    }
    let weights: Vec<u64> = files
        .iter()
        .map(|(_, src, _)| fs::metadata(src).map(|m| m.len()).unwrap_or(0))
        .collect();
    let sizes = sizes_within_bounds(cut, &weights, input, max)?;
    let mut it = files.into_iter();
    let mut parts = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        let i = i as u32;
        let dir = tmp.join(part_name(i));
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        for (rel, src, _) in it.by_ref().take(size as usize) {
            let to = dir.join(&rel);
            if let Some(p) = to.parent() {
                fs::create_dir_all(p).ctx("create", p)?;
            }
            fs::copy(&src, &to).ctx("copy", &src)?;
        }
        parts.push(Part {
            index: i,
            path: dir,
            records: size,
            digest: String::new(),
            range: None,
        });
    }
    Ok(parts)
}

#[cfg(test)]
mod tests;
