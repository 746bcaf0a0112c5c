//! `nexa.v1.ControlService`: what operators call, with the operator token. Pipelines
//! arrive as YAML plus the project files they read, sent by content (only the blobs the
//! coordinator lacks travel); each submitted run is recorded so that a restarted
//! coordinator resumes it under the same id.

use super::receive::Receiving;
use super::{MeshConfig, status};
use crate::scheduler::{Progress, RunRequest};
use crate::state::{self, StepRecord};
use crate::{Coordinator, Store};
use nexa_proto::v1;
use nexa_proto::v1::control_service_server::ControlService;
use nexa_shared::{artifact, digest, paths, spec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// The most workers one `ListWorkers` answer holds (about 1 KiB each).
const WORKER_PAGE: usize = 1_000;

/// The store tree of submitted runs, keyed by run id.
pub const SUBMISSIONS_TREE: &str = "submissions";

/// A submitted run, as recorded for resumption.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Submission {
    /// Run id.
    pub run_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// The YAML.
    pub yaml: String,
    /// File name for messages.
    pub file_name: String,
    /// `--verify`.
    pub verify: bool,
    /// `rerun --from`.
    pub from: Option<String>,
    /// Whether it ended.
    pub finished: bool,
}

/// How long a finished run's events stay for watchers that come late (after that its
/// step records answer them).
const FEED_KEEP: std::time::Duration = std::time::Duration::from_secs(600);
/// The most events a run's feed keeps for late watchers (the oldest half go first):
/// ~1 KB each as held (heaptrack: 100,000 of them were ~110 MB of a fan-out's heap);
/// a watcher that needs more reads the step records.
const FEED_HISTORY: usize = 20_000;

#[derive(Debug)]
struct RunFeed {
    history: Vec<v1::RunEvent>,
    live: broadcast::Sender<v1::RunEvent>,
}

