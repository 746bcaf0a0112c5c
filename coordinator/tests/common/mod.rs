//! Helpers for the coordinator's tests, which play the worker against a real loop.

#![allow(dead_code)]

use nexa_coordinator::scheduler::{Progress, RunHandle, RunRequest, RunSummary};
use nexa_coordinator::{Coordinator, Result, SledStore, Store};
use nexa_shared::digest;
use nexa_shared::job::{JobResult, Lease, Outcome, OutputFile};
use nexa_shared::signing::Identity;
use std::path::Path;

/// Submits a loaded pipeline of the project at `project`.
pub async fn submit(
    coord: &Coordinator,
    project: &Path,
    loaded: nexa_shared::spec::Loaded,
) -> RunHandle {
    coord
        .submit(RunRequest {
            loaded,
            project: project.to_path_buf(),
            verify: false,
            from: None,
            git_sha: None,
            run_id: None,
            confined: false,
        })
        .await
        .expect("submit")
}

/// The next lease for worker `w1`, within `secs` seconds.
pub async fn lease(coord: &Coordinator, secs: u64) -> Lease {
    tokio::time::timeout(std::time::Duration::from_secs(secs), coord.lease("w1"))
        .await
        .expect("a lease in time")
        .expect("a lease")
}

/// The run's summary, once it is reported finished within `secs` seconds of the last
/// progress line.
pub async fn finished(run: &mut RunHandle, secs: u64) -> RunSummary {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(secs), run.recv()).await {
            Ok(Some(Progress::Finished(s))) => return s,
            Ok(Some(_)) => continue,
            other => panic!("the run did not finish: {other:?}"),
        }
    }
}

/// A successful, unsigned result of `lease` whose output `out` holds `x.txt` =
/// `content`, staged under `staging`.
pub fn result_for(lease: &Lease, staging: &Path, content: &[u8]) -> JobResult {
    let dir = staging.join("out");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("x.txt"), content).expect("write");
    JobResult {
        job_id: lease.job.job_id.clone(),
        generation: lease.generation,
        attempt: lease.attempt,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        outputs: vec![OutputFile {
            output: "out".into(),
            path: "x.txt".into(),
            size: content.len() as u64,
            digest: digest::format(&blake3::hash(content)).into(),
        }],
        started_ms: 1,
        ended_ms: 2,
        error: String::new(),
        staging: Some(staging.to_path_buf()),
        log: None,
        progress: None,
        worker_key: [0; 32],
        signature: Vec::new(),
    }
}

/// A 2-core, 1 GiB, one-slot worker with `id`'s key.
pub fn worker_info(id: &Identity) -> nexa_coordinator::scheduler::WorkerInfo {
    nexa_coordinator::scheduler::WorkerInfo {
        name: "w".into(),
        key: id.public_key(),
        profile: nexa_shared::hardware::Profile {
            cores: 2,
            memory_total: 1 << 30,
            ..Default::default()
        },
        slots: 1,
    }
}

/// sled, with every write (`put_batch`, `remove`, `compare_and_swap`) shown first to
/// `watch(tree, bytes)`, which may refuse it (a full disk) or count it.
pub struct Watched<F> {
    pub inner: SledStore,
    pub watch: F,
}

impl<F: Fn(&str, usize) -> Result<()> + Send + Sync + 'static> Store for Watched<F> {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get(tree, key)
    }
    fn put_batch(&self, tree: &str, entries: &[(String, Vec<u8>)]) -> Result<()> {
        (self.watch)(tree, entries.iter().map(|(k, v)| k.len() + v.len()).sum())?;
        self.inner.put_batch(tree, entries)
    }
    fn remove(&self, tree: &str, key: &str) -> Result<()> {
        (self.watch)(tree, 0)?;
        self.inner.remove(tree, key)
    }
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.scan_prefix(tree, prefix)
    }
    fn keys_from(&self, tree: &str, prefix: &str, from: &str) -> Result<Vec<String>> {
        self.inner.keys_from(tree, prefix, from)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn compare_and_swap(
        &self,
        tree: &str,
        key: &str,
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        (self.watch)(tree, new.map_or(0, <[u8]>::len))?;
        self.inner.compare_and_swap(tree, key, old, new)
    }
}
