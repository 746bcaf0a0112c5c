//! Files cut into the chunks that every streaming call carries (worker uploads, input
//! fetches, blob uploads, pulls): one size and one reader for all of them.

use std::io::Read;
use std::path::Path;

/// The bytes in one chunk.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Reads the file at `path` in chunks of [`CHUNK_BYTES`] and hands each to `send` with
/// its offset; an empty file is one empty chunk, so that it arrives too. Returns
/// `Ok(false)` as soon as `send` does (the receiver is gone), `Ok(true)` when all of it
/// was sent. An error names the path.
pub fn send_file(path: &Path, send: impl FnMut(u64, &[u8]) -> bool) -> std::io::Result<bool> {
    let named = |op: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
    };
    let f = std::fs::File::open(path).map_err(|e| named("open", e))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(CHUNK_BYTES as u64);
    send_reader(f, len, send).map_err(|e| named("read", e))
}

/// [`send_file`] for any reader of about `len` bytes (a range shard's spans).
pub fn send_reader(
    mut f: impl Read,
    len: u64,
    mut send: impl FnMut(u64, &[u8]) -> bool,
) -> std::io::Result<bool> {
    // A buffer no larger than the file (most outputs and inputs are small): a zeroed
    // 1 MiB allocation per file showed in profiles of many small jobs.
    let mut buf = vec![0u8; (len.saturating_add(1)).min(CHUNK_BYTES as u64) as usize];
    let mut offset = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 && offset > 0 {
            return Ok(true);
        }
        if !send(offset, &buf[..n]) {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
        offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_in_chunks_and_an_empty_one_as_one_empty_chunk() {
        let d = std::env::temp_dir().join(format!("nexa-chunks-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let big = d.join("big");
        let bytes: Vec<u8> = (0..CHUNK_BYTES * 2 + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &bytes).expect("write");
        let mut got = Vec::new();
        let mut offsets = Vec::new();
        assert!(
            send_file(&big, |o, c| {
                offsets.push(o);
                got.extend_from_slice(c);
                true
            })
            .expect("send")
        );
        assert_eq!(got, bytes);
        assert_eq!(offsets, [0, CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64]);
        let empty = d.join("empty");
        std::fs::write(&empty, b"").expect("write");
        let mut n = 0;
        assert!(
            send_file(&empty, |_, c| {
                n += 1;
                c.is_empty()
            })
            .expect("send")
        );
        assert_eq!(n, 1);
        assert!(!send_file(&big, |_, _| false).expect("stops"));
        let e = send_file(&d.join("missing"), |_, _| true).expect_err("missing");
        assert!(e.to_string().contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
