//! Receiving a worker's output files so that nothing can be written into them once a
//! result names them.
//!
//! A file is received into a private part file outside the job's staging tree
//! (`<staging>.parts/<random>`), hashed as it streams, and checked against its declared
//! size and digest. Only then is the part file closed and renamed to its name in the
//! staging tree. So every file under the staging tree is complete, verified and has no
//! open writer anywhere: a stream that is still open when the result arrives can only
//! reach its own part file, which is never sealed.
//!
//! Each stream holds the [`Gate`] of the attempt it writes for (which also counts the
//! attempt's bytes against the per-job limit). Reporting the attempt closes the gate, and
//! a closed gate refuses the rename, so no file enters the staging tree after the result
//! that names its contents was taken.

use super::receive::{Receiving, Verified};
use super::status;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::Status;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One attempt's upload gate: open until its result is reported.
#[derive(Debug, Default)]
pub(super) struct Gate {
    closed: Mutex<bool>,
    /// Bytes declared by the files started so far.
    declared: std::sync::atomic::AtomicU64,
}

impl Gate {
    /// Counts a file of `size` bytes against the attempt's total `limit`.
    pub(super) fn reserve(&self, size: u64, limit: u64) -> Result<(), Status> {
        use std::sync::atomic::Ordering;
        let before = self.declared.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) > limit {
            return Err(Status::resource_exhausted(format!(
                "the job's outputs pass {limit} bytes, the most one job may upload"
            )));
        }
        Ok(())
    }

    /// Renames a verified part file to `dest`, unless the gate closed meanwhile.
    fn commit(&self, verified: Verified, dest: &Path) -> Result<u64, Status> {
        let closed = lock(&self.closed);
        if *closed {
            return Err(Status::failed_precondition(
                "the result of this attempt was already reported: no more uploads for it",
            ));
        }
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(status::io("create", dir))?;
        }
        nexa_shared::fail_point!(
            "upload.rename",
            Status::internal(format!(
                "staging: {}",
                nexa_shared::failpoint::injected("upload.rename")
            ))
        );
        verified.rename_to(dest)
    }
}

/// How many attempts' gates are kept before the oldest are forgotten (an attempt whose
/// lease expired never reports, so its gate would stay otherwise).
const MAX_GATES: usize = 65_536;

/// The gates of the attempts that uploaded and have not reported, by staging directory.
#[derive(Debug, Default)]
pub(super) struct Gates {
    open: Mutex<HashMap<PathBuf, (Arc<Gate>, std::time::Instant)>>,
}

impl Gates {
    /// The gate for `staging`, shared by every stream writing for that attempt.
    pub(super) fn open(&self, staging: &Path) -> Arc<Gate> {
        let mut open = lock(&self.open);
        if let Some((g, _)) = open.get(staging) {
            return g.clone();
        }
        if open.len() >= MAX_GATES {
            let mut ages: Vec<std::time::Instant> = open.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            open.retain(|_, (_, t)| *t > cutoff);
        }
        let g = Arc::new(Gate::default());
        open.insert(
            staging.to_path_buf(),
            (g.clone(), std::time::Instant::now()),
        );
        g
    }

    /// Closes `staging`'s gate: from now on no stream can add a file to it. (What
    /// unfinished streams left in its part directory is removed by the caller, off the
    /// runtime; an unfinished stream removes its own part file when it ends.)
    pub(super) fn close(&self, staging: &Path) {
        let gate = lock(&self.open).remove(staging);
        if let Some((g, _)) = gate {
            *lock(&g.closed) = true;
        }
    }
}

/// Where part files of `staging`'s attempt are received (beside, not inside, the tree
/// that is sealed).
pub(super) fn parts_dir(staging: &Path) -> PathBuf {
    let mut s = staging.as_os_str().to_owned();
    s.push(".parts");
    PathBuf::from(s)
}

