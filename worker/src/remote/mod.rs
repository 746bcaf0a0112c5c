//! The worker's side of the mesh: a [`CoordinatorLink`] over gRPC. It enrols by signing
//! the coordinator's challenge, long-polls for leases, sends heartbeats that keep its
//! leases alive (and carry cancellations back), streams inputs in by digest and outputs
//! out in chunks, and re-enrols or backs off and retries whenever the coordinator is
//! away, forever.

mod exchanger;

use crate::CoordinatorLink;
use nexa_proto::convert;
use nexa_proto::retry::{OnError, on_error};
use nexa_proto::v1;
use nexa_proto::v1::worker_service_client::WorkerServiceClient;
use nexa_shared::hardware::Profile;
use nexa_shared::job::{JobInput, JobResult, Lease};
use nexa_shared::signing::Identity;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The upload name of a job's log (not an output: never sealed).
pub const LOG_OUTPUT: &str = ".log";

/// Who this worker is, for (re-)enrolment.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// Display name.
    pub name: String,
    /// Jobs at once.
    pub slots: u32,
    /// Hardware.
    pub profile: Profile,
    /// The operator's enrolment token, when enrolment is not open.
    pub token: Option<String>,
}

#[derive(Debug, Default, Clone)]
struct Session {
    token: String,
    worker_id: String,
    heartbeat: Duration,
}

/// A coordinator reached over gRPC.
/// Produces a fresh hardware profile (free memory, free GPU memory).
pub type Profiler = Arc<dyn Fn() -> Profile + Send + Sync>;

/// A coordinator reached over gRPC.
pub struct GrpcLink {
    profiler: Mutex<Option<Profiler>>,
    client: WorkerServiceClient<Channel>,
    identity: Arc<Identity>,
    enrolment: Mutex<Enrolment>,
    session: Mutex<Session>,
    /// Attempts running here, by (job, generation): a job can be leased here again
    /// while its older attempt is still being killed.
    running: Mutex<HashMap<(String, u64), watch::Sender<bool>>>,
    /// What running attempts said of their progress since the last heartbeat.
    progress: Mutex<HashMap<(String, u64), nexa_shared::job::JobProgress>>,
    metrics: Mutex<Option<Arc<crate::metrics::WorkerMetrics>>>,
    /// The services this worker hosts (`--services`), reported in every heartbeat.
    services: Mutex<Option<Arc<crate::services::ServiceTable>>>,
    /// One enrolment at a time: the heartbeat and every slot notice a lost session at
    /// once, and concurrent challenges would void each other.
    enrolling: tokio::sync::Mutex<()>,
    /// Counts successful enrolments, so a caller that waited knows one just happened.
    enrolments: std::sync::atomic::AtomicU64,
    /// The profile changed (runtimes probed after enrolment): the next heartbeat
    /// carries it, and is sent at once ([`GrpcLink::runtimes_probed`]).
    profile_due: std::sync::atomic::AtomicBool,
    beat_now: tokio::sync::Notify,
    /// Reports and lease asks batched into `Exchange` calls.
    pump: exchanger::Pump,
    /// This link, for the pump's task.
    me: std::sync::Weak<GrpcLink>,
}

