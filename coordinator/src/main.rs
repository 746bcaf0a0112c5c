//! `nexa-coordinator`: serve the mesh, or write development TLS certificates.
//!
//! Settings are layered: defaults, then a TOML file (`--config`), then `NEXA_*`
//! environment variables, then flags.

use anyhow::Context;

/// mimalloc: the coordinator allocates many small, short-lived buffers from several
/// threads (protobuf messages, paths, JSON), where glibc's allocator spent ~14% of the
/// mesh bench's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use nexa_coordinator::mesh::{MeshConfig, ServeConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "nexa-coordinator", version, about = "The Nexa coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve workers and operators.
    Serve(Box<ServeArgs>),
    /// Write a development CA and a server certificate for TLS.
    Certs {
        /// Where to write ca.pem, server.pem and server.key.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names the server certificate is valid for.
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Look after the run-state store.
    Store {
        #[command(subcommand)]
        command: StoreCmd,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Records per tree and their bytes against the store's size on disk (its space
    /// amplification). The coordinator must be stopped (sled locks its store).
    Stats {
        /// The coordinator's data directory [default: ./nexa-data].
        #[arg(long, env = "NEXA_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a store that cannot be opened: step and run records from the pipelines'
    /// state mirrors, lineage from the sealed artifacts, models from the registry
    /// mirror. The old store is moved aside; what could not be recovered is listed.
    Recover {
        /// The coordinator's data directory [default: ./nexa-data].
        #[arg(long, env = "NEXA_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Rebuild even a store that opens.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServeArgs {
    /// A TOML file with any of these settings (keys as the flags, without dashes in front).
    #[arg(long, env = "NEXA_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "NEXA_LISTEN")]
    listen: Option<String>,
    /// Where the store, blobs, projects and tokens live [default: ./nexa-data].
    #[arg(long, env = "NEXA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (Prometheus text format); off when absent.
    #[arg(long, env = "NEXA_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// The operator token; generated, stored in the data dir and printed once when absent.
    #[arg(long, env = "NEXA_OPERATOR_TOKEN")]
    operator_token: Option<String>,
    /// The token workers enrol with; generated like the operator token when absent.
    #[arg(long, env = "NEXA_ENROL_TOKEN")]
    enrol_token: Option<String>,
    /// Let any worker enrol without a token.
    #[arg(long, env = "NEXA_OPEN_ENROLMENT", num_args = 0..=1, default_missing_value = "true")]
    open_enrolment: Option<bool>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "NEXA_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "NEXA_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Heartbeat interval in ms [default: 2000]; leases live three of them.
    #[arg(long, env = "NEXA_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Seconds a job no worker can run waits for one to join [default: 30].
    #[arg(long, env = "NEXA_UNFIT_GRACE_S")]
    unfit_grace_s: Option<u64>,
    /// Replicate every step that has no `validation` of its own, for a pool of untrusted
    /// workers: `replicas=N,quorum=K[,tolerance=R][,homogeneous]`.
    #[arg(long, env = "NEXA_VALIDATE")]
    validate: Option<String>,
    /// Free space the data disk keeps, e.g. `1GiB` [default: 1GiB; `0` turns it off].
    /// Below it the coordinator takes no new submissions, leases or uploads, and
    /// `/readyz` answers 503, until space returns.
    #[arg(long, env = "NEXA_MIN_FREE")]
    min_free: Option<String>,
    /// The most one job may upload in all, e.g. `100GiB` [default: 256GiB].
    #[arg(long, env = "NEXA_MAX_JOB_OUTPUT")]
    max_job_output: Option<String>,
    /// The largest submission (the pipeline and its file list), e.g. `256MiB`
    /// [default: 64MiB]; a pipeline of a million steps is ~92 MB.
    #[arg(long, env = "NEXA_MAX_SUBMIT")]
    max_submit: Option<String>,
    /// Start pilot workers in Slurm allocations for `scheduler: slurm` steps (also on
    /// with any --slurm-* flag or a `[slurm]` section in the file).
    #[arg(long)]
    #[serde(skip)]
    slurm: bool,
    /// The Slurm provider's settings from the flags.
    #[command(flatten)]
    #[serde(skip)]
    slurm_flags: nexa_coordinator::slurm::SlurmArgs,
    /// The `[slurm]` section of the file.
    #[arg(skip)]
    #[serde(rename = "slurm")]
    slurm_file: Option<nexa_coordinator::slurm::SlurmArgs>,
}

impl ServeArgs {
    /// Flags and environment win over the file; the file over defaults.
    fn layered(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file: ServeArgs =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            listen,
            data_dir,
            metrics_listen,
            operator_token,
            enrol_token,
            open_enrolment,
            tls_cert,
            tls_key,
            heartbeat_ms,
            unfit_grace_s,
            validate,
            min_free,
            max_job_output,
            max_submit
        );
        if file.slurm_file.is_some() {
            self.slurm = true;
        }
        self.slurm_flags = self.slurm_flags.or(file.slurm_file.unwrap_or_default());
        Ok(self)
    }
}

/// Reads a token stored in the data dir, or makes, stores (0600) and announces one.
fn stored_token(data_dir: &Path, name: &str, what: &str) -> anyhow::Result<String> {
    let path = data_dir.join(name);
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    let mut b = [0u8; 24];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let token = hex::encode(b);
    nexa_coordinator::certs::write_private(&path, token.as_bytes())?;
    eprintln!(
        "{what}: {token}\n  (generated and stored in {}; it is not printed again)",
        path.display()
    );
    Ok(token)
}

pub(crate) fn main() -> anyhow::Result<()> {
    nexa_shared::logging::init("info");
    match Cli::parse().command {
        Cmd::Certs { out, hosts } => {
            let c = nexa_coordinator::certs::write_dev_certs(&out, &hosts)?;
            println!(
                "wrote {} (trust this), {} and {} for {}",
                c.ca.display(),
                c.cert.display(),
                c.key.display(),
                hosts.join(", ")
            );
            Ok(())
        }
        Cmd::Serve(args) => serve(args.layered()?),
        Cmd::Store {
            command:
                StoreCmd::Recover {
                    data_dir,
                    force,
                    json,
                },
        } => recover(
            &data_dir.unwrap_or_else(|| PathBuf::from("nexa-data")),
            force,
            json,
        ),
        Cmd::Store {
            command: StoreCmd::Stats { data_dir, json },
        } => store_stats(
            &data_dir.unwrap_or_else(|| PathBuf::from("nexa-data")),
            json,
        ),
    }
}

fn store_stats(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let path = data_dir.join("store");
    anyhow::ensure!(path.is_dir(), "{}: no store here", path.display());
    let store = nexa_coordinator::store::SledStore::open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let s = store.stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let size = nexa_shared::units::format_size;
    println!(
        "{:<16} {:>10} {:>12} {:>12}",
        "tree", "records", "keys", "values"
    );
    for t in &s.trees {
        println!(
            "{:<16} {:>10} {:>12} {:>12}",
            t.name,
            t.records,
            size(t.key_bytes),
            size(t.value_bytes)
        );
    }
    println!(
        "live {} on {} of disk: space amplification {:.1}x",
        size(s.live_bytes),
        size(s.disk_bytes),
        s.amplification
    );
    Ok(())
}

fn recover(data_dir: &Path, force: bool, json: bool) -> anyhow::Result<()> {
    let r = nexa_coordinator::recover::recover(data_dir, force)
        .with_context(|| format!("recovering the store of {}", data_dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if let Some(old) = &r.moved_to {
        println!("the old store was moved to {}", old.display());
    }
    println!(
        "recovered: {} step records and {} runs of {} pipelines, lineage of {} sealed artifacts, {} models",
        r.steps, r.runs, r.pipelines, r.artifacts, r.models
    );
    println!("not recovered:");
    for line in &r.not_recovered {
        println!("  - {line}");
    }
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let data_dir = a.data_dir.unwrap_or_else(|| PathBuf::from("nexa-data"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let operator_token = match a.operator_token {
        Some(t) => t,
        None => stored_token(&data_dir, "operator.token", "operator token")?,
    };
    let enrol_token = if a.open_enrolment.unwrap_or(false) {
        None
    } else {
        Some(match a.enrol_token {
            Some(t) => t,
            None => stored_token(&data_dir, "enrol.token", "worker enrolment token")?,
        })
    };
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(&c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(&k).with_context(|| format!("reading {}", k.display()))?,
        )),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let mut mesh = MeshConfig::new(data_dir);
    mesh.enrol_token = enrol_token;
    if let Some(m) = &a.max_job_output {
        mesh.max_upload_job =
            nexa_shared::units::parse_size(m).with_context(|| format!("--max-job-output {m:?}"))?;
    }
    if let Some(m) = &a.max_submit {
        let bytes =
            nexa_shared::units::parse_size(m).with_context(|| format!("--max-submit {m:?}"))?;
        mesh.max_submit_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    if let Some(m) = &a.min_free {
        mesh.min_free =
            nexa_shared::units::parse_size(m).with_context(|| format!("--min-free {m:?}"))?;
    }
    if let Some(ms) = a.heartbeat_ms {
        mesh.heartbeat_interval = Duration::from_millis(ms.max(50));
        mesh.lease_ttl = mesh.heartbeat_interval * 3;
    }
    let cfg = ServeConfig {
        mesh,
        operator_token,
        unfit_grace: Duration::from_secs(a.unfit_grace_s.unwrap_or(30)),
        default_validation: a
            .validate
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow::anyhow!("--validate: {e}"))?,
        tls,
        slurm: None,
    };
    let slurm = (a.slurm || a.slurm_flags.any()).then_some(a.slurm_flags);
    let listen = a.listen.unwrap_or_else(|| "127.0.0.1:7070".into());
    let metrics_listen = a.metrics_listen;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // A store that cannot be opened stops the start before anything listens.
        let store = nexa_coordinator::mesh::open_store(&cfg.mesh.data_dir)?;
        let metrics = match &metrics_listen {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("metrics on {m}"))?;
                println!("metrics on {}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let mut cfg = cfg;
        if let Some(s) = slurm {
            let url = nexa_coordinator::slurm::url_of(listener.local_addr()?, cfg.tls.is_some());
            let c = s
                .config(&cfg.mesh.data_dir, url, cfg.mesh.enrol_token.clone())
                .map_err(anyhow::Error::msg)?;
            eprintln!("Slurm pilots ({}) reach this coordinator at {}", c.job_name, c.url);
            cfg.slurm = Some(c);
        }
        // Scripts and tests read the bound address (the port may be 0) from this line,
        // the last one the coordinator prints.
        println!("listening on {}", listener.local_addr()?);
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down");
        };
        nexa_coordinator::mesh::serve_opened(listener, metrics, cfg, store, shutdown).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("nexa.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9000\"\nheartbeat-ms = 700\nopen-enrolment = true\n",
        )
        .expect("write");
        let cli = Cli::parse_from([
            "nexa-coordinator",
            "serve",
            "--config",
            file.to_str().expect("utf8"),
            "--heartbeat-ms",
            "300",
        ]);
        let Cmd::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let a = args.layered().expect("layered");
        assert_eq!(a.listen.as_deref(), Some("0.0.0.0:9000"), "from the file");
        assert_eq!(a.heartbeat_ms, Some(300), "the flag wins");
        assert_eq!(a.open_enrolment, Some(true));
        assert_eq!(a.data_dir, None, "left to the default");
        std::fs::write(&file, "colour = \"red\"\n").expect("write");
        let cli = Cli::parse_from([
            "nexa-coordinator",
            "serve",
            "--config",
            file.to_str().expect("utf8"),
        ]);
        let Cmd::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let err = args
            .layered()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            err.contains("colour"),
            "unknown keys are refused by name: {err}"
        );
    }

    #[test]
    fn the_files_slurm_section_turns_the_provider_on_and_its_flags_win_over_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("nexa.toml");
        std::fs::write(
            &file,
            "[slurm]\npartition = \"gpu\"\nmax-pilots = 4\nsbatch = [\"--reservation=r1\"]\nwalltime = \"2h\"\n",
        )
        .expect("write");
        let cli = Cli::parse_from([
            "nexa-coordinator",
            "serve",
            "--config",
            file.to_str().expect("utf8"),
            "--slurm-partition",
            "batch",
        ]);
        let Cmd::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let a = args.layered().expect("layered");
        assert!(a.slurm, "a [slurm] section turns the provider on");
        let c = a
            .slurm_flags
            .config(dir.path(), "http://login:7070".into(), Some("t".into()))
            .expect("config");
        assert_eq!(c.partition.as_deref(), Some("batch"), "the flag wins");
        assert_eq!(c.max_pilots, 4, "from the file");
        assert_eq!(c.sbatch_lines, ["--reservation=r1"]);
        assert_eq!(c.walltime, Duration::from_secs(7200));
        assert!(c.job_name.starts_with("nexa-pilot-"), "{}", c.job_name);
        std::fs::write(&file, "[slurm]\npartition = \"gpu\\n#SBATCH --uid=0\"\n").expect("write");
        let cli = Cli::parse_from([
            "nexa-coordinator",
            "serve",
            "--config",
            file.to_str().expect("utf8"),
        ]);
        let Cmd::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let err = args
            .layered()
            .expect("layered")
            .slurm_flags
            .config(dir.path(), "http://login:7070".into(), None)
            .err()
            .unwrap_or_default();
        assert!(err.contains("slurm partition"), "refused: {err}");
    }
}
