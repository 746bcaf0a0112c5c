//! What a pipeline's state looks like to the user: the summary at the end of a run and
//! `nexa pipeline status` (a table, or JSON for scripts).

use crate::embedded;
use nexa_coordinator::RunSummary;
use nexa_coordinator::mirror;
use nexa_coordinator::scheduler::RunOutcome;
use nexa_coordinator::state::{StepRecord, StepStatus};
use nexa_shared::spec::Loaded;
use std::path::Path;
use std::process::ExitCode;

pub(crate) fn short(hash: &str) -> String {
    let h = hash.trim_start_matches("blake3:");
    format!("blake3:{}", &h[..h.len().min(12)])
}

pub(crate) fn primary(rec: &StepRecord) -> Option<(&str, &str)> {
    rec.outputs
        .get(nexa_shared::spec::DEFAULT_OUTPUT)
        .or_else(|| rec.outputs.values().next())
        .map(|a| (a.path.as_str(), a.hash.as_str()))
}

pub(crate) fn print_summary(s: &RunSummary, file: &str, order: &[usize]) {
    let count = |st: StepStatus| s.steps.iter().filter(|r| r.status == st).count();
    println!(
        "pipeline {}: {} in {:.2}s (run {}): {} complete, {} skipped, {} failed, {} blocked, {} cancelled",
        s.pipeline,
        match s.outcome {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed => "FAILED",
            RunOutcome::Cancelled => "CANCELLED",
        },
        s.elapsed.as_secs_f64(),
        s.run_id,
        count(StepStatus::Complete),
        count(StepStatus::Skipped),
        count(StepStatus::Failed),
        count(StepStatus::Blocked),
        count(StepStatus::Cancelled),
    );
    if s.steps.len() <= 50 || s.outcome != RunOutcome::Succeeded {
        for &i in order {
            let r = &s.steps[i];
            if s.steps.len() > 50 && r.status.is_done() {
                continue;
            }
            let art = primary(r)
                .map(|(p, h)| format!("{p}  {}", short(h)))
                .unwrap_or_default();
            println!("  {:<24} {:<9} {art}", r.id, r.status.as_str());
        }
    }
    let failed: Vec<&StepRecord> = order
        .iter()
        .map(|&i| &s.steps[i])
        .filter(|r| r.status == StepStatus::Failed)
        .collect();
    for r in &failed {
        eprintln!("\nstep '{}' failed:", r.id);
        for line in r.error.as_deref().unwrap_or("").lines() {
            eprintln!("    {line}");
        }
        if let Some(log) = &r.log {
            eprintln!("  log: {log}");
        }
    }
    if let Some(first) = failed.first() {
        eprintln!(
            "\nfix the cause, then continue with:\n  nexa pipeline rerun {file} --from {}",
            first.id
        );
    }
    if s.outcome == RunOutcome::Cancelled {
        eprintln!("\ncancelled; state saved. continue with:\n  nexa pipeline resume {file}");
    }
}

pub(crate) fn status(project: &Path, l: &Loaded, json: bool) -> anyhow::Result<ExitCode> {
    let name = &l.pipeline.name;
    let state_dir = embedded::state_dir(project, name);
    // The store is the truth; while a run holds it, read the mirror it keeps.
    let records: std::collections::BTreeMap<String, StepRecord> =
        if !state_dir.join("store").exists() {
            Default::default()
        } else {
            match embedded::open_store(project, name) {
                Ok(store) => nexa_coordinator::state::load_steps(&store, name)?,
                Err(nexa_coordinator::Error::StoreLocked(_)) => mirror::read(&state_dir)
                    .map(|m| m.steps.into_iter().map(|r| (r.id.clone(), r)).collect())
                    .unwrap_or_default(),
                Err(e) => return Err(e.into()),
            }
        };
    print_status(l, &records, json)
}

pub(crate) fn print_status(
    l: &Loaded,
    records: &std::collections::BTreeMap<String, StepRecord>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let name = &l.pipeline.name;
    let steps: Vec<serde_json::Value> = l
        .pipeline
        .steps
        .iter()
        .map(|s| {
            let r = records.get(&s.id.value);
            let status = r.map_or(StepStatus::Pending, |r| r.status);
            let (artifact, hash) = r.and_then(primary).map_or((None, None), |(p, h)| (Some(p), Some(h)));
            serde_json::json!({
                "id": s.id.value,
                "status": status,
                "cache_key": r.and_then(|r| r.cache_key.clone()),
                "artifact": artifact,
                "hash": hash,
                "outputs": r.map(|r| &r.outputs),
                "shards": r.map(|r| r.shards.iter().map(|sh| serde_json::json!({
                    "index": sh.index, "status": sh.status, "cache_key": sh.cache_key, "hash": sh.hash, "worker": sh.worker,
                })).collect::<Vec<_>>()),
                "error": r.and_then(|r| r.error.clone()),
                "run_id": r.map(|r| &r.run_id),
                "worker": r.and_then(|r| r.worker.clone()),
                "progress": r.and_then(|r| r.progress.clone()),
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"pipeline": name, "steps": steps}))?
        );
    } else {
        println!("pipeline {name}");
        for s in &steps {
            let hash = s["hash"].as_str().map(short).unwrap_or_default();
            println!(
                "  {:<24} {:<9} {}  {}",
                s["id"].as_str().unwrap_or(""),
                s["status"].as_str().unwrap_or(""),
                s["artifact"].as_str().unwrap_or("-"),
                hash
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
