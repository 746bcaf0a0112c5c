//! The `exec` handler: runs a command (`cmd: [argv]`) or a shell script (`run: ...`) in
//! its own process group, with inputs staged read-only and named in `NEXA_IN_<NAME>`,
//! outputs written under `NEXA_OUT`, stdout and stderr kept as the job's log. A timeout
//! or a cancellation kills the whole process group. A job that names an image, or every
//! job on a worker started with `--executor docker`, runs instead in a sandboxed
//! container ([`crate::sandbox`]) with the same variables pointing at its mounts.

use crate::cas::Cas;
use crate::gpus::GpuPool;
use crate::sandbox::{self, Executor};
use crate::{CoordinatorLink, outputs};
use nexa_shared::handlers;
use nexa_shared::job::{JobResult, Lease, Outcome, now_ms};
use nexa_shared::paths;
use nexa_shared::spec::{ExecCommand, ExecParams};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::sync::watch;

/// How much of the log's end a failure carries.
const LOG_TAIL: u64 = 4096;

fn result(lease: &Lease, outcome: Outcome, started: u64) -> JobResult {
    JobResult {
        job_id: lease.job.job_id.clone(),
        generation: lease.generation,
        attempt: lease.attempt,
        outcome,
        exit_code: None,
        outputs: Vec::new(),
        started_ms: started,
        ended_ms: now_ms(),
        error: String::new(),
        staging: None,
        log: None,
        progress: None,
        worker_key: [0; 32],
        signature: Vec::new(),
    }
}

fn failed(lease: &Lease, started: u64, error: String) -> JobResult {
    let mut r = result(lease, Outcome::Failed, started);
    r.error = error;
    r
}

/// The job's private directory: `<work>/jobs/<job id>-g<generation>`.
pub fn job_dir(work_dir: &Path, lease: &Lease) -> PathBuf {
    work_dir.join("jobs").join(format!(
        "{}-g{}",
        paths::safe_component(&lease.job.job_id.replace('/', "_")),
        lease.generation
    ))
}

fn read_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim_end().to_string()
}

fn kill_group(pid: Option<u32>) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The child leads its own group; ESRCH (already gone) is fine.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// What a job runs on: the worker's cache, GPUs, directories and executor.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// The input cache.
    pub cas: &'a Cas,
    /// The worker's GPUs.
    pub gpus: &'a GpuPool,
    /// Where job directories live.
    pub work_dir: &'a Path,
    /// Process or container.
    pub executor: &'a Executor,
    /// The memory limit of a container job that asked for none (the worker's memory
    /// over its slots).
    pub memory_share: u64,
    /// Whether `runners.serve` jobs may start services ([`crate::WorkerConfig::services`]).
    pub services: bool,
}

/// Maps the worker's paths to the ones a job sees: the same paths for a process, the
/// `/nexa/...` mounts for a container (which also records the mounts).
struct PathMap {
    container: bool,
    mounts: Vec<sandbox::Mount>,
}

impl PathMap {
    fn input(&mut self, name: &str, staged: &Path) -> String {
        if !self.container {
            return staged.display().to_string();
        }
        let at = format!("{}/{}", sandbox::IN_ROOT, paths::safe_component(name));
        // The whole cache entry is mounted, so the input keeps its own file name.
        if let Some(dir) = staged.parent() {
            self.mounts.push(sandbox::Mount {
                host: dir.to_path_buf(),
                container: at.clone(),
                read_only: true,
            });
        }
        let file = staged
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{at}/{file}")
    }

    fn output(&self, out_root: &Path, rel: Option<&str>) -> String {
        match (self.container, rel) {
            (false, Some(r)) => out_root.join(r).display().to_string(),
            (false, None) => out_root.display().to_string(),
            (true, Some(r)) => format!("{}/{r}", sandbox::OUT_ROOT),
            (true, None) => sandbox::OUT_ROOT.to_string(),
        }
    }
}

