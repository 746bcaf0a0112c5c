//! The Slurm provider's settings as flags (`--slurm-<key>`) and as the `[slurm]` section
//! of a configuration file: one definition for `nexa-coordinator serve` and for the
//! embedded `nexa pipeline run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Slurm provider: flags `--slurm-<key>`, or `<key>` in the file's `[slurm]`.
#[derive(clap::Args, Default, Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SlurmArgs {
    /// Partition for pilots of steps that name none [default: the cluster's default].
    #[arg(long = "slurm-partition")]
    pub partition: Option<String>,
    /// Account pilots are charged to [default: the user's default].
    #[arg(long = "slurm-account")]
    pub account: Option<String>,
    /// QOS of the pilots.
    #[arg(long = "slurm-qos")]
    pub qos: Option<String>,
    /// Node features the pilots need (`--constraint`).
    #[arg(long = "slurm-constraint")]
    pub constraint: Option<String>,
    /// One more sbatch option for every pilot, e.g. `--reservation=r1` (repeatable).
    #[arg(long = "slurm-sbatch", allow_hyphen_values = true)]
    #[serde(default)]
    pub sbatch: Vec<String>,
    /// Pilots kept even when nothing waits [default: 0].
    #[arg(long = "slurm-min-pilots")]
    pub min_pilots: Option<u32>,
    /// The most pilots at once [default: 16].
    #[arg(long = "slurm-max-pilots")]
    pub max_pilots: Option<u32>,
    /// A pilot's walltime, e.g. `4h` [default: 1h; longer for a step whose timeout needs it].
    #[arg(long = "slurm-walltime")]
    pub walltime: Option<String>,
    /// A pilot with no job for this long gives its allocation back [default: 60s].
    #[arg(long = "slurm-idle-timeout")]
    pub idle_timeout: Option<String>,
    /// How long before its walltime a pilot stops taking jobs [default: 60s].
    #[arg(long = "slurm-drain")]
    pub drain: Option<String>,
    /// The worker command on the compute nodes [default: nexa-worker beside this binary].
    #[arg(long = "slurm-worker")]
    pub worker: Option<String>,
    /// One more argument for the pilots' `nexa-worker join` (repeatable).
    #[arg(long = "slurm-worker-arg", allow_hyphen_values = true)]
    #[serde(default)]
    pub worker_arg: Vec<String>,
    /// The coordinator's URL as compute nodes reach it [default: this host's name and
    /// the port it listens on].
    #[arg(long = "slurm-url")]
    pub url: Option<String>,
    /// Where pilots write their logs; must exist on the compute nodes [default:
    /// <data-dir>/slurm-logs].
    #[arg(long = "slurm-log-dir")]
    pub log_dir: Option<PathBuf>,
    /// Memory a pilot asks for when its step names none [default: 1GiB].
    #[arg(long = "slurm-min-memory")]
    pub min_memory: Option<String>,
}

impl SlurmArgs {
    /// Flags win over the file's `[slurm]`.
    pub fn or(mut self, file: SlurmArgs) -> Self {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            partition,
            account,
            qos,
            constraint,
            min_pilots,
            max_pilots,
            walltime,
            idle_timeout,
            drain,
            worker,
            url,
            log_dir,
            min_memory
        );
        if self.sbatch.is_empty() {
            self.sbatch = file.sbatch;
        }
        if self.worker_arg.is_empty() {
            self.worker_arg = file.worker_arg;
        }
        self
    }

    /// Whether any setting is given.
    pub fn any(&self) -> bool {
        self.partition.is_some()
            || self.account.is_some()
            || self.qos.is_some()
            || self.constraint.is_some()
            || !self.sbatch.is_empty()
            || self.min_pilots.is_some()
            || self.max_pilots.is_some()
            || self.walltime.is_some()
            || self.idle_timeout.is_some()
            || self.drain.is_some()
            || self.worker.is_some()
            || !self.worker_arg.is_empty()
            || self.url.is_some()
            || self.log_dir.is_some()
            || self.min_memory.is_some()
    }

    /// The provider's configuration; `url` is where pilots reach this coordinator.
    pub fn config(
        self,
        data_dir: &Path,
        url: String,
        token: Option<String>,
    ) -> Result<super::SlurmConfig, String> {
        let job_name = super::job_name(data_dir)
            .map_err(|e| format!("keeping the pilots' id in {}: {e}", data_dir.display()))?;
        let mut c = super::SlurmConfig::new(self.url.unwrap_or(url), job_name);
        let duration = |v: Option<String>, what: &str, default: Duration| match v {
            Some(t) => {
                humantime::parse_duration(&t).map_err(|e| format!("slurm {what} {t:?}: {e}"))
            }
            None => Ok(default),
        };
        c.partition = self.partition;
        c.account = self.account;
        c.qos = self.qos;
        c.constraint = self.constraint;
        c.sbatch_lines = self.sbatch;
        c.min_pilots = self.min_pilots.unwrap_or(c.min_pilots);
        c.max_pilots = self.max_pilots.unwrap_or(c.max_pilots);
        c.walltime = duration(self.walltime, "walltime", c.walltime)?;
        c.idle_timeout = duration(self.idle_timeout, "idle-timeout", c.idle_timeout)?;
        c.drain = duration(self.drain, "drain", c.drain)?;
        if let Some(w) = self.worker {
            c.worker = w;
        }
        c.worker_args = self.worker_arg;
        if let Some(m) = &self.min_memory {
            c.min_memory = nexa_shared::units::parse_size(m)
                .map_err(|e| format!("slurm min-memory {m:?}: {e}"))?;
        }
        c.log_dir = match self.log_dir {
            Some(d) => d,
            None => std::path::absolute(data_dir.join("slurm-logs"))
                .map_err(|e| format!("{}: {e}", data_dir.display()))?,
        };
        std::fs::create_dir_all(&c.log_dir)
            .map_err(|e| format!("creating {}: {e}", c.log_dir.display()))?;
        c.token = token;
        c.check()?;
        Ok(c)
    }
}
