//! `nexa` commands. Exit codes: 0 success, 1 the run failed (or an operational error),
//! 2 invalid input (pipeline or arguments), 130 cancelled.

use crate::embedded::{self, Embedded};
use crate::render::Renderer;
use crate::summary::{print_status, print_summary, status};
use crate::viz;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nexa_coordinator::scheduler::{RunOutcome, RunRequest};

use nexa_coordinator::Progress;
use nexa_shared::spec::{self, Loaded};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Nexa: declarative pipelines on a compute mesh, or embedded on this machine.
#[derive(Debug, Parser)]
#[command(name = "nexa", version, about)]
pub struct Cli {
    /// The project (artifact) root that relative paths in pipelines resolve against.
    #[arg(long, global = true, env = "NEXA_PROJECT_DIR", default_value = ".")]
    pub project_dir: PathBuf,
    /// A remote coordinator (http://host:port, or https:// with --ca); absent: run
    /// embedded on this machine.
    #[arg(long, global = true, env = "NEXA_COORDINATOR")]
    pub coordinator: Option<String>,
    /// The operator token for --coordinator.
    #[arg(long, global = true, env = "NEXA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust for an https:// coordinator.
    #[arg(long, global = true, env = "NEXA_CA")]
    pub ca: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run, resume, inspect and draw pipelines.
    Pipeline {
        /// The pipeline command.
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Re-hash a sealed artifact against its meta.json and check the workers' signatures.
    Verify {
        /// The artifact directory.
        artifact: PathBuf,
        /// The whole ancestry too: every artifact it was made from, re-hashed and
        /// signature-checked, and every input's digest as it was used.
        #[arg(long)]
        deep: bool,
    },
    /// What produced an artifact (--up, the default) or what was made from it (--down).
    Lineage {
        /// The artifact directory.
        artifact: PathBuf,
        /// Walk to the producers (the default).
        #[arg(long, conflicts_with = "down")]
        up: bool,
        /// Walk to the artifacts made from it.
        #[arg(long)]
        down: bool,
        /// How many levels.
        #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
        depth: usize,
        /// text, json or dot.
        #[arg(long, value_enum, default_value_t = crate::lineage_cmd::Format::Text)]
        format: crate::lineage_cmd::Format,
        /// With --coordinator: the pipeline whose artifact this is.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// List the coordinator's workers, or drain / ban / re-activate one.
    Workers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Let this worker finish its jobs and give it no more.
        #[arg(long, value_name = "WORKER")]
        drain: Option<String>,
        /// Give this worker no more work and refuse its results.
        #[arg(long, value_name = "WORKER")]
        ban: Option<String>,
        /// Let this worker get work again (clears throttling and quarantine).
        #[arg(long, value_name = "WORKER")]
        activate: Option<String>,
        /// A leaderboard by credit: verified GPU-seconds, then CPU-seconds.
        #[arg(long)]
        credit: bool,
        /// Show only the first N workers by id (they are read a page at a time).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Workers per page read from the coordinator (as kubectl's --chunk-size; the
        /// coordinator holds a page to 1,000).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        chunk_size: u32,
    },
    /// The model registry: register, resolve, promote, list, show, history.
    Models {
        /// The models command.
        #[command(subcommand)]
        command: crate::models::ModelsCommand,
    },
    /// Model servers: start (returns once healthy), list, health, stop.
    Serve {
        /// The serve command.
        #[command(subcommand)]
        command: crate::serve::ServeCommand,
    },
    /// Artifacts on a coordinator.
    Artifacts {
        /// The artifacts command.
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
}

/// `nexa artifacts ...`.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Download a sealed artifact from the coordinator and verify it.
    Pull {
        /// The pipeline name.
        pipeline: String,
        /// The artifact path as the pipeline's `out` names it.
        path: String,
        /// Where to put it [default: the same path here].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Options of every command that runs a pipeline.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline YAML file.
    pub file: PathBuf,
    /// Jobs run at once (default: the machine's cores).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Re-hash cached artifacts before reusing them (default: check COMPLETE, key and size).
    #[arg(long)]
    pub verify: bool,
    /// Slurm pilots for `scheduler: slurm` steps.
    #[command(flatten)]
    pub slurm: Box<crate::slurm::Flags>,
}

/// `nexa pipeline ...`.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Run a pipeline; steps whose artifacts are sealed under the same cache key are SKIPPED,
    /// so running again resumes.
    Run(RunArgs),
    /// Alias of `run`.
    Resume(RunArgs),
    /// Re-run STEP and everything downstream of it, ignoring their step caches.
    Rerun {
        /// Run options.
        #[command(flatten)]
        run: RunArgs,
        /// The step to start from.
        #[arg(long)]
        from: String,
    },
    /// Show each step's status, cache key and artifact.
    Status {
        /// The pipeline YAML file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draw the DAG.
    Viz {
        /// The pipeline YAML file.
        file: PathBuf,
        /// text, dot or mermaid.
        #[arg(long, value_enum, default_value_t = viz::Format::Text)]
        format: viz::Format,
    },
    /// Check a pipeline file and list every problem as file:line:col: message.
    Validate {
        /// The pipeline YAML file.
        file: PathBuf,
    },
}

/// Parses arguments, runs the command, returns the exit code.
pub fn main() -> ExitCode {
    // `nexa workers | head`: stdout closed early is how pipes end, not a crash. Rust
    // ignores SIGPIPE, so a print then fails and panics; exit quietly instead, with the
    // status a process killed by SIGPIPE has.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
    let cli = Cli::parse();
    nexa_shared::logging::init("warn");
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn remote_of(cli: &Cli) -> anyhow::Result<Option<crate::remote::Remote>> {
    let Some(url) = cli.coordinator.clone() else {
        return Ok(None);
    };
    let token = cli
        .token
        .clone()
        .context("--coordinator needs --token (or NEXA_TOKEN): the operator token")?;
    Ok(Some(crate::remote::Remote {
        url,
        token,
        ca: cli.ca.clone(),
    }))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let project = std::path::absolute(&cli.project_dir).context("resolving --project-dir")?;
    let remote = remote_of(&cli)?;
    match cli.command {
        Command::Workers {
            json,
            drain,
            ban,
            activate,
            credit,
            limit,
            chunk_size,
        } => {
            let r = remote.context("nexa workers needs --coordinator and --token")?;
            if credit {
                return runtime()?.block_on(crate::workers_cmd::leaderboard(&r, json, chunk_size));
            }
            runtime()?.block_on(crate::workers_cmd::list(
                &r,
                json,
                (limit, chunk_size),
                drain,
                ban,
                activate,
            ))
        }
        Command::Artifacts {
            command:
                ArtifactsCommand::Pull {
                    pipeline,
                    path,
                    out,
                },
        } => {
            let r = remote.context("nexa artifacts pull needs --coordinator and --token")?;
            let dest = project.join(out.unwrap_or_else(|| PathBuf::from(&path)));
            let meta = runtime()?.block_on(crate::remote::pull(&r, &pipeline, &path, &dest))?;
            println!(
                "pulled {} ({} bytes, {}), verified",
                dest.display(),
                meta.bytes,
                meta.hash
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { command } => match &remote {
            Some(r) => {
                let on_coordinator = |project: &Path, file: PathBuf| {
                    let args = RunArgs {
                        file,
                        slots: None,
                        verify: false,
                        slurm: Default::default(),
                    };
                    run_remote(r, project, args, None)
                };
                crate::serve::run(
                    crate::serve::Place::Coordinator(r),
                    &project,
                    command,
                    &on_coordinator,
                )
            }
            None => crate::serve::run(
                crate::serve::Place::Project(&project),
                &project,
                command,
                &run_file,
            ),
        },
        Command::Models { command } => match &remote {
            Some(r) => runtime()?.block_on(crate::models::run_remote(r, command)),
            None => crate::models::run(&project, command),
        },
        Command::Lineage {
            artifact,
            up: _,
            down,
            depth,
            format,
            pipeline,
        } => match &remote {
            Some(r) => {
                let pipeline = pipeline.context(
                    "nexa lineage --coordinator needs --pipeline (the artifact's pipeline)",
                )?;
                runtime()?.block_on(crate::lineage_cmd::lineage_remote(
                    r, &pipeline, &artifact, down, depth, format,
                ))
            }
            None => crate::lineage_cmd::lineage(&project, &artifact, down, depth, format),
        },
        Command::Verify {
            artifact,
            deep: true,
        } => crate::lineage_cmd::verify_deep(&project, &artifact),
        Command::Verify {
            artifact,
            deep: false,
        } => match nexa_shared::provenance::verify_artifact(&artifact) {
            Ok(v) => {
                let who = if v.workers.is_empty() {
                    "none recorded".to_string()
                } else {
                    v.workers.join(", ")
                };
                println!(
                    "ok {} {} ({} bytes); signatures verified: {who}",
                    artifact.display(),
                    v.meta.hash,
                    v.meta.bytes
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("FAILED {e}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Pipeline { command } => match command {
            PipelineCommand::Run(a) | PipelineCommand::Resume(a) => match &remote {
                Some(r) => run_remote(r, &project, a, None),
                None => run(&project, a, None),
            },
            PipelineCommand::Rerun { run: a, from } => match &remote {
                Some(r) => run_remote(r, &project, a, Some(from)),
                None => run(&project, a, Some(from)),
            },
            PipelineCommand::Validate { file } => match load(&file, &project) {
                Ok(l) => {
                    println!("{}: ok ({} steps)", file.display(), l.pipeline.steps.len());
                    Ok(ExitCode::SUCCESS)
                }
                Err(code) => Ok(code),
            },
            PipelineCommand::Viz { file, format } => match load(&file, &project) {
                Ok(l) => {
                    print!("{}", viz::render(&l, format));
                    Ok(ExitCode::SUCCESS)
                }
                Err(code) => Ok(code),
            },
            PipelineCommand::Status { file, json } => match load(&file, &project) {
                Ok(l) => match &remote {
                    Some(r) => {
                        let records =
                            runtime()?.block_on(crate::remote::status(r, &l.pipeline.name))?;
                        let map = records.into_iter().map(|r| (r.id.clone(), r)).collect();
                        print_status(&l, &map, json)
                    }
                    None => status(&project, &l, json),
                },
                Err(code) => Ok(code),
            },
        },
    }
}

/// Loads and validates; on failure prints every diagnostic and returns exit code 2.
fn load(file: &Path, project: &Path) -> Result<Loaded, ExitCode> {
    match spec::load_file(file, project) {
        Ok(l) => Ok(l),
        Err(nexa_shared::Error::Invalid(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!(
                "{}: {} error{}",
                file.display(),
                diags.len(),
                if diags.len() == 1 { "" } else { "s" }
            );
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// Runs a pipeline file embedded, as `nexa pipeline run FILE` does.
pub fn run_file(project: &Path, file: PathBuf) -> anyhow::Result<ExitCode> {
    run(
        project,
        RunArgs {
            file,
            slots: None,
            verify: false,
            slurm: Default::default(),
        },
        None,
    )
}

fn run(project: &Path, args: RunArgs, from: Option<String>) -> anyhow::Result<ExitCode> {
    let loaded = match load(&args.file, project) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if let Some(f) = &from
        && !loaded.pipeline.steps.iter().any(|s| &s.id.value == f)
    {
        eprintln!("error: --from {f}: no such step in {}", args.file.display());
        return Ok(ExitCode::from(2));
    }
    // Services the run will start again are stopped first: a re-run replaces them.
    let serve_steps = crate::serve::serve_steps(project, &loaded);
    crate::serve::before_run(project, &serve_steps)?;
    let slots = args.slots.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let file_display = args.file.display().to_string();
    rt.block_on(async move {
        let name = loaded.pipeline.name.clone();
        let state_dir = embedded::state_dir(project, &name);
        let store = embedded::open_store(project, &name)?;
        let work_dir = state_dir.join("worker");
        // Nothing else uses this state now (the store is locked): jobs of a killed run are
        // stale. Kill what they left running, then drop their directories.
        nexa_worker::exec::reap_orphans(&work_dir);
        let _ = std::fs::remove_dir_all(work_dir.join("jobs"));
        let key = project.join(".nexa_state").join("worker.key");
        // A pipeline with steps in container images runs them with the local docker
        // (asked only then: it costs a round trip to the daemon).
        let containers = loaded.pipeline.steps.iter().any(|s| s.image().is_some());
        if containers {
            nexa_worker::sandbox::reap_orphans("docker", &work_dir);
        }
        let python = loaded
            .pipeline
            .steps
            .iter()
            .any(|s| nexa_shared::runners::is_runner(&s.uses.value));
        let held = || crate::serve::held_gpus(project);
        let cluster = crate::slurm::wanted(&loaded, &args.slurm);
        let emb = Embedded::start(
            Arc::new(store),
            crate::slurm::engine_config(cluster),
            embedded::LocalWorker {
                work_dir,
                key_path: key,
                slots,
                containers,
                python,
            },
            &held,
        )?;
        let pilots = match cluster {
            true => Some(crate::slurm::start(&emb.coordinator, *args.slurm, &state_dir).await?),
            false => None,
        };
        let n = loaded.pipeline.steps.len();
        let order: Vec<usize> = loaded.dag.topo_order().unwrap_or_else(|| (0..n).collect());
        let mut handle = emb
            .submit(RunRequest {
                loaded,
                project: project.to_path_buf(),
                verify: args.verify,
                from,
                git_sha: embedded::git_sha(project),
                run_id: None,
                confined: false,
            })
            .await?;
        let mut renderer = Renderer::new(n);
        let mut cancelled = false;
        let mut summary = None;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                p = handle.recv() => match p {
                    Some(Progress::Finished(s)) => {
                        renderer.show(&Progress::Finished(s.clone()));
                        summary = Some(s);
                        break;
                    }
                    Some(p) => renderer.show(&p),
                    None => break,
                },
                _ = &mut ctrl_c => {
                    if cancelled {
                        eprintln!("aborting");
                        if let Some(p) = &pilots {
                            p.cancel_now();
                        }
                        std::process::exit(130);
                    }
                    cancelled = true;
                    eprintln!("cancelling: killing running jobs and saving state (Ctrl-C again to abort)");
                    emb.coordinator.cancel(&handle.run_id)?;
                    ctrl_c.set(tokio::signal::ctrl_c());
                }
            }
        }
        if let Some(p) = pilots {
            p.stop().await;
        }
        emb.stop().await;
        let Some(summary) = summary else {
            anyhow::bail!("the coordinator stopped before the run finished");
        };
        // Handles are stored before anything is printed (a closed stdout must not lose
        // a running service).
        let serving = crate::serve::after_run(
            project,
            &summary.pipeline,
            &serve_steps,
            summary.run_id.as_str(),
        )?;
        print_summary(&summary, &file_display, &order);
        for line in serving {
            println!("{line}");
        }
        Ok(match summary.outcome {
            RunOutcome::Succeeded => ExitCode::SUCCESS,
            RunOutcome::Failed => ExitCode::from(1),
            RunOutcome::Cancelled => ExitCode::from(130),
        })
    })
}

fn run_remote(
    r: &crate::remote::Remote,
    project: &Path,
    args: RunArgs,
    from: Option<String>,
) -> anyhow::Result<ExitCode> {
    let loaded = match load(&args.file, project) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let n = loaded.pipeline.steps.len();
    let order: Vec<usize> = loaded.dag.topo_order().unwrap_or_else(|| (0..n).collect());
    let summary = runtime()?.block_on(crate::remote::run(
        r,
        &args.file,
        project,
        &loaded,
        args.verify,
        from,
    ))?;
    print_summary(&summary, &args.file.display().to_string(), &order);
    Ok(match summary.outcome {
        RunOutcome::Succeeded => ExitCode::SUCCESS,
        RunOutcome::Failed => ExitCode::from(1),
        RunOutcome::Cancelled => ExitCode::from(130),
    })
}
