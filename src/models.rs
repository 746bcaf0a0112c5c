//! `nexa models ...`: the model registry. Embedded, it lives in the project's
//! `.nexa_state/registry` store, shared by every pipeline of the project.

use anyhow::Context;
use clap::Subcommand;
use nexa_coordinator::SledStore;
use nexa_coordinator::registry::{Bump, Model, Registry};
use nexa_shared::models::RegistryAnswer;
use std::path::Path;
use std::process::ExitCode;

/// `nexa models ...`.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Register an artifact as the next version of a model.
    Register {
        /// The model's name.
        name: String,
        /// The artifact (a sealed local directory, or a URI such as s3://...).
        uri: String,
        /// Metadata: inline JSON, or @FILE holding JSON.
        #[arg(long)]
        meta: Option<String>,
        /// Which part of the version to bump: patch, minor or major.
        #[arg(long, default_value = "patch")]
        bump: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print where NAME, NAME:latest, NAME:1.2.0 or NAME:TAG is.
    Resolve {
        /// The reference.
        reference: String,
        /// Print the whole version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Point TAG at VERSION (or `latest`), after checking the artifact's seal, hashes
    /// and signatures.
    Promote {
        /// The model's name.
        name: String,
        /// The version.
        version: String,
        /// The tag (prod, staging, ...).
        tag: String,
    },
    /// Delete a version (refused while a tag names it).
    Delete {
        /// The model's name.
        name: String,
        /// The version.
        version: String,
    },
    /// Every model with its latest version and tags.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One model's versions and tags.
    Show {
        /// The model's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which version held which tag, from when to when.
    History {
        /// The model's name.
        name: String,
        /// Only this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The project's registry store.
pub fn open(project: &Path) -> anyhow::Result<SledStore> {
    let dir = project.join(".nexa_state").join("registry");
    std::fs::create_dir_all(project.join(".nexa_state"))
        .with_context(|| format!("creating {}", project.join(".nexa_state").display()))?;
    Ok(SledStore::open(&dir)?)
}

fn parse_meta(meta: Option<String>) -> anyhow::Result<serde_json::Value> {
    let Some(m) = meta else {
        return Ok(serde_json::Value::Null);
    };
    let text = match m.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?,
        None => m,
    };
    serde_json::from_str(&text).context("--meta is not JSON")
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn summary(m: &Model) -> String {
    let latest = m.latest().map_or("-".to_string(), |v| v.version.clone());
    let tags: Vec<String> = m
        .tags
        .iter()
        .map(|(t, v)| format!("{t}={}", v.version))
        .collect();
    format!(
        "{:<24} latest {:<10} {} version(s)  {}",
        m.name,
        latest,
        m.live_versions().len(),
        tags.join(" ")
    )
}

/// Runs a `nexa models` command against the project's registry.
pub fn run(project: &Path, command: ModelsCommand) -> anyhow::Result<ExitCode> {
    let store = open(project)?;
    let r = Registry::new(&store);
    // A relative artifact path is relative to the project, like pipelines' paths.
    let in_project = |uri: &str| -> String {
        if uri.contains("://") || Path::new(uri).is_absolute() {
            uri.to_string()
        } else {
            project.join(uri).display().to_string()
        }
    };
    match command {
        ModelsCommand::Register {
            name,
            uri,
            meta,
            bump,
            json,
        } => {
            let bump: Bump = bump.parse()?;
            let v = r.register(&name, &in_project(&uri), parse_meta(meta)?, bump)?;
            if json {
                print_json(&v)?;
            } else {
                println!("registered {}:{} -> {}", v.name, v.version, v.uri);
            }
        }
        ModelsCommand::Resolve { reference, json } => print_version(&r.resolve(&reference)?, json)?,
        ModelsCommand::Promote { name, version, tag } => {
            let p = r.promote(&name, &version, &tag)?;
            println!("promoted {name}:{} to {tag} (verified)", p.version);
        }
        ModelsCommand::Delete { name, version } => {
            r.delete(&name, &version)?;
            println!("deleted {name}:{version}");
        }
        ModelsCommand::List { json } => print_list(&r.list()?, json)?,
        ModelsCommand::Show { name, json } => print_model(&r.show(&name)?, json)?,
        ModelsCommand::History { name, tag, json } => print_history(&r.show(&name)?, tag, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `nexa models` command against a coordinator's registry (what pipelines on
/// it registered). Registering and deleting are done by pipelines' registry steps.
pub async fn run_remote(
    remote: &crate::remote::Remote,
    command: ModelsCommand,
) -> anyhow::Result<ExitCode> {
    use crate::remote::models;
    match command {
        ModelsCommand::Register { .. } | ModelsCommand::Delete { .. } => anyhow::bail!(
            "on a coordinator, models are registered by pipelines' core.registry.register steps; register and delete work on this project's registry (without --coordinator)"
        ),
        ModelsCommand::Resolve { reference, json } => {
            let RegistryAnswer::Version(v) = models(remote, "resolve", &reference, "", "").await?
            else {
                anyhow::bail!("the coordinator did not answer 'resolve' with a version");
            };
            print_version(&v, json)?;
        }
        ModelsCommand::Promote { name, version, tag } => {
            let RegistryAnswer::Promotion(p) =
                models(remote, "promote", &name, &version, &tag).await?
            else {
                anyhow::bail!("the coordinator did not answer 'promote' with a promotion");
            };
            println!("promoted {name}:{} to {tag} (verified)", p.version);
        }
        ModelsCommand::List { json } => {
            let RegistryAnswer::List(list) = models(remote, "list", "", "", "").await? else {
                anyhow::bail!("the coordinator did not answer 'list' with models");
            };
            print_list(&list, json)?
        }
        ModelsCommand::Show { name, json } => print_model(&shown(remote, &name).await?, json)?,
        ModelsCommand::History { name, tag, json } => {
            print_history(&shown(remote, &name).await?, tag, json)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The coordinator's `show` of a model.
async fn shown(remote: &crate::remote::Remote, name: &str) -> anyhow::Result<Model> {
    match crate::remote::models(remote, "show", name, "", "").await? {
        RegistryAnswer::Model(m) => Ok(m),
        _ => anyhow::bail!("the coordinator did not answer 'show' with a model"),
    }
}

fn print_version(v: &nexa_coordinator::registry::Version, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(v)
    } else {
        println!("{}", v.uri);
        Ok(())
    }
}

fn print_list(models: &[Model], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&models);
    }
    for m in models {
        println!("{}", summary(m));
    }
    Ok(())
}

fn print_model(m: &Model, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(m);
    }
    println!("{}", summary(m));
    for v in m.versions.values() {
        let tags: Vec<&str> = m
            .tags
            .iter()
            .filter(|(_, t)| t.version == v.version)
            .map(|(k, _)| k.as_str())
            .collect();
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!("  [{}]", tags.join(", "))
        };
        let deleted = if v.deleted_at.is_some() {
            "  (deleted)"
        } else {
            ""
        };
        println!(
            "  {:<10} {}  {}  {}{tags}{deleted}",
            v.version,
            v.registered_at,
            v.hash.as_deref().unwrap_or("-"),
            v.uri,
        );
    }
    Ok(())
}

fn print_history(m: &Model, tag: Option<String>, json: bool) -> anyhow::Result<()> {
    let h: Vec<_> = m
        .history
        .iter()
        .filter(|p| tag.as_ref().is_none_or(|t| &p.tag == t))
        .collect();
    if json {
        return print_json(&h);
    }
    for p in h {
        println!(
            "{:<10} {:<10} {} -> {}",
            p.tag,
            p.version,
            p.from,
            p.to.as_deref().unwrap_or("now")
        );
    }
    Ok(())
}
