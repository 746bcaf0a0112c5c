//! `nexa lineage` and `nexa verify --deep`, on this project: the lineage indexes of
//! every pipeline's store under `.nexa_state/`, with the artifacts' `meta.json` files
//! as the fallback.

use nexa_coordinator::SledStore;
use nexa_coordinator::sealing::lineage::{self, Graph, Index};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Output formats of `nexa lineage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An indented tree.
    Text,
    /// The graph as JSON (nodes, edges, levels, external inputs).
    Json,
    /// Graphviz.
    Dot,
}

/// Reads the lineage of every pipeline store of the project into one index.
pub fn project_index(project: &Path) -> Index {
    let mut idx = Index::new(project);
    let state = project.join(".nexa_state");
    let Ok(entries) = std::fs::read_dir(&state) else {
        return idx;
    };
    let mut stores: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join("store"))
        .filter(|p| p.is_dir())
        .collect();
    stores.sort();
    for s in stores {
        match SledStore::open(&s).and_then(|st| lineage::dump(&st)) {
            Ok(entries) => idx.add(entries),
            Err(e) => eprintln!(
                "note: {} not read ({e}); artifacts made from its outputs may be missing",
                s.display()
            ),
        }
    }
    idx
}

fn root_uri(artifact: &Path) -> anyhow::Result<String> {
    let abs = std::path::absolute(artifact)?;
    if !abs.join(nexa_shared::artifact::META).is_file() {
        anyhow::bail!("{} is not an artifact (no meta.json)", abs.display());
    }
    Ok(format!("file://{}", abs.display()))
}

fn show(project: &Path, uri: &str) -> String {
    let p = lineage::uri_path(uri);
    p.strip_prefix(project).unwrap_or(&p).display().to_string()
}

fn short(s: &str) -> &str {
    let end = s.char_indices().nth(19).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

fn text(project: &Path, g: &Graph, up: bool) -> String {
    let mut out = String::new();
    let describe = |uri: &str| -> String {
        match g.nodes.iter().find(|n| n.uri == uri) {
            Some(n) => format!(
                "{}  [{} · step {} · run {}{}]  {}",
                show(project, uri),
                n.pipeline,
                n.step,
                n.run_id,
                n.worker
                    .as_deref()
                    .map(|w| format!(" · worker {}", short(w)))
                    .unwrap_or_default(),
                short(&n.hash)
            ),
            None => format!("{}  [no meta.json]", show(project, uri)),
        }
    };
    fn walk(
        g: &Graph,
        uri: &str,
        up: bool,
        indent: usize,
        seen: &mut Vec<String>,
        out: &mut String,
        describe: &dyn Fn(&str) -> String,
    ) {
        if seen.iter().any(|s| s == uri) {
            return;
        }
        seen.push(uri.to_string());
        let arrow = if up { "←" } else { "→" };
        for e in &g.edges {
            let (here, next) = if up {
                (&e.to, &e.from)
            } else {
                (&e.from, &e.to)
            };
            if here == uri {
                out.push_str(&format!(
                    "{}{arrow} {}: {}\n",
                    "   ".repeat(indent + 1),
                    e.input,
                    describe(next)
                ));
                walk(g, next, up, indent + 1, seen, out, describe);
            }
        }
        if up {
            for x in g.external.iter().filter(|x| x.consumer == uri) {
                out.push_str(&format!(
                    "{}← {}: {}  [file]  {}\n",
                    "   ".repeat(indent + 1),
                    x.input,
                    x.path,
                    short(&x.digest)
                ));
            }
        }
    }
    out.push_str(&describe(&g.root));
    out.push('\n');
    walk(g, &g.root, up, 0, &mut Vec::new(), &mut out, &describe);
    out
}

fn dot(project: &Path, g: &Graph) -> String {
    let mut out = String::from("digraph lineage {\n  rankdir=LR;\n  node [shape=box];\n");
    for n in &g.nodes {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n{} · {}\"];\n",
            n.uri,
            show(project, &n.uri),
            n.step,
            short(&n.hash)
        ));
    }
    for x in &g.external {
        out.push_str(&format!(
            "  \"{}\" [shape=note];\n  \"{}\" -> \"{}\" [label=\"{}\"];\n",
            x.path, x.path, x.consumer, x.input
        ));
    }
    for e in &g.edges {
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
            e.from, e.to, e.input
        ));
    }
    out.push_str("}\n");
    out
}

/// `nexa lineage ARTIFACT`.
pub fn lineage(
    project: &Path,
    artifact: &Path,
    down: bool,
    depth: usize,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let root = root_uri(&project.join(artifact))?;
    let g = project_index(project).walk(&root, !down, depth);
    render(project, &g, !down, format)
}

fn render(project: &Path, g: &Graph, up: bool, format: Format) -> anyhow::Result<ExitCode> {
    match format {
        Format::Text => print!("{}", text(project, g, up)),
        Format::Json => println!("{}", serde_json::to_string_pretty(g)?),
        Format::Dot => print!("{}", dot(project, g)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `nexa lineage ARTIFACT --pipeline P --coordinator URL`: the coordinator's lineage of
/// one of a pipeline's artifacts.
pub async fn lineage_remote(
    remote: &crate::remote::Remote,
    pipeline: &str,
    artifact: &Path,
    down: bool,
    depth: usize,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let depth = u32::try_from(depth).unwrap_or(0);
    let (g, project) = crate::remote::lineage(
        remote,
        pipeline,
        &artifact.display().to_string(),
        down,
        depth,
    )
    .await?;
    render(Path::new(&project), &g, !down, format)
}

/// What one `verify --deep` has read already: each input's digest now and each split
/// index, so that many shards of one input hash it and read its splits once.
#[derive(Default)]
struct Seen {
    digests: std::collections::HashMap<PathBuf, String>,
    splits: std::collections::HashMap<PathBuf, Option<nexa_shared::shard::Split>>,
}

/// What an input holds now, in the form it was recorded: a whole file or tree, or for a
/// shard's input (`<uri>#part-N`) its part N, found among the project's splits of the
/// input's current content and re-hashed (a range re-read from the input itself).
fn input_now(project: &Path, uri: &str, was: &str, seen: &mut Seen) -> anyhow::Result<String> {
    let path = lineage::input_path(project, uri);
    let whole = match seen.digests.get(&path) {
        Some(d) => d.clone(),
        None => {
            let (d, _, _) = nexa_shared::artifact::input_digest(&path)?;
            seen.digests.insert(path.clone(), d.clone());
            d
        }
    };
    let Some(index) = uri
        .rsplit_once("#part-")
        .and_then(|(_, n)| n.parse::<usize>().ok())
    else {
        return Ok(whole);
    };
    let hex = whole.trim_start_matches(nexa_shared::digest::PREFIX);
    let named = format!("{}-", &hex[..hex.len().min(32)]);
    let mut found = None;
    let states = std::fs::read_dir(project.join(".nexa_state"))
        .into_iter()
        .flatten();
    for state in states.flatten() {
        let splits = std::fs::read_dir(state.path().join("splits"))
            .into_iter()
            .flatten();
        for split in splits.flatten() {
            if !split.file_name().to_string_lossy().starts_with(&named) {
                continue;
            }
            let part = seen
                .splits
                .entry(split.path())
                .or_insert_with(|| nexa_shared::shard::finished(&path, &split.path()))
                .as_ref()
                .and_then(|s| s.parts.get(index));
            if let Some(part) = part {
                let now = part.digest_now()?;
                if now == was {
                    return Ok(now);
                }
                found.get_or_insert(now);
            }
        }
    }
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "no split of its content now ({}) has a part {index}: it changed since the shard read it",
            short(&whole)
        )
    })
}

