//! A coordinator and workers as real processes on 127.0.0.1.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A binary of the workspace, built beside `nexa` (same target dir and profile).
/// `cargo test` only builds the binaries of the package under test, and never builds
/// `nexa-worker-test` (it needs the test-only `fake-gpus` feature), so the first call
/// in each test process asks cargo to bring them up to date: a no-op when they are.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        cargo_build(&[
            "-p",
            "nexa-coordinator",
            "--bin",
            "nexa-coordinator",
            "-p",
            "nexa-worker",
            "--bin",
            "nexa-worker",
        ]);
        cargo_build(&[
            "-p",
            "nexa-worker",
            "--bin",
            "nexa-worker-test",
            "--features",
            "fake-gpus",
        ]);
    });
    beside_nexa(name)
}

/// `cargo build ARGS` in this workspace, with the profile `nexa` was built with.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(&cargo);
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("build")
        .args(args);
    if Path::new(env!("CARGO_BIN_EXE_nexa"))
        .components()
        .any(|c| c.as_os_str() == "release")
    {
        c.arg("--release");
    }
    let out = c.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "building {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A built binary of the workspace, beside `nexa`.
fn beside_nexa(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_nexa")).with_file_name(name);
    assert!(p.exists(), "{} is missing after building it", p.display());
    p
}

/// `nexa-coordinator-failpoints`: the coordinator with its fail points armed by
/// `FAILPOINTS` (built with the `failpoints` feature, beside the others; only the
/// fail-point suite asks for it).
pub fn failpoints_bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        cargo_build(&[
            "-p",
            "nexa-coordinator",
            "--bin",
            "nexa-coordinator-failpoints",
            "--features",
            "failpoints",
        ]);
    });
    beside_nexa("nexa-coordinator-failpoints")
}

/// `127.0.0.1:<port>` with a port free now: a coordinator restarted on it comes back at
/// the address its workers know.
pub fn fixed_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    format!("127.0.0.1:{port}")
}

pub struct Coord {
    pub child: Child,
    pub addr: String,
    pub data: PathBuf,
    /// The metrics address, when started with `--metrics-listen`.
    pub metrics: Option<String>,
}

impl Coord {
    /// Starts `nexa-coordinator serve` on `listen` (use 127.0.0.1:0 for any port).
    pub fn start(data: &Path, listen: &str, extra: &[&str]) -> Coord {
        Coord::try_start(data, listen, extra).unwrap_or_else(|| {
            panic!(
                "the coordinator exited before listening:\n{}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            )
        })
    }

    /// [`Coord::start`] for a coordinator that may fail to start: `None` when it exits
    /// before printing its address (its log is at `<data>.log`).
    // The child is waited for on every path: here when it exits, by `Coord`'s drop
    // otherwise.
    pub fn try_start(data: &Path, listen: &str, extra: &[&str]) -> Option<Coord> {
        Coord::try_start_exe(&bin("nexa-coordinator"), &[], data, listen, extra)
    }

    /// [`Coord::try_start`] with another coordinator binary and extra environment.
    #[allow(clippy::zombie_processes)]
    pub fn try_start_exe(
        exe: &Path,
        env: &[(&str, &str)],
        data: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Option<Coord> {
        let mut child = Command::new(exe)
            .envs(env.iter().copied())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data)
            .args(["--operator-token", "op-token", "--unfit-grace-s", "2"])
            .args(if extra.contains(&"--heartbeat-ms") {
                &[][..]
            } else {
                &["--heartbeat-ms", "300"][..]
            })
            .args(extra)
            .env("NEXA_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.with_extension("log"))
                    .expect("coordinator log"),
            ))
            .spawn()
            .expect("start coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut metrics = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                return None;
            }
            if let Some(m) = line.trim().strip_prefix("metrics on ") {
                metrics = Some(m.to_string());
                continue;
            }
            // Scripts read the address from the last line the coordinator prints.
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string();
            return Some(Coord {
                child,
                addr,
                data: data.to_path_buf(),
                metrics,
            });
        }
    }

    /// The operator's view of the workers (`nexa workers --json`).
    pub fn workers(&self, p: &super::Project) -> Vec<serde_json::Value> {
        let url = self.url("http");
        let out = p
            .cmd(&[
                "--coordinator",
                &url,
                "--token",
                "op-token",
                "workers",
                "--json",
            ])
            .output()
            .expect("nexa workers");
        assert!(out.status.success(), "{}", super::text(&out));
        serde_json::from_slice(&out.stdout).expect("workers json")
    }

    /// The refusal counters `nexa workers` prints (`refused or expired: stale=1 ...`).
    pub fn refusals(&self, p: &super::Project) -> std::collections::BTreeMap<String, u64> {
        let url = self.url("http");
        let out = p
            .cmd(&["--coordinator", &url, "--token", "op-token", "workers"])
            .output()
            .expect("nexa workers");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("refused or expired: "))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// A coordinator on any free port that lets any worker enrol.
    pub fn open(data: &Path) -> Coord {
        Coord::start(data, "127.0.0.1:0", &["--open-enrolment"])
    }

    /// `GET path` on the metrics port: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(
            self.metrics
                .as_deref()
                .expect("started with --metrics-listen"),
            path,
        )
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub struct Worker {
    pub child: Child,
    pub dir: PathBuf,
}

