//! Talking to a remote coordinator: submitting a pipeline with the project files it
//! reads (by content; only what the coordinator lacks is sent), streaming its progress,
//! listing workers, and pulling artifacts back.

use crate::render::Renderer;
use anyhow::Context;
use nexa_coordinator::Progress;
use nexa_coordinator::scheduler::{RunOutcome, RunSummary};
use nexa_coordinator::state::{StepRecord, StepStatus};
use nexa_proto::v1;
use nexa_proto::v1::control_service_client::ControlServiceClient;
use nexa_shared::spec::Loaded;
use nexa_shared::{dag, digest, paths};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// How to reach a coordinator.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `http://host:port` or `https://…`.
    pub url: String,
    /// The operator token.
    pub token: String,
    /// A CA certificate to trust for https.
    pub ca: Option<PathBuf>,
}

/// A connected control client that sends the operator token.
pub struct Control {
    client: ControlServiceClient<Channel>,
    token: String,
}

impl Control {
    /// Connects.
    pub async fn connect(r: &Remote) -> anyhow::Result<Self> {
        let ca =
            r.ca.as_ref()
                .map(std::fs::read)
                .transpose()
                .context("reading --ca")?;
        let endpoint =
            nexa_worker::remote::channel_endpoint(&r.url, ca).map_err(anyhow::Error::msg)?;
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", r.url))?;
        Ok(Self {
            // The coordinator enforces its own submission limit (`--max-submit`).
            client: ControlServiceClient::new(channel)
                .max_decoding_message_size(1 << 30)
                .max_encoding_message_size(1 << 30),
            token: r.token.clone(),
        })
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.token).parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// The project files a pipeline reads that no step produces: `(project path, file)`.
fn project_files(l: &Loaded, project: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (i, s) in l.pipeline.steps.iter().enumerate() {
        for (name, written) in &s.inputs {
            if l.dag.upstream[i].contains_key(name) {
                continue;
            }
            let rel = dag::project_relative(project, &written.value).with_context(|| {
                format!(
                    "step '{}': input '{name}' ({}) is outside the project; a remote run can only send files inside it",
                    s.id.value, written.value
                )
            })?;
            let full = project.join(&rel);
            // A link that leads out of the project would send whatever it points at (a
            // link to /etc/shadow, a whole home directory): refused, with the link named.
            if let (Ok(real), Ok(root)) = (full.canonicalize(), project.canonicalize())
                && !real.starts_with(&root)
            {
                anyhow::bail!(
                    "step '{}': input '{name}' ({}) is a symlink to {}, outside the project; a remote run sends only files inside it",
                    s.id.value,
                    written.value,
                    real.display()
                );
            }
            if full.is_dir() {
                for (sub, p, _) in digest::list_files(&full, &[])? {
                    out.push((format!("{}/{sub}", rel.display()), p));
                }
            } else if full.is_file() {
                out.push((rel.display().to_string(), full));
            } else {
                anyhow::bail!(
                    "step '{}': input '{name}': {} does not exist",
                    s.id.value,
                    written.value
                );
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The largest pipeline file a submission may carry (the message limit is 64 MiB; the
/// rest is the file list and framing).
const MAX_PIPELINE_FILE: u64 = 60 << 20;

/// Submits the pipeline at `file`, sending the files it reads, and follows the run until
/// it ends. Returns the summary.
pub async fn run(
    remote: &Remote,
    file: &Path,
    project: &Path,
    l: &Loaded,
    verify: bool,
    from: Option<String>,
) -> anyhow::Result<RunSummary> {
    // The submission travels as one message, which the coordinator (and this client)
    // take up to 64 MiB: say so here rather than fail with an h2 protocol error.
    let size = std::fs::metadata(file)?.len();
    if size > MAX_PIPELINE_FILE {
        anyhow::bail!(
            "{}: the pipeline file is {size} bytes; a coordinator takes pipeline files up to {MAX_PIPELINE_FILE} bytes (60 MiB)",
            file.display()
        );
    }
    let mut c = Control::connect(remote).await?;
    let files = project_files(l, project)?;
    let mut hashed = Vec::with_capacity(files.len());
    for (rel, p) in &files {
        let (h, size) = digest::hash_file(p)?;
        hashed.push((rel.clone(), p.clone(), digest::format(&h), size));
    }
    let missing = c
        .client
        .missing_blobs(c.req(v1::MissingBlobsRequest {
            digests: hashed.iter().map(|h| h.2.clone()).collect(),
        }))
        .await
        .map_err(status_err)?
        .into_inner()
        .missing;
    // Each missing blob once: two files with the same content are one blob.
    let mut seen = std::collections::HashSet::new();
    let to_send: Vec<(PathBuf, String, u64)> = hashed
        .iter()
        .filter(|h| missing.contains(&h.2) && seen.insert(h.2.clone()))
        .map(|h| (h.1.clone(), h.2.clone(), h.3))
        .collect();
    if !to_send.is_empty() {
        let bytes: u64 = to_send.iter().map(|t| t.2).sum();
        eprintln!(
            "sending {} file(s), {} (the coordinator has the rest)",
            to_send.len(),
            nexa_shared::units::format_size(bytes)
        );
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for (p, d, size) in to_send {
                let sent = nexa_proto::chunks::send_file(&p, |offset, data| {
                    tx.blocking_send(v1::BlobChunk {
                        digest: d.clone(),
                        offset,
                        data: data.to_vec(),
                        size,
                    })
                    .is_ok()
                })?;
                if !sent {
                    anyhow::bail!("upload closed");
                }
            }
            Ok(())
        });
        let sent = c
            .client
            .put_blob(c.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await;
        reader.await??;
        sent.map_err(status_err)?;
    }
    let yaml = std::fs::read_to_string(file)?;
    let resp = c
        .client
        .submit(
            c.req(v1::SubmitRequest {
                pipeline_yaml: yaml,
                file_name: file.display().to_string(),
                files: hashed
                    .iter()
                    .map(|h| v1::ProjectFile {
                        path: h.0.clone(),
                        digest: h.2.clone(),
                    })
                    .collect(),
                verify,
                from: from.unwrap_or_default(),
            }),
        )
        .await
        .map_err(status_err)?
        .into_inner();
    eprintln!(
        "submitted run {} of {} to {}",
        resp.run_id, resp.pipeline, remote.url
    );
    follow(
        remote,
        &mut c,
        &resp.run_id,
        &resp.pipeline,
        l.pipeline.steps.len(),
    )
    .await
}

/// How long `follow` keeps trying to reach a coordinator that went away (a restart, an
/// upgrade, a network blip) before giving up; the run itself goes on regardless.
const RECONNECT_FOR: Duration = Duration::from_secs(600);

/// Why following stopped before the run finished.
enum Interrupted {
    /// The connection to the coordinator broke (it may be restarting).
    Lost(String),
    /// Anything else.
    Fatal(anyhow::Error),
}

/// Follows a run to its end, reconnecting when the coordinator goes away: a restarted
/// coordinator resumes the run under the same id and replays its progress; a run that
/// finished while we were away is read back from the step records.
async fn follow(
    remote: &Remote,
    c: &mut Control,
    run_id: &str,
    pipeline: &str,
    steps: usize,
) -> anyhow::Result<RunSummary> {
    let mut renderer = Renderer::new(steps);
    loop {
        let why = match follow_once(c, &mut renderer, run_id).await {
            Ok(s) => return Ok(s),
            Err(Interrupted::Fatal(e)) => return Err(e),
            Err(Interrupted::Lost(why)) => why,
        };
        eprintln!("lost the coordinator ({why}); reconnecting to follow run {run_id}");
        let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
        let mut delay = Duration::from_millis(250);
        *c = loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tokio::signal::ctrl_c() => anyhow::bail!(
                    "stopped following run {run_id}; it goes on on the coordinator \
                     (`nexa pipeline status` shows it)"
                ),
            }
            match Control::connect(remote).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "gave up following run {run_id} (it goes on on the coordinator; \
                         `nexa pipeline status` shows it)"
                    )));
                }
                Err(_) => delay = (delay * 2).min(Duration::from_secs(5)),
            }
        };
        eprintln!("reconnected to {}", remote.url);
        // Finished while we were away (a finished run has no live feed after a restart):
        // the step records tell how it ended.
        let known = c
            .client
            .watch(c.req(v1::WatchRequest {
                run_id: run_id.into(),
            }))
            .await;
        if let Err(s) = known
            && s.code() == tonic::Code::NotFound
        {
            let records = status(remote, pipeline).await?;
            let ok = records
                .iter()
                .all(|r| matches!(r.status, StepStatus::Complete | StepStatus::Skipped));
            let s = RunSummary {
                run_id: run_id.into(),
                pipeline: pipeline.into(),
                outcome: if ok {
                    RunOutcome::Succeeded
                } else {
                    RunOutcome::Failed
                },
                steps: records,
                elapsed: Duration::ZERO,
            };
            renderer.show(&Progress::Finished(s.clone()));
            return Ok(s);
        }
    }
}

