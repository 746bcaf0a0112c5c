//! Lineage: which job, step, run and worker produced each sealed artifact, from which
//! inputs, kept in the store and indexed both ways.
//!
//! ```text
//! lineage/node/<artifact uri>            the artifact's node (producer, signature, inputs)
//! lineage/up/<artifact uri>/<input>      the artifact that input came from
//! lineage/down/<artifact uri>/<consumer> an artifact made from it (value: the input name)
//! ```
//!
//! Artifacts are named by their `file://` URI (meta.json's `uri`). An input's producer is
//! the sealed artifact directory that holds the input's path; an input with none is an
//! external file (a leaf). Nodes are built from `meta.json`, so lineage can also be
//! walked upwards from the files alone ([`node_from_disk`]).

use crate::{Result, Store};
use nexa_shared::artifact::{self, Meta};
pub use nexa_shared::lineage::{Edge, External, Graph, Input, Node};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The store tree holding lineage.
pub const LINEAGE_TREE: &str = "lineage";

fn file_uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// The path a `file://` URI names.
pub fn uri_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

/// The sealed artifact directory that holds `path` (itself or an ancestor), if any.
pub fn producer_of(path: &Path) -> Option<PathBuf> {
    let mut p = Some(path);
    while let Some(dir) = p {
        if artifact::is_complete(dir) && dir.join(artifact::META).is_file() {
            return Some(dir.to_path_buf());
        }
        p = dir.parent();
    }
    None
}

/// Where an input path as written resolves (relative paths are relative to `project`).
pub fn input_path(project: &Path, written: &str) -> PathBuf {
    let clean = written.split('#').next().unwrap_or(written);
    let p = Path::new(clean);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        project.join(p)
    }
}

/// The node of the artifact at `out`, whose `meta.json` is `meta`.
pub fn node_of(project: &Path, out: &Path, meta: &Meta) -> Node {
    let abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let label = |k: &str| meta.labels.get(k).cloned().unwrap_or_default();
    let inputs = meta
        .inputs
        .iter()
        .map(|i| {
            let path = input_path(project, &i.uri);
            Input {
                name: i.name.clone(),
                uri: i.uri.clone(),
                digest: i.digest.clone(),
                producer: producer_of(&path)
                    .filter(|p| p != &abs)
                    .map(|p| file_uri(&p)),
            }
        })
        .collect();
    Node {
        uri: file_uri(&abs),
        hash: meta.hash.clone(),
        kind: meta.kind.clone(),
        pipeline: label("pipeline"),
        step: label("step_id"),
        run_id: label("run_id"),
        cache_key: label("cache_key"),
        job: meta
            .labels
            .get(nexa_shared::provenance::SIGNED_LABEL)
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|v| v["job_id"].as_str().map(str::to_string)),
        worker: meta.labels.get("worker").cloned(),
        signature: meta.labels.get("signature").cloned(),
        inputs,
    }
}

/// The node of a sealed artifact read from its `meta.json`.
pub fn node_from_disk(project: &Path, out: &Path) -> Option<Node> {
    let meta = artifact::read_meta(out).ok()?;
    Some(node_of(project, out, &meta))
}

/// Records nodes and both indexes in one batch.
pub fn record(store: &dyn Store, nodes: &[Node]) -> Result<()> {
    let mut entries = Vec::new();
    for n in nodes {
        entries.push((format!("node/{}", n.uri), serde_json::to_vec(n)?));
        for i in &n.inputs {
            if let Some(p) = &i.producer {
                entries.push((format!("up/{}/{}", n.uri, i.name), p.as_bytes().to_vec()));
                entries.push((format!("down/{p}/{}", n.uri), i.name.as_bytes().to_vec()));
            }
        }
    }
    store.put_batch(LINEAGE_TREE, &entries)
}

/// Every lineage entry of a store (for merging several stores' views).
pub fn dump(store: &dyn Store) -> Result<Vec<(String, Vec<u8>)>> {
    store.scan_prefix(LINEAGE_TREE, "")
}

/// A lineage index read into memory (from one or more stores), with the files on disk
/// as a fallback for nodes sealed before lineage was recorded.
#[derive(Debug, Default)]
pub struct Index {
    nodes: BTreeMap<String, Node>,
    down: BTreeMap<String, BTreeSet<(String, String)>>,
    project: PathBuf,
}

impl Index {
    /// An empty index resolving relative input paths against `project`.
    pub fn new(project: &Path) -> Self {
        Self {
            project: project.to_path_buf(),
            ..Self::default()
        }
    }