/// The control service's state.
pub struct ControlApi {
    coord: Coordinator,
    store: Arc<dyn Store>,
    cfg: MeshConfig,
    operator_token: String,
    feeds: Arc<Mutex<HashMap<String, RunFeed>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Loads a submitted pipeline against `root` (on the blocking pool): valid, and reading
/// only what lies inside its project.
async fn load_confined(file: &str, yaml: &str, root: &Path) -> Result<spec::Loaded, Status> {
    let (file, yaml, root) = (file.to_string(), yaml.to_string(), root.to_path_buf());
    status::blocking(move || {
        spec::load_str(&file, &yaml, &root)
            .and_then(|l| spec::check_confined_inputs(&file, &l).map(|()| l))
            .map_err(status::domain)
    })
    .await
}

/// Puts each submitted file (`(file, its place in the project, its blob)`) in place,
/// hard-linked from the blob store or copied; a file already there with that content is
/// left alone.
fn lay_out(files: &[(v1::ProjectFile, PathBuf, PathBuf)]) -> Result<(), Status> {
    for (f, dest, blob) in files {
        if !blob.is_file() {
            return Err(Status::failed_precondition(format!(
                "blob {} for {} was not uploaded",
                f.digest, f.path
            )));
        }
        let same = digest::hash_file(dest).is_ok_and(|(h, _)| digest::format(&h) == f.digest);
        if !same {
            if let Some(d) = dest.parent() {
                std::fs::create_dir_all(d).map_err(status::io("create", d))?;
            }
            let _ = std::fs::remove_file(dest);
            if std::fs::hard_link(blob, dest).is_err() {
                std::fs::copy(blob, dest).map_err(status::io("copy", blob))?;
            }
        }
    }
    Ok(())
}

/// Whether `e` is the last event of its run.
fn is_finished(e: &v1::RunEvent) -> bool {
    matches!(e.event, Some(v1::run_event::Event::Finished(_)))
}

impl ControlApi {
    /// A control service over `coord`, keeping its records in `store`.
    pub fn new(
        coord: Coordinator,
        store: Arc<dyn Store>,
        cfg: MeshConfig,
        operator_token: String,
    ) -> Self {
        Self {
            coord,
            store,
            cfg,
            operator_token,
            feeds: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Refuses new work while the data disk is below its free-space floor.
    fn disk_ok(&self) -> Result<(), Status> {
        match &self.cfg.disk {
            Some(g) => g.check().map_err(Status::unavailable),
            None => Ok(()),
        }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        super::auth::check_operator_token(req.metadata(), &self.operator_token)
    }

    fn blob_path(&self, d: &str) -> Result<PathBuf, Status> {
        let h = digest::parse(d).map_err(status::domain)?;
        Ok(self.cfg.data_dir.join("blobs").join(h.to_hex().as_str()))
    }

    /// The coordinator-side project of a pipeline.
    pub fn project_dir(data_dir: &Path, pipeline: &str) -> PathBuf {
        data_dir
            .join("projects")
            .join(paths::safe_component(pipeline))
    }

    /// Verifies a received blob and moves it to its name in the blob store.
    async fn keep_blob(&self, digest: &str, r: Receiving) -> Result<u64, Status> {
        let dest = self.blob_path(digest)?;
        // Durable before it is acknowledged: a submitted run names it.
        status::blocking(move || r.verify(true)?.rename_to(&dest)).await
    }

    /// Writes and flushes a submission's record (on the blocking pool).
    async fn save_submission(&self, s: &Submission) -> Result<(), Status> {
        let bytes = serde_json::to_vec(s).map_err(crate::Error::from)?;
        let (store, run_id) = (self.store.clone(), s.run_id.clone());
        tokio::task::spawn_blocking(move || {
            store
                .put(SUBMISSIONS_TREE, &run_id, &bytes)
                .and_then(|_| store.flush())
        })
        .await
        .map_err(status::join)?
        .map_err(Status::from)
    }

    /// Starts a run and relays its progress to watchers; records it for resumption.
    async fn start(&self, sub: Submission) -> Result<String, Status> {
        let project = Self::project_dir(&self.cfg.data_dir, &sub.pipeline);
        let loaded = load_confined(&sub.file_name, &sub.yaml, &project).await?;
        // The submission is durable before the run starts: a run the store refused is
        // refused whole, never left running unacknowledged (where a resubmission would
        // race it over the same artifacts).
        let mut sub = sub;
        if sub.run_id.is_empty() {
            sub.run_id = crate::scheduler::new_run_id().into_string();
        }
        self.save_submission(&sub).await?;
        let submitted = self
            .coord
            .submit(RunRequest {
                loaded,
                project,
                verify: sub.verify,
                from: sub.from.clone(),
                git_sha: None,
                run_id: Some(sub.run_id.clone().into()),
                confined: true,
            })
            .await;
        let handle = match submitted {
            Ok(h) => h,
            Err(e) => {
                // Not to be resumed: it never started.
                if let Err(err) = self.store.remove(SUBMISSIONS_TREE, &sub.run_id) {
                    tracing::error!(run = %sub.run_id, error = %format!("{err:#}"), "forgetting a submission that did not start");
                }
                return Err(e.into());
            }
        };
        let run_id = handle.run_id.to_string();
        let (live, _) = broadcast::channel(1024);
        lock(&self.feeds).insert(
            run_id.clone(),
            RunFeed {
                history: Vec::new(),
                live,
            },
        );
        let feeds = self.feeds.clone();
        let store = self.store.clone();
        let mut progress = handle;
        self.coord.tasks().spawn("run feed", async move {
            while let Some(p) = progress.recv().await {
                let finished = matches!(p, Progress::Finished(_));
                let e = v1::RunEvent::from(&p);
                {
                    let mut f = lock(&feeds);
                    if let Some(feed) = f.get_mut(&sub.run_id) {
                        // A late watcher replays the recent past, not all of it.
                        if feed.history.len() >= FEED_HISTORY {
                            feed.history.drain(..FEED_HISTORY / 2);
                        }
                        feed.history.push(e.clone());
                        let _ = feed.live.send(e);
                    }
                }
                if finished {
                    sub.finished = true;
                    let (store, done) = (store.clone(), sub.clone());
                    let saved = tokio::task::spawn_blocking(move || {
                        let bytes = serde_json::to_vec(&done)?;
                        store
                            .put(SUBMISSIONS_TREE, &done.run_id, &bytes)
                            .and_then(|_| store.flush())
                    })
                    .await;
                    match saved {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %format!("{e:#}"), "recording a finished run")
                        }
                        Err(e) => tracing::error!(error = %e, "recording a finished run"),
                    }
                    // Watchers that come later are answered from the step records.
                    tokio::time::sleep(FEED_KEEP).await;
                    lock(&feeds).remove(&sub.run_id);
                    break;
                }
            }
        });
        Ok(run_id)
    }

