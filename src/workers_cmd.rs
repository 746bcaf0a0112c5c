//! `nexa workers`: the coordinator's workers listed page by page (10,000 volunteers
//! are never one answer, and the first rows show before the last page is read), the
//! operator's drain / ban / activate, and the credit leaderboard.

use crate::remote::Remote;
use nexa_shared::record::WorkerSummary;
use std::process::ExitCode;

/// `nexa workers`: drains, bans or re-activates one first when asked, then lists them
/// a page at a time (a table printed as each page comes, or JSON), stopping after
/// `limit` when given, and ends with the count by state.
pub async fn list(
    r: &Remote,
    json: bool,
    (limit, chunk): (Option<usize>, u32),
    drain: Option<String>,
    ban: Option<String>,
    activate: Option<String>,
) -> anyhow::Result<ExitCode> {
    use nexa_shared::record::AdminState as S;
    for (id, state) in [(drain, S::Drain), (ban, S::Ban), (activate, S::Active)] {
        if let Some(id) = id {
            crate::remote::set_worker_state(r, &id, state).await?;
            println!("worker {id}: {}", state.as_str());
        }
    }
    let limit = limit.unwrap_or(usize::MAX);
    if json {
        let mut ws = Vec::new();
        crate::remote::worker_pages(r, chunk, |page, _| {
            ws.extend(page);
            ws.len() < limit
        })
        .await?;
        ws.truncate(limit);
        let v: Vec<serde_json::Value> = ws
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id, "name": w.name, "state": w.state, "slots": w.slots, "running": w.running,
                    "succeeded": w.succeeded, "failed": w.failed, "error_rate": w.error_rate(),
                    "valid": w.valid, "invalid": w.invalid, "trusted_for": w.trusted_for,
                    "credit": {"cpu_seconds": w.cpu_seconds, "gpu_seconds": w.gpu_seconds},
                    "public_key": hex::encode(w.key),
                    "profile": w.profile,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:<16} {:<11} {:>5} {:>7} {:>9} {:>13} {:>9} {:>9}  gpus",
        "worker",
        "name",
        "state",
        "slots",
        "running",
        "err rate",
        "valid/invalid",
        "CPU-s",
        "GPU-s"
    );
    let (mut shown, mut total) = (0usize, 0u64);
    let mut by_state: std::collections::BTreeMap<&'static str, usize> = Default::default();
    crate::remote::worker_pages(r, chunk, |page, all| {
        total = all;
        for w in page.iter().take(limit - shown) {
            *by_state.entry(w.state.as_str()).or_default() += 1;
            print_row(w);
        }
        shown += page.len().min(limit - shown);
        shown < limit
    })
    .await?;
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    if (shown as u64) < total {
        println!(
            "{shown} of {total} workers shown ({}); --limit for more",
            states.join(", ")
        );
    } else {
        println!("{total} workers ({})", states.join(", "));
    }
    let refused = crate::remote::refusals(r).await?;
    let line: Vec<String> = refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("refused or expired: {}", line.join(" "));
    Ok(ExitCode::SUCCESS)
}

/// One worker's line of the table.
fn print_row(w: &WorkerSummary) {
    let p = &w.profile;
    let total = w.succeeded + w.failed;
    let rate = if total == 0 {
        "-".to_string()
    } else {
        format!("{:.0}%", 100.0 * w.error_rate())
    };
    let gpus: Vec<String> = p
        .gpus
        .iter()
        .map(|g| {
            format!(
                "{} ({}, {} free)",
                g.name,
                nexa_shared::units::format_size(g.memory_total),
                nexa_shared::units::format_size(g.memory_free)
            )
        })
        .collect();
    let trust = if w.trusted_for.is_empty() {
        format!("{}/{}", w.valid, w.invalid)
    } else {
        format!("{}/{} T", w.valid, w.invalid)
    };
    println!(
        "{:<18} {:<16} {:<11} {:>5} {:>7} {:>9} {:>13} {:>9.1} {:>9.1}  {}",
        w.id.as_str(),
        w.name,
        w.state.as_str(),
        w.slots,
        w.running,
        rate,
        trust,
        w.cpu_seconds,
        w.gpu_seconds,
        if gpus.is_empty() {
            "-".to_string()
        } else {
            gpus.join(", ")
        }
    );
}

/// `nexa workers --credit`: who did the most verified work.
pub async fn leaderboard(r: &Remote, json: bool, chunk: u32) -> anyhow::Result<ExitCode> {
    let mut ws = crate::remote::workers(r, chunk).await?;
    ws.sort_by(|a, b| {
        (b.gpu_seconds, b.cpu_seconds)
            .partial_cmp(&(a.gpu_seconds, a.cpu_seconds))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if json {
        let v: Vec<serde_json::Value> = ws
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({"rank": i + 1, "id": w.id, "name": w.name,
                    "gpu_seconds": w.gpu_seconds, "cpu_seconds": w.cpu_seconds,
                    "valid": w.valid, "invalid": w.invalid})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>4}  {:<18} {:<16} {:>12} {:>12} {:>7} {:>7}",
        "rank", "worker", "name", "GPU-s", "CPU-s", "valid", "invalid"
    );
    for (i, w) in ws.iter().enumerate() {
        println!(
            "{:>4}  {:<18} {:<16} {:>12.1} {:>12.1} {:>7} {:>7}",
            i + 1,
            w.id.as_str(),
            w.name,
            w.gpu_seconds,
            w.cpu_seconds,
            w.valid,
            w.invalid
        );
    }
    Ok(ExitCode::SUCCESS)
}
