//! Lineage graphs between the wire and [`nexa_shared::lineage`].

use super::{ConvertError, err};
use crate::v1;
use nexa_shared::lineage::{Edge, External, Graph, Input, Node};

impl From<&Node> for v1::LineageNode {
    fn from(n: &Node) -> Self {
        Self {
            uri: n.uri.clone(),
            hash: n.hash.clone(),
            kind: n.kind.clone(),
            pipeline: n.pipeline.clone(),
            step: n.step.clone(),
            run_id: n.run_id.clone(),
            cache_key: n.cache_key.clone(),
            job: n.job.clone(),
            worker: n.worker.clone(),
            signature: n.signature.clone(),
            inputs: n
                .inputs
                .iter()
                .map(|i| v1::LineageInput {
                    name: i.name.clone(),
                    uri: i.uri.clone(),
                    digest: i.digest.clone(),
                    producer: i.producer.clone(),
                })
                .collect(),
        }
    }
}

impl From<v1::LineageNode> for Node {
    fn from(n: v1::LineageNode) -> Self {
        Self {
            uri: n.uri,
            hash: n.hash,
            kind: n.kind,
            pipeline: n.pipeline,
            step: n.step,
            run_id: n.run_id,
            cache_key: n.cache_key,
            job: n.job,
            worker: n.worker,
            signature: n.signature,
            inputs: n
                .inputs
                .into_iter()
                .map(|i| Input {
                    name: i.name,
                    uri: i.uri,
                    digest: i.digest,
                    producer: i.producer,
                })
                .collect(),
        }
    }
}

impl From<&Graph> for v1::LineageGraph {
    fn from(g: &Graph) -> Self {
        Self {
            root: g.root.clone(),
            nodes: g.nodes.iter().map(Into::into).collect(),
            levels: g
                .levels
                .iter()
                .map(|(k, &l)| (k.clone(), l as u64))
                .collect(),
            edges: g
                .edges
                .iter()
                .map(|e| v1::LineageEdge {
                    from: e.from.clone(),
                    to: e.to.clone(),
                    input: e.input.clone(),
                })
                .collect(),
            external: g
                .external
                .iter()
                .map(|x| v1::LineageExternal {
                    consumer: x.consumer.clone(),
                    input: x.input.clone(),
                    path: x.path.clone(),
                    digest: x.digest.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::LineageGraph> for Graph {
    type Error = ConvertError;
    fn try_from(g: v1::LineageGraph) -> Result<Self, ConvertError> {
        Ok(Self {
            root: g.root,
            nodes: g.nodes.into_iter().map(Into::into).collect(),
            levels: g
                .levels
                .into_iter()
                .map(|(k, l)| {
                    let l = usize::try_from(l)
                        .map_err(|_| err("LineageGraph", "levels", format!("level {l}")))?;
                    Ok((k, l))
                })
                .collect::<Result<_, ConvertError>>()?,
            edges: g
                .edges
                .into_iter()
                .map(|e| Edge {
                    from: e.from,
                    to: e.to,
                    input: e.input,
                })
                .collect(),
            external: g
                .external
                .into_iter()
                .map(|x| External {
                    consumer: x.consumer,
                    input: x.input,
                    path: x.path,
                    digest: x.digest,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_walked_graph_survives_the_wire() {
        let node = |uri: &str, job: Option<&str>, producer: Option<&str>| Node {
            uri: uri.into(),
            hash: format!("blake3:{uri}"),
            kind: "dataset".into(),
            pipeline: "p".into(),
            step: "s".into(),
            run_id: "r".into(),
            cache_key: "k".into(),
            job: job.map(Into::into),
            worker: job.map(|_| "ab".repeat(32)),
            signature: job.map(|_| "cd".repeat(64)),
            inputs: vec![Input {
                name: "in".into(),
                uri: "data/x".into(),
                digest: "blake3:x".into(),
                producer: producer.map(Into::into),
            }],
        };
        let g = Graph {
            root: "file:///p/b".into(),
            nodes: vec![
                node("file:///p/b", Some("b-job"), Some("file:///p/a")),
                node("file:///p/a", None, None),
            ],
            levels: BTreeMap::from([("file:///p/b".into(), 0), ("file:///p/a".into(), 1)]),
            edges: vec![Edge {
                from: "file:///p/a".into(),
                to: "file:///p/b".into(),
                input: "in".into(),
            }],
            external: vec![External {
                consumer: "file:///p/a".into(),
                input: "in".into(),
                path: "data/x".into(),
                digest: "blake3:x".into(),
            }],
        };
        let back = Graph::try_from(v1::LineageGraph::from(&g)).expect("converts");
        assert_eq!(back.root, g.root);
        assert_eq!(back.nodes, g.nodes);
        assert_eq!(back.levels, g.levels);
        assert_eq!(back.edges, g.edges);
        assert_eq!(back.external, g.external);
    }
}