impl Drop for GrpcLink {
    fn drop(&mut self) {
        self.pump.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An endpoint for `url`, with TLS trusting `ca_pem` when given.
pub fn channel_endpoint(
    url: &str,
    ca_pem: Option<Vec<u8>>,
) -> Result<tonic::transport::Endpoint, String> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| format!("coordinator address {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Some(Duration::from_secs(10)))
        // A connection whose peer vanished (a cut network, a killed container) is noticed
        // within seconds and replaced, instead of calls hanging on it for the kernel's
        // retransmission timeout (minutes).
        .http2_keep_alive_interval(Duration::from_secs(3))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(ca) = ca_pem {
        let host = endpoint.uri().host().unwrap_or("localhost").to_string();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(host);
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
    }
    Ok(endpoint)
}

/// Exponential backoff from 100 ms to 10 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(7))).min(Duration::from_secs(10))
}

impl GrpcLink {
    /// A link to `url` (`http://host:port`, or `https://` with `ca_pem` the CA to
    /// trust); connects lazily and reconnects on its own.
    pub fn new(
        url: &str,
        identity: Arc<Identity>,
        enrolment: Enrolment,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Arc<Self>, String> {
        let endpoint = channel_endpoint(url, ca_pem)?;
        let client =
            WorkerServiceClient::new(endpoint.connect_lazy()).max_decoding_message_size(8 << 20);
        Ok(Arc::new_cyclic(|me| Self {
            profiler: Mutex::new(None),
            client,
            identity,
            enrolment: Mutex::new(enrolment),
            session: Mutex::new(Session::default()),
            running: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            metrics: Mutex::new(None),
            services: Mutex::new(None),
            enrolling: tokio::sync::Mutex::new(()),
            enrolments: std::sync::atomic::AtomicU64::new(0),
            profile_due: std::sync::atomic::AtomicBool::new(false),
            beat_now: tokio::sync::Notify::new(),
            pump: exchanger::Pump::default(),
            me: me.clone(),
        }))
    }

    /// This link, weakly (the pump's task must not keep it alive).
    pub(crate) fn weak(&self) -> std::sync::Weak<GrpcLink> {
        self.me.clone()
    }

    /// One `Exchange` call with the session.
    pub(crate) async fn exchange(
        &self,
        req: v1::ExchangeRequest,
    ) -> Result<v1::ExchangeResponse, Status> {
        let mut client = self.client.clone();
        Ok(client.exchange(self.authed(req)).await?.into_inner())
    }

    /// Reports one result with `Report` (a coordinator that does not know `Exchange`),
    /// retried as any report.
    pub(crate) async fn report_alone(&self, result: &v1::JobResult) -> exchanger::Delivered {
        let resp = self
            .retrying(8, || async {
                let mut client = self.client.clone();
                client.report(self.authed(result.clone())).await
            })
            .await?
            .into_inner();
        Ok(if resp.accepted {
            Ok(())
        } else {
            Err(resp.reason)
        })
    }

    /// Exports heartbeat outcomes to `m` (connected, failures).
    pub fn set_metrics(&self, m: Arc<crate::metrics::WorkerMetrics>) {
        *lock(&self.metrics) = Some(m);
    }

    /// Reports `table`'s services in heartbeats and stops them when the coordinator
    /// says so.
    pub fn set_services(&self, table: Arc<crate::services::ServiceTable>) {
        *lock(&self.services) = Some(table);
    }

    /// Sets how heartbeats re-read the hardware (every 15th one).
    pub fn set_profiler(&self, p: Profiler) {
        *lock(&self.profiler) = Some(p);
    }

    /// The runtimes probed after enrolment (their labels; one the operator set with
    /// `--label` is kept): the profile stops being `runtimes_pending` and goes to the
    /// coordinator in a heartbeat sent now.
    pub fn runtimes_probed(&self, labels: std::collections::BTreeMap<String, String>) {
        {
            let mut e = lock(&self.enrolment);
            for (k, v) in labels {
                e.profile.labels.entry(k).or_insert(v);
            }
            e.profile.runtimes_pending = false;
        }
        self.profile_due
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.beat_now.notify_one();
    }

    /// The id the coordinator gave this worker (empty before enrolment).
    pub fn worker_id(&self) -> String {
        lock(&self.session).worker_id.clone()
    }

    fn authed<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let token = lock(&self.session).token.clone();
        if let Ok(v) = format!("Bearer {token}").parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    /// Enrols: asks for a challenge, signs it, presents profile and token.
    pub async fn enrol(&self) -> Result<(), Status> {
        use std::sync::atomic::Ordering;
        let seen = self.enrolments.load(Ordering::SeqCst);
        let _one = self.enrolling.lock().await;
        if self.enrolments.load(Ordering::SeqCst) != seen {
            // Another task re-enrolled while this one waited: its session serves us too.
            return Ok(());
        }
        let mut client = self.client.clone();
        let key = self.identity.public_key().to_vec();
        let nonce = client
            .challenge(v1::ChallengeRequest {
                protocol_version: nexa_proto::PROTOCOL_VERSION,
                public_key: key.clone(),
            })
            .await?
            .into_inner()
            .nonce;
        let e = lock(&self.enrolment).clone();
        let resp = client
            .enrol(v1::EnrolRequest {
                protocol_version: nexa_proto::PROTOCOL_VERSION,
                public_key: key,
                signature: self.identity.sign_enrolment(&nonce),
                nonce,
                name: e.name.clone(),
                slots: e.slots,
                profile: Some(v1::HardwareProfile::from(&e.profile)),
                enrol_token: e.token.clone().unwrap_or_default(),
            })
            .await?
            .into_inner();
        tracing::info!(worker = %resp.worker_id, name = %e.name, "enrolled");
        *lock(&self.session) = Session {
            token: resp.session_token,
            worker_id: resp.worker_id,
            heartbeat: Duration::from_millis(resp.heartbeat_interval_ms.max(100)),
        };
        self.enrolments.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Enrols, retrying with backoff until it works. Errors that retrying cannot fix
    /// (a refused token, a protocol mismatch) are returned.
    pub async fn enrol_until_done(&self) -> Result<(), Status> {
        let mut attempt = 0;
        loop {
            match self.enrol().await {
                Ok(()) => return Ok(()),
                // A refused token, a protocol mismatch or a malformed key: enrolling
                // again cannot fix it. (An expired challenge, PERMISSION_DENIED, can: the
                // next attempt asks for a new one.)
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument
                    ) =>
                {
                    return Err(s);
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "coordinator unreachable; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Runs `call` with the session; on an unknown session (the coordinator restarted)
    /// enrols again; on other errors backs off and retries, up to `tries` times.
    pub(crate) async fn retrying<T, F, Fut>(&self, tries: u32, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(s) if attempt + 1 >= tries => return Err(s),
                Err(s) if on_error(s.code()) == OnError::Reenrol => {
                    tracing::info!("session unknown to the coordinator; enrolling again");
                    if let Err(e) = self.enrol().await {
                        tracing::warn!(error = %e.message(), "re-enrolment failed");
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
                Err(s) if on_error(s.code()) == OnError::GiveUp => return Err(s),
                Err(s) => {
                    tracing::debug!(error = %s.message(), "call failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
            attempt += 1;
        }
    }

    /// Sends heartbeats until the process ends: they keep leases alive, refresh the
    /// profile now and then, and deliver cancellations. The loop never ends by itself:
    /// its owner treats the end of the returned task (a panic) as the worker's end.
    pub fn spawn_heartbeats(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let link = self.clone();
        tokio::spawn(async move {
            let mut n: u64 = 0;
            loop {
                let every = lock(&link.session)
                    .heartbeat
                    .max(Duration::from_millis(100));
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = link.beat_now.notified() => {}
                }
                n += 1;
                let due = link
                    .profile_due
                    .swap(false, std::sync::atomic::Ordering::SeqCst);
                let mut said = std::mem::take(&mut *lock(&link.progress));
                let running: Vec<v1::RunningJob> = lock(&link.running)
                    .keys()
                    .map(|(j, g)| v1::RunningJob {
                        job_id: j.clone(),
                        generation: *g,
                        progress: said
                            .remove(&(j.clone(), *g))
                            .map(|p| v1::JobProgress::from(&p)),
                    })
                    .collect();
                let profile = if n.is_multiple_of(15) || due {
                    // Re-read the hardware so the coordinator sees current free memory;
                    // keep the labels found at start (probing runtimes is slow).
                    let profiler = lock(&link.profiler).clone();
                    if let Some(p) = profiler
                        && let Ok(mut fresh) = tokio::task::spawn_blocking(move || p()).await
                    {
                        let mut e = lock(&link.enrolment);
                        fresh.labels = e.profile.labels.clone();
                        fresh.runtimes_pending = e.profile.runtimes_pending;
                        e.profile = fresh;
                    }
                    Some(v1::HardwareProfile::from(&lock(&link.enrolment).profile))
                } else {
                    None
                };
                let table = lock(&link.services).clone();
                let services = table
                    .as_ref()
                    .map(|t| {
                        t.snapshot()
                            .into_iter()
                            .map(|((job_id, generation), s)| v1::ServiceBeat {
                                job_id,
                                generation,
                                healthy: s.healthy,
                                detail: s.detail,
                                gpu_uuids: s.gpu_uuids,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut client = link.client.clone();
                let mut req = link.authed(v1::HeartbeatRequest {
                    running,
                    profile,
                    services,
                });
                // A heartbeat that cannot arrive in time is as good as lost.
                req.set_timeout(every.saturating_mul(3));
                let outcome = client.heartbeat(req).await;
                if due && outcome.is_err() {
                    // Not delivered: the next heartbeat carries it (a re-enrolment
                    // presents it too).
                    link.profile_due
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if let Some(m) = lock(&link.metrics).as_ref() {
                    m.connected.set(i64::from(outcome.is_ok()));
                    if outcome.is_err() {
                        m.heartbeat_failures.inc();
                    }
                }
                match outcome {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        if let Some(t) = &table {
                            for s in resp.stop_services {
                                let t = t.clone();
                                let grace = Duration::from_millis(s.grace_ms);
                                tracing::info!(job = %s.job_id, generation = s.generation, "coordinator asked to stop a service");
                                // Off the heartbeat: the grace period may be long.
                                tokio::task::spawn_blocking(move || {
                                    t.stop(&s.job_id, s.generation, grace)
                                });
                            }
                        }
                        let running = lock(&link.running);
                        for c in resp.cancel {
                            let attempt = (c.job_id, c.generation);
                            if let Some(tx) = running.get(&attempt) {
                                tracing::info!(job = %attempt.0, generation = attempt.1, "coordinator cancelled the job");
                                let _ = tx.send(true);
                            }
                        }
                    }
                    Err(s) if on_error(s.code()) == OnError::Reenrol => {
                        if let Err(e) = link.enrol().await {
                            tracing::warn!(error = %e.message(), "re-enrolment failed");
                        }
                    }
                    Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed"),
                }
            }
        })
    }

    async fn upload(&self, result: &JobResult) -> Result<(), Status> {
        let Some(staging) = result.staging.clone() else {
            return Ok(());
        };
        let mut files = result.outputs.clone();
        // The job's log travels too, as the pseudo-output `.log`, so the operator sees it.
        if let Some(log) = &result.log
            && let Ok(meta) = std::fs::metadata(log)
            && let Ok((h, _)) = nexa_shared::digest::hash_file(log)
        {
            let dest = staging.join(LOG_OUTPUT);
            if std::fs::create_dir_all(&dest).is_ok()
                && std::fs::copy(log, dest.join("log")).is_ok()
            {
                files.push(nexa_shared::job::OutputFile {
                    output: LOG_OUTPUT.into(),
                    path: "log".into(),
                    size: meta.len(),
                    digest: nexa_shared::ids::Digest::of(&h),
                });
            }
        }
        let (job_id, generation) = (result.job_id.to_string(), result.generation);
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::UploadChunk>(4);
        let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
            for o in files {
                let path = staging.join(&o.output).join(&o.path);
                let sent = nexa_proto::chunks::send_file(&path, |offset, data| {
                    tx.blocking_send(v1::UploadChunk {
                        job_id: job_id.clone(),
                        generation,
                        output: o.output.clone(),
                        path: o.path.clone(),
                        offset,
                        data: data.to_vec(),
                        size: o.size,
                        digest: o.digest.to_string(),
                    })
                    .is_ok()
                })
                .map_err(|e| e.to_string())?;
                if !sent {
                    return Err("upload stream closed".into());
                }
            }
            Ok(())
        });
        let mut client = self.client.clone();
        let sent = client
            .upload(self.authed(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await;
        let read = reader.await.map_err(|e| Status::internal(e.to_string()))?;
        sent?;
        read.map_err(Status::internal)
    }

    /// Waits for a lease with `Lease` calls (a coordinator that does not know
    /// `Exchange`), forever; re-enrols when the session is gone.
    pub(crate) async fn lease_alone(&self) -> Option<Lease> {
        let mut attempt = 0;
        loop {
            let mut client = self.client.clone();
            match client
                .lease(self.authed(v1::LeaseRequest { wait_ms: 15_000 }))
                .await
            {
                Ok(resp) => {
                    attempt = 0;
                    let r = resp.into_inner();
                    let Some(wire) = r.lease else { continue };
                    match convert::lease_from_wire(wire, r.gpu_uuids) {
                        Ok(l) => return Some(l),
                        Err(e) => {
                            tracing::error!(error = %e, "the coordinator sent a lease this worker cannot read");
                            tokio::time::sleep(backoff(5)).await;
                        }
                    }
                }
                Err(s) if on_error(s.code()) == OnError::Reenrol => {
                    if let Err(e) = self.enrol().await {
                        tracing::warn!(error = %e.message(), "re-enrolment failed");
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                    }
                }
                Err(s) => {
                    tracing::debug!(error = %s.message(), "lease call failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Uploads `result`'s files, then sends it (with `ask`, the slot's ask for its next
    /// lease, when given); waits for its verdict.
    async fn deliver(&self, result: JobResult, ask: Option<tokio::sync::oneshot::Sender<Lease>>) {
        let job_dir = result
            .staging
            .as_ref()
            .and_then(|s| s.parent().map(Path::to_path_buf));
        // Uploads, then the report, each retried on its own: the report closes the
        // attempt to uploads, so a report that failed in flight (the coordinator refused
        // to judge it, or died judging it) is sent again alone, never after a re-upload
        // that a closed attempt would refuse.
        let outcome = match self.retrying(8, || self.upload(&result)).await {
            Ok(()) if self.pump.unsupported() => {
                if let Some(ask) = ask {
                    self.pump.ask(self, ask);
                }
                self.report_alone(&v1::JobResult::from(&result)).await
            }
            Ok(()) => {
                let wire = v1::JobResult::from(&result);
                match self.pump.report(self, wire, ask).await {
                    Ok(delivered) => delivered,
                    Err(_) => Err(Status::unavailable("the link closed")),
                }
            }
            Err(s) => {
                if let Some(ask) = ask {
                    self.pump.ask(self, ask);
                }
                Err(s)
            }
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::warn!(job = %result.job_id, reason = %reason, "the coordinator refused the result");
            }
            Err(s) => {
                tracing::warn!(job = %result.job_id, error = %s.message(), "could not deliver the result; the lease will expire and the job move");
            }
        }
        lock(&self.running).remove(&(result.job_id.to_string(), result.generation));
        if let Some(d) = job_dir {
            let _ = tokio::fs::remove_dir_all(d).await;
        }
    }
}

impl CoordinatorLink for GrpcLink {
    fn progress(&self, lease: &Lease, progress: nexa_shared::job::JobProgress) {
        // Sent with the next heartbeat; only the latest counts.
        lock(&self.progress).insert((lease.job.job_id.to_string(), lease.generation), progress);
    }

    async fn next_lease(&self) -> Option<Lease> {
        if self.pump.unsupported() {
            return self.lease_alone().await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pump.ask(self, tx);
        rx.await.ok()
    }

    async fn report(&self, result: JobResult) {
        self.deliver(result, None).await;
    }

    async fn report_and_ask(&self, result: JobResult) -> crate::NextLease<'_> {
        if self.pump.unsupported() {
            self.deliver(result, None).await;
            return crate::NextLease::new(self.next_lease());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.deliver(result, Some(tx)).await;
        crate::NextLease::new(async move { rx.await.ok() })
    }

    fn cancellation(&self, lease: &Lease) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        lock(&self.running).insert((lease.job.job_id.to_string(), lease.generation), tx);
        rx
    }

    async fn fetch_input(&self, input: &JobInput, dest: &Path) -> Result<(), String> {
        let mut client = self.client.clone();
        let mut stream = self
            .retrying(5, || {
                let mut c = client.clone();
                let req = self.authed(v1::FetchRequest {
                    digest: input.digest.to_string(),
                });
                async move { c.fetch(req).await }
            })
            .await
            .map_err(|s| format!("fetching {}: {}", input.digest, s.message()))?
            .into_inner();
        let _ = &mut client;
        let mut open: Option<(String, std::fs::File)> = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk.map_err(|s| format!("fetching {}: {}", input.digest, s.message()))?;
            let target = if c.is_dir {
                let rel =
                    nexa_shared::paths::check_relative_name(&c.path).map_err(|e| e.to_string())?;
                dest.join(rel)
            } else {
                dest.to_path_buf()
            };
            if open.as_ref().is_none_or(|(p, _)| p != &c.path) {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("create {}: {e}", parent.display()))?;
                }
                let f = std::fs::File::create(&target)
                    .map_err(|e| format!("create {}: {e}", target.display()))?;
                open = Some((c.path.clone(), f));
            }
            if let Some((_, f)) = open.as_mut() {
                use std::io::Write;
                f.write_all(&c.data)
                    .map_err(|e| format!("write {}: {e}", target.display()))?;
            }
        }
        if input.is_dir && !dest.exists() {
            std::fs::create_dir_all(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        }
        Ok(())
    }
}
