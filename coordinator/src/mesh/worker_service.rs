//! `nexa.v1.WorkerService`.

use super::MeshConfig;
use super::uploads::{Gates, Incoming};
use crate::Coordinator;
use crate::scheduler::{EdgeRefusal, LeaseCheck, Want};
use nexa_proto::v1;
use nexa_proto::v1::worker_service_server::WorkerService;
use nexa_shared::hardware::Profile;
use nexa_shared::ids::JobId;
use nexa_shared::job::JobResult;
use nexa_shared::{paths, signing};
use rand_core::RngCore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// How long an enrolment challenge stays valid.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);

/// The key a challenge nonce was issued for, and when.
type IssuedChallenge = ([u8; 32], Instant);

/// The most challenges outstanding at once; past it new ones are refused until some
/// expire (issued ones are never voided by newer ones).
const MAX_CHALLENGES: usize = 65_536;

/// A session: its worker and when it was last used.
#[derive(Debug, Clone)]
struct Session {
    worker: String,
    used: Instant,
}

/// The worker service's state.
#[derive(Debug)]
pub struct WorkerApi {
    pub(super) coord: Coordinator,
    pub(super) cfg: MeshConfig,
    nonces: Mutex<HashMap<[u8; 32], IssuedChallenge>>,
    sessions: Mutex<HashMap<String, Session>>,
    pub(super) served: Mutex<HashMap<String, Served>>,
    /// Per worker: the digests its leases named, with the attempts that named them.
    pub(super) leased_inputs: Mutex<HashMap<String, LeasedInputs>>,
    pub(super) gates: Gates,
}

/// One worker's leased inputs: digest → the `(job, generation)` attempts that named it.
pub(super) type LeasedInputs = HashMap<String, Vec<(String, u64)>>;

/// How many attempts per (worker, input) are remembered; an attempt that expired
/// without a report is forgotten first.
pub(super) const MAX_ATTEMPTS_PER_INPUT: usize = 64;

/// An input a lease named, so that its worker may fetch it by digest.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub(super) path: PathBuf,
    pub(super) is_dir: bool,
    /// A range shard: streamed from these spans of its input.
    pub(super) range: Option<std::sync::Arc<nexa_shared::shard::Range>>,
    /// When a lease last named it.
    pub(super) at: Instant,
}

