//! The crash soak: a coordinator SIGKILLed at random moments, again and again, while
//! fan-outs of random-valued steps run on real workers. Every kill is followed by a
//! restart on the same data dir and port. What must hold, checked after every restart
//! and at the end:
//! - no sealed artifact's hash ever changes (each step writes a random value, so a step
//!   sealed twice, or a result accepted twice, would change its hash);
//! - every run finishes, every step COMPLETE (or SKIPPED: sealed before a kill and
//!   reused), and its client exits 0.
//!
//! `NEXA_SOAK_KILLS` sets the number of kills (default 100), `NEXA_SOAK_SEED` the seed
//! of the kill moments (printed, for a rerun of the same schedule).

mod common;

use common::mesh::{Coord, Worker, fixed_listen, remote, remote_status, step, wait_workers};
use common::{Project, sealed};
use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// xorshift64*: enough for kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn fan_out(p: &Project, name: &str) {
    p.write(
        &format!("{name}.yaml"),
        &format!(
            r#"pipeline:
  name: {name}
  steps:
    - id: gen
      uses: exec
      params: {{run: 'for i in $(seq 1 24); do od -An -N8 -tx8 /dev/urandom; done > "$NEXA_OUT/recs.txt"'}}
      out: artifacts/gen
    - id: fan
      uses: exec
      in: {{recs: artifacts/gen}}
      shards: {{over: recs, count: 12}}
      params: {{run: 'sleep 0.$(od -An -N1 -tu1 /dev/urandom | tr -d " ")1; od -An -N8 -tx8 /dev/urandom > "$NEXA_OUT/v"; cat "$NEXA_IN_RECS/recs.txt" >> "$NEXA_OUT/v"'}}
      out: artifacts/fan
    - id: merge
      uses: exec
      in: {{parts: artifacts/fan}}
      params: {{run: 'find "$NEXA_IN_PARTS" -name v | sort | xargs cat > "$NEXA_OUT/all"; od -An -N8 -tx8 /dev/urandom >> "$NEXA_OUT/all"'}}
      out: artifacts/merge
"#
        ),
    );
}

fn follow(p: &Project, coord: &Coord, name: &str) -> Child {
    remote(p, coord, &["pipeline", "run", &format!("{name}.yaml")])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(p.path().join(format!("{name}.client.log"))).expect("log"),
        ))
        .spawn()
        .expect("client")
}

#[test]
fn a_hundred_coordinator_sigkills_change_no_sealed_hash_and_every_run_finishes() {
    let kills: usize = std::env::var("NEXA_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("NEXA_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("soak: {kills} kills, NEXA_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let p = Project::new();
    let listen = fixed_listen();
    let data = p.path().join("coord");
    let mut coord = Coord::start(&data, &listen, &["--open-enrolment"]);
    let url = coord.url("http");
    let _a = Worker::start(&url, &p.path().join("a"), 2, None, &[]);
    let _b = Worker::start(&url, &p.path().join("b"), 2, None, &[]);
    wait_workers(&p, &coord, 2);

    let mut runs: Vec<(String, Child)> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut changed: Vec<String> = Vec::new();
    let check = |seen: &mut BTreeMap<String, String>, changed: &mut Vec<String>| {
        let mut now = BTreeMap::new();
        sealed(&data.join("projects"), &mut now);
        for (path, hash) in now {
            match seen.get(&path) {
                Some(h) if *h != hash => changed.push(format!("{path}: {h} -> {hash}")),
                Some(_) => {}
                None => {
                    seen.insert(path, hash);
                }
            }
        }
    };
    let started = Instant::now();
    for k in 0..kills {
        // Keep a fan-out running: a new one whenever the last has finished.
        let idle = runs
            .last_mut()
            .is_none_or(|(_, c)| c.try_wait().ok().flatten().is_some());
        if idle {
            let name = format!("soak{}", runs.len());
            fan_out(&p, &name);
            let client = follow(&p, &coord, &name);
            // Kills come after the submission is acknowledged: a client whose submit
            // meets a dead coordinator fails at once (nothing was accepted), which is not
            // what this soak is about. Following the run across kills is.
            let log = p.path().join(format!("{name}.client.log"));
            let t0 = Instant::now();
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("submitted run")
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{name} was never submitted"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            runs.push((name.clone(), client));
        }
        std::thread::sleep(rng.millis(150, 1500));
        coord.sigkill();
        check(&mut seen, &mut changed);
        coord = Coord::start(&data, &listen, &["--open-enrolment"]);
        if k % 10 == 9 {
            eprintln!(
                "soak: {} kills in {:.0?}, {} runs, {} sealed artifacts",
                k + 1,
                started.elapsed(),
                runs.len(),
                seen.len()
            );
        }
    }
    // Let every run finish.
    let deadline = Instant::now() + Duration::from_secs(300);
    for (name, client) in &mut runs {
        loop {
            if let Some(status) = client.try_wait().expect("client") {
                let log = std::fs::read_to_string(p.path().join(format!("{name}.client.log")))
                    .unwrap_or_default();
                assert!(status.success(), "run {name} failed:\n{log}");
                break;
            }
            assert!(Instant::now() < deadline, "run {name} did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        let st = remote_status(&p, &coord, &format!("{name}.yaml"));
        // Steps sealed before a kill are SKIPPED (reused by their cache keys) when the
        // resumed run reaches them again.
        for s in ["gen", "fan", "merge"] {
            let status = step(&st, s)["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                status == "COMPLETE" || status == "SKIPPED",
                "{name}: {s} is {status}: {st}"
            );
        }
    }
    check(&mut seen, &mut changed);
    eprintln!(
        "soak: {kills} kills, {} runs finished, {} sealed artifacts, {} hashes changed, in {:.0?}",
        runs.len(),
        seen.len(),
        changed.len(),
        started.elapsed()
    );
    assert!(changed.is_empty(), "sealed hashes changed: {changed:#?}");
    assert!(
        kills < 50 || runs.len() >= 2,
        "the soak should cover more than one run"
    );
}
