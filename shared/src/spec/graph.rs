//! Building a pipeline's dependency graph: implicit order, `after`, and the edges that
//! `in` references to another step's `out` imply.

use super::Pipeline;
use crate::dag::{Dag, Upstream, project_relative};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Builds the graph. Unknown `after` names are skipped (validation reports them).
pub fn build(p: &Pipeline, root: &Path) -> Dag {
    let n = p.steps.len();
    let index: HashMap<&str, usize> = p
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.value.as_str(), i))
        .rev()
        .collect();
    let outputs: HashMap<PathBuf, (usize, String)> = super::output_paths(p, root)
        .into_iter()
        .map(|(i, name, path)| (path, (i, name)))
        .collect();
    let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut upstream = vec![HashMap::new(); n];
    let mut self_reads = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        match &s.after {
            None if i > 0 => {
                deps[i].insert(i - 1);
            }
            None => {}
            Some(list) => {
                for a in list {
                    if let Some(&j) = index.get(a.value.as_str())
                        && j != i
                    {
                        deps[i].insert(j);
                    }
                }
            }
        }
        for (name, path) in &s.inputs {
            let Some(rel) = project_relative(root, &path.value) else {
                continue;
            };
            // The longest output path that contains the input wins: walk up from it.
            let producer = rel
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .find_map(|a| outputs.get(a).map(|(j, n)| (j, n, a.to_path_buf())));
            if let Some((j, out_name, out)) = producer {
                let out = &out;
                if *j == i {
                    self_reads.push((
                        path.pos,
                        format!(
                            "step '{}': input '{name}' reads the step's own output {}",
                            s.id.value,
                            out.display()
                        ),
                    ));
                    continue;
                }
                deps[i].insert(*j);
                let sub = rel.strip_prefix(out).ok().map(Path::to_path_buf);
                upstream[i].insert(
                    name.clone(),
                    Upstream {
                        step: *j,
                        output: out_name.clone(),
                        subpath: sub.filter(|s| !s.as_os_str().is_empty()),
                    },
                );
            }
        }
    }
    Dag::from_edges(
        deps.into_iter().map(|d| d.into_iter().collect()).collect(),
        upstream,
        self_reads,
    )
}