impl Worker {
    /// Starts `nexa-worker join` with its own key and work dir under `dir`; `fake_gpus`
    /// is a JSON list for NEXA_FAKE_GPUS (test builds only).
    pub fn start(
        url: &str,
        dir: &Path,
        slots: u32,
        fake_gpus: Option<&str>,
        extra: &[&str],
    ) -> Worker {
        Self::start_env(url, dir, slots, fake_gpus, extra, &[])
    }

    /// [`Worker::start`] with extra environment variables (e.g. `NEXA_PYTHON`).
    pub fn start_env(
        url: &str,
        dir: &Path,
        slots: u32,
        fake_gpus: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Worker {
        std::fs::create_dir_all(dir).expect("worker dir");
        // The test-only build, which honours NEXA_FAKE_GPUS; the real one never does.
        let mut c = Command::new(bin("nexa-worker-test"));
        c.arg("join")
            .arg(url)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--key")
            .arg(dir.join("worker.key"))
            .args(["--slots", &slots.to_string()])
            .args(extra)
            .env("NEXA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("worker.log")).expect("worker log"),
            ));
        match fake_gpus {
            Some(g) => c.env("NEXA_FAKE_GPUS", g),
            None => c.env_remove("NEXA_FAKE_GPUS"),
        };
        c.envs(env.iter().copied());
        Worker {
            child: c.spawn().expect("start worker"),
            dir: dir.to_path_buf(),
        }
    }

