//! The `docker` executor: runs a job's command in a container that sees only what the
//! job was given. No network (unless the step asks and the volunteer allowed it), a
//! read-only root file system, inputs mounted read-only, the output directory the only
//! writable mount, a private `/tmp` in memory, CPU, memory and process limits from the
//! job's resources, exactly the GPUs the job was assigned, no capabilities, an
//! unprivileged user, and nothing of the worker's home or key.

use nexa_shared::hardware::Gpu;
use std::path::{Path, PathBuf};

/// Where a job's inputs appear in the container: `/nexa/in/<name>/<file name>`.
pub const IN_ROOT: &str = "/nexa/in";
/// Where its outputs go: `/nexa/out/<output name>`.
pub const OUT_ROOT: &str = "/nexa/out";
/// Its scratch and working directory (a tmpfs, discarded; also `TMPDIR`). Not `/tmp`:
/// every path outside `/nexa/out` and this one is read-only, host-looking paths too.
pub const TMP: &str = "/nexa/tmp";
/// The size of that tmpfs.
const TMP_SIZE: &str = "512m";
/// At most this many processes in one job's container.
const PIDS_LIMIT: u32 = 4096;
/// The label every job container carries: a digest of the worker's work directory, so a
/// restarted worker removes only its own leftovers.
pub const OWNER_LABEL: &str = "nexa.worker-dir";

/// How a worker runs jobs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Executor {
    /// Every job in a container (`--executor docker`): a volunteer's job never runs on
    /// the bare host. When false, jobs that name an image still run in one.
    pub sandbox_only: bool,
    /// The image for jobs that name none (sandbox-only workers).
    pub default_image: Option<String>,
    /// Jobs may ask for a network (`params.network: true`).
    pub allow_network: bool,
    /// The `docker` command (tests may point elsewhere).
    pub docker: String,
}

impl Executor {
    /// The process executor (jobs naming an image still use `docker`).
    pub fn process() -> Self {
        Self {
            docker: "docker".into(),
            ..Self::default()
        }
    }

    /// The image a job runs in, `None` for a plain process, or why it cannot run here.
    pub fn image_for(&self, requested: Option<&str>) -> Result<Option<String>, String> {
        match (requested, self.sandbox_only, &self.default_image) {
            (Some(i), _, _) => Ok(Some(i.to_string())),
            (None, true, Some(d)) => Ok(Some(d.clone())),
            (None, true, None) => Err(
                "this worker runs jobs only in containers (--executor docker) and the step \
                 names no image: give it params.image"
                    .into(),
            ),
            (None, false, _) => Ok(None),
        }
    }
}

/// One bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Path on the worker's host.
    pub host: PathBuf,
    /// Path in the container.
    pub container: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Everything a container run is made of.
#[derive(Debug, Clone)]
pub struct ContainerJob<'a> {
    /// Container name (unique per job attempt).
    pub name: String,
    /// The job id, as a label.
    pub job_id: &'a str,
    /// The worker's owner label value.
    pub owner: String,
    /// The image.
    pub image: &'a str,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// CPU limit.
    pub cpus: u32,
    /// Memory limit in bytes (0 = none).
    pub memory: u64,
    /// The GPUs the job was assigned.
    pub gpus: Vec<&'a Gpu>,
    /// Give the container a network.
    pub network: bool,
    /// `uid:gid` to run as.
    pub user: String,
    /// The command and its arguments.
    pub argv: Vec<String>,
}

/// A name docker accepts, unique per job attempt: `nexa-<digest of the job id>-g<gen>`.
pub fn container_name(job_id: &str, generation: u64) -> String {
    let h = blake3::hash(job_id.as_bytes()).to_hex();
    format!("nexa-{}-g{generation}", &h[..20])
}

/// The owner label's value for a work directory.
pub fn owner_of(work_dir: &Path) -> String {
    blake3::hash(work_dir.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string()
}

/// The user a job's container runs as: the worker's own ids, or `nobody` when the
/// worker runs as root (a job never gets root, even inside its container).
pub fn container_user() -> (u32, u32) {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    if uid.is_root() {
        (65534, 65534)
    } else {
        (uid.as_raw(), gid.as_raw())
    }
}

/// The `docker run` arguments (after `docker`).
pub fn run_args(job: &ContainerJob<'_>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--name".into(),
        job.name.clone(),
        "--label".into(),
        format!("nexa.job={}", job.job_id),
        "--label".into(),
        format!("{OWNER_LABEL}={}", job.owner),
        "--network".into(),
        if job.network { "bridge" } else { "none" }.into(),
        "--read-only".into(),
        "--tmpfs".into(),
        format!("{TMP}:rw,nosuid,nodev,size={TMP_SIZE}"),
        "--cap-drop".into(),
        "ALL".into(),
        "--security-opt".into(),
        "no-new-privileges".into(),
        "--pids-limit".into(),
        PIDS_LIMIT.to_string(),
        "--user".into(),
        job.user.clone(),
        "--cpus".into(),
        job.cpus.max(1).to_string(),
        "--workdir".into(),
        TMP.into(),
        // The image's own entrypoint is not the job's: run exactly its command.
        "--entrypoint".into(),
        String::new(),
    ];
    if job.memory > 0 {
        a.push("--memory".into());
        a.push(job.memory.to_string());
        // No swap beyond the limit.
        a.push("--memory-swap".into());
        a.push(job.memory.to_string());
    }
    if !job.gpus.is_empty() {
        // The quotes keep docker's CSV parser from splitting the device list.
        let uuids: Vec<&str> = job.gpus.iter().map(|g| g.uuid.as_str()).collect();
        a.push("--gpus".into());
        a.push(format!("\"device={}\"", uuids.join(",")));
    }
    for m in &job.mounts {
        a.push("--mount".into());
        a.push(format!(
            "type=bind,source={},target={}{}",
            m.host.display(),
            m.container,
            if m.read_only { ",readonly" } else { "" }
        ));
    }
    a.push("--env".into());
    a.push(format!("TMPDIR={TMP}"));
    for (k, v) in &job.env {
        a.push("--env".into());
        a.push(format!("{k}={v}"));
    }
    a.push(job.image.to_string());
    a.extend(job.argv.iter().cloned());
    a
}

