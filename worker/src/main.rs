//! `nexa-worker`: a Nexa worker. Today: `nexa-worker profile [--json]`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// A Nexa worker.
#[derive(Parser)]
#[command(name = "nexa-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print what this machine offers: CPU, memory, disk, GPUs (NVML), runtimes.
    Profile {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Where free disk is measured (the worker's work directory).
        #[arg(long, default_value = ".")]
        work_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEXA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Profile { json, work_dir } => {
            let started = std::time::Instant::now();
            let p = nexa_worker::profile::profile(&work_dir, true);
            if json {
                match serde_json::to_string_pretty(&p) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                use nexa_shared::units::format_size;
                println!("{} ({}, {})", p.hostname, p.os, p.arch);
                println!("  cpu     {} x {}", p.cores, p.cpu_model);
                println!(
                    "  memory  {} total, {} available",
                    format_size(p.memory_total),
                    format_size(p.memory_available)
                );
                println!(
                    "  disk    {} free under {}",
                    format_size(p.disk_free),
                    work_dir.display()
                );
                for g in &p.gpus {
                    println!(
                        "  gpu {}   {} {} ({} total, {} free, compute {}.{}{})",
                        g.index,
                        g.name,
                        g.uuid,
                        format_size(g.memory_total),
                        format_size(g.memory_free),
                        g.compute_capability.0,
                        g.compute_capability.1,
                        if g.mig_enabled { ", MIG" } else { "" }
                    );
                }
                if let Some(d) = &p.driver_version {
                    println!(
                        "  driver  {d}, CUDA {}",
                        p.cuda_version.as_deref().unwrap_or("?")
                    );
                }
                if let Some(n) = &p.gpu_note {
                    println!("  {n}");
                }
                let labels: Vec<String> =
                    p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  labels  {}", labels.join(" "));
                println!("  (profiled in {} ms)", started.elapsed().as_millis());
            }
            ExitCode::SUCCESS
        }
    }
}