    /// `nexa-worker join URL ARGS` exactly as given (its log in `dir`).
    pub fn start_raw(url: &str, dir: &Path, args: &[&str]) -> Worker {
        std::fs::create_dir_all(dir).expect("worker dir");
        let child = Command::new(bin("nexa-worker-test"))
            .arg("join")
            .arg(url)
            .args(args)
            .env("NEXA_LOG", "info")
            .env_remove("NEXA_FAKE_GPUS")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("worker.log")).expect("worker log"),
            ))
            .spawn()
            .expect("start worker");
        Worker {
            child,
            dir: dir.to_path_buf(),
        }
    }

    pub fn public_key(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(b) = std::fs::read(self.dir.join("worker.key"))
                && b.len() == 32
            {
                let arr: [u8; 32] = b.try_into().expect("32 bytes");
                let vk = ed25519_dalek::SigningKey::from_bytes(&arr).verifying_key();
                return vk.to_bytes().iter().map(|x| format!("{x:02x}")).collect();
            }
            assert!(Instant::now() < deadline, "worker key never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    /// Whether this worker has a job directory right now.
    pub fn running_job(&self) -> bool {
        std::fs::read_dir(self.dir.join("work/jobs"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The address of the worker's metrics port (started with `--metrics-listen`).
    pub fn metrics_addr(&self) -> String {
        let mut addr = None;
        wait_for("the worker's metrics port", Duration::from_secs(20), || {
            addr = self
                .log()
                .lines()
                .find_map(|l| l.strip_prefix("metrics on ").map(str::to_string));
            addr.is_some()
        });
        addr.unwrap_or_default()
    }

    /// Freezes the worker process (not its jobs, which run in their own process groups)
    /// for `d`, as a stalled event loop or a laptop lid would.
    pub fn freeze(&self, d: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        std::thread::sleep(d);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub fn gib(n: u64) -> u64 {
    n << 30
}

pub fn fake_gpu(
    index: u32,
    uuid: &str,
    name: &str,
    mem_gib: u64,
    cc: (u32, u32),
) -> serde_json::Value {
    serde_json::json!({
        "index": index, "uuid": uuid, "name": name, "memory_total": gib(mem_gib),
        "memory_free": gib(mem_gib), "compute_capability": [cc.0, cc.1], "mig_enabled": false
    })
}

/// Waits until `f` holds, or panics with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The operator token every test coordinator is started with.
pub const TOKEN: &str = "op-token";

/// A `nexa` command against `coord`, with the operator token.
pub fn remote(p: &super::Project, coord: &Coord, args: &[&str]) -> Command {
    let url = coord.url("http");
    let mut all: Vec<String> = vec!["--coordinator".into(), url, "--token".into(), TOKEN.into()];
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    p.cmd(&refs)
}

/// `nexa workers --json`.
pub fn workers_json(p: &super::Project, coord: &Coord) -> Vec<serde_json::Value> {
    let out = remote(p, coord, &["workers", "--json"])
        .output()
        .expect("workers");
    assert!(out.status.success(), "{}", super::text(&out));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("json")
}

/// Waits until `n` workers are active.
pub fn wait_workers(p: &super::Project, coord: &Coord, n: usize) {
    wait_for("workers to enrol", Duration::from_secs(20), || {
        workers_json(p, coord)
            .iter()
            .filter(|w| w["state"] == "active")
            .count()
            >= n
    });
}

/// Waits until `n` workers are active and have sent what their runtime probe found
/// (a worker enrols first and sends its runtimes' labels in a heartbeat after).
pub fn wait_probed(p: &super::Project, coord: &Coord, n: usize) {
    wait_for(
        "workers to send their runtimes",
        Duration::from_secs(30),
        || {
            workers_json(p, coord)
                .iter()
                .filter(|w| w["state"] == "active" && w["profile"]["runtimes_pending"] == false)
                .count()
                >= n
        },
    );
}

/// One step's entry in a status JSON.
pub fn step<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["id"] == id))
        .unwrap_or_else(|| panic!("no step {id} in {status}"))
}

/// `nexa pipeline status FILE --json` against `coord`.
pub fn remote_status(p: &super::Project, coord: &Coord, file: &str) -> serde_json::Value {
    let out = remote(p, coord, &["pipeline", "status", file, "--json"])
        .output()
        .expect("status");
    assert!(out.status.success(), "{}", super::text(&out));
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// Makes sure the local Debian base image (`nexa/debian-base:bookworm`) exists, building
/// it with `.ci/base_image.sh` (debootstrap + docker import) when it does not; one
/// builder at a time across test processes.
pub fn base_image() -> &'static str {
    const IMAGE: &str = "nexa/debian-base:bookworm";
    let lock = std::fs::File::create(std::env::temp_dir().join("nexa-base-image.lock"))
        .expect("lock file");
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|held| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/base_image.sh");
            let out = Command::new("bash")
                .arg(script)
                .output()
                .expect("base image script");
            assert!(
                out.status.success(),
                "building the base image failed: {}",
                super::text(&out)
            );
            drop(held);
        })
        .expect("flock");
    IMAGE
}

/// A plain HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// How a [`RawWorker`] asks for leases and reports: one `Lease` and one `Report` call
/// each, or `Exchange` (what `nexa-worker` uses). Wire tests run against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Single,
    Exchange,
}

/// A hand-driven worker over the real gRPC API: it enrols properly, then does whatever a
/// test (playing a malicious volunteer) tells it.
pub struct RawWorker {
    pub client:
        nexa_proto::v1::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    pub session: String,
    pub id: nexa_shared::signing::Identity,
    pub via: Via,
}

impl RawWorker {
    /// Connects to `url` and enrols with a fresh key; leases and reports with single calls.
    pub async fn enrol(url: &str) -> RawWorker {
        Self::enrol_via(url, Via::Single).await
    }

    /// Connects to `url` and enrols with a fresh key; leases and reports `via`.
    pub async fn enrol_via(url: &str, via: Via) -> RawWorker {
        use nexa_proto::v1;
        let mut client = v1::worker_service_client::WorkerServiceClient::connect(url.to_string())
            .await
            .expect("connect");
        let id = nexa_shared::signing::Identity::generate();
        let nonce = client
            .challenge(v1::ChallengeRequest {
                protocol_version: nexa_proto::PROTOCOL_VERSION,
                public_key: id.public_key().to_vec(),
            })
            .await
            .expect("challenge")
            .into_inner()
            .nonce;
        let session = client
            .enrol(v1::EnrolRequest {
                protocol_version: nexa_proto::PROTOCOL_VERSION,
                public_key: id.public_key().to_vec(),
                signature: id.sign_enrolment(&nonce),
                nonce,
                name: "raw".into(),
                slots: 1,
                profile: Some(v1::HardwareProfile {
                    cores: 2,
                    memory_total: 1 << 30,
                    ..Default::default()
                }),
                enrol_token: String::new(),
            })
            .await
            .expect("enrol")
            .into_inner()
            .session_token;
        RawWorker {
            client,
            session,
            id,
            via,
        }
    }