/// Runs one leased job to a (not yet signed) result.
pub async fn run_job<L: CoordinatorLink>(
    link: &L,
    host: &Host<'_>,
    lease: &Lease,
    mut cancel: watch::Receiver<bool>,
) -> JobResult {
    let started = now_ms();
    let job = &lease.job;
    let runner = nexa_shared::runners::is_runner(&job.uses);
    if job.uses != handlers::EXEC && !runner {
        return failed(lease, started, handlers::not_available_message(&job.uses));
    }
    let parsed = if runner {
        crate::runners::exec_params(job)
    } else {
        ExecParams::from_json(&job.params)
    };
    let params = match parsed {
        Ok(p) => p,
        Err(e) => return failed(lease, started, e),
    };
    let image = match host.executor.image_for(params.image.as_deref()) {
        Ok(i) => i,
        Err(e) => return failed(lease, started, e),
    };
    if job.uses == nexa_shared::runners::SERVE && !host.services {
        return failed(
            lease,
            started,
            "runners.serve starts a service, and this worker does not host services \
             (nexa-worker join --services)"
                .into(),
        );
    }
    if runner && image.is_some() {
        return failed(
            lease,
            started,
            format!(
                "'{}' runs on the worker's own Python ($NEXA_PYTHON), and this worker runs \
                 every job in a container (--executor docker)",
                job.uses
            ),
        );
    }
    if image.is_some() && params.network && !host.executor.allow_network {
        return failed(
            lease,
            started,
            "the step asks for a network (params.network: true) and this worker's volunteer \
             did not allow it (nexa-worker join --allow-job-network)"
                .into(),
        );
    }
    let dir = job_dir(host.work_dir, lease);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let out_root = dir.join("out");
    let scratch = dir.join("work");
    for d in [&out_root, &scratch] {
        if let Err(e) = tokio::fs::create_dir_all(d).await {
            return failed(lease, started, format!("creating {}: {e}", d.display()));
        }
    }
    let mut map = PathMap {
        container: image.is_some(),
        mounts: Vec::new(),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for input in &job.inputs {
        match host.cas.stage(link, input).await {
            Ok(p) => {
                env.push((
                    format!("NEXA_IN_{}", paths::env_name(&input.name)),
                    map.input(&input.name, &p),
                ));
                env.push((
                    format!("NEXA_DIGEST_{}", paths::env_name(&input.name)),
                    input.digest.to_string(),
                ));
            }
            Err(e) => return failed(lease, started, e.to_string()),
        }
    }
    for name in &job.outputs {
        let d = out_root.join(name);
        if let Err(e) = tokio::fs::create_dir_all(&d).await {
            return failed(lease, started, format!("creating {}: {e}", d.display()));
        }
        env.push((
            format!("NEXA_OUT_{}", paths::env_name(name)),
            map.output(&out_root, Some(name)),
        ));
    }
    let nexa_out = match job.outputs.as_slice() {
        [single] => map.output(&out_root, Some(single)),
        _ => map.output(&out_root, None),
    };
    env.push(("NEXA_OUT".into(), nexa_out));
    env.push((
        "NEXA_TMP".into(),
        if map.container {
            sandbox::TMP.into()
        } else {
            scratch.display().to_string()
        },
    ));
    if job.uses == nexa_shared::runners::SERVE {
        env.push((
            "NEXA_SERVICES_DIR".into(),
            host.work_dir.join("services").display().to_string(),
        ));
    }
    env.push(("NEXA_JOB_ID".into(), job.job_id.to_string()));
    env.push(("NEXA_RUN_ID".into(), job.run_id.to_string()));
    env.push(("NEXA_STEP_ID".into(), job.step_id.clone()));
    env.push(("NEXA_ATTEMPT".into(), lease.attempt.to_string()));
    env.push(("NEXA_PARAMS".into(), job.params.to_string()));
    if let Some((i, n)) = job.shard {
        env.push(("NEXA_SHARD_INDEX".into(), i.to_string()));
        env.push(("NEXA_SHARD_COUNT".into(), n.to_string()));
    }
    // The job sees exactly the GPUs it asked for (none when it asked for none): the ones
    // the coordinator reserved, or, when it named none, ones from this worker's pool.
    let gpus = host.gpus;
    let gpu_lease = tokio::select! {
        l = gpus.acquire_named(&lease.gpus), if !lease.gpus.is_empty() => match l {
            Ok(l) => l,
            Err(e) => return failed(lease, started, e),
        },
        l = gpus.acquire(&job.requirements), if lease.gpus.is_empty() => match l {
            Ok(l) => l,
            Err(e) => return failed(lease, started, e),
        },
        _ = cancel.wait_for(|c| *c) => {
            let mut r = result(lease, Outcome::Cancelled, started);
            r.error = "cancelled while waiting for a GPU".into();
            return r;
        }
    };
    let visible = gpu_lease.cuda_visible_devices();
    env.push(("CUDA_VISIBLE_DEVICES".into(), visible.clone()));
    env.push(("NEXA_GPUS".into(), visible));
    let log_path = dir.join("log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => return failed(lease, started, format!("creating log: {e}")),
    };
    let (stdout, stderr) = match (log.try_clone(), log.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return failed(lease, started, "duplicating the log handle".into()),
    };
    let lookup: std::collections::HashMap<&str, &str> = env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(params.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .collect();
    let argv: Vec<String> = match &params.command {
        ExecCommand::Argv(argv) => argv.iter().map(|a| expand(a, &lookup)).collect(),
        ExecCommand::Script(script) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
    };
    let container = image.as_deref().map(|image| {
        let mut env = env.clone();
        env.extend(params.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        container_run(
            sandbox::ContainerJob {
                name: sandbox::container_name(&job.job_id, lease.generation),
                job_id: &job.job_id,
                owner: sandbox::owner_of(host.work_dir),
                image,
                mounts: std::mem::take(&mut map.mounts),
                env,
                // docker refuses more CPUs than the host has (slots may exceed cores).
                cpus: job.requirements.cpus.min(
                    std::thread::available_parallelism()
                        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
                ),
                memory: if job.requirements.memory > 0 {
                    job.requirements.memory
                } else {
                    host.memory_share
                },
                gpus: gpu_lease.gpus(),
                network: params.network,
                user: String::new(),
                argv: argv.clone(),
            },
            &out_root,
        )
    });
    let mut cmd = match &container {
        None => {
            let mut c = tokio::process::Command::new(&argv[0]);
            c.args(&argv[1..]).envs(env).envs(&params.env);
            c
        }
        Some((_, args)) => {
            // No leftover can hold this name: it carries the lease's generation, and a
            // restarted worker removes its predecessor's containers before it joins.
            let mut c = tokio::process::Command::new(&host.executor.docker);
            // The docker client gets none of the job's variables (they go in --env) and
            // none of the worker's but what it needs to find its daemon.
            c.args(args).env_clear();
            for k in [
                "PATH",
                "HOME",
                "DOCKER_HOST",
                "DOCKER_CONFIG",
                "DOCKER_CONTEXT",
            ] {
                if let Some(v) = std::env::var_os(k) {
                    c.env(k, v);
                }
            }
            c
        }
    };
    cmd.current_dir(&scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = match &container {
                Some(_) => host.executor.docker.clone(),
                None => argv[0].clone(),
            };
            return failed(lease, started, format!("cannot start '{what}': {e}"));
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        // Lets a later start reap this job's process group if this process dies.
        let _ = std::fs::write(dir.join("pgid"), format!("{pid}\n{}\n", job.job_id));
    }
    let timeout = async {
        match job.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    enum End {
        Exited(std::io::Result<std::process::ExitStatus>),
        TimedOut,
        Cancelled,
    }
    let mut said = ProgressTail::default();
    let end = tokio::select! {
        s = child.wait() => End::Exited(s),
        _ = timeout => End::TimedOut,
        _ = cancel.wait_for(|c| *c) => End::Cancelled,
        never = watch_progress(link, lease, &log_path, &mut said) => match never {},
    };
    // Whatever happened, nothing the job started outlives it: killing the docker
    // client does not stop its container, so that is removed by name.
    if let Some((name, _)) = &container
        && !matches!(end, End::Exited(_))
    {
        sandbox::kill(&host.executor.docker, name).await;
    }
    kill_group(pid);
    drop(gpu_lease);
    let mut r = match end {
        End::TimedOut | End::Cancelled => {
            let _ = child.wait().await;
            let timed_out = matches!(end, End::TimedOut);
            let mut r = result(
                lease,
                if timed_out {
                    Outcome::TimedOut
                } else {
                    Outcome::Cancelled
                },
                started,
            );
            r.error = if timed_out {
                format!(
                    "killed after the step's timeout of {}; log tail:\n{}",
                    humantime_secs(job.timeout),
                    read_tail(&log_path)
                )
            } else {
                "cancelled".into()
            };
            r
        }
        End::Exited(Err(e)) => failed(lease, started, format!("waiting for the job: {e}")),
        End::Exited(Ok(status)) => {
            let mut r = result(lease, Outcome::Succeeded, started);
            r.exit_code = status.code();
            if !status.success() {
                r.outcome = Outcome::Failed;
                r.error = read_tail(&log_path);
            }
            r
        }
    };
    if r.outcome == Outcome::Succeeded {
        let root = out_root.clone();
        let names = job.outputs.clone();
        let hashed = tokio::task::spawn_blocking(move || outputs::hash_outputs(&root, &names))
            .await
            .unwrap_or_else(|e| Err(format!("hashing task failed: {e}")));
        match hashed {
            Ok(files) => {
                r.outputs = files;
                r.staging = Some(out_root);
            }
            Err(e) => {
                r.outcome = Outcome::Failed;
                r.error = format!("hashing outputs: {e}");
            }
        }
    }
    // The lines printed since the watcher's last look (a short job's only ones, a
    // long one's `400/400`): the result carries the newest, for the last word.
    said.read(&log_path);
    r.progress = said.newest;
    r.log = Some(log_path);
    // Set for failures too, so a remote link can send the log from the job directory.
    if r.staging.is_none() {
        r.staging = Some(dir.join("out"));
    }
    r.ended_ms = now_ms();
    r
}

/// Reads the job's log as it grows and tells the coordinator each new
/// `::nexa-progress::` line (the latest of each second). Never returns.
async fn watch_progress<L: CoordinatorLink>(
    link: &L,
    lease: &Lease,
    log: &Path,
    said: &mut ProgressTail,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if let Some(p) = said.read(log) {
            link.progress(lease, p);
        }
    }
}

/// Where a job's log has been read to, and the newest progress line found in it.
#[derive(Default)]
struct ProgressTail {
    offset: u64,
    partial: Vec<u8>,
    newest: Option<nexa_shared::job::JobProgress>,
}

impl ProgressTail {
    /// Reads what the log gained since the last call; returns the newest progress line
    /// in it when that differs from the one before.
    fn read(&mut self, log: &Path) -> Option<nexa_shared::job::JobProgress> {
        use nexa_shared::job::JobProgress;
        use std::io::{Read, Seek, SeekFrom};
        const MAX_READ: u64 = 1 << 20;
        let mut f = std::fs::File::open(log).ok()?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > self.offset + MAX_READ {
            // Far behind (a chatty job): skip to the last part, dropping a cut line.
            self.offset = len - MAX_READ;
            self.partial.clear();
        }
        f.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut buf = Vec::new();
        f.take(MAX_READ).read_to_end(&mut buf).ok()?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let end = self.partial.iter().rposition(|b| *b == b'\n')?;
        let found = String::from_utf8_lossy(&self.partial[..end])
            .lines()
            .rev()
            .find_map(JobProgress::parse_line);
        self.partial.drain(..=end);
        let p = found.filter(|p| self.newest.as_ref() != Some(p))?;
        self.newest = Some(p.clone());
        Some(p)
    }
}

/// Completes a job's container with its user and its output root as the one writable
/// mount; returns the container's name and the `docker run` arguments.
fn container_run(mut spec: sandbox::ContainerJob<'_>, out_root: &Path) -> (String, Vec<String>) {
    let (uid, gid) = sandbox::container_user();
    if uid != nix::unistd::getuid().as_raw() {
        // The job's user is not the worker's: let it write its outputs.
        open_for_job(out_root);
    }
    spec.user = format!("{uid}:{gid}");
    spec.mounts.push(sandbox::Mount {
        host: out_root.to_path_buf(),
        container: sandbox::OUT_ROOT.into(),
        read_only: false,
    });
    (spec.name.clone(), sandbox::run_args(&spec))
}

/// Makes a job's output directories writable by the unprivileged user its container
/// runs as (the worker runs as root; the job never does).
fn open_for_job(out_root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dirs = std::iter::once(out_root.to_path_buf()).chain(
        std::fs::read_dir(out_root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for d in dirs {
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777));
    }
}

/// Kills the process groups of jobs left running by a worker process that died
/// (SIGKILL, power loss) in `work_dir`. A group is killed only when its leader still
/// carries the job's `NEXA_JOB_ID`, so a reused pid is never hit. Returns how many.
pub fn reap_orphans(work_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(work_dir.join("jobs")) else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("pgid")) else {
            continue;
        };
        let mut lines = text.lines();
        let (Some(pid), Some(job)) = (
            lines.next().and_then(|p| p.parse::<u32>().ok()),
            lines.next(),
        ) else {
            continue;
        };
        if environ_has(pid, &format!("NEXA_JOB_ID={job}")) {
            tracing::info!(pid, job, "killing a job left running by a previous worker");
            kill_group(Some(pid));
            killed += 1;
        }
    }
    killed
}

/// True when process `pid`'s environment holds exactly `entry` (`KEY=VALUE`): how a
/// job's or a service's process is told from an unrelated one that reused its pid.
pub fn environ_has(pid: u32, entry: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()))
        .unwrap_or(false)
}

/// Expands `${NAME}` in an argv element from the job's environment (the `NEXA_*`
/// variables and `params.env`); unknown names are left as written.
pub fn expand(arg: &str, env: &std::collections::HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn humantime_secs(t: Option<std::time::Duration>) -> String {
    t.map(|d| format!("{}s", d.as_secs_f64()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_expansion() {
        let env: std::collections::HashMap<&str, &str> =
            [("NEXA_OUT", "/o"), ("K", "v")].into_iter().collect();
        assert_eq!(expand("${NEXA_OUT}/x", &env), "/o/x");
        assert_eq!(expand("a${K}b${K}", &env), "avbv");
        assert_eq!(expand("${UNKNOWN}", &env), "${UNKNOWN}");
        assert_eq!(expand("$HOME ${", &env), "$HOME ${");
    }
}
