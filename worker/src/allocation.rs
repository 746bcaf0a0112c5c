//! A worker inside a batch allocation (a Slurm pilot): what the allocation gives it,
//! read from the environment Slurm sets, so that the worker offers only that.
//!
//! - `SLURM_JOB_ID`, `SLURM_JOB_PARTITION`, `SLURMD_NODENAME` become the labels
//!   `slurm.job_id`, `slurm.partition`, `slurm.node` (the operator's view; steps with
//!   a `slurm.partition` override match the pilot's partition).
//! - `SLURM_MEM_PER_NODE` (MiB) caps the memory the worker offers: the node's total is
//!   not the allocation's.
//! - `SLURM_CPUS_ON_NODE` is the default number of slots.
//! - GPUs: only those Slurm allocated (`SLURM_JOB_GPUS`, else `CUDA_VISIBLE_DEVICES`,
//!   as NVML indices); none when it allocated none, even if the node has some.

use nexa_shared::hardware::Profile;

/// What a Slurm allocation gives the worker running in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// `SLURM_JOB_PARTITION`.
    pub partition: Option<String>,
    /// `SLURMD_NODENAME`.
    pub node: Option<String>,
    /// `SLURM_CPUS_ON_NODE`.
    pub cpus: Option<u32>,
    /// `SLURM_MEM_PER_NODE`, in bytes.
    pub memory: Option<u64>,
    /// The GPU indices allocated (empty: none).
    pub gpus: Vec<u32>,
}

impl Allocation {
    /// The allocation this process runs in, when `SLURM_JOB_ID` says it runs in one.
    pub fn from_env() -> Option<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Allocation::from_env`], from any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let job_id = var("SLURM_JOB_ID").filter(|j| !j.is_empty())?;
        let gpus = var("SLURM_JOB_GPUS")
            .or_else(|| var("CUDA_VISIBLE_DEVICES"))
            .map(|list| {
                list.split(',')
                    .filter_map(|g| g.trim().parse::<u32>().ok())
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            job_id,
            partition: var("SLURM_JOB_PARTITION"),
            node: var("SLURMD_NODENAME"),
            cpus: var("SLURM_CPUS_ON_NODE").and_then(|c| c.parse().ok()),
            memory: var("SLURM_MEM_PER_NODE")
                .and_then(|m| m.parse::<u64>().ok())
                .map(|mib| mib << 20),
            gpus,
        })
    }

    /// Narrows `p` to the allocation: its labels, its memory, its GPUs (unless the
    /// volunteer chose GPUs with `--gpus`, `explicit_gpus`).
    pub fn apply(&self, p: &mut Profile, explicit_gpus: bool) {
        for (label, value) in [
            ("slurm.job_id", Some(&self.job_id)),
            ("slurm.partition", self.partition.as_ref()),
            ("slurm.node", self.node.as_ref()),
        ] {
            if let Some(v) = value {
                p.labels.entry(label.into()).or_insert_with(|| v.clone());
            }
        }
        if let Some(m) = self.memory.filter(|&m| m > 0) {
            p.memory_total = p.memory_total.min(m);
            p.memory_available = p.memory_available.min(m);
        }
        if !explicit_gpus {
            p.gpus.retain(|g| self.gpus.contains(&g.index));
            if p.gpus.is_empty() {
                p.gpu_note = Some(format!(
                    "Slurm allocated no GPU to job {} (ask with --gres=gpu:N)",
                    self.job_id
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexa_shared::hardware::Gpu;

    fn gpu(index: u32) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            memory_total: 80 << 30,
            memory_free: 80 << 30,
            compute_capability: (9, 0),
            mig_enabled: false,
        }
    }

    #[test]
    fn a_pilot_offers_only_what_its_allocation_holds() {
        let node = Profile {
            memory_total: 512 << 30,
            memory_available: 500 << 30,
            cores: 64,
            gpus: (0..4).map(gpu).collect(),
            ..Profile::default()
        };
        let vars = |extra: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                [
                    ("SLURM_JOB_ID", "42"),
                    ("SLURM_JOB_PARTITION", "gpu"),
                    ("SLURM_MEM_PER_NODE", "2048"),
                    ("SLURM_CPUS_ON_NODE", "4"),
                ]
                .iter()
                .chain(extra)
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
            }
        };
        let two = Allocation::from_vars(vars(&[("SLURM_JOB_GPUS", "1,3")])).expect("in Slurm");
        assert_eq!(two.cpus, Some(4));
        let mut p = node.clone();
        two.apply(&mut p, false);
        assert_eq!(p.memory_total, 2 << 30, "the allocation's memory");
        assert_eq!(p.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            p.labels.get("slurm.partition").map(String::as_str),
            Some("gpu")
        );
        assert_eq!(p.labels.get("slurm.job_id").map(String::as_str), Some("42"));

        let none = Allocation::from_vars(vars(&[])).expect("in Slurm");
        let mut p = node.clone();
        none.apply(&mut p, false);
        assert!(p.gpus.is_empty(), "no gres: no GPU, though the node has 4");
        assert!(p.gpu_note.as_deref().unwrap_or("").contains("--gres"));
        let mut p = node.clone();
        none.apply(&mut p, true);
        assert_eq!(p.gpus.len(), 4, "--gpus chosen by hand wins");

        assert_eq!(Allocation::from_vars(|_| None), None, "not in Slurm");
    }
}
