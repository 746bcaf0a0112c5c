//! `nexa-bench store`: the run-state store (sled, through `SledStore`) at a million
//! records: write throughput in the write-behind's groups, its size on disk against
//! the live bytes (space amplification) after the first write and after every record
//! is rewritten (a state change each), and how long opening and reading it all back
//! takes (what a restarted coordinator pays), and the process's RSS at each stage.

use nexa_coordinator::{SledStore, Store};
use std::path::Path;
use std::time::Instant;

/// Records per batch, as the engine's write-behind round groups them.
const GROUP: usize = 256;

/// A step-record-sized JSON value for record `i` in state `state`.
fn record(i: usize, state: &str) -> Vec<u8> {
    serde_json::json!({
        "id": format!("s{i}"), "status": state, "run_id": "20261203T000000-0000",
        "cache_key": format!("{:064x}", i), "attempts": 1, "worker": format!("{:016x}", i * 7),
        "outputs": {"out": {"path": format!("artifacts/s{i}"), "hash": format!("blake3:{:064x}", i * 3)}},
        "duration_ms": 12,
    })
    .to_string()
    .into_bytes()
}

fn write_all(s: &SledStore, records: usize, state: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut batch = Vec::with_capacity(GROUP);
    for i in 0..records {
        batch.push((format!("bench/s{i:08}"), record(i, state)));
        if batch.len() == GROUP {
            s.put_batch("steps", &batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        s.put_batch("steps", &batch)?;
    }
    s.flush()?;
    Ok(records as f64 / t.elapsed().as_secs_f64())
}

/// Runs the benchmark and prints its figures.
pub fn run(records: usize, scratch: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nexa-bench-store-")
        .tempdir_in(scratch)?;
    let path = dir.path().join("store");
    let s = SledStore::open(&path)?;
    let me = std::process::id();
    let first = write_all(&s, records, "RUNNING")?;
    let a = s.stats()?;
    let rss_written = crate::workers::usage(me)?.1;
    let second = write_all(&s, records, "COMPLETE")?;
    let b = s.stats()?;
    let rss_rewritten = crate::workers::usage(me)?.1;
    drop(s);
    let t = Instant::now();
    let s = SledStore::open(&path)?;
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let back = s.scan_prefix("steps", "bench/")?.len();
    let scan_ms = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(back == records, "read back {back} of {records}");
    let (_, rss_read, peak) = crate::workers::usage(me)?;
    let mb = |b: u64| b as f64 / 1e6;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "records": records, "record_bytes": a.live_bytes / records.max(1) as u64,
                "writes_per_s": first, "rewrites_per_s": second,
                "live_mb": mb(a.live_bytes), "disk_mb_written": mb(a.disk_bytes),
                "amplification_written": a.amplification,
                "disk_mb_rewritten": mb(b.disk_bytes), "amplification_rewritten": b.amplification,
                "open_ms": open_ms, "scan_all_ms": scan_ms,
                "rss_mb_written": rss_written, "rss_mb_rewritten": rss_rewritten,
                "rss_mb_read_back": rss_read, "peak_rss_mb": peak,
            })
        );
    } else {
        println!(
            "{records} step-sized records ({} B each) in groups of {GROUP}, sled on disk",
            a.live_bytes / records.max(1) as u64
        );
        println!(
            "  written at {first:.0}/s: live {:.0} MB on {:.0} MB of disk ({:.1}x)",
            mb(a.live_bytes),
            mb(a.disk_bytes),
            a.amplification
        );
        println!(
            "  each rewritten once at {second:.0}/s: {:.0} MB of disk ({:.1}x)",
            mb(b.disk_bytes),
            b.amplification
        );
        println!("  reopened in {open_ms:.0} ms, every record read back in {scan_ms:.0} ms");
        println!(
            "  RSS {rss_written:.0} MB written, {rss_rewritten:.0} MB rewritten, {rss_read:.0} MB read back (peak {peak:.0} MB)"
        );
    }
    Ok(())
}