/// One output file being received for an attempt: a [`Receiving`] in the attempt's part
/// directory, and where it goes once verified.
pub(super) struct Incoming {
    receiving: Receiving,
    dest: PathBuf,
    gate: Arc<Gate>,
}

impl Incoming {
    /// Starts receiving `name` (`size` bytes with `digest`) for the attempt staged at
    /// `staging`; it will be `dest` once complete.
    pub(super) fn create(
        name: String,
        staging: &Path,
        dest: PathBuf,
        size: u64,
        digest: String,
        gate: Arc<Gate>,
    ) -> Result<Self, Status> {
        let receiving = Receiving::create(name, &parts_dir(staging), size, digest)?;
        Ok(Self {
            receiving,
            dest,
            gate,
        })
    }

    /// `<output>/<path>`, as the worker named it.
    pub(super) fn name(&self) -> &str {
        &self.receiving.name
    }

    /// Appends a chunk that starts at `offset`.
    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Status> {
        nexa_shared::fail_point!(
            "upload.write",
            Status::internal(format!(
                "staging {}: {}",
                self.receiving.name,
                nexa_shared::failpoint::injected("upload.write")
            ))
        );
        self.receiving.write(offset, data)
    }

    /// Checks size and digest and moves the file to its place in the staging tree,
    /// unless the attempt was reported meanwhile. A mismatch is `DATA_LOSS`.
    ///
    /// Not fsynced here: a staged file is durable only once it is sealed (the sealer
    /// fsyncs the payload, or syncfs's the group, before `COMPLETE`), and nothing relies
    /// on it before that: a coordinator that dies first runs the job again.
    pub(super) fn finish(self) -> Result<u64, Status> {
        let verified = self.receiving.verify(false)?;
        self.gate.commit(verified, &self.dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(dir: &Path, gates: &Gates, body: &[u8], declared: &[u8]) -> Incoming {
        let staging = dir.join("w/job-g1");
        Incoming::create(
            "out/f".into(),
            &staging,
            staging.join("out/f"),
            declared.len() as u64,
            nexa_shared::digest::format(&blake3::hash(declared)),
            gates.open(&staging),
        )
        .map(|mut f| {
            f.write(0, body).expect("write");
            f
        })
        .expect("create")
    }

    #[test]
    fn a_stream_still_open_when_the_result_arrives_cannot_add_to_the_staging_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gates = Gates::default();
        let full = b"eighteen bytes!!!!";
        let f = incoming(dir.path(), &gates, &full[..5], full);
        let staging = dir.path().join("w/job-g1");
        // Incomplete: nothing under the staging tree.
        assert!(!staging.join("out/f").exists());
        gates.close(&staging);
        let mut f = f;
        f.write(5, &full[5..])
            .expect("the part file still takes bytes");
        let err = f.finish().expect_err("closed gate");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(!staging.join("out/f").exists());
        assert!(
            !parts_dir(&staging).exists()
                || std::fs::read_dir(parts_dir(&staging))
                    .expect("dir")
                    .next()
                    .is_none()
        );
    }

    #[test]
    fn a_verified_file_is_renamed_into_place_closed_and_a_short_one_never_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gates = Gates::default();
        let staging = dir.path().join("w/job-g1");
        let f = incoming(dir.path(), &gates, b"hello", b"hello");
        assert_eq!(f.finish().expect("finish"), 5);
        assert_eq!(
            std::fs::read(staging.join("out/f")).expect("read"),
            b"hello"
        );
        let short = incoming(dir.path(), &gates, b"he", b"hello");
        assert_eq!(
            short.finish().expect_err("short").code(),
            tonic::Code::DataLoss
        );
        assert_eq!(
            std::fs::read(staging.join("out/f")).expect("read"),
            b"hello"
        );
        assert_eq!(
            std::fs::read_dir(parts_dir(&staging)).expect("dir").count(),
            0,
            "no part file is left behind"
        );
    }
}
