//! The docker executor, end to end: a real coordinator, real `nexa-worker join
//! --executor docker` processes and real containers from the local Debian base image
//! (built by `.ci/base_image.sh` when missing). Jobs that try to read the worker's key,
//! reach the network, write outside their output directory or use more memory than
//! their resources say fail; the worker stays healthy and runs the next job.

mod common;

use common::mesh::{
    Coord, Worker, base_image, remote, remote_status, step, wait_for, wait_workers, workers_json,
};
use common::{Project, text};
use std::io::Read;
use std::time::Duration;

/// The docker bridge's gateway address (the host, as a container with a network
/// reaches it): the first address of the bridge's subnet.
fn bridge_gateway() -> String {
    let out = std::process::Command::new("docker")
        .args([
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{(index .IPAM.Config 0).Gateway}} {{(index .IPAM.Config 0).Subnet}}",
        ])
        .output()
        .expect("docker network inspect");
    assert!(out.status.success(), "{}", text(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(gw), Some(_)) => gw.to_string(),
        (Some(subnet), None) => {
            // The default bridge often names no gateway: it is the subnet's first host.
            let net: std::net::Ipv4Addr = subnet
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("bridge subnet {subnet:?}"));
            std::net::Ipv4Addr::from(u32::from(net) + 1).to_string()
        }
        _ => panic!("no bridge network: {text:?}"),
    }
}

