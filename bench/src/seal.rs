//! `nexa-bench seal`: what sealing a large checkpoint costs, phase by phase, on the path
//! a trained model takes: the worker hashes its output files and signs the result; the
//! coordinator checks the staged payload against the signed list (hashing it again),
//! makes it durable (fsync), renames it into place and writes `COMPLETE`.
//!
//! The payload is written and `sync`ed before the clock starts, as an upload would have
//! left it; what is timed is only what sealing adds.

use nexa_shared::artifact::{self, SealRequest};
use nexa_shared::digest::FileEntry;
use std::path::Path;
use std::time::Instant;

/// One timed seal.
struct Round {
    hash: f64,
    sign: f64,
    seal: f64,
}

/// Runs `reps` seals of `size` bytes split into `files` files under `scratch`, and
/// reports the best.
pub fn run(
    size: &str,
    files: usize,
    reps: usize,
    scratch: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let bytes = nexa_shared::units::parse_size(size)?;
    let files = files.max(1);
    std::fs::create_dir_all(scratch)?;
    let dir = tempfile::tempdir_in(scratch)?;
    let identity = nexa_shared::signing::Identity::generate();
    let mut rounds = Vec::new();
    for rep in 0..reps.max(1) {
        let out = dir.path().join(format!("checkpoint-{rep}"));
        let tmp = artifact::tmp_path(&out);
        std::fs::create_dir_all(&tmp)?;
        for i in 0..files {
            super::fill(
                &tmp.join(format!("model-{i:05}-of-{files:05}.safetensors")),
                bytes / files as u64,
            )?;
        }
        // As an upload leaves it: written, on disk, in the page cache.
        sync_all();
        // The worker: its output files hashed (its own code), the result signed.
        let t = Instant::now();
        let name = tmp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let outputs =
            nexa_worker::outputs::hash_outputs(dir.path(), &[name]).map_err(anyhow::Error::msg)?;
        let hash = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let entries: Vec<FileEntry> = outputs
            .iter()
            .map(|o| FileEntry {
                path: o.path.clone(),
                size: o.size,
                digest: o.digest.to_string(),
            })
            .collect();
        let result = super::signed_result(&identity, "bench/checkpoint".into(), (1, 1), outputs);
        nexa_shared::signing::verify_result(&identity.public_key(), &result)?;
        let sign = t.elapsed().as_secs_f64();
        // The coordinator: the payload checked against the signed list, then sealed.
        let t = Instant::now();
        let req = SealRequest {
            kind: "checkpoint".into(),
            inputs: Vec::new(),
            labels: Default::default(),
            expected: Some(entries),
            provenance: None,
        };
        artifact::seal(&out, req)?;
        let seal = t.elapsed().as_secs_f64();
        rounds.push(Round { hash, sign, seal });
        let _ = artifact::remove_tree(&out);
    }
    let total = |r: &Round| r.hash + r.sign + r.seal;
    let best = rounds
        .iter()
        .min_by(|a, b| total(a).total_cmp(&total(b)))
        .ok_or_else(|| anyhow::anyhow!("no round"))?;
    let gbps = bytes as f64 / total(best) / 1e9;
    if json {
        println!(
            "{}",
            serde_json::json!({"bytes": bytes, "files": files, "hash_s": best.hash,
                "sign_s": best.sign, "seal_s": best.seal, "total_s": total(best), "gb_per_s": gbps})
        );
    } else {
        println!(
            "sealing a {} checkpoint of {files} files (best of {}): hash {:.3} s, sign {:.6} s, verify + fsync + rename + COMPLETE {:.3} s; total {:.3} s = {gbps:.2} GB/s (goal >= 1 GB/s)",
            nexa_shared::units::format_size(bytes),
            rounds.len(),
            best.hash,
            best.sign,
            best.seal,
            total(best)
        );
    }
    Ok(())
}

/// Flushes every dirty page of the system to disk.
fn sync_all() {
    // std has no sync(2); the coreutils command is on every machine this runs on.
    let _ = std::process::Command::new("sync").status();
}
