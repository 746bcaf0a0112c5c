//! Hardware profiles, job requirements, and matching.
//!
//! Matching is a pure function: [`assign`] picks, for one job, a worker and the GPUs it
//! gets, by best fit (the smallest GPU that satisfies the job, so big GPUs stay free for
//! the jobs that need them). [`why_unfit`] explains why no worker could ever run a job.

use crate::spec::Resources;
use crate::units::format_size;
use std::collections::BTreeMap;

/// One GPU as NVML reported it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// `GPU-…` UUID (what `CUDA_VISIBLE_DEVICES` takes).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Free memory in bytes at profiling time.
    pub memory_free: u64,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Whether MIG mode is on.
    pub mig_enabled: bool,
}

/// What a worker has.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Host name.
    pub hostname: String,
    /// Operating system and version.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// CPU model.
    pub cpu_model: String,
    /// Logical cores.
    pub cores: u32,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Available memory in bytes.
    pub memory_available: u64,
    /// Free disk under the work directory in bytes.
    pub disk_free: u64,
    /// GPUs NVML confirmed; never anything else.
    pub gpus: Vec<Gpu>,
    /// NVIDIA driver version, when NVML is there.
    pub driver_version: Option<String>,
    /// CUDA driver API version (e.g. `13.0`), when NVML is there.
    pub cuda_version: Option<String>,
    /// Why there are no GPUs, when there are none.
    pub gpu_note: Option<String>,
    /// Labels: runtimes found (`python3`, `torch`, `docker`) and the operator's own.
    pub labels: BTreeMap<String, String>,
    /// The worker is still probing its runtimes (the job interpreter's packages,
    /// docker): their labels come in a later heartbeat. Until then no step is failed
    /// as one no worker can run for want of such a label.
    #[serde(default)]
    pub runtimes_pending: bool,
}

/// What a job needs (from `resources` in the pipeline).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Requirements {
    /// CPU slots.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// GPUs.
    pub gpus: u32,
    /// Memory per GPU in bytes.
    pub gpu_memory: u64,
    /// Minimum compute capability.
    pub compute_capability: Option<(u32, u32)>,
    /// Labels the worker must carry with these values.
    pub labels: BTreeMap<String, String>,
    /// The job runs in a container image (`params.image`): only a worker with a
    /// container runtime (label [`DOCKER_LABEL`]) can take it.
    #[serde(default)]
    pub container: bool,
}

/// The label a worker carries when it can run jobs in containers (value: the engine's
/// version).
pub const DOCKER_LABEL: &str = "docker";
/// The label a worker carries when it runs every job in a container
/// (`nexa-worker join --executor docker`); value `docker`.
pub const SANDBOX_LABEL: &str = "sandbox";
/// The label a worker carries when it hosts the servers `runners.serve` steps start
/// (embedded, or `nexa-worker join --services`); value `yes`. Serve steps need it.
pub const SERVICES_LABEL: &str = "services";
/// The label of a worker reserved for one cluster scheduler's steps: `slurm` (a pilot
/// worker inside a Slurm allocation) or `k8s` (a Kubernetes worker pool). A step with
/// `scheduler: slurm|k8s` needs it; such a worker takes no other step.
pub const SCHEDULER_LABEL: &str = "scheduler";
/// The label naming the image such a worker uses for steps that name none.
pub const DEFAULT_IMAGE_LABEL: &str = "sandbox.default-image";
/// The label of a worker whose allocation ends at a known time (a Slurm pilot): Unix
/// seconds. Such a worker takes only jobs whose timeout ends before it
/// ([`walltime_ok`]).
pub const WALLTIME_END_LABEL: &str = "slurm.end";
/// Seconds kept between the end of a job's timeout and the end of its worker's
/// allocation: the time to upload and report its result.
pub const WALLTIME_SLACK_S: u64 = 30;

/// Whether a job with this timeout, started now (`now_unix`), ends before the
/// allocation of worker `p` does ([`WALLTIME_END_LABEL`]), with [`WALLTIME_SLACK_S`] to
/// spare. A worker without an end takes anything; a job without a timeout may go to a
/// worker with an end (it may be cut short, and then it runs again elsewhere).
pub fn walltime_ok(timeout: Option<std::time::Duration>, p: &Profile, now_unix: u64) -> bool {
    let (Some(t), Some(end)) = (
        timeout,
        p.labels
            .get(WALLTIME_END_LABEL)
            .and_then(|e| e.parse::<u64>().ok()),
    ) else {
        return true;
    };
    now_unix
        .saturating_add(t.as_secs())
        .saturating_add(WALLTIME_SLACK_S)
        <= end
}