/// The ids of the containers of step `id`'s jobs.
fn containers_of(id: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "--all", "--format", "{{.ID}} {{.Labels}}"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("/{id},")) || l.ends_with(&format!("/{id}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Whether a container of a job of step `id` is still there.
fn container_left(id: &str) -> bool {
    !containers_of(id).is_empty()
}

#[test]
fn sandboxed_jobs_cannot_read_the_key_reach_the_network_or_write_outside_their_output() {
    let image = base_image();
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let w = Worker::start(
        &url,
        &p.path().join("vol"),
        2,
        None,
        &["--executor", "docker", "--default-image", image],
    );
    wait_workers(&p, &coord, 1);
    let key = w.dir.join("worker.key");
    let key_before = std::fs::read(&key).expect("key");
    // Something listening on the host where a container with a network could reach it:
    // the sandboxed job must not get there.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let gw = bridge_gateway();
    let work = w.dir.join("work");
    p.write("data/in.txt", "precious\n");
    p.write(
        "s.yaml",
        &format!(
            r#"pipeline:
  name: sandbox
  steps:
    - id: steal_key
      uses: exec
      after: []
      retries: 0
      params: {{run: 'cat {key} "$HOME/.config/nexa/worker.key" > "$NEXA_OUT/key"'}}
      out: artifacts/steal_key
    - id: phone_home
      uses: exec
      after: []
      retries: 0
      params:
        cmd: [bash, -c, 'echo hi > /dev/tcp/{gw}/{port} && echo reached > "$NEXA_OUT/r"']
      out: artifacts/phone_home
    - id: write_input
      uses: exec
      after: []
      retries: 0
      in: {{data: data/in.txt}}
      params: {{run: 'echo pwned > "$NEXA_IN_DATA"'}}
      out: artifacts/write_input
    - id: write_host
      uses: exec
      after: []
      retries: 0
      params: {{run: 'mkdir -p {work}/escape && echo pwned > {work}/escape/x'}}
      out: artifacts/write_host
    - id: write_root
      uses: exec
      after: []
      retries: 0
      params: {{run: 'echo pwned > /etc/escape'}}
      out: artifacts/write_root
    - id: hog
      uses: exec
      after: []
      retries: 0
      resources: {{memory: 64MiB}}
      params: {{cmd: [python3, -c, 'b = bytearray(256 << 20); open("/nexa/out/out/x", "w").write("fit")']}}
      out: artifacts/hog
    - id: too_slow
      uses: exec
      after: []
      retries: 0
      timeout: 2s
      params: {{run: 'sleep 60'}}
      out: artifacts/too_slow
"#,
            key = key.display(),
            work = work.display(),
        ),
    );
    let out = remote(&p, &coord, &["pipeline", "run", "s.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let st = remote_status(&p, &coord, "s.yaml");
    for id in [
        "steal_key",
        "phone_home",
        "write_input",
        "write_host",
        "write_root",
        "hog",
    ] {
        assert_eq!(step(&st, id)["status"], "FAILED", "{id}: {st}");
    }
    assert_eq!(step(&st, "too_slow")["status"], "FAILED", "{st}");
    assert!(
        step(&st, "too_slow")["error"]
            .as_str()
            .is_some_and(|e| e.contains("timeout of 2s")),
        "{st}"
    );
    let err = |id: &str| {
        step(&st, id)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        err("steal_key").contains("No such file"),
        "{}",
        err("steal_key")
    );
    assert!(
        err("write_input").contains("Read-only file system"),
        "{}",
        err("write_input")
    );
    assert!(
        err("write_root").contains("Read-only file system"),
        "{}",
        err("write_root")
    );
    assert!(
        err("write_host").contains("Read-only file system"),
        "{}",
        err("write_host")
    );
    // Over its memory limit, the job is killed by the kernel (137 = SIGKILL).
    assert!(err("hog").contains("exit status 137"), "{}", err("hog"));
    // Nothing reached the host: no connection, no file, the key and the input intact.
    let mut buf = [0u8; 8];
    let reached = listener
        .accept()
        .map(|(mut s, _)| s.read(&mut buf).unwrap_or(0))
        .is_ok();
    assert!(!reached, "a sandboxed job connected to the host");
    assert!(!work.join("escape").exists(), "a job wrote on the host");
    assert_eq!(std::fs::read(&key).expect("key"), key_before);
    assert_eq!(p.read("data/in.txt"), "precious\n");
    // The timed-out job's container is gone, not left running.
    wait_for(
        "the timed-out container to go",
        Duration::from_secs(20),
        || !container_left("too_slow"),
    );

    // The worker is healthy: still active, and it runs the next job, in its default
    // image (a step that names none), as nobody, with its output where it belongs.
    p.write(
        "ok.yaml",
        r#"pipeline:
  name: fine
  steps:
    - id: fine
      uses: exec
      in: {data: data/in.txt}
      params: {run: 'test -f /.dockerenv || test -e /run/.containerenv; id -u > "$NEXA_OUT/uid"; tr a-z A-Z < "$NEXA_IN_DATA" > "$NEXA_OUT/up"'}
      out: artifacts/fine
"#,
    );
    let out = remote(&p, &coord, &["pipeline", "run", "ok.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let art = coord.data.join("projects/fine/artifacts/fine");
    assert_eq!(
        std::fs::read_to_string(art.join("up")).unwrap_or_default(),
        "PRECIOUS\n"
    );
    let uid = std::fs::read_to_string(art.join("uid")).unwrap_or_default();
    assert_ne!(uid.trim(), "0", "jobs never run as root");
    let ws = workers_json(&p, &coord);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0]["state"], "active", "{ws:?}");
    drop(w);
}

#[test]
fn network_is_granted_only_when_the_step_asks_and_the_volunteer_allows() {
    let image = base_image();
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let gw = bridge_gateway();
    let pipeline = |name: &str| {
        format!(
            r#"pipeline:
  name: {name}
  steps:
    - id: fetch
      uses: exec
      retries: 0
      params:
        image: {image}
        network: true
        cmd: [bash, -c, 'echo hi > /dev/tcp/{gw}/{port} && echo reached > "$NEXA_OUT/r"']
      out: artifacts/fetch
"#
        )
    };
    p.write("deny.yaml", &pipeline("deny"));
    p.write("allow.yaml", &pipeline("allow"));
    let strict = Worker::start(
        &url,
        &p.path().join("strict"),
        1,
        None,
        &["--executor", "docker"],
    );
    wait_workers(&p, &coord, 1);
    let out = remote(&p, &coord, &["pipeline", "run", "deny.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let st = remote_status(&p, &coord, "deny.yaml");
    assert!(
        step(&st, "fetch")["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--allow-job-network"),
        "{st}"
    );
    drop(strict);
    let _open = Worker::start(
        &url,
        &p.path().join("open"),
        1,
        None,
        &["--executor", "docker", "--allow-job-network"],
    );
    let accepted = std::thread::spawn(move || listener.accept().is_ok());
    let out = remote(&p, &coord, &["pipeline", "run", "allow.yaml"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        accepted.join().expect("accept"),
        "the allowed job reached the host"
    );
}

#[test]
fn a_restarted_worker_removes_the_containers_its_killed_predecessor_left() {
    let image = base_image();
    let p = Project::new();
    let coord = Coord::open(&p.path().join("coord"));
    let url = coord.url("http");
    let dir = p.path().join("vol");
    let args = ["--executor", "docker", "--default-image", image];
    let mut w = Worker::start(&url, &dir, 1, None, &args);
    wait_workers(&p, &coord, 1);
    p.write(
        "long.yaml",
        r#"pipeline:
  name: orphan
  steps:
    - id: long_job
      uses: exec
      params: {run: 'sleep 300'}
      out: artifacts/long_job
"#,
    );
    let mut run = remote(&p, &coord, &["pipeline", "run", "long.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run");
    wait_for("the job's container", Duration::from_secs(60), || {
        container_left("long_job")
    });
    // The worker dies without a chance to clean up; its container runs on.
    w.sigkill();
    std::thread::sleep(Duration::from_millis(500));
    let orphans = containers_of("long_job");
    assert_eq!(orphans.len(), 1, "the container outlives a SIGKILL");
    // The same worker (same work directory) starting again removes it first.
    let _w2 = Worker::start(&url, &dir, 1, None, &args);
    wait_for(
        "the orphaned container to go",
        Duration::from_secs(30),
        || !containers_of("long_job").contains(&orphans[0]),
    );
    let _ = run.kill();
    let _ = run.wait();
    // The job itself is not lost: it is leased again (and would run to its end).
    wait_for("the job to run again", Duration::from_secs(60), || {
        containers_of("long_job").iter().any(|c| *c != orphans[0])
    });
    drop(_w2);
    remove_containers("long_job");
}

/// Removes the containers of step `id`'s jobs (a test's own leftovers).
fn remove_containers(id: &str) {
    for cid in containers_of(id) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "--force", &cid])
            .output();
    }
}