/// Whether a failed call means the coordinator is unreachable (worth reconnecting).
fn is_lost(s: &tonic::Status) -> bool {
    nexa_proto::retry::on_error(s.code()) == nexa_proto::retry::OnError::Reconnect
}

/// Streams a run's progress until it finishes; Ctrl-C cancels it on the coordinator.
async fn follow_once(
    c: &mut Control,
    renderer: &mut Renderer,
    run_id: &str,
) -> Result<RunSummary, Interrupted> {
    let fatal = |e: anyhow::Error| Interrupted::Fatal(e);
    let mut stream = match c
        .client
        .watch(c.req(v1::WatchRequest {
            run_id: run_id.into(),
        }))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) if is_lost(&s) => return Err(Interrupted::Lost(s.message().to_string())),
        Err(s) => return Err(fatal(status_err(s))),
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut cancelled = false;
    loop {
        let e = tokio::select! {
            e = stream.next() => e,
            _ = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                eprintln!("cancelling run {run_id} on the coordinator");
                c.client.cancel(c.req(v1::CancelRequest { run_id: run_id.into() })).await.map_err(|s| fatal(status_err(s)))?;
                continue;
            }
        };
        let e = match e {
            None => return Err(Interrupted::Lost("the progress stream closed".into())),
            Some(Err(s)) if is_lost(&s) => return Err(Interrupted::Lost(s.message().to_string())),
            Some(Err(s)) => return Err(fatal(status_err(s))),
            Some(Ok(e)) => e,
        };
        let p = Progress::try_from(e).map_err(|e| fatal(e.into()))?;
        if let Progress::Finished(s) = p {
            renderer.show(&Progress::Finished(s.clone()));
            return Ok(s);
        }
        renderer.show(&p);
    }
}