impl From<&Resources> for Requirements {
    fn from(r: &Resources) -> Self {
        Self {
            cpus: r.cpus.unwrap_or(1),
            memory: r.memory.unwrap_or(0),
            gpus: r.gpus.unwrap_or(0),
            gpu_memory: r.gpu_memory.unwrap_or(0),
            compute_capability: r.compute_capability,
            labels: BTreeMap::new(),
            container: false,
        }
    }
}

impl Requirements {
    /// True when this GPU can serve the job now: it fits ([`Requirements::gpu_ok`]) and
    /// its last reported free memory holds the job's need.
    pub fn gpu_usable_now(&self, g: &Gpu) -> bool {
        self.gpu_ok(g) && g.memory_free >= self.gpu_memory
    }

    /// True when this GPU could ever serve the job (by its total memory).
    pub fn gpu_ok(&self, g: &Gpu) -> bool {
        g.memory_total >= self.gpu_memory
            && self
                .compute_capability
                .is_none_or(|cc| g.compute_capability >= cc)
    }
}

/// A worker's capacity right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Free<'a> {
    /// The worker's id.
    pub worker: &'a str,
    /// Its profile.
    pub profile: &'a Profile,
    /// Free CPU slots.
    pub slots: u32,
    /// Free memory in bytes.
    pub memory: u64,
    /// Indices (into `profile.gpus`) of the GPUs not in use.
    pub free_gpus: Vec<usize>,
}

/// Where a job goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Index into the `free` slice given to [`assign`].
    pub worker: usize,
    /// Indices into that worker's `profile.gpus`.
    pub gpus: Vec<usize>,
}

fn labels_ok(req: &Requirements, p: &Profile) -> bool {
    req.labels.iter().all(|(k, v)| label_ok(p, k, v)) && executor_ok(req, p) && reserved_ok(req, p)
}

/// A worker reserved for a cluster scheduler's steps (label [`SCHEDULER_LABEL`], e.g. a
/// Slurm pilot) takes only steps that name that scheduler; every other worker is the
/// ordinary pool.
fn reserved_ok(req: &Requirements, p: &Profile) -> bool {
    match p.labels.get(SCHEDULER_LABEL) {
        Some(s) if s != "local" => req.labels.get(SCHEDULER_LABEL) == Some(s),
        _ => true,
    }
}

/// A worker carries label `k` with value `v`, or with any value when `v` is
/// [`crate::runners::ANY`].
fn label_ok(p: &Profile, k: &str, v: &str) -> bool {
    match p.labels.get(k) {
        Some(have) => v == crate::runners::ANY || have == v,
        None => false,
    }
}

/// A job naming an image needs a container runtime; a sandbox-only worker takes a job
/// naming none only when it has a default image to run it in (it never runs a job's
/// commands on its host).
fn executor_ok(req: &Requirements, p: &Profile) -> bool {
    if req.container {
        return p.labels.contains_key(DOCKER_LABEL);
    }
    p.labels.get(SANDBOX_LABEL).is_none_or(|s| s != "docker")
        || p.labels.contains_key(DEFAULT_IMAGE_LABEL)
}