    /// Resumes every run that was submitted but had not finished when the coordinator
    /// stopped, under its old id. Returns how many.
    pub async fn resume_unfinished(&self) -> usize {
        let subs = match self.store.scan_prefix(SUBMISSIONS_TREE, "") {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading submitted runs");
                return 0;
            }
        };
        let mut n = 0;
        for (_, v) in subs {
            let Ok(sub) = serde_json::from_slice::<Submission>(&v) else {
                continue;
            };
            if sub.finished {
                continue;
            }
            let id = sub.run_id.clone();
            match self.start(sub).await {
                Ok(_) => {
                    tracing::info!(run = %id, "resumed a run the coordinator was running when it stopped");
                    n += 1;
                }
                Err(e) => tracing::error!(run = %id, error = %e.message(), "could not resume run"),
            }
        }
        n
    }
}

/// Sends a run's past events, then its live ones, until it finishes or the watcher goes.
async fn relay(
    history: Vec<v1::RunEvent>,
    live: &mut broadcast::Receiver<v1::RunEvent>,
    tx: &tokio::sync::mpsc::Sender<Result<v1::RunEvent, Status>>,
) {
    let mut done = false;
    for e in history {
        done |= is_finished(&e);
        if tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
    while !done {
        match live.recv().await {
            Ok(e) => {
                done = is_finished(&e);
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "a watcher fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::RunEvent, Status>> + Send>>;
type PullStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn missing_blobs(
        &self,
        req: Request<v1::MissingBlobsRequest>,
    ) -> Result<Response<v1::MissingBlobsResponse>, Status> {
        self.check(&req)?;
        let wanted: Vec<(String, PathBuf)> = req
            .into_inner()
            .digests
            .into_iter()
            .map(|d| self.blob_path(&d).map(|p| (d, p)))
            .collect::<Result<_, _>>()?;
        let missing = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .filter(|(_, p)| !p.is_file())
                .map(|(d, _)| d)
                .collect()
        })
        .await
        .map_err(status::join)?;
        Ok(Response::new(v1::MissingBlobsResponse { missing }))
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<v1::BlobChunk>>,
    ) -> Result<Response<v1::PutBlobResponse>, Status> {
        self.check(&req)?;
        self.disk_ok()?;
        let dir = self.cfg.data_dir.join("blobs");
        let mut stream = req.into_inner();
        let (mut blobs, mut total) = (0u64, 0u64);
        // The blob being received: its digest and its part file. File I/O runs on the
        // blocking pool, never on the runtime.
        let mut cur: Option<(String, Receiving)> = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            if cur.as_ref().is_none_or(|x| x.0 != c.digest) {
                if let Some((d, r)) = cur.take() {
                    total += self.keep_blob(&d, r).await?;
                    blobs += 1;
                }
                self.blob_path(&c.digest)?;
                let (dir, d, size) = (dir.clone(), c.digest.clone(), c.size);
                let r =
                    status::blocking(move || Receiving::create(format!("blob {d}"), &dir, size, d))
                        .await?;
                cur = Some((c.digest.clone(), r));
            }
            if let Some((d, r)) = cur.take() {
                let mut r = r;
                let r = status::blocking(move || r.write(c.offset, &c.data).map(|()| r)).await?;
                cur = Some((d, r));
            }
        }
        if let Some((d, r)) = cur.take() {
            total += self.keep_blob(&d, r).await?;
            blobs += 1;
        }
        crate::metrics::count_bytes(self.cfg.metrics.as_ref(), "in", total);
        Ok(Response::new(v1::PutBlobResponse {
            blobs,
            bytes: total,
        }))
    }

    async fn submit(
        &self,
        req: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        self.check(&req)?;
        self.disk_ok()?;
        let r = req.into_inner();
        // Validate first, against a scratch root, so a bad file is refused before any
        // copy; then lay the project out from the blobs. Both on the blocking pool.
        let scratch = self.cfg.data_dir.join("projects").join("_validate");
        let loaded = load_confined(&r.file_name, &r.pipeline_yaml, &scratch).await?;
        let pipeline = loaded.pipeline.name.clone();
        let project = Self::project_dir(&self.cfg.data_dir, &pipeline);
        let mut files = Vec::with_capacity(r.files.len());
        for f in &r.files {
            let rel = paths::contained(&project, &f.path)
                .map_err(|e| Status::invalid_argument(format!("file {:?}: {e}", f.path)))?;
            files.push((f.clone(), project.join(rel), self.blob_path(&f.digest)?));
        }
        status::blocking(move || lay_out(&files)).await?;
        let run_id = self
            .start(Submission {
                run_id: String::new(),
                pipeline: pipeline.clone(),
                yaml: r.pipeline_yaml,
                file_name: r.file_name,
                verify: r.verify,
                from: (!r.from.is_empty()).then_some(r.from),
                finished: false,
            })
            .await?;
        Ok(Response::new(v1::SubmitResponse { run_id, pipeline }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.check(&req)?;
        let run_id = req.into_inner().run_id;
        let (history, mut live) = {
            let feeds = lock(&self.feeds);
            let feed = feeds
                .get(&run_id)
                .ok_or_else(|| Status::not_found(format!("no run {run_id} on this coordinator")))?;
            (feed.history.clone(), feed.live.subscribe())
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let cfg = self.cfg.clone();
        self.coord.tasks().spawn("watch stream", async move {
            // A stopping coordinator ends the stream (UNAVAILABLE: the CLI reconnects to
            // the restarted one) rather than hold its shutdown until the run ends.
            tokio::select! {
                () = relay(history, &mut live, &tx) => {}
                () = cfg.stopped() => {
                    let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        self.check(&req)?;
        self.coord.cancel(&req.into_inner().run_id)?;
        Ok(Response::new(v1::CancelResponse {}))
    }

    async fn list_workers(
        &self,
        req: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => WORKER_PAGE,
            n => (n as usize).min(WORKER_PAGE),
        };
        let page = crate::scheduler::WorkerPage {
            after: (!r.after.is_empty()).then(|| r.after.into()),
            limit,
        };
        let (views, total) = self.coord.worker_page(page).await?;
        let next_after = match views.last() {
            Some(last) if views.len() == limit => last.id.to_string(),
            _ => String::new(),
        };
        let workers = views
            .iter()
            .map(|w| v1::WorkerStatus::from(&w.summary()))
            .collect();
        Ok(Response::new(v1::ListWorkersResponse {
            workers,
            next_after,
            total: total as u64,
        }))
    }

    async fn set_worker_state(
        &self,
        req: Request<v1::SetWorkerStateRequest>,
    ) -> Result<Response<v1::SetWorkerStateResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let state = nexa_proto::convert::admin_state_from_wire(r.state)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let found = self.coord.set_worker_state(&r.worker_id, state).await?;
        if !found {
            return Err(Status::not_found(format!("no worker {}", r.worker_id)));
        }
        Ok(Response::new(v1::SetWorkerStateResponse {}))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.check(&req)?;
        let pipeline = req.into_inner().pipeline;
        let store = self.store.clone();
        let records: Vec<StepRecord> =
            tokio::task::spawn_blocking(move || state::load_steps(store.as_ref(), &pipeline))
                .await
                .map_err(status::join)??
                .into_values()
                .collect();
        Ok(Response::new(v1::StatusResponse {
            steps: records.iter().map(v1::StepRecord::from).collect(),
        }))
    }

    async fn models(
        &self,
        req: Request<v1::ModelsRequest>,
    ) -> Result<Response<v1::ModelsResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let mirror = self.cfg.data_dir.join(crate::recover::REGISTRY_MIRROR);
        let answer = status::blocking(move || {
            use nexa_shared::models::RegistryAnswer as A;
            let reg = crate::registry::Registry::new(store.as_ref()).mirrored_in(Some(mirror));
            let answer = match r.op.as_str() {
                "list" => reg.list().map(A::List),
                "show" => reg.show(&r.name).map(A::Model),
                "resolve" => reg.resolve(&r.name).map(A::Version),
                "promote" => reg.promote(&r.name, &r.version, &r.tag).map(A::Promotion),
                other => Err(crate::Error::Registry(format!(
                    "unknown registry operation '{other}'"
                ))),
            };
            answer.map_err(Status::from)
        })
        .await?;
        Ok(Response::new(v1::ModelsResponse::from(&answer)))
    }

    async fn lineage(
        &self,
        req: Request<v1::LineageRequest>,
    ) -> Result<Response<v1::LineageResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let project = Self::project_dir(&self.cfg.data_dir, &r.pipeline);
        let rel = paths::contained(&project, &r.path).map_err(status::domain)?;
        let out = std::path::absolute(project.join(&rel)).map_err(status::io("resolve", &rel))?;
        if !out.join(nexa_shared::artifact::META).is_file() {
            return Err(Status::not_found(format!(
                "{} of pipeline {} is not an artifact",
                r.path, r.pipeline
            )));
        }
        let store = self.store.clone();
        let proj = project.clone();
        let graph = status::blocking(move || {
            let mut idx = crate::sealing::lineage::Index::new(&proj);
            idx.add(crate::sealing::lineage::dump(store.as_ref()).map_err(Status::from)?);
            let depth = if r.depth == 0 {
                usize::MAX
            } else {
                r.depth as usize
            };
            let root = format!("file://{}", out.display());
            Ok(idx.walk(&root, !r.down, depth))
        })
        .await?;
        Ok(Response::new(v1::LineageResponse {
            graph: Some(v1::LineageGraph::from(&graph)),
            project: std::path::absolute(&project)
                .unwrap_or(project)
                .display()
                .to_string(),
        }))
    }

    async fn refusals(
        &self,
        req: Request<v1::RefusalsRequest>,
    ) -> Result<Response<v1::RefusalsResponse>, Status> {
        self.check(&req)?;
        let r = self.coord.refusals().await?;
        Ok(Response::new(v1::RefusalsResponse {
            counts: r
                .counts()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }))
    }

    type PullStream = PullStream;

    async fn pull(
        &self,
        req: Request<v1::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let project = Self::project_dir(&self.cfg.data_dir, &r.pipeline);
        let rel = paths::contained(&project, &r.path).map_err(status::domain)?;
        let dir = project.join(rel);
        if !artifact::is_complete(&dir) {
            return Err(Status::not_found(format!(
                "{} is not a sealed artifact of pipeline {}",
                r.path, r.pipeline
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let metrics = self.cfg.metrics.clone();
        self.coord.tasks().spawn_blocking("artifact pull", move || {
            let files = match digest::list_files(&dir, &[]) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                    return;
                }
            };
            let send = |c: Result<v1::FetchChunk, Status>| tx.blocking_send(c).is_ok();
            for (rel, p, size) in files {
                if !super::worker_service::stream_file(&rel, &p, true, &send) {
                    return;
                }
                crate::metrics::count_bytes(metrics.as_ref(), "out", size);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn services(
        &self,
        req: Request<v1::ServicesRequest>,
    ) -> Result<Response<v1::ServicesResponse>, Status> {
        self.check(&req)?;
        let name = req.into_inner().name;
        super::service_control::services(&self.coord, self.store.clone(), name)
            .await
            .map(Response::new)
    }

    async fn stop_service(
        &self,
        req: Request<v1::StopServiceRequest>,
    ) -> Result<Response<v1::StopServiceResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let grace = std::time::Duration::from_millis(r.grace_ms.min(600_000));
        super::service_control::stop(
            &self.coord,
            self.store.clone(),
            r.name,
            grace,
            self.cfg.heartbeat_interval,
        )
        .await
        .map(Response::new)
    }
}