/// `nexa workers`: every enrolled worker, by id (read page by page).
pub async fn workers(
    remote: &Remote,
    chunk: u32,
) -> anyhow::Result<Vec<nexa_shared::record::WorkerSummary>> {
    let mut all = Vec::new();
    worker_pages(remote, chunk, |page, _| {
        all.extend(page);
        true
    })
    .await?;
    Ok(all)
}

/// Reads the workers `chunk` (the coordinator holds it to 1,000) at a time, by id,
/// handing each page and the number enrolled in all to `each` until it returns false
/// or the last page came.
pub async fn worker_pages(
    remote: &Remote,
    chunk: u32,
    mut each: impl FnMut(Vec<nexa_shared::record::WorkerSummary>, u64) -> bool,
) -> anyhow::Result<()> {
    let mut c = Control::connect(remote).await?;
    let mut after = String::new();
    loop {
        let r = c
            .client
            .list_workers(c.req(v1::ListWorkersRequest {
                after: after.clone(),
                limit: chunk,
            }))
            .await
            .map_err(status_err)?
            .into_inner();
        let page = r
            .workers
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<Vec<_>, _>>()?;
        if !each(page, r.total) || r.next_after.is_empty() || r.next_after <= after {
            return Ok(());
        }
        after = r.next_after;
    }
}

/// Refusals and lease expiries so far, by reason.
pub async fn refusals(remote: &Remote) -> anyhow::Result<Vec<(String, u64)>> {
    let mut c = Control::connect(remote).await?;
    let mut v: Vec<(String, u64)> = c
        .client
        .refusals(c.req(v1::RefusalsRequest {}))
        .await
        .map_err(status_err)?
        .into_inner()
        .counts
        .into_iter()
        .collect();
    v.sort();
    Ok(v)
}