/// `nexa verify ARTIFACT --deep`: the artifact and its whole ancestry. Every artifact is
/// re-hashed and its signatures checked; every input must still have the digest it had
/// when it was consumed. Names the failing link nearest the source.
pub fn verify_deep(project: &Path, artifact: &Path) -> anyhow::Result<ExitCode> {
    let root = root_uri(&project.join(artifact))?;
    let g = project_index(project).walk(&root, true, usize::MAX);
    // (level, an artifact's own failure rather than a changed input, message)
    let mut failures: Vec<(usize, bool, String)> = Vec::new();
    let mut checked = 0;
    let mut seen = Seen::default();
    for n in &g.nodes {
        let level = g.levels.get(&n.uri).copied().unwrap_or(0);
        let path = lineage::uri_path(&n.uri);
        checked += 1;
        if let Err(e) = nexa_shared::provenance::verify_artifact(&path) {
            failures.push((level, true, format!("{}: {e}", show(project, &n.uri))));
        }
        for i in &n.inputs {
            match input_now(project, &i.uri, &i.digest, &mut seen) {
                Ok(d) if d == i.digest => {}
                Ok(d) => failures.push((
                    level + 1,
                    false,
                    format!(
                        "{} (input '{}' of {}) is now {} but was {} when it was used",
                        i.uri,
                        i.name,
                        show(project, &n.uri),
                        short(&d),
                        short(&i.digest)
                    ),
                )),
                Err(e) => failures.push((
                    level + 1,
                    false,
                    format!(
                        "{} (input '{}' of {}): {e}",
                        i.uri,
                        i.name,
                        show(project, &n.uri)
                    ),
                )),
            }
        }
    }
    if failures.is_empty() {
        println!(
            "ok {}: {checked} artifact(s) up the lineage re-hashed, signatures and input digests verified",
            artifact.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // The failure highest up the lineage is the cause, and at one level an artifact's
    // own failure comes before its consumers' changed inputs: the rest follow from it.
    failures.sort_by_key(|f| std::cmp::Reverse((f.0, f.1)));
    let (level, _, first) = &failures[0];
    eprintln!("FAILED {level} step(s) up: {first}");
    for (l, _, f) in &failures[1..] {
        eprintln!("  also ({l} up): {f}");
    }
    Ok(ExitCode::from(1))
}
