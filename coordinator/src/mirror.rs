//! The human-readable mirror of run state: `.nexa_state/<pipeline>/pipeline_state.json`,
//! as the seeds describe. The store is the truth; the mirror is rewritten atomically and
//! is what `nexa pipeline status` reads while a run holds the store.

use crate::state::StepRecord;
use std::path::{Path, PathBuf};

/// The mirror's file name.
pub const FILE: &str = "pipeline_state.json";

/// The mirror document.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Mirror {
    /// Pipeline name.
    pub pipeline: String,
    /// The last run.
    pub run_id: String,
    /// When this was written (RFC 3339).
    pub updated_at: String,
    /// Steps in file order.
    pub steps: Vec<StepRecord>,
}

/// The mirror's path for a pipeline state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Writes the mirror atomically (temp file, fsync, rename), serialized straight to the
/// file (a million shards' mirror is ~250 MB of JSON, never held in memory).
pub fn write(state_dir: &Path, mirror: &Mirror) -> std::io::Result<()> {
    write_atomic_with(&path(state_dir), |w| {
        serde_json::to_writer_pretty(w, mirror).map_err(std::io::Error::other)
    })
}

/// Replaces `path` with `bytes` atomically: a temp file beside it, fsynced, renamed over
/// it. A reader sees the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| std::io::Write::write_all(w, bytes))
}

/// As [`write_atomic`], with the content written by `fill` through a buffer.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let f = std::fs::File::create(&tmp)?;
    nexa_shared::fail_point!(
        "mirror.write",
        nexa_shared::failpoint::injected("mirror.write")
    );
    let mut w = std::io::BufWriter::with_capacity(1 << 16, &f);
    fill(&mut w)?;
    w.flush()?;
    drop(w);
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the mirror, if there is one.
pub fn read(state_dir: &Path) -> Option<Mirror> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
