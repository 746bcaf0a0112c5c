//! Against a real single-node Slurm (`.ci/slurm.sh` installs and starts one, without
//! systemd): `scheduler: slurm` steps run only on pilot workers, `nexa-worker join`
//! inside sbatch allocations, and a step keeps its cache when it moves between the
//! ordinary pool and Slurm; a pilot scancelled mid-job loses its lease and the job
//! completes in another.

mod common;

use common::mesh::{Coord, Worker, bin, remote, remote_status, step};
use common::{Project, text};
use std::path::Path;
use std::process::Command;

/// Starts (or finds) the test Slurm; its `SLURM_CONF`.
fn slurm() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/slurm.sh");
    let out = Command::new("bash").arg(script).output().expect("slurm.sh");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The Slurm jobs this test submitted, scancelled when it ends however it ends.
struct Pilots {
    conf: String,
    name: String,
}

impl Pilots {
    fn squeue(&self) -> Vec<String> {
        let out = Command::new("squeue")
            .env("SLURM_CONF", &self.conf)
            .args(["-h", "-o", "%i", "-n", &self.name])
            .output()
            .expect("squeue");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Submits a pilot: `nexa-worker join` labelled `scheduler=slurm`, one slot.
    fn submit(&self, url: &str, dir: &Path) -> String {
        std::fs::create_dir_all(dir).expect("pilot dir");
        let wrap = format!(
            "exec {} join {url} --work-dir {}/work --key {}/worker.key --slots 1 --label scheduler=slurm",
            bin("nexa-worker").display(),
            dir.display(),
            dir.display()
        );
        let out = Command::new("sbatch")
            .env("SLURM_CONF", &self.conf)
            .env("NEXA_LOG", "info")
            // Without --mem a job takes the whole node's memory and the next one waits.
            .args([
                "--parsable",
                "--cpus-per-task=1",
                "--mem=1G",
                "--job-name",
                &self.name,
            ])
            .arg(format!("--output={}/pilot.log", dir.display()))
            .args(["--wrap", &wrap])
            .output()
            .expect("sbatch");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Pilots {
    fn drop(&mut self) {
        let _ = Command::new("scancel")
            .env("SLURM_CONF", &self.conf)
            .args(["-n", &self.name])
            .status();
    }
}

#[test]
fn a_slurm_step_runs_in_slurm_allocations_across_pilots_keeps_its_cache_when_it_moves_and_survives_a_scancel()
 {
    let conf = slurm();
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let _ordinary = Worker::start(&url, &p.path().join("ordinary"), 2, None, &[]);
    let pilots = Pilots {
        conf,
        name: format!("nexa-test-pilot-{}", std::process::id()),
    };
    let ids: Vec<String> = (0..2)
        .map(|i| pilots.submit(&url, &p.path().join(format!("pilot{i}"))))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while coord.workers(&p).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pilots did not enrol; their logs:\n{}\n{}",
            std::fs::read_to_string(p.path().join("pilot0/pilot.log")).unwrap_or_default(),
            std::fs::read_to_string(p.path().join("pilot1/pilot.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let workers = coord.workers(&p);
    for id in &ids {
        assert!(
            workers.iter().any(|w| w
                .to_string()
                .contains(&format!("\"slurm.job_id\":\"{id}\""))),
            "pilot {id} enrolled with its Slurm job id: {workers:?}"
        );
    }

    p.write("items.txt", "a\nb\nc\nd\n");
    let pipeline = |prep_scheduler: &str| {
        format!(
            r#"
pipeline:
  name: cluster
  steps:
    - id: prep
      uses: exec
{prep_scheduler}      params: {{run: 'echo "${{SLURM_JOB_ID:-none}}" > "$NEXA_OUT/where"'}}
      out: artifacts/prep
    - id: fan
      uses: exec
      scheduler: slurm
      in: {{items: items.txt, prep: artifacts/prep}}
      shards: {{over: items, count: 4}}
      params: {{run: 'sleep 2; echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}}
      out: artifacts/fan
"#
        )
    };
    p.write("cluster.yaml", &pipeline(""));
    let out = remote(&p, &coord, &["pipeline", "run", "cluster.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let art = coord.data.join("projects/cluster/artifacts");
    let read = |rel: &str| {
        std::fs::read_to_string(art.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(read("prep/where"), "none", "a local step stays off Slurm");
    let mut used = std::collections::BTreeSet::new();
    for k in 0..4 {
        let job = read(&format!("fan/shard-{k:05}/where"));
        assert!(
            ids.contains(&job),
            "shard {k} ran in {job:?}, not a pilot {ids:?}"
        );
        used.insert(job);
    }
    assert_eq!(
        used.len(),
        2,
        "the shards spread over both pilots: {used:?}"
    );

    // The same step moved onto Slurm keeps its cache: scheduler is not in the key.
    let before = remote_status(&p, &coord, "cluster.yaml");
    p.write("cluster.yaml", &pipeline("      scheduler: slurm\n"));
    let out = remote(&p, &coord, &["pipeline", "run", "cluster.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let after = remote_status(&p, &coord, "cluster.yaml");
    for id in ["prep", "fan"] {
        assert_eq!(step(&after, id)["status"], "SKIPPED", "{id}: {after}");
        assert_eq!(
            step(&after, id)["cache_key"],
            step(&before, id)["cache_key"],
            "{id}"
        );
    }

    // A pilot scancelled mid-job (Slurm kills it KillWait = 1 s after its SIGTERM): its
    // lease is lost and the job completes in the other pilot's allocation.
    let started = p.path().join("started");
    p.write(
        "long.yaml",
        &format!(
            r#"
pipeline:
  name: long
  steps:
    - id: long
      uses: exec
      scheduler: slurm
      params: {{run: 'echo "$SLURM_JOB_ID" >> {started}; sleep 6; echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}}
      out: artifacts/long
"#,
            started = started.display()
        ),
    );
    let run = run_until_started(&p, &coord, "long.yaml", &started);
    let victim = std::fs::read_to_string(&started)
        .expect("started")
        .trim()
        .to_string();
    assert!(ids.contains(&victim), "{victim} is not a pilot of {ids:?}");
    let out = Command::new("scancel")
        .env("SLURM_CONF", &pilots.conf)
        .arg(&victim)
        .output()
        .expect("scancel");
    assert!(out.status.success(), "{}", text(&out));
    let done = run.wait_with_output().expect("run");
    assert!(done.status.success(), "{}", text(&done));
    let survivor = std::fs::read_to_string(coord.data.join("projects/long/artifacts/long/where"))
        .expect("where")
        .trim()
        .to_string();
    assert!(
        ids.contains(&survivor) && survivor != victim,
        "the job finished in {survivor}, not in the other pilot ({ids:?}, {victim} cancelled)"
    );
    drop(pilots);
    let left = Pilots {
        conf: slurm(),
        name: format!("nexa-test-pilot-{}", std::process::id()),
    };
    common::mesh::wait_for(
        "the pilots to leave squeue",
        std::time::Duration::from_secs(15),
        || left.squeue().is_empty(),
    );
}

/// Starts `nexa pipeline run FILE` against `coord` and waits until its job has made
/// `started` (it runs in a pilot, which pilots take a moment to be for).
fn run_until_started(
    p: &Project,
    coord: &Coord,
    file: &str,
    started: &Path,
) -> std::process::Child {
    let run = remote(p, coord, &["pipeline", "run", file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    common::mesh::wait_for(
        "the job to start in a pilot",
        std::time::Duration::from_secs(60),
        || started.exists(),
    );
    run
}

/// A coordinator with the Slurm provider on: pilots run the test worker (which honours
/// `NEXA_FAKE_GPUS`: the node's "GPUs", of which Slurm hands out its two gres devices).
fn provider_coord(data: &Path, conf: &str, extra: &[&str]) -> Coord {
    let worker = bin("nexa-worker-test").display().to_string();
    let gpus = serde_json::json!([
        common::mesh::fake_gpu(0, "GPU-fake-0", "Fake A100", 40, (8, 0)),
        common::mesh::fake_gpu(1, "GPU-fake-1", "Fake A100", 40, (8, 0)),
    ])
    .to_string();
    let mut args = vec![
        "--open-enrolment",
        "--slurm-worker",
        &worker,
        "--slurm-idle-timeout",
        "20s",
        "--slurm-min-memory",
        "256MiB",
    ];
    args.extend_from_slice(extra);
    Coord::try_start_exe(
        &bin("nexa-coordinator"),
        &[("SLURM_CONF", conf), ("NEXA_FAKE_GPUS", &gpus)],
        data,
        "127.0.0.1:0",
        &args,
    )
    .unwrap_or_else(|| {
        panic!(
            "the coordinator did not start:\n{}",
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        )
    })
}

/// The pilots of the coordinator with data dir `data`, as squeue lists them:
/// (job id, state, tres per node).
fn provider_pilots(conf: &str, data: &Path) -> Vec<(String, String, String)> {
    let Ok(id) = std::fs::read_to_string(data.join("slurm.id")) else {
        return Vec::new();
    };
    let out = Command::new("squeue")
        .env("SLURM_CONF", conf)
        .args([
            "-h",
            "-n",
            &format!("nexa-pilot-{}", id.trim()),
            "-o",
            "%i|%T|%b",
        ])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
}

/// Right after a stop: every pilot of `data` is cancelled (at most still completing),
/// and soon none is in squeue.
fn no_pilot_left(conf: &str, data: &Path) {
    let left = provider_pilots(conf, data);
    assert!(
        left.iter().all(|(_, s, _)| s == "COMPLETING"),
        "squeue shows no pilot after Ctrl-C: {left:?}"
    );
    common::mesh::wait_for(
        "the cancelled pilots to leave squeue",
        std::time::Duration::from_secs(20),
        || provider_pilots(conf, data).is_empty(),
    );
}

/// Cancels a provider's pilots whatever happens to the test.
struct CancelPilots(String, std::path::PathBuf);

impl Drop for CancelPilots {
    fn drop(&mut self) {
        for (id, _, _) in provider_pilots(&self.0, &self.1) {
            let _ = Command::new("scancel")
                .env("SLURM_CONF", &self.0)
                .arg(id)
                .status();
        }
    }
}

#[test]
fn the_provider_shapes_pilots_from_resources_spreads_shards_gives_gpu_steps_only_gpu_pilots_and_ctrl_c_leaves_none()
 {
    let conf = slurm();
    let p = Project::new();
    let data = p.path().join("coord");
    let mut coord = provider_coord(&data, &conf, &["--slurm-max-pilots", "3"]);
    let _cleanup = CancelPilots(conf.clone(), data.clone());
    let _ordinary = Worker::start(&coord.url("http"), &p.path().join("ordinary"), 2, None, &[]);
    p.write("items.txt", "a\nb\nc\nd\n");
    p.write(
        "cluster.yaml",
        r#"
pipeline:
  name: provided
  steps:
    - id: prep
      uses: exec
      params: {run: 'echo "${SLURM_JOB_ID:-none}" > "$NEXA_OUT/where"'}
      out: artifacts/prep
    - id: fan
      uses: exec
      scheduler: slurm
      after: [prep]
      in: {items: items.txt}
      shards: {over: items, count: 4}
      resources: {cpus: 1, memory: 300MiB}
      params: {run: 'sleep 1; echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}
      out: artifacts/fan
    - id: gpu
      uses: exec
      scheduler: slurm
      after: [prep]
      resources: {gpus: 1}
      timeout: 5m
      params: {run: 'echo "$SLURM_JOB_ID $SLURM_JOB_GPUS $CUDA_VISIBLE_DEVICES" > "$NEXA_OUT/where"'}
      out: artifacts/gpu
"#,
    );
    let started = std::time::Instant::now();
    let out = remote(&p, &coord, &["pipeline", "run", "cluster.yaml"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}\ncoordinator log:\n{}",
        text(&out),
        std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
    );
    eprintln!("the pipeline ran through pilots in {:?}", started.elapsed());
    let art = data.join("projects/provided/artifacts");
    let read = |rel: &str| {
        std::fs::read_to_string(art.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(read("prep/where"), "none", "a local step stays off Slurm");
    let pilots = provider_pilots(&conf, &data);
    let tres: std::collections::BTreeMap<String, String> = pilots
        .iter()
        .map(|(i, _, t)| (i.clone(), t.clone()))
        .collect();
    let mut used = std::collections::BTreeSet::new();
    for k in 0..4 {
        let job = read(&format!("fan/shard-{k:05}/where"));
        assert!(!job.is_empty(), "shard {k} ran outside Slurm");
        used.insert(job);
    }
    assert!(used.len() >= 2, "the shards spread over pilots: {used:?}");
    let gpu = read("gpu/where");
    let mut f = gpu.split_whitespace();
    let (gpu_job, slurm_gpus, visible) = (
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
        f.next().unwrap_or(""),
    );
    assert!(
        !slurm_gpus.is_empty() && visible.starts_with("GPU-fake-"),
        "the GPU step ran with a GPU Slurm allocated: {gpu:?}"
    );
    if let Some(t) = tres.get(gpu_job) {
        assert!(t.contains("gpu:1"), "its pilot asked for gres: {t}");
    }
    // The pilots without gres offered no GPU, though the node "has" two.
    let workers = coord.workers(&p);
    let mut cpu_pilots = 0;
    for w in &workers {
        let labels = &w["profile"]["labels"];
        if labels["scheduler"] != "slurm" {
            continue;
        }
        let job = labels["slurm.job_id"].as_str().unwrap_or("");
        let gpus = w["profile"]["gpus"].as_array().map_or(0, Vec::len);
        if job == gpu_job {
            assert_eq!(gpus, 1, "the GPU pilot offers the one GPU it got: {w}");
        } else if gpus == 0 {
            cpu_pilots += 1;
        } else {
            panic!("a pilot without gres offered GPUs: {w}");
        }
        assert!(
            labels["slurm.end"]
                .as_str()
                .is_some_and(|e| e.parse::<u64>().is_ok()),
            "a pilot says when its allocation ends: {w}"
        );
    }
    assert!(cpu_pilots >= 1, "{workers:?}");
    assert!(pilots.len() <= 3, "at most --slurm-max-pilots: {pilots:?}");

    // Ctrl-C: the coordinator cancels every pilot it submitted before it exits.
    assert!(
        !provider_pilots(&conf, &data).is_empty(),
        "pilots idle, not gone yet"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coord.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = coord.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    no_pilot_left(&conf, &data);
}

#[test]
fn a_step_slurm_cannot_run_fails_with_its_reason_and_a_killed_coordinators_pilots_are_found_again_not_leaked()
 {
    let conf = slurm();
    let p = Project::new();
    let data = p.path().join("coord");
    let mut coord = provider_coord(&data, &conf, &[]);
    let _cleanup = CancelPilots(conf.clone(), data.clone());
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    p.write(
        "hopeless.yaml",
        &format!(
            r#"
pipeline:
  name: hopeless
  steps:
    - id: wide
      uses: exec
      scheduler: slurm
      resources: {{cpus: {cpus}}}
      params: {{cmd: [true]}}
      out: artifacts/wide
    - id: nowhere
      uses: exec
      scheduler: slurm
      after: []
      slurm: {{partition: no-such-partition}}
      params: {{cmd: [true]}}
      out: artifacts/nowhere
"#
        ),
    );
    let started = std::time::Instant::now();
    let out = remote(&p, &coord, &["pipeline", "run", "hopeless.yaml"])
        .output()
        .expect("run");
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        took < std::time::Duration::from_secs(60),
        "failed within a minute: {took:?}"
    );
    let status = remote_status(&p, &coord, "hopeless.yaml");
    let wide = step(&status, "wide");
    assert_eq!(wide["status"], "FAILED", "{status}");
    let why = wide["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("Reason=PartitionConfig") && why.contains(&format!("{cpus} CPUs")),
        "Slurm's reason and the request: {why}"
    );
    let nowhere = step(&status, "nowhere");
    assert_eq!(nowhere["status"], "FAILED", "{status}");
    let why = nowhere["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("sbatch refused") && why.contains("invalid partition"),
        "sbatch's own message: {why}"
    );
    let left = provider_pilots(&conf, &data);
    assert!(
        left.iter().all(|(_, s, _)| s != "PENDING"),
        "the hopeless pilot was cancelled: {left:?}"
    );

    // Pilots running, then the coordinator is killed: they outlive it, and the next
    // coordinator on the same data dir finds them, reuses them and, when it stops,
    // cancels them.
    p.write(
        "sleepy.yaml",
        r#"
pipeline:
  name: sleepy
  steps:
    - id: nap
      uses: exec
      scheduler: slurm
      params: {run: 'echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}
      out: artifacts/nap
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "sleepy.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let first = std::fs::read_to_string(data.join("projects/sleepy/artifacts/nap/where"))
        .expect("where")
        .trim()
        .to_string();
    let addr = coord.addr.clone();
    coord.sigkill();
    let orphans = provider_pilots(&conf, &data);
    assert!(
        orphans
            .iter()
            .any(|(id, s, _)| *id == first && s == "RUNNING"),
        "the pilot outlives a SIGKILLed coordinator: {orphans:?}"
    );
    let mut coord = Coord::try_start_exe(
        &bin("nexa-coordinator"),
        &[("SLURM_CONF", &conf)],
        &data,
        &addr,
        &[
            "--open-enrolment",
            "--slurm-worker",
            &bin("nexa-worker-test").display().to_string(),
            "--slurm-idle-timeout",
            "20s",
        ],
    )
    .expect("restarted on the same address");
    // A new step (not the cached one) needs a pilot again.
    p.write(
        "sleepy.yaml",
        &p.read("sleepy.yaml")
            .replace("id: nap", "id: nap\n      cache_hint: again"),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "sleepy.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let second = std::fs::read_to_string(data.join("projects/sleepy/artifacts/nap/where"))
        .expect("where")
        .trim()
        .to_string();
    assert_eq!(
        second, first,
        "the restarted coordinator reused its predecessor's pilot"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coord.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(coord.child.wait().expect("wait").success());
    common::mesh::wait_for(
        "no pilot of either coordinator in squeue",
        std::time::Duration::from_secs(20),
        || provider_pilots(&conf, &data).is_empty(),
    );
}

#[test]
fn an_embedded_run_on_a_login_node_sends_its_slurm_steps_to_pilots_it_submits_and_ctrl_c_cancels_them()
 {
    let conf = slurm();
    let p = Project::new();
    let state = p.path().join(".nexa_state/login/mesh");
    let _cleanup = CancelPilots(conf.clone(), state.clone());
    let worker = bin("nexa-worker-test").display().to_string();
    let flags = [
        "--slurm-listen",
        "127.0.0.1:0",
        "--slurm-worker",
        worker.as_str(),
        "--slurm-min-memory",
        "256MiB",
    ];
    p.write("items.txt", "a\nb\n");
    p.write(
        "login.yaml",
        r#"
pipeline:
  name: login
  steps:
    - id: here
      uses: exec
      params: {run: 'echo "${SLURM_JOB_ID:-none}" > "$NEXA_OUT/where"'}
      out: artifacts/here
    - id: there
      uses: exec
      scheduler: slurm
      in: {items: items.txt, here: artifacts/here}
      shards: {over: items, count: 2}
      params: {run: 'cat "$NEXA_IN_ITEMS" > "$NEXA_OUT/items"; echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}
      out: artifacts/there
"#,
    );
    // No flag at all: sbatch is on PATH, so the run submits pilots (the real
    // nexa-worker beside nexa, reaching this host's name on any port).
    bin("nexa-worker");
    let out = p
        .cmd(&["pipeline", "run", "login.yaml"])
        .env("SLURM_CONF", &conf)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        p.read("artifacts/here/where").trim(),
        "none",
        "the local step ran here"
    );
    for k in 0..2 {
        let job = p.read(&format!("artifacts/there/shard-{k:05}/where"));
        assert!(
            !job.trim().is_empty() && job.trim() != "none",
            "shard {k} ran in a Slurm allocation: {job:?}"
        );
        assert!(
            !p.read(&format!("artifacts/there/shard-{k:05}/items"))
                .is_empty()
        );
    }
    common::mesh::wait_for(
        "the run's pilots to leave squeue",
        std::time::Duration::from_secs(20),
        || provider_pilots(&conf, &state).is_empty(),
    );

    // Ctrl-C while a pilot runs a job: the run is cancelled and its pilots scancelled.
    let started = p.path().join("started");
    p.write(
        "login.yaml",
        &p.read("login.yaml").replace(
            "cat \"$NEXA_IN_ITEMS\"",
            &format!(
                "touch {}; sleep 60; cat \"$NEXA_IN_ITEMS\"",
                started.display()
            ),
        ),
    );
    let mut args = vec!["pipeline", "run", "login.yaml"];
    args.extend_from_slice(&flags);
    let mut run = p
        .cmd(&args)
        .env("SLURM_CONF", &conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    common::mesh::wait_for(
        "a job to start in a pilot",
        std::time::Duration::from_secs(60),
        || started.exists(),
    );
    assert!(!provider_pilots(&conf, &state).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = run.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "cancelled: {status:?}");
    no_pilot_left(&conf, &state);
}

#[test]
fn a_pilot_told_its_walltime_is_near_finishes_its_job_takes_no_other_and_leaves() {
    let conf = slurm();
    let p = Project::new();
    let data = p.path().join("coord");
    let coord = provider_coord(&data, &conf, &["--slurm-max-pilots", "1"]);
    let _cleanup = CancelPilots(conf.clone(), data.clone());
    let started = p.path().join("started");
    p.write(
        "drain.yaml",
        &format!(
            r#"
pipeline:
  name: drain
  steps:
    - id: long
      uses: exec
      scheduler: slurm
      params: {{run: 'touch {started}; sleep 4; echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}}
      out: artifacts/long
    - id: next
      uses: exec
      scheduler: slurm
      params: {{run: 'echo "$SLURM_JOB_ID" > "$NEXA_OUT/where"'}}
      out: artifacts/next
"#,
            started = started.display()
        ),
    );
    let run = run_until_started(&p, &coord, "drain.yaml", &started);
    let pilots = provider_pilots(&conf, &data);
    assert_eq!(pilots.len(), 1, "{pilots:?}");
    let pilot = pilots[0].0.clone();
    // What `--signal=B:TERM@<drain>` does before the walltime: TERM to the batch shell
    // only, which hands it to the worker.
    let out = Command::new("scancel")
        .env("SLURM_CONF", &conf)
        .args(["--batch", "--signal=TERM", &pilot])
        .output()
        .expect("scancel");
    assert!(out.status.success(), "{}", text(&out));
    let done = run.wait_with_output().expect("run");
    assert!(done.status.success(), "{}", text(&done));
    let ran_in = std::fs::read_to_string(data.join("projects/drain/artifacts/long/where"))
        .expect("where")
        .trim()
        .to_string();
    assert_eq!(ran_in, pilot, "the draining pilot finished its own job");
    let next = std::fs::read_to_string(data.join("projects/drain/artifacts/next/where"))
        .expect("where")
        .trim()
        .to_string();
    assert!(
        !next.is_empty() && next != pilot,
        "the next job went to a new pilot, not the draining one ({pilot}): {next:?}"
    );
    common::mesh::wait_for(
        "the drained pilot to leave",
        std::time::Duration::from_secs(20),
        || {
            provider_pilots(&conf, &data)
                .iter()
                .all(|(id, _, _)| *id != pilot)
        },
    );
    let log = std::fs::read_to_string(data.join("slurm-logs").join(format!(
        "{}-{pilot}.log",
        std::fs::read_to_string(data.join("slurm.id"))
            .map(|i| format!("nexa-pilot-{}", i.trim()))
            .unwrap_or_default()
    )))
    .unwrap_or_default();
    assert!(
        !log.contains("left to run elsewhere"),
        "the job was not killed by the drain: {log}"
    );
}
