//! `nexa serve start|list|health|stop`: model servers as durable handles.
//!
//! A service is started by a `runners.serve` step (its own, or the one-step pipeline
//! `serve start` writes), which seals a `handle.json` once the server is healthy.
//!
//! Embedded, the handle is kept in the project's store (`.nexa_state/registry`, tree
//! `services`), so `health` and `stop` work from any later process. A stop checks that
//! the pid still carries the service's `NEXA_SERVICE_ID` before it signals anything (a
//! reused pid is never hit), sends SIGTERM to the server's process group and SIGKILL
//! after the grace period (`nexa_worker::services`).
//!
//! With `--coordinator`, the coordinator's store keeps the handle and the worker that
//! runs the service reports its health in its heartbeats; `stop` goes to the worker
//! through them and returns once the worker no longer runs it.

use crate::remote::Remote;
use anyhow::Context;
use clap::Subcommand;
use nexa_coordinator::store::{SledStore, Store};
use nexa_shared::runners;
use nexa_shared::spec::Loaded;
use nexa_worker::services;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const TREE: &str = "services";

/// `nexa serve ...`.
#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// Start a model server and return once it is healthy; prints its name and endpoint.
    Start {
        /// hf_runtime (Nexa's server over transformers) or vllm.
        #[arg(long, default_value = "hf_runtime")]
        backend: String,
        /// A save_pretrained folder (a checkpoint artifact) or a hub id.
        #[arg(long)]
        model: String,
        /// The handle's name (also the model's name in the API) [default: the folder's].
        #[arg(long)]
        name: Option<String>,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port (0: any free port).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// vLLM's --tensor-parallel-size.
        #[arg(long, default_value_t = 1)]
        tensor_parallel: u32,
        /// GPUs the server holds while it runs [default: vllm --tensor-parallel (none for
        /// a dry run), else 0].
        #[arg(long)]
        gpus: Option<u32>,
        /// Record the command without starting anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the services and whether each is healthy.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check one service (exit 0 when healthy, 1 when not).
    Health {
        /// The service's name.
        name: String,
    },
    /// Stop a service: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// The service's name.
        name: String,
        /// How long to wait after SIGTERM.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
}

fn open(project: &Path) -> anyhow::Result<SledStore> {
    crate::models::open(project)
}