/// A registry call on the coordinator; the answer as JSON.
pub async fn models(
    remote: &Remote,
    op: &str,
    name: &str,
    version: &str,
    tag: &str,
) -> anyhow::Result<nexa_shared::models::RegistryAnswer> {
    let mut c = Control::connect(remote).await?;
    let answer = c
        .client
        .models(c.req(v1::ModelsRequest {
            op: op.into(),
            name: name.into(),
            version: version.into(),
            tag: tag.into(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    Ok(answer.try_into()?)
}

/// Lineage of a pipeline's artifact on the coordinator: (graph, project dir).
pub async fn lineage(
    remote: &Remote,
    pipeline: &str,
    path: &str,
    down: bool,
    depth: u32,
) -> anyhow::Result<(nexa_shared::lineage::Graph, String)> {
    let mut c = Control::connect(remote).await?;
    let r = c
        .client
        .lineage(c.req(v1::LineageRequest {
            pipeline: pipeline.into(),
            path: path.into(),
            down,
            depth,
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let graph = r
        .graph
        .ok_or_else(|| anyhow::anyhow!("the coordinator's LineageResponse has no graph"))?;
    Ok((graph.try_into()?, r.project))
}

/// Drains, bans or re-activates a worker.
pub async fn set_worker_state(
    remote: &Remote,
    worker: &str,
    state: nexa_shared::record::AdminState,
) -> anyhow::Result<()> {
    let mut c = Control::connect(remote).await?;
    c.client
        .set_worker_state(c.req(v1::SetWorkerStateRequest {
            worker_id: worker.into(),
            state: v1::WorkerAdminState::from(state) as i32,
        }))
        .await
        .map_err(status_err)?;
    Ok(())
}

/// The step records of a pipeline on the coordinator.
pub async fn status(remote: &Remote, pipeline: &str) -> anyhow::Result<Vec<StepRecord>> {
    let mut c = Control::connect(remote).await?;
    let r = c
        .client
        .status(c.req(v1::StatusRequest {
            pipeline: pipeline.into(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    Ok(r.steps
        .into_iter()
        .map(StepRecord::try_from)
        .collect::<Result<_, _>>()?)
}

/// Downloads the sealed artifact `path` of `pipeline` into `dest` and verifies it.
pub async fn pull(
    remote: &Remote,
    pipeline: &str,
    path: &str,
    dest: &Path,
) -> anyhow::Result<nexa_shared::artifact::Meta> {
    let mut c = Control::connect(remote).await?;
    let mut stream = c
        .client
        .pull(c.req(v1::PullRequest {
            pipeline: pipeline.into(),
            path: path.into(),
        }))
        .await
        .map_err(status_err)?
        .into_inner();
    let tmp = nexa_shared::artifact::tmp_path(dest);
    nexa_shared::artifact::remove_tree(&tmp)?;
    std::fs::create_dir_all(&tmp)?;
    let mut open: Option<(String, std::fs::File)> = None;
    while let Some(chunk) = stream.next().await {
        let ch = chunk.map_err(status_err)?;
        let rel = paths::check_relative_name(&ch.path)?;
        if open.as_ref().is_none_or(|(p, _)| p != &ch.path) {
            let target = tmp.join(&rel);
            if let Some(d) = target.parent() {
                std::fs::create_dir_all(d)?;
            }
            open = Some((ch.path.clone(), std::fs::File::create(&target)?));
        }
        if let Some((_, f)) = open.as_mut() {
            use std::io::Write;
            f.write_all(&ch.data)?;
        }
    }
    if let Some((_, f)) = open.take() {
        f.sync_all()?;
    }
    // Verified where it was received: a copy that fails never takes `dest`'s place, so
    // nothing that looks complete is left behind (an earlier verified pull stays).
    let meta = match nexa_shared::artifact::verify(&tmp) {
        Ok(m) => m,
        Err(e) => {
            let _ = nexa_shared::artifact::remove_tree(&tmp);
            return Err(anyhow::anyhow!(
                "the pulled copy failed verification and was removed: {e}"
            ));
        }
    };
    nexa_shared::artifact::remove_tree(dest)?;
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::rename(&tmp, dest)?;
    Ok(meta)
}

/// The coordinator's service handles (all, or the one named), with their states.
pub async fn services(remote: &Remote, name: &str) -> anyhow::Result<Vec<v1::Service>> {
    let mut c = Control::connect(remote).await?;
    Ok(c.client
        .services(c.req(v1::ServicesRequest { name: name.into() }))
        .await
        .map_err(status_err)?
        .into_inner()
        .services)
}

/// Stops a service through its worker; returns what happened.
pub async fn stop_service(remote: &Remote, name: &str, grace: Duration) -> anyhow::Result<String> {
    let mut c = Control::connect(remote).await?;
    Ok(c.client
        .stop_service(c.req(v1::StopServiceRequest {
            name: name.into(),
            grace_ms: grace.as_millis() as u64,
        }))
        .await
        .map_err(status_err)?
        .into_inner()
        .outcome)
}
