//! The free-space floor: the coordinator stops taking work before its data disk is full,
//! so that it never acknowledges what it could not persist and never drives its store
//! into a write failure.
//!
//! Below the floor, submissions are refused (`UNAVAILABLE`, retried by clients), no new
//! leases are handed out (a job leased now would upload into a full disk), uploads are
//! refused, and `/readyz` answers 503. Jobs stay queued and resume when space returns;
//! nothing is failed for it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Watches the free space of the data directory's file system.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    floor: u64,
    free: AtomicU64,
    low: AtomicBool,
}

impl DiskGuard {
    /// A guard for `dir` that reports low below `floor` free bytes (0: never).
    pub fn new(dir: PathBuf, floor: u64) -> Self {
        let g = Self {
            dir,
            floor,
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
        };
        g.refresh();
        g
    }

    /// The floor, in bytes.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Free bytes at the last look.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Looks again (a `statvfs`); returns whether the disk is below the floor. A file
    /// system that cannot be read counts as low.
    pub fn refresh(&self) -> bool {
        let free = nexa_shared::disk::free_bytes(&self.dir).unwrap_or(0);
        self.free.store(free, Ordering::Relaxed);
        let low = self.floor > 0 && free < self.floor;
        let was = self.low.swap(low, Ordering::Relaxed);
        if low && !was {
            tracing::error!(free, floor = self.floor, dir = %self.dir.display(), "data disk below its free-space floor: refusing new work");
        } else if was && !low {
            tracing::info!(
                free,
                floor = self.floor,
                "data disk above its floor again: taking work"
            );
        }
        low
    }

    /// Whether the disk was below the floor at the last look.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// `Err` with a message for callers when the disk is below the floor (looked at now).
    pub fn check(&self) -> Result<(), String> {
        self.refresh();
        self.refusal()
    }

    /// [`DiskGuard::check`] from the last look (the watcher's, at most a second old):
    /// for hot paths such as every upload.
    pub fn refusal(&self) -> Result<(), String> {
        if self.is_low() {
            return Err(format!(
                "the coordinator's data disk has {} free, under its floor of {}: try again later",
                nexa_shared::units::format_size(self.free()),
                nexa_shared::units::format_size(self.floor)
            ));
        }
        Ok(())
    }

    /// Looks every `every` until the returned task is dropped or aborted.
    pub fn watch(self: std::sync::Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let g = self.clone();
                let _ = tokio::task::spawn_blocking(move || g.refresh()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_is_low_and_zero_never_is() {
        let d = tempfile::tempdir().expect("tempdir");
        let never = DiskGuard::new(d.path().to_path_buf(), 0);
        assert!(!never.is_low() && never.check().is_ok());
        let always = DiskGuard::new(d.path().to_path_buf(), u64::MAX);
        assert!(always.is_low());
        let e = always.check().expect_err("low");
        assert!(e.contains("under its floor"), "{e}");
        let gone = DiskGuard::new(d.path().join("missing"), 1);
        assert!(gone.is_low(), "an unreadable file system counts as low");
    }
}
