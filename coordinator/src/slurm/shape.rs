//! What one pilot asks Slurm for, from the requirements of the jobs it is for:
//! `cpus` → `--cpus-per-task`, `memory` → `--mem`, `gpus` → `--gres=gpu:N`, the
//! timeout plus the drain margin → `--time`, and a step's `slurm:` overrides
//! (labels `slurm.partition` …) over the provider's defaults.

use super::SlurmConfig;
use nexa_shared::hardware::Requirements;
use std::time::Duration;

/// A pilot's request: two pilots of one shape are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    /// `--cpus-per-task` (and the worker's slots).
    pub cpus: u32,
    /// `--mem`, in MiB.
    pub memory_mb: u64,
    /// `--gres=gpu:N` when more than zero.
    pub gpus: u32,
    /// `--time`, in whole minutes.
    pub minutes: u64,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// `--constraint`.
    pub constraint: Option<String>,
    /// Its jobs need what the worker's runtime probe finds (an ML runner's Python
    /// packages, a container runtime); without, the pilot's worker skips the probe
    /// (`--no-probe`), a few hundred milliseconds of CPU at each pilot's start.
    pub runtimes: bool,
}

impl Shape {
    /// Where the pilot goes: its sbatch options named by their flags (`partition`,
    /// `account`, `qos`, `constraint`), those given.
    pub fn placement(&self) -> impl Iterator<Item = (&'static str, &str)> {
        placement(&self.partition, &self.account, &self.qos, &self.constraint)
    }

    /// The pilot for jobs needing `req` with `timeout`, under `cfg`.
    pub fn of(req: &Requirements, timeout: Option<Duration>, cfg: &SlurmConfig) -> Self {
        let label = |k: &str| req.labels.get(&format!("slurm.{k}")).cloned();
        let memory = req.memory.max(cfg.min_memory);
        let needed = timeout.map_or(Duration::ZERO, |t| {
            t + cfg.drain + Duration::from_secs(nexa_shared::hardware::WALLTIME_SLACK_S)
        });
        let walltime = cfg.walltime.max(needed);
        Self {
            cpus: req.cpus.max(1),
            memory_mb: memory.div_ceil(1 << 20),
            gpus: req.gpus,
            minutes: walltime.as_secs().div_ceil(60),
            partition: label("partition").or_else(|| cfg.partition.clone()),
            account: label("account").or_else(|| cfg.account.clone()),
            qos: label("qos").or_else(|| cfg.qos.clone()),
            constraint: label("constraint").or_else(|| cfg.constraint.clone()),
            runtimes: req.container
                || req
                    .labels
                    .keys()
                    .any(|k| k == "python" || k.starts_with("python.")),
        }
    }

    /// The shape of the pilots kept for `min_pilots`: a one-CPU step with no timeout.
    pub fn idle(cfg: &SlurmConfig) -> Self {
        Self::of(&Requirements::default(), None, cfg)
    }

    /// A short stable name of the shape (carried in the pilot's comment, so that a
    /// restarted coordinator knows what its predecessor's pilots are for).
    pub fn key(&self) -> String {
        let text = format!("{self:?}");
        blake3::hash(text.as_bytes()).to_hex()[..12].to_string()
    }

    /// For messages: `2 CPUs, 4096 MiB, 1 GPU, 61 min on partition gpu`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} CPU{}, {} MiB",
            self.cpus,
            if self.cpus == 1 { "" } else { "s" },
            self.memory_mb
        );
        if self.gpus > 0 {
            s.push_str(&format!(
                ", {} GPU{}",
                self.gpus,
                if self.gpus == 1 { "" } else { "s" }
            ));
        }
        s.push_str(&format!(", {} min", self.minutes));
        for (what, v) in self.placement() {
            s.push_str(&format!(", {what} {v}"));
        }
        s
    }
}

/// The given ones of partition, account, qos and constraint, by their sbatch names.
pub fn placement<'a>(
    partition: &'a Option<String>,
    account: &'a Option<String>,
    qos: &'a Option<String>,
    constraint: &'a Option<String>,
) -> impl Iterator<Item = (&'static str, &'a str)> {
    [
        ("partition", partition),
        ("account", account),
        ("qos", qos),
        ("constraint", constraint),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pilot_is_shaped_from_its_steps_resources_timeout_and_overrides() {
        let mut cfg = SlurmConfig::new("http://login:7070".into(), "nexa-pilot-x".into());
        cfg.partition = Some("batch".into());
        cfg.walltime = Duration::from_secs(600);
        let mut req = Requirements {
            cpus: 4,
            memory: 3 << 30,
            gpus: 2,
            ..Requirements::default()
        };
        let s = Shape::of(&req, Some(Duration::from_secs(7200)), &cfg);
        assert_eq!((s.cpus, s.memory_mb, s.gpus), (4, 3072, 2));
        // 2 h of timeout + 60 s of drain + 30 s of slack: 122 minutes, over the 10 default.
        assert_eq!(s.minutes, 122);
        assert_eq!(
            s.partition.as_deref(),
            Some("batch"),
            "the provider's default"
        );
        req.labels.insert("slurm.partition".into(), "gpu".into());
        req.labels.insert("slurm.qos".into(), "high".into());
        let s = Shape::of(&req, None, &cfg);
        assert_eq!(
            s.partition.as_deref(),
            Some("gpu"),
            "the step's override wins"
        );
        assert_eq!(s.qos.as_deref(), Some("high"));
        assert_eq!(s.minutes, 10, "no timeout: the provider's walltime");
        assert_ne!(s.key(), Shape::idle(&cfg).key());
        assert_eq!(s.key(), Shape::of(&req, None, &cfg).key(), "stable");
        let idle = Shape::idle(&cfg);
        assert_eq!(
            (idle.cpus, idle.memory_mb, idle.gpus),
            (1, 1024, 0),
            "--mem always"
        );
        assert!(s.describe().contains("partition gpu"), "{}", s.describe());
        // Only steps that need what the runtime probe finds get pilots that probe.
        assert!(!s.runtimes && !idle.runtimes);
        let mut ml = req.clone();
        ml.labels
            .insert(nexa_shared::runners::label("torch"), "*".into());
        assert!(Shape::of(&ml, None, &cfg).runtimes, "an ML runner step");
        let image = Requirements {
            container: true,
            ..req.clone()
        };
        assert!(
            Shape::of(&image, None, &cfg).runtimes,
            "a step naming an image"
        );
    }
}