/// How many inputs are kept fetchable before the least recently leased are forgotten
/// (a forgotten input is fetchable again as soon as another lease names it).
pub(super) const MAX_SERVED: usize = 65_536;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
            leased_inputs: Mutex::new(HashMap::new()),
            gates: Gates::default(),
        }
    }

    /// The worker id behind the call's session token.
    pub(super) fn worker<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = super::auth::bearer(req.metadata())
            .ok_or_else(|| Status::unauthenticated("missing session token: enrol first"))?;
        let idle = self.session_idle();
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(token) {
            Some(s) if s.used.elapsed() < idle => {
                s.used = Instant::now();
                Ok(s.worker.clone())
            }
            Some(_) => {
                sessions.remove(token);
                Err(Status::unauthenticated("session expired: enrol again"))
            }
            None => Err(Status::unauthenticated("unknown session: enrol again")),
        }
    }

    /// How long a session lives unused: a live worker heartbeats every interval, so one
    /// silent for many lease lifetimes is gone (it re-enrols if it comes back).
    fn session_idle(&self) -> Duration {
        (self.cfg.lease_ttl * 20).max(Duration::from_secs(60))
    }

    /// Completes one received file, counting a digest or size mismatch as a refusal.
    async fn finish(&self, f: Incoming) -> Result<u64, Status> {
        // The digest check, the fsync and the rename into the staging tree (refused once
        // the attempt was reported) are one blocking step.
        let r = tokio::task::spawn_blocking(move || f.finish())
            .await
            .map_err(super::status::join)?;
        r.inspect_err(|s| {
            if s.code() == tonic::Code::DataLoss {
                self.coord.count_refusal(EdgeRefusal::UploadDigest);
            }
        })
    }

    /// Refuses unless `(job, generation)` is leased to `worker` now.
    async fn require_lease(&self, worker: &str, job: &str, generation: u64) -> Result<(), Status> {
        let check = self.coord.lease_live(worker, job, generation).await?;
        match check {
            LeaseCheck::Live => return Ok(()),
            LeaseCheck::Stale => self.coord.count_refusal(EdgeRefusal::StaleUpload),
            LeaseCheck::Unknown => self.coord.count_refusal(EdgeRefusal::NoLease),
        }
        Err(Status::failed_precondition(format!(
            "job {job} generation {generation} is not leased to this worker"
        )))
    }

    /// Forgets the inputs the attempt `(job, generation)` named for `worker` (its result
    /// came in). Only that attempt: a stale attempt reporting late must not take the
    /// inputs away from a newer lease of the same job on the same worker.
    pub(super) fn forget_inputs(&self, worker: &str, job: &str, generation: u64) {
        let mut leased = lock(&self.leased_inputs);
        if let Some(mine) = leased.get_mut(worker) {
            mine.retain(|_, attempts| {
                attempts.retain(|(j, g)| !(j == job && *g == generation));
                !attempts.is_empty()
            });
        }
    }

    pub(super) fn staging(&self, worker: &str, job_id: &str, generation: u64) -> PathBuf {
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
pub(super) fn forget_oldest(served: &mut HashMap<String, Served>, keep: usize) {
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
        if nonces.len() >= MAX_CHALLENGES {
            nonces.retain(|_, (_, at)| at.elapsed() < CHALLENGE_TTL);
        }
        if nonces.len() >= MAX_CHALLENGES {
            // Overload: UNAVAILABLE, which clients retry.
            return Err(Status::unavailable(
                "too many enrolments pending: try again shortly",
            ));
        }
        // Keyed by the nonce: asking for a challenge never voids one already issued.
        nonces.insert(nonce, (key, Instant::now()));
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
            && !super::auth::secrets_equal(r.enrol_token.as_bytes(), expected.as_bytes())
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
        // The nonce is single-use and must be one this coordinator issued for this key.
        let issued = <[u8; 32]>::try_from(r.nonce.as_slice())
            .ok()
            .and_then(|n| lock(&self.nonces).remove(&n));
        match issued {
            Some((for_key, at)) if at.elapsed() < CHALLENGE_TTL && for_key == key => {}
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
        self.coord.register_worker(
            &worker_id,
            crate::scheduler::WorkerInfo {
                name: r.name.clone(),
                key,
                profile,
                slots,
            },
        )?;
        let token = hex::encode(random32());
        {
            // A new enrolment ends the worker's earlier sessions, and expired ones go.
            let idle = self.session_idle();
            let mut sessions = lock(&self.sessions);
            sessions.retain(|_, s| s.worker != worker_id && s.used.elapsed() < idle);
            sessions.insert(
                token.clone(),
                Session {
                    worker: worker_id.clone(),
                    used: Instant::now(),
                },
            );
        }
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
        let wait = Duration::from_millis(req.get_ref().wait_ms);
        let one = Want {
            slots: 1,
            wait: true,
        };
        let leases = self.leases(&worker, one, wait).await?;
        Ok(Response::new(leases.into_iter().next().unwrap_or_default()))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let worker = self.worker(&req)?;
        let r = req.into_inner();
        for j in &r.running {
            if let Some(p) = &j.progress
                && let Ok(p) = nexa_shared::job::JobProgress::try_from(*p)
            {
                // Best effort: progress lost to an overloaded loop is only a stale bar.
                let _ = self.coord.job_progress(
                    &worker,
                    JobId::from(j.job_id.clone()),
                    j.generation,
                    p,
                );
            }
        }
        let running = r
            .running
            .into_iter()
            .map(|j| (JobId::from(j.job_id), j.generation))
            .collect();
        let services = r
            .services
            .into_iter()
            .map(|s| crate::scheduler::ServiceBeat {
                job_id: JobId::from(s.job_id),
                generation: s.generation,
                healthy: s.healthy,
                detail: s.detail,
                gpu_uuids: s.gpu_uuids,
            })
            .collect();
        let beat = crate::scheduler::Beat {
            running,
            services,
            profile: r.profile.map(Profile::from),
        };
        let Some(answer) = self.coord.beat(&worker, beat).await? else {
            // Its leases are not extended (they expire and its jobs move); it stays
            // enrolled, so that an operator who re-activates it gets it back at once.
            return Err(Status::permission_denied(
                "this worker is banned by the coordinator's operator",
            ));
        };
        Ok(Response::new(v1::HeartbeatResponse {
            cancel: answer
                .cancel
                .into_iter()
                .map(|(job_id, generation)| v1::RunningJob {
                    job_id: job_id.into_string(),
                    generation,
                    progress: None,
                })
                .collect(),
            stop_services: answer
                .stop_services
                .into_iter()
                .map(|(job_id, generation, grace)| v1::StopService {
                    job_id: job_id.into_string(),
                    generation,
                    grace_ms: grace.as_millis() as u64,
                })
                .collect(),
        }))
    }

    async fn upload(
        &self,
        req: Request<Streaming<v1::UploadChunk>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let worker = self.worker(&req)?;
        if let Some(g) = &self.cfg.disk {
            g.refusal().map_err(Status::unavailable)?;
        }
        let mut stream = req.into_inner();
        let mut current: Option<Incoming> = None;
        // The attempt the last file was for, with its gate: checked once per attempt.
        let mut attempt: Option<((String, u64), PathBuf, std::sync::Arc<super::uploads::Gate>)> =
            None;
        let (mut files, mut bytes) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            let same = current
                .as_ref()
                .is_some_and(|f| f.name() == format!("{}/{}", c.output, c.path));
            if !same {
                if let Some(f) = current.take() {
                    bytes += self.finish(f).await?;
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
                let key = (c.job_id.clone(), c.generation);
                if attempt.as_ref().is_none_or(|(k, _, _)| *k != key) {
                    let staging = self.staging(&worker, &c.job_id, c.generation);
                    // The gate is taken before the lease is checked, so a report that
                    // lands in between still closes it.
                    let gate = self.gates.open(&staging);
                    self.require_lease(&worker, &c.job_id, c.generation).await?;
                    attempt = Some((key, staging, gate));
                }
                let Some((_, staging, gate)) = attempt.as_ref() else {
                    continue;
                };
                gate.reserve(c.size, self.cfg.max_upload_job)?;
                let dest = staging.join(&c.output).join(rel);
                let (name, staging, gate) = (
                    format!("{}/{}", c.output, c.path),
                    staging.clone(),
                    gate.clone(),
                );
                let (size, digest) = (c.size, c.digest.clone());
                // File I/O runs on the blocking pool, never on the runtime.
                current = Some(
                    super::status::blocking(move || {
                        Incoming::create(name, &staging, dest, size, digest, gate)
                    })
                    .await?,
                );
            }
            let Some(f) = current.take() else { continue };
            current = Some(
                super::status::blocking(move || {
                    let mut f = f;
                    f.write(c.offset, &c.data).map(|()| f)
                })
                .await?,
            );
        }
        if let Some(f) = current.take() {
            bytes += self.finish(f).await?;
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
        let result = JobResult::try_from(req.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = self.prepare_report(&worker, result).await?;
        let verdict = self.coord.report_judged(&worker, result).await?;
        Ok(Response::new(v1::ReportResponse {
            accepted: verdict.is_ok(),
            reason: verdict.err().unwrap_or_default(),
        }))
    }

    async fn exchange(
        &self,
        req: Request<v1::ExchangeRequest>,
    ) -> Result<Response<v1::ExchangeResponse>, Status> {
        let worker = self.worker(&req)?;
        // Armed, it plays a coordinator from before `Exchange` (workers fall back).
        nexa_shared::fail_point!(
            "exchange.call",
            Status::unimplemented("exchange is not served (fail point exchange.call)")
        );
        self.exchange_for(&worker, req.into_inner())
            .await
            .map(Response::new)
    }

    type FetchStream = FetchStream;

    async fn fetch(
        &self,
        req: Request<v1::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let worker = self.worker(&req)?;
        let digest = req.into_inner().digest;
        // Only an attempt leased to this worker that named this input may fetch it.
        let attempts = lock(&self.leased_inputs)
            .get(&worker)
            .and_then(|m| m.get(&digest))
            .cloned()
            .unwrap_or_default();
        let mut live = false;
        for (job, generation) in attempts.iter().rev() {
            if self.coord.lease_live(&worker, job, *generation).await? == LeaseCheck::Live {
                live = true;
                break;
            }
        }
        if !live {
            self.coord.count_refusal(EdgeRefusal::NoLease);
            return Err(Status::permission_denied(format!(
                "no live lease of this worker names input {digest}"
            )));
        }
        let Served {
            path,
            is_dir,
            range,
            ..
        } = lock(&self.served)
            .get(&digest)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no input {digest} is being served")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let metrics = self.cfg.metrics.clone();
        self.coord.tasks().spawn_blocking("input fetch", move || {
            let send = |c: Result<v1::FetchChunk, Status>| tx.blocking_send(c).is_ok();
            if let Some(r) = range {
                if stream_range(&r, &send) {
                    crate::metrics::count_bytes(metrics.as_ref(), "out", r.len());
                }
                return;
            }
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
    stream(rel, is_dir, send, |emit| {
        nexa_proto::chunks::send_file(p, emit)
    })
}

/// Streams a range shard as `FetchChunk`s, as the part would be streamed were it
/// written out: one file, or a directory holding its one file.
fn stream_range(
    r: &nexa_shared::shard::Range,
    send: &dyn Fn(Result<v1::FetchChunk, Status>) -> bool,
) -> bool {
    let rel = r.inner.as_deref().unwrap_or_default();
    stream(rel, r.inner.is_some(), send, |emit| {
        let reader = r
            .reader()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        nexa_proto::chunks::send_reader(reader, r.len(), emit)
    })
}

/// Sends what `read` hands out as `FetchChunk`s of `rel`; an error is sent as one.
fn stream(
    rel: &str,
    is_dir: bool,
    send: &dyn Fn(Result<v1::FetchChunk, Status>) -> bool,
    read: impl FnOnce(&mut dyn FnMut(u64, &[u8]) -> bool) -> std::io::Result<bool>,
) -> bool {
    let mut emit = |offset: u64, data: &[u8]| {
        send(Ok(v1::FetchChunk {
            path: rel.to_string(),
            offset,
            data: data.to_vec(),
            is_dir,
        }))
    };
    match read(&mut emit) {
        Ok(all) => all,
        Err(e) => {
            send(Err(Status::internal(e.to_string())));
            false
        }
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
                    range: None,
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
