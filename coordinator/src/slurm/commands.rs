//! Slurm's own commands, as a user would run them: `sbatch --parsable` with the script
//! on stdin, `squeue` for the pilots of one job name, `scancel`. They find the cluster
//! as the coordinator's environment says (`SLURM_CONF`, or the node's configuration).

use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// One pilot as squeue lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The Slurm job id.
    pub id: String,
    /// `PENDING`, `RUNNING`, `COMPLETING` …
    pub state: String,
    /// Why it waits (`Resources`, `Priority`, `PartitionConfig` …) or `None`.
    pub reason: String,
    /// Its comment (see [`super::script::comment`]).
    pub comment: String,
}

/// Pending reasons that no wait can fix: the request can never be satisfied where it
/// was sent, or the account or QOS may not use it.
pub const HOPELESS: &[&str] = &[
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AccountNotAllowed",
    "QOSNotAllowed",
    "PartitionDown",
    "PartitionInactive",
];

/// Whether sbatch's message says the controller could not be reached for a moment
/// (retried next round) rather than that it refused the pilot (the steps fail).
pub fn transient(message: &str) -> bool {
    [
        "Socket timed out",
        "Unable to contact slurm controller",
        "Slurm temporarily unable to accept job",
        "Resource temporarily unavailable",
        "Connection refused",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// Submits `script`; the new job's id, or sbatch's own message.
pub async fn sbatch(script: &str, token: Option<&str>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new("sbatch");
    cmd.arg("--parsable")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(t) = token {
        // In the job's environment (sbatch exports the submitter's), not in its script.
        cmd.env("NEXA_ENROL_TOKEN", t);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run sbatch: {e} (is Slurm's client on PATH?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("writing the script to sbatch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("sbatch: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(one_line(&stderr, &stdout));
    }
    // `--parsable`: `id` or `id;cluster`.
    let id = stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "sbatch printed no job id: {}",
            one_line(&stderr, &stdout)
        ));
    }
    Ok(id)
}

/// The jobs named `name`, as squeue lists them now.
pub async fn squeue(name: &str) -> Result<Vec<Listed>, String> {
    let args = ["-h", "-n", name, "-o", "%i|%T|%r|%k"].map(str::to_string);
    Ok(parse_squeue(&run("squeue", &args).await?))
}

/// squeue's `%i|%T|%r|%k` lines.
pub fn parse_squeue(text: &str) -> Vec<Listed> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(4, '|');
            let id = f.next()?.trim().to_string();
            if id.is_empty() {
                return None;
            }
            Some(Listed {
                id,
                state: f.next().unwrap_or("").trim().to_string(),
                reason: f.next().unwrap_or("").trim().to_string(),
                comment: f.next().unwrap_or("").trim().to_string(),
            })
        })
        .collect()
}

/// Cancels these jobs (all at once); scancel's message when it fails.
pub async fn scancel(ids: &[String]) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    run("scancel", ids).await.map(drop)
}

/// Cancels every job named `name` (the pilots of this coordinator).
pub async fn scancel_named(name: &str) -> Result<(), String> {
    run("scancel", &["-n".to_string(), name.to_string()])
        .await
        .map(drop)
}

/// Runs a Slurm command; its stdout, or its message when it fails.
async fn run(cmd: &str, args: &[String]) -> Result<String, String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(one_line(&String::from_utf8_lossy(&out.stderr), &stdout))
    }
}

/// A command's message on one line: stderr's, else stdout's, else "no output".
fn one_line(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if joined.is_empty() {
        "no output".into()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_parse_and_messages_keep_to_one_line() {
        let l = parse_squeue(
            "12|PENDING|PartitionConfig|nexa-pilot:shape=abc\n13|RUNNING|None|(null)\n\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].reason, "PartitionConfig");
        assert_eq!(l[0].comment, "nexa-pilot:shape=abc");
        assert_eq!(l[1].state, "RUNNING");
        assert!(transient(
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
        ));
        assert!(!transient(
            "sbatch: error: Batch job submission failed: Invalid partition name specified"
        ));
        assert_eq!(
            one_line(
                "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed\n",
                ""
            ),
            "sbatch: error: invalid partition specified: nope; sbatch: error: Batch job submission failed"
        );
    }
}
