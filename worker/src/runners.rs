//! Runner jobs (`runners.train`, `runners.eval`, `runners.infer`) become process jobs:
//! `$NEXA_PYTHON -u <driver>/run.py <uses>`, the driver folder staged like any input
//! (see [`nexa_shared::runners`]). They then take exactly the path an `exec` job takes:
//! staged inputs, GPUs, timeout, cancellation, hashed and signed outputs.

use nexa_shared::job::JobSpec;
use nexa_shared::runners::RUNNER_INPUT;
use nexa_shared::spec::{ExecCommand, ExecParams};
use std::collections::BTreeMap;

/// The interpreter runner jobs use: `$NEXA_PYTHON`, else `python3` on `PATH`.
pub fn python() -> String {
    std::env::var("NEXA_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// The process a runner job runs as.
pub fn exec_params(job: &JobSpec) -> Result<ExecParams, String> {
    if !job.inputs.iter().any(|i| i.name == RUNNER_INPUT) {
        return Err(format!(
            "the '{}' job carries no driver (input '{RUNNER_INPUT}'); the coordinator is older \
             than this worker",
            job.uses
        ));
    }
    let var = format!(
        "${{NEXA_IN_{}}}",
        nexa_shared::paths::env_name(RUNNER_INPUT)
    );
    let env: BTreeMap<String, String> = [
        ("PYTHONUNBUFFERED", "1"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("AXOLOTL_DO_NOT_TRACK", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Ok(ExecParams {
        kind: None,
        command: ExecCommand::Argv(vec![
            python(),
            "-u".into(),
            format!("{var}/run.py"),
            job.uses.clone(),
        ]),
        env,
        image: None,
        network: job
            .params
            .get("network")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}