    /// Reports `result` with `Report`, or alone in an `Exchange` that asks for nothing;
    /// the coordinator's verdict.
    pub async fn report(
        &mut self,
        result: nexa_proto::v1::JobResult,
    ) -> Result<nexa_proto::v1::ReportResponse, tonic::Status> {
        use nexa_proto::v1;
        match self.via {
            Via::Single => {
                let req = self.authed(result);
                self.client.report(req).await.map(|r| r.into_inner())
            }
            Via::Exchange => {
                let req = self.authed(v1::ExchangeRequest {
                    results: vec![result],
                    want: 0,
                    wait_ms: 0,
                });
                let mut r = self.client.exchange(req).await?.into_inner();
                assert_eq!(r.verdicts.len(), 1, "one verdict per result");
                assert!(r.leases.is_empty(), "no lease was asked for");
                Ok(r.verdicts.remove(0))
            }
        }
    }

    /// `msg` with this worker's session token.
    pub fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.session).parse().expect("header"),
        );
        req
    }

    /// Waits up to `secs` for a lease.
    pub async fn lease(&mut self, secs: u64) -> nexa_shared::job::Lease {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = match self.via {
                Via::Single => {
                    let req = self.authed(nexa_proto::v1::LeaseRequest { wait_ms: 1000 });
                    self.client.lease(req).await.expect("lease").into_inner()
                }
                Via::Exchange => {
                    let req = self.authed(nexa_proto::v1::ExchangeRequest {
                        results: Vec::new(),
                        want: 1,
                        wait_ms: 1000,
                    });
                    let r = self.client.exchange(req).await.expect("exchange");
                    let mut leases = r.into_inner().leases;
                    assert!(leases.len() <= 1, "one lease asked for");
                    leases.pop().unwrap_or_default()
                }
            };
            if let Some(l) = r.lease {
                return nexa_proto::convert::lease_from_wire(l, r.gpu_uuids).expect("lease");
            }
            assert!(Instant::now() < deadline, "no lease in {secs} s");
        }
    }

    /// A signed, succeeded result for `lease` naming one file `out/<path>` of `content`.
    pub fn result(
        &self,
        lease: &nexa_shared::job::Lease,
        output: &str,
        path: &str,
        content: &[u8],
    ) -> nexa_proto::v1::JobResult {
        let mut r = nexa_shared::job::JobResult {
            job_id: lease.job.job_id.clone(),
            generation: lease.generation,
            attempt: lease.attempt,
            outcome: nexa_shared::job::Outcome::Succeeded,
            exit_code: Some(0),
            outputs: vec![nexa_shared::job::OutputFile {
                output: output.into(),
                path: path.into(),
                size: content.len() as u64,
                digest: nexa_shared::digest::format(&blake3::hash(content)).into(),
            }],
            started_ms: 1,
            ended_ms: 2,
            error: String::new(),
            staging: None,
            log: None,
            progress: None,
            worker_key: [0; 32],
            signature: Vec::new(),
        };
        self.id.sign_result(&mut r);
        nexa_proto::v1::JobResult::from(&r)
    }

    /// An upload chunk for `lease`.
    pub fn chunk(
        lease: &nexa_shared::job::Lease,
        output: &str,
        path: &str,
        offset: u64,
        data: &[u8],
        whole: &[u8],
    ) -> nexa_proto::v1::UploadChunk {
        nexa_proto::v1::UploadChunk {
            job_id: lease.job.job_id.to_string(),
            generation: lease.generation,
            output: output.into(),
            path: path.into(),
            offset,
            data: data.to_vec(),
            size: whole.len() as u64,
            digest: nexa_shared::digest::format(&blake3::hash(whole)),
        }
    }

    /// Uploads `content` as `output/path` for `lease` in one stream.
    pub async fn upload(
        &mut self,
        lease: &nexa_shared::job::Lease,
        output: &str,
        path: &str,
        content: &[u8],
    ) -> Result<nexa_proto::v1::UploadResponse, tonic::Status> {
        let c = Self::chunk(lease, output, path, 0, content, content);
        let req = self.authed(tokio_stream::iter(vec![c]));
        self.client.upload(req).await.map(|r| r.into_inner())
    }
}
