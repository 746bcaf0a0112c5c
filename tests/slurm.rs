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
    let run = remote(&p, &coord, &["pipeline", "run", "long.yaml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    common::mesh::wait_for(
        "the job to start in a pilot",
        std::time::Duration::from_secs(30),
        || started.exists(),
    );
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