    /// Adds entries as [`dump`] returns them.
    pub fn add(&mut self, entries: Vec<(String, Vec<u8>)>) {
        for (k, v) in entries {
            if let Some(uri) = k.strip_prefix("node/") {
                if let Ok(n) = serde_json::from_slice::<Node>(&v) {
                    self.nodes.insert(uri.to_string(), n);
                }
            } else if let Some(rest) = k.strip_prefix("down/") {
                // down/<producer uri>/<consumer uri>: both are file:// URIs.
                if let Some(at) = rest[1..].find("/file://") {
                    let (producer, consumer) = rest.split_at(at + 1);
                    let name = String::from_utf8_lossy(&v).to_string();
                    self.down
                        .entry(producer.to_string())
                        .or_default()
                        .insert((consumer[1..].to_string(), name));
                }
            }
        }
    }

    /// A node, from the index or else from its `meta.json`.
    pub fn node(&self, uri: &str) -> Option<Node> {
        self.nodes
            .get(uri)
            .cloned()
            .or_else(|| node_from_disk(&self.project, &uri_path(uri)))
    }

    /// Artifacts made from `uri`, with the input name they used it under.
    pub fn consumers(&self, uri: &str) -> Vec<(String, String)> {
        self.down
            .get(uri)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Walks up (`true`: producers) or down from `root`, at most `depth` levels.
    pub fn walk(&self, root: &str, up: bool, depth: usize) -> Graph {
        let mut g = Graph {
            root: root.to_string(),
            ..Graph::default()
        };
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([(root.to_string(), 0usize)]);
        while let Some((uri, d)) = queue.pop_front() {
            if !seen.insert(uri.clone()) {
                continue;
            }
            let node = self.node(&uri);
            g.levels.insert(uri.clone(), d);
            if d < depth {
                if up {
                    for i in node.iter().flat_map(|n| &n.inputs) {
                        match &i.producer {
                            Some(p) => {
                                g.edges.push(Edge {
                                    from: p.clone(),
                                    to: uri.clone(),
                                    input: i.name.clone(),
                                });
                                queue.push_back((p.clone(), d + 1));
                            }
                            None => g.external.push(External {
                                consumer: uri.clone(),
                                input: i.name.clone(),
                                path: i.uri.clone(),
                                digest: i.digest.clone(),
                            }),
                        }
                    }
                } else {
                    for (c, name) in self.consumers(&uri) {
                        g.edges.push(Edge {
                            from: uri.clone(),
                            to: c.clone(),
                            input: name,
                        });
                        queue.push_back((c, d + 1));
                    }
                }
            }
            if let Some(n) = node {
                g.nodes.push(n);
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn node(uri: &str, inputs: &[(&str, Option<&str>)]) -> Node {
        Node {
            uri: uri.into(),
            hash: format!("blake3:{uri}"),
            kind: "dataset".into(),
            pipeline: "p".into(),
            step: uri.rsplit('/').next().unwrap_or_default().into(),
            run_id: "r".into(),
            cache_key: "k".into(),
            job: None,
            worker: None,
            signature: None,
            inputs: inputs
                .iter()
                .map(|(n, p)| Input {
                    name: n.to_string(),
                    uri: n.to_string(),
                    digest: "blake3:0".into(),
                    producer: p.map(str::to_string),
                })
                .collect(),
        }
    }

    #[test]
    fn both_directions_are_indexed_and_walked_to_a_depth() {
        let s = MemStore::default();
        let (a, b, c, d) = (
            "file:///p/art/a",
            "file:///p/art/b",
            "file:///p/art/c",
            "file:///p/art/d",
        );
        record(
            &s,
            &[
                node(a, &[("raw", None)]),
                node(b, &[("x", Some(a))]),
                node(c, &[("y", Some(b)), ("z", Some(a))]),
                node(d, &[("w", Some(c))]),
            ],
        )
        .expect("record");
        let mut idx = Index::new(Path::new("/p"));
        idx.add(dump(&s).expect("dump"));
        let up = idx.walk(d, true, 10);
        let reached: BTreeSet<&str> = up.nodes.iter().map(|n| n.uri.as_str()).collect();
        assert_eq!(reached, BTreeSet::from([a, b, c, d]));
        assert_eq!(up.levels[a], 2, "a is two steps up from d through c");
        assert_eq!(up.external.len(), 1);
        assert_eq!(up.external[0].path, "raw");
        let down = idx.walk(a, false, 10);
        let reached: BTreeSet<&str> = down.nodes.iter().map(|n| n.uri.as_str()).collect();
        assert_eq!(reached, BTreeSet::from([a, b, c, d]));
        assert!(down.edges.contains(&Edge {
            from: a.into(),
            to: c.into(),
            input: "z".into()
        }));
        let shallow = idx.walk(a, false, 1);
        let reached: BTreeSet<&str> = shallow.nodes.iter().map(|n| n.uri.as_str()).collect();
        assert_eq!(reached, BTreeSet::from([a, b, c]));
    }
}