fn handles(store: &SledStore) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(store
        .scan_prefix(TREE, "")?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

fn handle(store: &SledStore, name: &str) -> anyhow::Result<serde_json::Value> {
    let bytes = store
        .get(TREE, name)?
        .with_context(|| format!("no service named '{name}' (nexa serve list)"))?;
    serde_json::from_slice(&bytes).with_context(|| format!("the handle of '{name}' is not JSON"))
}

/// Where the handles are kept.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// The project's store: services on this machine, checked and signalled here.
    Project(&'a Path),
    /// A coordinator's store: services on its workers, checked by them and stopped
    /// through their heartbeats.
    Coordinator(&'a Remote),
}

/// A handle and its state now: healthy, unhealthy, stopping, lost, stopped or dry_run.
struct Row {
    handle: serde_json::Value,
    state: String,
    detail: String,
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

impl Place<'_> {
    /// Every handle, or the one named.
    fn rows(&self, name: Option<&str>) -> anyhow::Result<Vec<Row>> {
        match self {
            Place::Project(project) => {
                let store = open(project)?;
                let list = match name {
                    Some(n) => vec![handle(&store, n)?],
                    None => handles(&store)?,
                };
                Ok(list
                    .into_iter()
                    .map(|handle| {
                        let (state, detail) = if handle["status"] == "dry_run" {
                            ("dry_run", "a dry run: nothing was started".to_string())
                        } else {
                            match services::health(&handle) {
                                Ok(()) => ("healthy", String::new()),
                                Err(why) => ("unhealthy", why),
                            }
                        };
                        Row {
                            handle,
                            state: state.into(),
                            detail,
                        }
                    })
                    .collect())
            }
            Place::Coordinator(r) => {
                let list = block_on(crate::remote::services(r, name.unwrap_or_default()))?;
                Ok(list
                    .into_iter()
                    .map(|s| Row {
                        handle: serde_json::from_str(&s.handle_json).unwrap_or_default(),
                        state: s.state,
                        detail: s.detail,
                    })
                    .collect())
            }
        }
    }

    /// Stops the named service and forgets its handle; returns what happened.
    fn stop(&self, name: &str, grace: Duration) -> anyhow::Result<String> {
        match self {
            Place::Project(project) => {
                let store = open(project)?;
                let h = handle(&store, name)?;
                let how = services::stop(&h, grace);
                store.remove(TREE, name)?;
                store.flush()?;
                Ok(how.into())
            }
            Place::Coordinator(r) => block_on(crate::remote::stop_service(r, name, grace)),
        }
    }
}

/// Runs a pipeline file (`nexa pipeline run FILE`, embedded or on the coordinator).
pub type RunFile<'a> = &'a dyn Fn(&Path, PathBuf) -> anyhow::Result<ExitCode>;

/// Runs `nexa serve ...` against the handles in `place`; `run_file` runs the one-step
/// pipeline `start` writes in `project`.
pub fn run(
    place: Place<'_>,
    project: &Path,
    command: ServeCommand,
    run_file: RunFile<'_>,
) -> anyhow::Result<ExitCode> {
    match command {
        ServeCommand::Start {
            backend,
            model,
            name,
            host,
            port,
            tensor_parallel,
            gpus,
            dry_run,
        } => {
            // A dry run starts nothing, so it holds no GPUs.
            let gpus = gpus.unwrap_or(if backend == "vllm" && !dry_run {
                tensor_parallel
            } else {
                0
            });
            start(
                place,
                project,
                run_file,
                &backend,
                &model,
                name,
                &host,
                (port, tensor_parallel, gpus),
                dry_run,
            )
        }
        ServeCommand::List { json } => {
            let rows = place.rows(None)?;
            if json {
                let list: Vec<serde_json::Value> = rows
                    .into_iter()
                    .map(|r| {
                        let mut h = r.handle;
                        h["healthy"] = serde_json::Value::Bool(r.state == "healthy");
                        h["state"] = serde_json::Value::String(r.state);
                        h["detail"] = serde_json::Value::String(r.detail);
                        h
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if rows.is_empty() {
                println!("no services");
            } else {
                for r in &rows {
                    let h = &r.handle;
                    println!(
                        "{:<24} {:<10} {:<28} {:<10} {}",
                        h["name"].as_str().unwrap_or("?"),
                        h["backend"].as_str().unwrap_or("?"),
                        h["endpoint"].as_str().unwrap_or("?"),
                        r.state,
                        h["worker"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ServeCommand::Health { name } => {
            let rows = place.rows(Some(&name))?;
            let Some(r) = rows.first() else {
                anyhow::bail!("no service named '{name}' (nexa serve list)");
            };
            let endpoint = r.handle["endpoint"].as_str().unwrap_or_default();
            if r.state == "healthy" {
                println!("{name}: healthy at {endpoint}");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{name}: {} at {endpoint} ({})", r.state, r.detail);
                Ok(ExitCode::from(1))
            }
        }
        ServeCommand::Stop { name, grace } => {
            let how = place.stop(&name, grace)?;
            println!("{name}: {how}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    place: Place<'_>,
    project: &Path,
    run_file: RunFile<'_>,
    backend: &str,
    model: &str,
    name: Option<String>,
    host: &str,
    (port, tensor_parallel, gpus): (u16, u32, u32),
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let local = project.join(model);
    let name = name.unwrap_or_else(|| {
        Path::new(model.trim_end_matches('/'))
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let model_line = if local.exists() {
        format!("      in: {{model: {}}}\n", q(model))
    } else {
        String::new()
    };
    let mut params = format!(
        "name: {}, host: {}, port: {port}, tensor_parallel: {tensor_parallel}, dry_run: {dry_run}",
        q(&name),
        q(host)
    );
    if !local.exists() {
        params.push_str(&format!(", model: {}", q(model)));
    }
    let resources = if gpus > 0 {
        format!("      resources: {{gpus: {gpus}}}\n")
    } else {
        String::new()
    };
    let pipeline_name = format!("serve-{name}");
    let yaml = format!(
        "pipeline:\n  name: {}\n  steps:\n    - id: serve\n      uses: runners.serve\n      backend: {}\n{model_line}{resources}      params: {{{params}}}\n      out: {}\n",
        q(&pipeline_name),
        q(backend),
        q(&format!("artifacts/serve/{name}"))
    );
    let dir = project.join(".nexa_state").join("serve");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!(
        "{}.yaml",
        nexa_shared::paths::safe_component(&name)
    ));
    std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    let code = run_file(project, file)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let rows = place.rows(Some(&name))?;
    let Some(h) = rows.first().map(|r| &r.handle) else {
        anyhow::bail!("the serve step succeeded and left no handle named '{name}'");
    };
    println!(
        "{name} {}{}",
        h["endpoint"].as_str().unwrap_or_default(),
        if dry_run {
            " (dry run: nothing started)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The GPUs (by UUID) that services running on this machine hold, from the project's
/// handles: an embedded run leaves them out.
pub fn held_gpus(project: &Path) -> Vec<String> {
    let Ok(store) = open(project) else {
        return Vec::new();
    };
    handles(&store)
        .unwrap_or_default()
        .iter()
        .filter(|h| services::alive(h))
        .flat_map(services::gpus_of)
        .collect()
}

/// The `runners.serve` steps of a pipeline, as (service name, artifact path); read once
/// before a run, for [`before_run`] and [`after_run`].
pub fn serve_steps(project: &Path, loaded: &Loaded) -> Vec<(String, PathBuf)> {
    loaded
        .pipeline
        .steps
        .iter()
        .filter(|s| s.uses.value == runners::SERVE)
        .filter_map(|s| {
            let (_, out) = s.outputs.entries().into_iter().next()?;
            let name = s
                .params
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or(&s.id.value)
                .to_string();
            Some((name, project.join(&out.value)))
        })
        .collect()
}

/// Before a pipeline with serve steps runs: the services it will start again are
/// stopped, so a re-run replaces them instead of failing on a taken port.
pub fn before_run(project: &Path, steps: &[(String, PathBuf)]) -> anyhow::Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let store = open(project)?;
    for (name, _) in steps {
        if let Ok(h) = handle(&store, name) {
            let how = services::stop(&h, Duration::from_secs(10));
            tracing::info!(service = %name, how, "replacing the service");
            store.remove(TREE, name)?;
        }
    }
    store.flush()?;
    Ok(())
}

/// After run `run_id` of `pipeline`: the handles its serve steps sealed in that run are
/// kept in the store (an artifact left by an earlier run, whose server was stopped
/// when this one began, is not). Returns what to tell the user.
pub fn after_run(
    project: &Path,
    pipeline: &str,
    steps: &[(String, PathBuf)],
    run_id: &str,
) -> anyhow::Result<Vec<String>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let store = open(project)?;
    let mut lines = Vec::new();
    for (name, dir) in steps {
        let sealed_now = nexa_shared::artifact::read_meta(dir)
            .is_ok_and(|m| m.labels.get("run_id").map(String::as_str) == Some(run_id));
        if !sealed_now {
            continue;
        }
        let Ok(text) = std::fs::read(dir.join("handle.json")) else {
            continue;
        };
        let Ok(mut h) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        h["pipeline"] = serde_json::Value::String(pipeline.to_string());
        h["artifact"] = serde_json::Value::String(dir.display().to_string());
        store.put(TREE, name, &serde_json::to_vec(&h)?)?;
        if h["status"] == "healthy" {
            lines.push(format!(
                "serving {name} at {} (nexa serve stop {name})",
                h["endpoint"].as_str().unwrap_or_default()
            ));
        }
    }
    store.flush()?;
    Ok(lines)
}
