//! Lineage as it is reported: a sealed artifact's node (what produced it, from which
//! inputs) and the graph a walk over them returns. The coordinator records and walks
//! them (`sealing/lineage.rs`); the CLI and the wire show them.

use std::collections::BTreeMap;

/// One sealed artifact and what it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// `file://` + absolute path.
    pub uri: String,
    /// Payload hash.
    pub hash: String,
    /// Artifact kind.
    pub kind: String,
    /// Producing pipeline, step and run.
    pub pipeline: String,
    /// The step.
    pub step: String,
    /// The run.
    pub run_id: String,
    /// The step's cache key.
    pub cache_key: String,
    /// The producing job (from the signed manifest; `None` for an assembled sharded
    /// step, whose shards each had their own job).
    #[serde(default)]
    pub job: Option<String>,
    /// The producing worker's public key (hex), when a worker signed it.
    pub worker: Option<String>,
    /// The worker's signature (hex).
    pub signature: Option<String>,
    /// What it was made from.
    pub inputs: Vec<Input>,
}

/// One input of a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Input {
    /// The step's name for it.
    pub name: String,
    /// The path as the pipeline wrote it.
    pub uri: String,
    /// Its content digest when the artifact was made.
    pub digest: String,
    /// The artifact holding it (`file://` URI), or `None` for an external file.
    pub producer: Option<String>,
}

/// An edge: `to` was made from `from` (its input `input`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    /// The input artifact.
    pub from: String,
    /// The artifact made from it.
    pub to: String,
    /// The input's name in the consuming step.
    pub input: String,
}

/// An input that no artifact produced (a file of the project).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct External {
    /// The artifact that read it.
    pub consumer: String,
    /// The input's name.
    pub input: String,
    /// Its path as written.
    pub path: String,
    /// Its digest when read.
    pub digest: String,
}

/// The result of a walk.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Graph {
    /// Where the walk started.
    pub root: String,
    /// Every artifact reached (with its level in `levels`).
    pub nodes: Vec<Node>,
    /// Distance from the root, by URI.
    pub levels: BTreeMap<String, usize>,
    /// Producer → consumer edges.
    pub edges: Vec<Edge>,
    /// External inputs met on the way up.
    pub external: Vec<External>,
}
