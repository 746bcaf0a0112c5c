//! `nexa serve start|list|health|stop`: model servers as durable handles.
//!
//! A service is started by a `runners.serve` step (its own, or the one-step pipeline
//! `serve start` writes), which seals a `handle.json` once the server is healthy. The
//! handle is then kept in the project's store (`.nexa_state/registry`, tree
//! `services`), so `health` and `stop` work from any later process. A stop checks that
//! the pid still carries the service's `NEXA_SERVICE_ID` before it signals anything (a
//! reused pid is never hit), sends SIGTERM to the server's process group and SIGKILL
//! after the grace period.

use anyhow::Context;
use clap::Subcommand;
use nexa_coordinator::store::{SledStore, Store};
use nexa_shared::runners;
use nexa_shared::spec::Loaded;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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

/// Runs a pipeline file embedded (`nexa pipeline run FILE`), as the CLI does.
pub type RunFile<'a> = &'a dyn Fn(&Path, PathBuf) -> anyhow::Result<ExitCode>;

/// Runs `nexa serve ...` against the project's store; `run_file` runs the one-step
/// pipeline `start` writes.
pub fn run(
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
            dry_run,
        } => start(
            project,
            run_file,
            &backend,
            &model,
            name,
            &host,
            port,
            tensor_parallel,
            dry_run,
        ),
        ServeCommand::List { json } => {
            let store = open(project)?;
            let mut rows = Vec::new();
            for mut h in handles(&store)? {
                let healthy = is_healthy(&h);
                h["healthy"] = serde_json::Value::Bool(healthy);
                rows.push(h);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no services");
            } else {
                for h in &rows {
                    println!(
                        "{:<24} {:<10} {:<28} {}",
                        h["name"].as_str().unwrap_or("?"),
                        h["backend"].as_str().unwrap_or("?"),
                        h["endpoint"].as_str().unwrap_or("?"),
                        if h["healthy"] == true {
                            "healthy"
                        } else {
                            "unhealthy"
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ServeCommand::Health { name } => {
            let h = handle(&open(project)?, &name)?;
            let endpoint = h["endpoint"].as_str().unwrap_or_default();
            if is_healthy(&h) {
                println!("{name}: healthy at {endpoint}");
                Ok(ExitCode::SUCCESS)
            } else {
                let why = if alive(&h) {
                    "the process runs but does not answer /health with the model listed"
                } else {
                    "its process is gone"
                };
                println!("{name}: unhealthy at {endpoint} ({why})");
                Ok(ExitCode::from(1))
            }
        }
        ServeCommand::Stop { name, grace } => {
            let store = open(project)?;
            let h = handle(&store, &name)?;
            let how = stop(&h, grace);
            store.remove(TREE, &name)?;
            store.flush()?;
            println!("{name}: {how}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    project: &Path,
    run_file: RunFile<'_>,
    backend: &str,
    model: &str,
    name: Option<String>,
    host: &str,
    port: u16,
    tensor_parallel: u32,
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
    let pipeline_name = format!("serve-{name}");
    let yaml = format!(
        "pipeline:\n  name: {}\n  steps:\n    - id: serve\n      uses: runners.serve\n      backend: {}\n{model_line}      params: {{{params}}}\n      out: {}\n",
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
    let h = handle(&open(project)?, &name)?;
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
            let how = stop(&h, Duration::from_secs(10));
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

fn pid_of(h: &serde_json::Value) -> Option<i32> {
    h["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
}

/// The handle's process still runs and is that service (its environment carries the
/// service id), not a zombie.
fn alive(h: &serde_json::Value) -> bool {
    let (Some(pid), Some(id)) = (pid_of(h), h["service_id"].as_str()) else {
        return false;
    };
    let ours = u32::try_from(pid)
        .is_ok_and(|p| nexa_worker::exec::environ_has(p, &format!("NEXA_SERVICE_ID={id}")));
    ours && !exited(pid)
}

/// The process is gone, or has exited and waits only to be reaped.
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

/// Stops the service; returns what happened.
fn stop(h: &serde_json::Value, grace: Duration) -> &'static str {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if !alive(h) {
        return "already stopped";
    }
    let Some(pid) = pid_of(h) else {
        return "already stopped";
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        // Its environment goes before the process does: wait for the exit itself.
        if exited(pid) {
            return "stopped (SIGTERM)";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    "killed (SIGKILL after the grace period)"
}

/// `GET /health` is 200 and `GET /v1/models` lists the handle's name.
fn is_healthy(h: &serde_json::Value) -> bool {
    let (Some(endpoint), Some(name)) = (h["endpoint"].as_str(), h["name"].as_str()) else {
        return false;
    };
    let Some(addr) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let ok = |path: &str| get(addr, path).filter(|(status, _)| *status == 200);
    if ok("/health").is_none() {
        return false;
    }
    ok("/v1/models")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["data"].as_array().cloned())
        .is_some_and(|models| models.iter().any(|m| m["id"] == name))
}

/// A plain HTTP/1.1 GET with a short timeout: (status, body).
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::net::ToSocketAddrs;
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.take(4 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