/// Kills and removes a job's container (a timeout, a cancellation). Errors are ignored:
/// the container may already be gone.
pub async fn kill(docker: &str, name: &str) {
    let _ = tokio::process::Command::new(docker)
        .args(["rm", "--force", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// Removes job containers a previous run of this worker (same work directory) left
/// behind when it died. Returns how many.
pub fn reap_orphans(docker: &str, work_dir: &Path) -> usize {
    let filter = format!("label={OWNER_LABEL}={}", owner_of(work_dir));
    let Ok(out) = std::process::Command::new(docker)
        .args(["ps", "--all", "--quiet", "--filter", &filter])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return 0;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return 0;
    }
    tracing::info!(
        count = ids.len(),
        "removing job containers left by a previous worker"
    );
    let _ = std::process::Command::new(docker)
        .args(["rm", "--force"])
        .args(&ids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    ids.len()
}

/// Whether `docker` answers (the daemon is reachable) — checked when a worker starts
/// with `--executor docker`, so a volunteer learns at once, not at the first job.
pub fn docker_works(docker: &str) -> Result<String, String> {
    let out = std::process::Command::new(docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map_err(|e| format!("cannot run '{docker}': {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "'{docker} version' failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str) -> Gpu {
        Gpu {
            index: 0,
            uuid: uuid.into(),
            name: "g".into(),
            memory_total: 1,
            memory_free: 1,
            compute_capability: (9, 0),
            mig_enabled: false,
        }
    }

    #[test]
    fn the_container_gets_only_what_the_job_was_given() {
        let (g0, g1) = (gpu("GPU-a"), gpu("GPU-b"));
        let job = ContainerJob {
            name: container_name("run/step", 3),
            job_id: "run/step",
            owner: "abc".into(),
            image: "nexa/debian-base:bookworm",
            mounts: vec![
                Mount {
                    host: "/w/cas/h".into(),
                    container: "/nexa/in/data".into(),
                    read_only: true,
                },
                Mount {
                    host: "/w/jobs/x/out".into(),
                    container: OUT_ROOT.into(),
                    read_only: false,
                },
            ],
            env: vec![("NEXA_OUT".into(), "/nexa/out".into())],
            cpus: 2,
            memory: 1 << 30,
            gpus: vec![&g0, &g1],
            network: false,
            user: "65534:65534".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
        };
        let a = run_args(&job);
        let joined = a.join(" ");
        for want in [
            "--network none",
            "--read-only",
            "--cap-drop ALL",
            "--security-opt no-new-privileges",
            "--user 65534:65534",
            "--cpus 2",
            "--memory 1073741824 --memory-swap 1073741824",
            "--gpus \"device=GPU-a,GPU-b\"",
            "type=bind,source=/w/cas/h,target=/nexa/in/data,readonly",
            "type=bind,source=/w/jobs/x/out,target=/nexa/out --env",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        // The image comes right before the command, nothing of the host in between.
        let at = a
            .iter()
            .position(|x| x == "nexa/debian-base:bookworm")
            .expect("image");
        assert_eq!(&a[at + 1..], ["/bin/sh", "-c", "echo hi"]);
        assert!(!joined.contains("--privileged") && !joined.contains("/var/run/docker.sock"));
        let open = run_args(&ContainerJob {
            network: true,
            gpus: Vec::new(),
            memory: 0,
            ..job
        })
        .join(" ");
        assert!(open.contains("--network bridge"));
        assert!(!open.contains("--gpus") && !open.contains("--memory"));
        assert!(container_name("a/b", 1).starts_with("nexa-"));
    }

    #[test]
    fn sandbox_only_workers_never_run_a_bare_command() {
        let mut e = Executor::process();
        assert_eq!(e.image_for(None), Ok(None));
        assert_eq!(e.image_for(Some("x:1")), Ok(Some("x:1".into())));
        e.sandbox_only = true;
        assert!(e.image_for(None).is_err());
        e.default_image = Some("d:1".into());
        assert_eq!(e.image_for(None), Ok(Some("d:1".into())));
    }
}
