//! The Slurm provider: pilot workers in Slurm allocations for `scheduler: slurm` steps.
//!
//! Pilots, as dask-jobqueue, Parsl's SlurmProvider and HTCondor glideins do: the
//! provider submits `nexa-worker join URL --label scheduler=slurm …` as sbatch jobs
//! shaped from the waiting steps' `resources`; each pilot enrols like any worker and
//! takes only slurm steps' jobs, one allocation running many jobs. Leases, heartbeats,
//! signed results and staging are the mesh's own: no squeue state machine decides a
//! job's fate. The provider only decides how many pilots of which shape exist
//! ([`provider`]), fails the steps whose pilots Slurm refuses or can never start, and
//! scancels its pilots when the coordinator stops. Its pilots carry the job name
//! `nexa-pilot-<id>` (the id kept in the data directory), so that a restarted
//! coordinator finds the ones its predecessor left.
//!
//! - [`args`]: its settings as flags and as a `[slurm]` section.
//! - [`shape`]: what one pilot asks Slurm for, from a step's requirements.
//! - [`script`]: the batch script of a pilot.
//! - [`commands`]: sbatch, squeue and scancel.
//! - [`provider`]: the loop that scales pilots up and down.

pub mod args;
pub mod commands;
pub mod provider;
pub mod script;
pub mod shape;

use std::path::PathBuf;
use std::time::Duration;

pub use args::SlurmArgs;
pub use provider::Provider;
pub use shape::Shape;

/// How the provider submits pilots: `nexa-coordinator serve --slurm-*` or the `[slurm]`
/// section of its configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmConfig {
    /// `--partition` for pilots of steps that name none [default: the cluster's].
    pub partition: Option<String>,
    /// `--account` [default: the user's default account].
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `--constraint`.
    pub constraint: Option<String>,
    /// More `#SBATCH` options, one per entry (e.g. `--reservation=r1`).
    pub sbatch_lines: Vec<String>,
    /// Pilots kept even with nothing to do (shaped as a one-CPU step).
    pub min_pilots: u32,
    /// The most pilots at once.
    pub max_pilots: u32,
    /// A pilot's walltime (`--time`); longer for a step whose timeout needs it.
    pub walltime: Duration,
    /// A pilot with no job for this long exits and gives its allocation back.
    pub idle_timeout: Duration,
    /// How long before its walltime a pilot is told to stop taking jobs
    /// (`--signal=B:TERM@…`); also the margin added to a step's timeout.
    pub drain: Duration,
    /// The worker command on the compute nodes.
    pub worker: String,
    /// More arguments for it (e.g. `--ca /shared/ca.pem`).
    pub worker_args: Vec<String>,
    /// The coordinator's address as compute nodes reach it.
    pub url: String,
    /// The enrolment token pilots present (in their environment, never in the script).
    pub token: Option<String>,
    /// Where pilots write their logs (`--output`); must exist on the compute nodes.
    pub log_dir: PathBuf,
    /// Memory a pilot asks for when its step names none (`--mem` is always given:
    /// without it Slurm may hand one job a whole node's memory).
    pub min_memory: u64,
    /// How often squeue is read and pilots are scaled.
    pub poll: Duration,
    /// The pilots' job name, `nexa-pilot-<id>`.
    pub job_name: String,
}

impl SlurmConfig {
    /// Defaults: no partition (the cluster's default), up to 16 pilots, 1 h walltime,
    /// 60 s idle, 60 s drain, 1 GiB minimum memory, squeue every 2 s, `nexa-worker`
    /// beside this binary.
    pub fn new(url: String, job_name: String) -> Self {
        Self {
            partition: None,
            account: None,
            qos: None,
            constraint: None,
            sbatch_lines: Vec::new(),
            min_pilots: 0,
            max_pilots: 16,
            walltime: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(60),
            worker: default_worker(),
            worker_args: Vec::new(),
            url,
            token: None,
            log_dir: PathBuf::from("/tmp"),
            min_memory: 1 << 30,
            poll: Duration::from_secs(2),
            job_name,
        }
    }

    /// Checks what goes into batch scripts: every Slurm value one word of safe
    /// characters, no extra line breaking out of its `#SBATCH` line.
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in
            shape::placement(&self.partition, &self.account, &self.qos, &self.constraint)
        {
            nexa_shared::spec::check_slurm_value(v).map_err(|e| format!("slurm {what}: {e}"))?;
        }
        for l in &self.sbatch_lines {
            if !l.starts_with("--") || l.contains(['\n', '\r']) {
                return Err(format!(
                    "slurm sbatch line {l:?} must be one sbatch option starting with --"
                ));
            }
        }
        let log_dir = self.log_dir.display().to_string();
        if log_dir.chars().any(char::is_whitespace) || log_dir.contains('%') {
            return Err(format!(
                "slurm log-dir {log_dir:?}: no spaces or % in it (it goes into an #SBATCH line)"
            ));
        }
        if self.max_pilots == 0 {
            return Err("slurm max-pilots must be at least 1".into());
        }
        if self.min_pilots > self.max_pilots {
            return Err(format!(
                "slurm min-pilots ({}) is more than max-pilots ({})",
                self.min_pilots, self.max_pilots
            ));
        }
        if self.walltime < Duration::from_secs(60) {
            return Err("slurm walltime must be at least a minute".into());
        }
        Ok(())
    }
}

/// `nexa-worker` beside the running binary when it is there, else from `PATH`.
fn default_worker() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nexa-worker")))
        .filter(|w| w.exists())
        .map(|w| w.display().to_string())
        .unwrap_or_else(|| "nexa-worker".into())
}

/// The pilots' job name for a data directory: `nexa-pilot-<id>`, the id made once and
/// kept in `<data>/slurm.id`, so that a restarted coordinator knows its pilots.
pub fn job_name(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("slurm.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(format!("nexa-pilot-{id}"));
        }
    }
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let id = hex::encode(b);
    std::fs::write(&path, &id)?;
    Ok(format!("nexa-pilot-{id}"))
}

/// The URL pilots reach a coordinator bound to `bound` at: the address itself, or this
/// host's name when it listens on every interface.
pub fn url_of(bound: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if bound.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    } else {
        bound.ip().to_string()
    };
    format!("{scheme}://{host}:{}", bound.port())
}
