//! `nexa.v1.WorkerService`.

use super::MeshConfig;
use crate::Coordinator;
use crate::engine::EdgeRefusal;
use nexa_proto::v1;
use nexa_proto::v1::worker_service_server::WorkerService;
use nexa_shared::hardware::Profile;
use nexa_shared::job::JobResult;
use nexa_shared::{paths, signing};
use rand_core::RngCore;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// How long an enrolment challenge stays valid.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// Size of the pieces inputs are streamed in.
const CHUNK: usize = 1 << 20;

/// A challenge nonce and when it was issued.
type IssuedChallenge = ([u8; 32], Instant);

/// The worker service's state.
#[derive(Debug)]
pub struct WorkerApi {
    coord: Coordinator,
    cfg: MeshConfig,
    nonces: Mutex<HashMap<[u8; 32], IssuedChallenge>>,
    sessions: Mutex<HashMap<String, String>>,
    served: Mutex<HashMap<String, Served>>,
}

/// An input a lease named, so that its worker may fetch it by digest.
#[derive(Debug, Clone)]
struct Served {
    path: PathBuf,
    is_dir: bool,
    /// When a lease last named it.
    at: Instant,
}

/// How many inputs are kept fetchable before the least recently leased are forgotten
/// (a forgotten input is fetchable again as soon as another lease names it).
const MAX_SERVED: usize = 65_536;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut b);
    b
}

impl WorkerApi {
    /// A service over `coord`.
    pub fn new(coord: Coordinator, cfg: MeshConfig) -> Self {
        Self {
            coord,
            cfg,
            nonces: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
        }
    }

    /// The worker id behind the call's session token.
    fn worker<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing session token: enrol first"))?;
        lock(&self.sessions)
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown session: enrol again"))
    }

    /// Completes one received file, counting a digest or size mismatch as a refusal.
    fn finish(&self, f: Incoming) -> Result<u64, Status> {
        f.finish().inspect_err(|s| {
            if s.code() == tonic::Code::DataLoss {
                self.coord.count_refusal(EdgeRefusal::UploadDigest);
            }
        })
    }

    fn staging(&self, worker: &str, job_id: &str, generation: u64) -> PathBuf {
        self.cfg
            .data_dir
            .join("staging")
            .join(paths::safe_component(worker))
            .join(format!(
                "{}-g{generation}",
                paths::safe_component(&job_id.replace('/', "_"))
            ))
    }
}

/// Keeps the `keep` most recently leased inputs.
fn forget_oldest(served: &mut HashMap<String, Served>, keep: usize) {
    let mut ages: Vec<Instant> = served.values().map(|s| s.at).collect();
    ages.sort_unstable_by(|a, b| b.cmp(a));
    if let Some(&cutoff) = ages.get(keep) {
        served.retain(|_, s| s.at > cutoff);
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v != nexa_proto::PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {v} is not supported; this coordinator speaks {}",
            nexa_proto::PROTOCOL_VERSION
        )));
    }
    Ok(())
}

/// One file being received.
struct Incoming {
    path: PathBuf,
    name: String,
    file: std::fs::File,
    hasher: blake3::Hasher,
    written: u64,
    size: u64,
    digest: String,
}

impl Incoming {
    fn finish(self) -> Result<u64, Status> {
        if self.written != self.size {
            let _ = std::fs::remove_file(&self.path);
            return Err(Status::data_loss(format!(
                "upload of {} ended at {} of {} bytes",
                self.name, self.written, self.size
            )));
        }
        let got = nexa_shared::digest::format(&self.hasher.finalize());
        if got != self.digest {
            let _ = std::fs::remove_file(&self.path);
            return Err(Status::data_loss(format!(
                "upload of {} is {got}, not the declared {}",
                self.name, self.digest
            )));
        }
        self.file
            .sync_all()
            .map_err(|e| Status::internal(format!("fsync {}: {e}", self.name)))?;
        Ok(self.written)
    }
}

type FetchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn challenge(
        &self,
        req: Request<v1::ChallengeRequest>,
    ) -> Result<Response<v1::ChallengeResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        let key: [u8; 32] = r
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("public_key must be 32 bytes"))?;
        let nonce = random32();
        let mut nonces = lock(&self.nonces);
        nonces.retain(|_, (_, at)| at.elapsed() < CHALLENGE_TTL);
        nonces.insert(key, (nonce, Instant::now()));
        Ok(Response::new(v1::ChallengeResponse {
            nonce: nonce.to_vec(),
        }))
    }

    async fn enrol(
        &self,
        req: Request<v1::EnrolRequest>,
    ) -> Result<Response<v1::EnrolResponse>, Status> {
        let r = req.into_inner();
        check_version(r.protocol_version)?;
        if let Some(expected) = &self.cfg.enrol_token
            && &r.enrol_token != expected
        {
            return Err(Status::unauthenticated(
                "enrolment needs the operator's enrolment token",
            ));
        }
        let key: [u8; 32] = r
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("public_key must be 32 bytes"))?;
        // The nonce is single-use and must be the one this coordinator issued for this key.
        let issued = lock(&self.nonces).remove(&key);
        match issued {
            Some((nonce, at))
                if at.elapsed() < CHALLENGE_TTL && nonce.as_slice() == r.nonce.as_slice() => {}
            _ => {
                return Err(Status::permission_denied(
                    "unknown or expired challenge: ask for a new one",
                ));
            }
        }
        signing::verify_enrolment(&key, &r.nonce, &r.signature)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let profile = Profile::from(r.profile.unwrap_or_default());
        let worker_id = hex::encode(&key[..8]);
        let slots = r.slots.clamp(1, 4096);
        tracing::info!(worker = %worker_id, name = %r.name, gpus = profile.gpus.len(), slots, "worker enrolled over gRPC");
        self.coord
            .register_worker(
                &worker_id,
                crate::engine::WorkerInfo {
                    name: r.name.clone(),
                    key,
                    profile,
                    slots,
                },
            )
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let token = hex::encode(random32());
        lock(&self.sessions).insert(token.clone(), worker_id.clone());
        Ok(Response::new(v1::EnrolResponse {
            worker_id,
            session_token: token,
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
        }))
    }

    async fn lease(
        &self,
        req: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::LeaseResponse>, Status> {
        let worker = self.worker(&req)?;
        let wait = Duration::from_millis(req.get_ref().wait_ms).min(self.cfg.max_lease_wait);
        let lease = match tokio::time::timeout(wait, self.coord.lease(&worker)).await {
            Ok(Some(l)) => l,
            Ok(None) => return Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => return Ok(Response::new(v1::LeaseResponse::default())),
        };
        {
            let mut served = lock(&self.served);
            let now = Instant::now();
            for i in &lease.job.inputs {
                served.insert(
                    i.digest.clone(),
                    Served {
                        path: i.source.clone(),
                        is_dir: i.is_dir,
                        at: now,
                    },
                );
            }
            if served.len() > MAX_SERVED {
                forget_oldest(&mut served, MAX_SERVED / 2);
            }
        }
        Ok(Response::new(v1::LeaseResponse {
            lease: Some(v1::Lease::from(&lease)),
            gpu_uuids: lease.gpus.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let worker = self.worker(&req)?;
        let r = req.into_inner();
        let running = r
            .running
            .into_iter()
            .map(|j| (j.job_id, j.generation))
            .collect();
        let cancel = self
            .coord
            .heartbeat(&worker, running, r.profile.map(Profile::from))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::HeartbeatResponse {
            cancel: cancel
                .into_iter()
                .map(|(job_id, generation)| v1::RunningJob { job_id, generation })
                .collect(),
        }))
    }

    async fn upload(
        &self,
        req: Request<Streaming<v1::UploadChunk>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let worker = self.worker(&req)?;
        let mut stream = req.into_inner();
        let mut current: Option<Incoming> = None;
        let (mut files, mut bytes) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            let same = current
                .as_ref()
                .is_some_and(|f| f.name == format!("{}/{}", c.output, c.path));
            if !same {
                if let Some(f) = current.take() {
                    bytes += self.finish(f)?;
                    files += 1;
                }
                if c.output.is_empty() || paths::safe_component(&c.output) != c.output {
                    self.coord.count_refusal(EdgeRefusal::UnsafeName);
                    return Err(Status::invalid_argument(format!(
                        "output name {:?} is not allowed",
                        c.output
                    )));
                }
                let rel = paths::check_relative_name(&c.path).map_err(|e| {
                    self.coord.count_refusal(EdgeRefusal::UnsafeName);
                    Status::invalid_argument(e.to_string())
                })?;
                if c.size > self.cfg.max_upload_file {
                    return Err(Status::resource_exhausted(format!(
                        "{} is {} bytes; the limit is {}",
                        c.path, c.size, self.cfg.max_upload_file
                    )));
                }
                let path = self
                    .staging(&worker, &c.job_id, c.generation)
                    .join(&c.output)
                    .join(rel);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Status::internal(format!("staging: {e}")))?;
                }
                let file = std::fs::File::create(&path)
                    .map_err(|e| Status::internal(format!("staging: {e}")))?;
                current = Some(Incoming {
                    path,
                    name: format!("{}/{}", c.output, c.path),
                    file,
                    hasher: blake3::Hasher::new(),
                    written: 0,
                    size: c.size,
                    digest: c.digest.clone(),
                });
            }
            let Some(f) = current.as_mut() else { continue };
            if c.offset != f.written {
                return Err(Status::invalid_argument(format!(
                    "{}: chunk at {} but {} bytes written",
                    f.name, c.offset, f.written
                )));
            }
            if f.written + c.data.len() as u64 > f.size {
                return Err(Status::resource_exhausted(format!(
                    "{}: more bytes than declared",
                    f.name
                )));
            }
            f.hasher.update(&c.data);
            f.file
                .write_all(&c.data)
                .map_err(|e| Status::internal(format!("staging: {e}")))?;
            f.written += c.data.len() as u64;
        }
        if let Some(f) = current.take() {
            bytes += self.finish(f)?;
            files += 1;
        }
        crate::metrics::count_bytes(self.cfg.metrics.as_ref(), "in", bytes);
        Ok(Response::new(v1::UploadResponse { files, bytes }))
    }

    async fn report(
        &self,
        req: Request<v1::JobResult>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let worker = self.worker(&req)?;
        let mut result = JobResult::try_from(req.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Uploads created the staging directory; a job with no files and no log has none
        // (the sealer then seals an empty payload).
        let staging = self.staging(&worker, &result.job_id, result.generation);
        let log = staging.join(".log").join("log");
        result.log = log.is_file().then_some(log);
        result.staging = Some(staging);
        self.coord
            .report(&worker, result)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::ReportResponse {
            accepted: true,
            reason: String::new(),
        }))
    }

    type FetchStream = FetchStream;

    async fn fetch(
        &self,
        req: Request<v1::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        self.worker(&req)?;
        let digest = req.into_inner().digest;
        let Served { path, is_dir, .. } = lock(&self.served)
            .get(&digest)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no input {digest} is being served")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let metrics = self.cfg.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let send = |c: Result<v1::FetchChunk, Status>| tx.blocking_send(c).is_ok();
            let files: Vec<(String, PathBuf)> = if is_dir {
                match nexa_shared::artifact::input_files(&path) {
                    Ok(f) => f.into_iter().map(|(rel, p, _)| (rel, p)).collect(),
                    Err(e) => {
                        send(Err(Status::internal(e.to_string())));
                        return;
                    }
                }
            } else {
                vec![(String::new(), path.clone())]
            };
            for (rel, p) in files {
                if !stream_file(&rel, &p, is_dir, &send) {
                    return;
                }
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                crate::metrics::count_bytes(metrics.as_ref(), "out", size);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Streams one file as `FetchChunk`s (at least one, so empty files arrive too); false
/// when the receiver went away or reading failed (the error was sent).
pub(super) fn stream_file(
    rel: &str,
    p: &Path,
    is_dir: bool,
    send: &dyn Fn(Result<v1::FetchChunk, Status>) -> bool,
) -> bool {
    let mut f = match std::fs::File::open(p) {
        Ok(f) => f,
        Err(e) => {
            send(Err(Status::internal(format!("open {}: {e}", p.display()))));
            return false;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                send(Err(Status::internal(format!("read {}: {e}", p.display()))));
                return false;
            }
        };
        // Every file sends at least one chunk, so empty files arrive too.
        if n == 0 && offset > 0 {
            return true;
        }
        let ok = send(Ok(v1::FetchChunk {
            path: rel.to_string(),
            offset,
            data: buf[..n].to_vec(),
            is_dir,
        }));
        if !ok {
            return false;
        }
        if n == 0 {
            return true;
        }
        offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_inputs_stay_bounded_and_keep_the_most_recent() {
        let mut served = HashMap::new();
        let t0 = Instant::now();
        for i in 0..10u64 {
            served.insert(
                format!("d{i}"),
                Served {
                    path: PathBuf::from(format!("/in/{i}")),
                    is_dir: false,
                    at: t0 + Duration::from_millis(i),
                },
            );
        }
        forget_oldest(&mut served, 4);
        let mut left: Vec<&String> = served.keys().collect();
        left.sort();
        assert_eq!(left, ["d6", "d7", "d8", "d9"]);
    }
}