/// Picks a worker and GPUs for `req` among `free`, best fit: the assignment whose GPUs
/// have the least total memory, then the worker with the fewest free slots left.
/// `None` when nothing fits now.
pub fn assign(req: &Requirements, free: &[Free<'_>]) -> Option<Assignment> {
    let mut best: Option<(u64, u32, Assignment)> = None;
    for (w, f) in free.iter().enumerate() {
        if f.slots < req.cpus.max(1) || f.memory < req.memory || !labels_ok(req, f.profile) {
            continue;
        }
        // A GPU that fits must also have the memory free now: someone else's process
        // may be holding it (the profile's free memory is refreshed on the session).
        let mut usable: Vec<usize> = f
            .free_gpus
            .iter()
            .copied()
            .filter(|&g| {
                f.profile
                    .gpus
                    .get(g)
                    .is_some_and(|gpu| req.gpu_usable_now(gpu))
            })
            .collect();
        if usable.len() < req.gpus as usize {
            continue;
        }
        usable.sort_by_key(|&g| (f.profile.gpus[g].memory_total, g));
        usable.truncate(req.gpus as usize);
        let mem: u64 = usable.iter().map(|&g| f.profile.gpus[g].memory_total).sum();
        let left = f.slots - req.cpus.max(1);
        let better = best
            .as_ref()
            .is_none_or(|(bm, bl, _)| (mem, left) < (*bm, *bl));
        if better {
            best = Some((
                mem,
                left,
                Assignment {
                    worker: w,
                    gpus: usable,
                },
            ));
        }
    }
    best.map(|(_, _, a)| a)
}

/// Why no worker in `profiles` could ever run `req` (with all its capacity free), or
/// `None` when one could.
pub fn why_unfit<'a>(
    req: &Requirements,
    profiles: impl IntoIterator<Item = (&'a Profile, u32)>,
) -> Option<String> {
    let profiles: Vec<(&Profile, u32)> = profiles.into_iter().collect();
    if profiles.is_empty() {
        return Some("no worker is enrolled".into());
    }
    let can = |p: &Profile, slots: u32| {
        slots >= req.cpus.max(1)
            && p.memory_total >= req.memory
            && labels_ok(req, p)
            && p.gpus.iter().filter(|g| req.gpu_ok(g)).count() >= req.gpus as usize
    };
    if profiles.iter().any(|(p, s)| can(p, *s)) {
        return None;
    }
    let mut why = Vec::new();
    let max_slots = profiles.iter().map(|(_, s)| *s).max().unwrap_or(0);
    if req.cpus > max_slots {
        why.push(format!(
            "needs {} CPU slots; the most any worker has is {max_slots}",
            req.cpus
        ));
    }
    let max_mem = profiles
        .iter()
        .map(|(p, _)| p.memory_total)
        .max()
        .unwrap_or(0);
    if req.memory > max_mem {
        why.push(format!(
            "needs {} memory; the largest worker has {}",
            format_size(req.memory),
            format_size(max_mem)
        ));
    }
    if req.gpus > 0 {
        let max_gpus = profiles
            .iter()
            .map(|(p, _)| p.gpus.len())
            .max()
            .unwrap_or(0);
        let largest = profiles
            .iter()
            .flat_map(|(p, _)| p.gpus.iter().map(|g| g.memory_total))
            .max();
        let best_cc = profiles
            .iter()
            .flat_map(|(p, _)| p.gpus.iter().map(|g| g.compute_capability))
            .max();
        if req.gpus as usize > max_gpus {
            let note = profiles.iter().find_map(|(p, _)| p.gpu_note.clone());
            why.push(format!(
                "needs {} GPU{}; the most any worker has is {max_gpus}{}",
                req.gpus,
                if req.gpus == 1 { "" } else { "s" },
                note.map(|n| format!(" ({n})")).unwrap_or_default()
            ));
        }
        if req.gpu_memory > 0 && largest.is_some_and(|l| l < req.gpu_memory) {
            why.push(format!(
                "needs ≥ {} GPU memory; largest enrolled is {}",
                format_size(req.gpu_memory),
                format_size(largest.unwrap_or(0))
            ));
        }
        if let (Some(cc), Some(best)) = (req.compute_capability, best_cc)
            && best < cc
        {
            why.push(format!(
                "needs compute capability ≥ {}.{}; the best enrolled is {}.{}",
                cc.0, cc.1, best.0, best.1
            ));
        }
    }
    let mut missing_python = Vec::new();
    for (k, v) in &req.labels {
        if profiles.iter().any(|(p, _)| label_ok(p, k, v)) {
            continue;
        }
        match k.strip_prefix("python.") {
            Some(package) if v == crate::runners::ANY => missing_python.push(package),
            _ if k == SCHEDULER_LABEL => why.push(format!(
                "has scheduler: {v}, and no enrolled worker is one of its workers (label \
                 scheduler={v}){}",
                if v == "slurm" {
                    ": Nexa submits pilots itself with sbatch on PATH (embedded) or from \
                     `nexa-coordinator serve --slurm`; by hand, a pilot is `nexa-worker join URL \
                     --label scheduler=slurm` run in an sbatch job"
                } else {
                    ": deploy/k8s/ runs such a pool"
                }
            )),
            _ if k == SERVICES_LABEL => why.push(
                "starts a service, and no worker hosts services: start one with                  `nexa-worker join --services` (label services)"
                    .into(),
            ),
            _ => why.push(format!("needs label {k}={v}; no worker has it")),
        }
    }
    if !missing_python.is_empty() {
        let labels: Vec<String> = missing_python
            .iter()
            .map(|p| format!("python.{p}"))
            .collect();
        why.push(format!(
            "needs the Python package{} {} (label {}); no worker has {}: on a worker, `{}` \
             into the interpreter it runs ($NEXA_PYTHON, else python3){}",
            if missing_python.len() == 1 { "" } else { "s" },
            missing_python.join(", "),
            labels.join(", "),
            if missing_python.len() == 1 {
                "it"
            } else {
                "them"
            },
            crate::runners::pip_line(&missing_python),
            if crate::runners::in_setup(&missing_python) {
                ", or `bash python/setup.sh` in the Nexa repo and NEXA_PYTHON set to what it \
                 prints"
            } else {
                ""
            },
        ));
    }
    if !req.labels.contains_key(SCHEDULER_LABEL)
        && !profiles.iter().any(|(p, _)| reserved_ok(req, p))
    {
        why.push(
            "runs on the ordinary pool (scheduler: local), and every enrolled worker is \
             reserved for a cluster scheduler's steps (label scheduler)"
                .into(),
        );
    }
    if req.container
        && !profiles
            .iter()
            .any(|(p, _)| p.labels.contains_key(DOCKER_LABEL))
    {
        why.push("names a container image; no worker has a container runtime (docker)".into());
    }
    if !req.container && profiles.iter().all(|(p, _)| !executor_ok(req, p)) {
        why.push(
            "names no container image; every worker runs only sandboxed jobs and has no \
             default image (give the step params.image, or start a worker with --default-image)"
                .into(),
        );
    }
    if why.is_empty() {
        why.push("no single worker has all of it at once".into());
    }
    Some(why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    /// A 4-core, 1 GiB worker carrying these labels.
    /// Whether `req` fits worker `p` with 4 free slots, 1 GiB and no GPUs.
    fn fits(req: &Requirements, p: &Profile) -> bool {
        let free = Free {
            worker: "w",
            profile: p,
            slots: 4,
            memory: GIB,
            free_gpus: Vec::new(),
        };
        assign(req, std::slice::from_ref(&free)).is_some()
    }

    fn with(labels: &[(&str, &str)]) -> Profile {
        Profile {
            cores: 4,
            memory_total: GIB,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Profile::default()
        }
    }

    #[test]
    fn container_jobs_need_docker_and_sandbox_workers_take_only_what_they_can_contain() {
        let bare = with(&[]);
        let docker = with(&[(DOCKER_LABEL, "28.2")]);
        let sandbox = with(&[(DOCKER_LABEL, "28.2"), (SANDBOX_LABEL, "docker")]);
        let sandbox_default = with(&[
            (DOCKER_LABEL, "28.2"),
            (SANDBOX_LABEL, "docker"),
            (DEFAULT_IMAGE_LABEL, "debian:bookworm"),
        ]);
        let plain = Requirements::from(&Resources::default());
        let boxed = Requirements {
            container: true,
            ..plain.clone()
        };
        assert!(fits(&plain, &bare) && fits(&plain, &docker) && fits(&plain, &sandbox_default));
        assert!(
            !fits(&plain, &sandbox),
            "a sandbox-only worker with no default image"
        );
        assert!(!fits(&boxed, &bare), "an image needs a container runtime");
        assert!(fits(&boxed, &docker) && fits(&boxed, &sandbox));
        let why = why_unfit(&boxed, [(&bare, 4)]).expect("unfit");
        assert!(why.contains("container runtime"), "{why}");
        let why = why_unfit(&plain, [(&sandbox, 4)]).expect("unfit");
        assert!(why.contains("--default-image"), "{why}");
        assert!(why_unfit(&plain, [(&sandbox, 4), (&bare, 4)]).is_none());
    }

    #[test]
    fn cluster_workers_take_only_their_schedulers_steps_and_such_steps_go_only_to_them() {
        let pilot = with(&[(SCHEDULER_LABEL, "slurm")]);
        let pod = with(&[(SCHEDULER_LABEL, "k8s")]);
        let ordinary = with(&[]);
        let named_local = with(&[(SCHEDULER_LABEL, "local")]);
        let local = Requirements::from(&Resources::default());
        let mut slurm = local.clone();
        slurm.labels.insert(SCHEDULER_LABEL.into(), "slurm".into());
        assert!(fits(&slurm, &pilot));
        assert!(!fits(&slurm, &ordinary) && !fits(&slurm, &pod));
        assert!(!fits(&local, &pilot), "a pilot is reserved for slurm steps");
        assert!(fits(&local, &ordinary) && fits(&local, &named_local));
        let why = why_unfit(&slurm, [(&ordinary, 4)]).expect("no pilot");
        assert!(
            why.contains("scheduler: slurm") && why.contains("--label scheduler=slurm"),
            "{why}"
        );
        let why = why_unfit(&local, [(&pilot, 4), (&pod, 4)]).expect("all reserved");
        assert!(why.contains("reserved for a cluster scheduler"), "{why}");
        assert!(why_unfit(&local, [(&pilot, 4), (&ordinary, 4)]).is_none());
    }

    #[test]
    fn a_worker_with_an_allocation_end_takes_only_jobs_whose_timeout_ends_before_it() {
        let pilot = with(&[(WALLTIME_END_LABEL, "10000")]);
        let hour = Some(std::time::Duration::from_secs(3600));
        let minute = Some(std::time::Duration::from_secs(60));
        assert!(walltime_ok(minute, &pilot, 10000 - 60 - WALLTIME_SLACK_S));
        assert!(!walltime_ok(
            minute,
            &pilot,
            10000 - 60 - WALLTIME_SLACK_S + 1
        ));
        assert!(
            !walltime_ok(hour, &pilot, 9000),
            "an hour does not fit in 1000 s"
        );
        assert!(
            walltime_ok(None, &pilot, 9999),
            "no timeout: no promise to keep"
        );
        assert!(walltime_ok(hour, &with(&[]), 9999), "no end: anything");
        let garbled = with(&[(WALLTIME_END_LABEL, "soon")]);
        assert!(
            walltime_ok(hour, &garbled, 0),
            "an end that is not a number is none"
        );
    }

    #[test]
    fn python_package_labels_match_any_version_and_their_absence_names_the_pip_line() {
        let torch = with(&[
            ("python.torch", "2.15.0"),
            ("python.transformers", "5.24.0"),
        ]);
        let bare = with(&[("python", "3.11")]);
        let mut req = Requirements::from(&Resources::default());
        for p in ["torch", "transformers", "peft"] {
            req.labels
                .insert(crate::runners::label(p), crate::runners::ANY.into());
        }
        let why = why_unfit(&req, [(&torch, 4), (&bare, 4)]).expect("no worker has peft");
        assert!(why.contains("python.peft"), "{why}");
        assert!(why.contains("pip install peft=="), "{why}");
        assert!(!why.contains("python.torch"), "someone has torch: {why}");
        req.labels.remove("python.peft");
        assert!(
            why_unfit(&req, [(&torch, 4)]).is_none(),
            "any version matches"
        );
        assert!(why_unfit(&req, [(&bare, 4)]).is_some());
        // An exact value still means that value.
        req.labels.insert("python.torch".into(), "2.0.0".into());
        let why = why_unfit(&req, [(&torch, 4)]).expect("wrong version");
        assert!(why.contains("needs label python.torch=2.0.0"), "{why}");
    }

    fn gpu(i: u32, mem_gib: u64, cc: (u32, u32)) -> Gpu {
        Gpu {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "test".into(),
            memory_total: mem_gib * GIB,
            memory_free: mem_gib * GIB,
            compute_capability: cc,
            mig_enabled: false,
        }
    }

    fn profile(gpus: Vec<Gpu>) -> Profile {
        Profile {
            cores: 8,
            memory_total: 64 * GIB,
            gpus,
            ..Profile::default()
        }
    }

    #[test]
    fn best_fit_takes_the_smallest_gpu_that_fits() {
        let big = profile(vec![gpu(0, 80, (9, 0))]);
        let small = profile(vec![gpu(0, 24, (8, 6)), gpu(1, 16, (7, 5))]);
        let free = |p| Free {
            worker: "w",
            profile: p,
            slots: 4,
            memory: 64 * GIB,
            free_gpus: (0..p.gpus.len()).collect(),
        };
        let workers = [free(&big), free(&small)];
        let req = Requirements {
            gpus: 1,
            gpu_memory: 20 * GIB,
            ..Requirements::from(&Resources::default())
        };
        assert_eq!(
            assign(&req, &workers),
            Some(Assignment {
                worker: 1,
                gpus: vec![0]
            })
        );
        let req40 = Requirements {
            gpu_memory: 40 * GIB,
            ..req.clone()
        };
        assert_eq!(
            assign(&req40, &workers),
            Some(Assignment {
                worker: 0,
                gpus: vec![0]
            })
        );
        let cc = Requirements {
            compute_capability: Some((9, 0)),
            ..req.clone()
        };
        assert_eq!(assign(&cc, &workers).map(|a| a.worker), Some(0));
        let cpu_only = Requirements::from(&Resources::default());
        assert_eq!(assign(&cpu_only, &workers).map(|a| a.gpus), Some(vec![]));
    }

    #[test]
    fn unfit_jobs_say_why() {
        let p = profile(vec![gpu(0, 24, (8, 6))]);
        let req = Requirements {
            gpus: 1,
            gpu_memory: 40 * GIB,
            ..Requirements::from(&Resources::default())
        };
        let why = why_unfit(&req, [(&p, 4)]).expect("unfit");
        assert!(
            why.contains("needs ≥ 40.0 GiB GPU memory; largest enrolled is 24.0 GiB"),
            "{why}"
        );
        let mut none = profile(vec![]);
        none.gpu_note = Some("NVML not found".into());
        let why = why_unfit(
            &Requirements {
                gpu_memory: 0,
                ..req.clone()
            },
            [(&none, 4)],
        )
        .expect("unfit");
        assert!(
            why.contains("needs 1 GPU; the most any worker has is 0 (NVML not found)"),
            "{why}"
        );
        assert!(
            why_unfit(
                &Requirements {
                    gpu_memory: GIB,
                    ..req
                },
                [(&p, 4)]
            )
            .is_none()
        );
    }

    fn arb_gpu() -> impl Strategy<Value = Gpu> {
        (0u32..8, 1u64..100, 5u32..10, 0u32..10, 0u64..=100).prop_map(|(i, m, a, b, pct)| {
            let mut g = gpu(i, m, (a, b));
            // Often all free, sometimes partly held by another process.
            if pct < 60 {
                g.memory_free = g.memory_total / 100 * pct;
            }
            g
        })
    }

    proptest! {
        #[test]
        fn assignments_satisfy_the_requirements_and_are_minimal(
            workers in proptest::collection::vec((proptest::collection::vec(arb_gpu(), 0..5), 0u32..6, 0u64..64), 1..6),
            gpus in 0u32..4, gpu_mem in 0u64..100, cpus in 0u32..4, cc in proptest::option::of((5u32..10, 0u32..10)),
        ) {
            let profiles: Vec<Profile> = workers.iter().map(|(g, _, _)| profile(g.clone())).collect();
            let free: Vec<Free> = workers.iter().zip(&profiles).map(|((g, slots, mem), p)| Free {
                worker: "w", profile: p, slots: *slots, memory: mem * GIB, free_gpus: (0..g.len()).collect(),
            }).collect();
            let req = Requirements { cpus, memory: 0, gpus, gpu_memory: gpu_mem * GIB, compute_capability: cc, labels: BTreeMap::new(), container: false };
            let feasible: Vec<usize> = (0..free.len()).filter(|&w| {
                free[w].slots >= cpus.max(1) && free[w].profile.gpus.iter().filter(|g| req.gpu_usable_now(g)).count() >= gpus as usize
            }).collect();
            match assign(&req, &free) {
                None => prop_assert!(feasible.is_empty(), "a feasible worker was missed"),
                Some(a) => {
                    prop_assert!(feasible.contains(&a.worker));
                    prop_assert_eq!(a.gpus.len(), gpus as usize);
                    let mut seen = a.gpus.clone(); seen.sort(); seen.dedup();
                    prop_assert_eq!(seen.len(), a.gpus.len(), "a GPU assigned twice");
                    let p = free[a.worker].profile;
                    for &g in &a.gpus { prop_assert!(req.gpu_usable_now(&p.gpus[g])); }
                    // Best fit: no feasible worker offers less total GPU memory.
                    let mem = |w: usize| -> u64 {
                        let mut m: Vec<u64> = free[w].profile.gpus.iter().filter(|g| req.gpu_usable_now(g)).map(|g| g.memory_total).collect();
                        m.sort(); m.into_iter().take(gpus as usize).sum()
                    };
                    let chosen: u64 = a.gpus.iter().map(|&g| p.gpus[g].memory_total).sum();
                    for &w in &feasible { prop_assert!(chosen <= mem(w)); }
                    prop_assert!(why_unfit(&req, profiles.iter().zip(workers.iter().map(|w| w.1))).is_none());
                }
            }
        }
    }
}
