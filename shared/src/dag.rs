//! The dependency graph of a pipeline over step indices: its edges, topological order,
//! cycles and what lies downstream. Built from a pipeline by `spec::graph` (implicit
//! order, `after`, and the edges that `in` references to another step's `out` imply); it
//! knows nothing of the spec itself.

use crate::paths;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Where a step input comes from when another step produces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The producing step's index.
    pub step: usize,
    /// The producing output's name.
    pub output: String,
    /// The path inside that output, when the input names a file within it.
    pub subpath: Option<PathBuf>,
}

/// A pipeline's dependency graph over step indices.
#[derive(Debug, Clone, Default)]
pub struct Dag {
    /// `deps[i]`: the steps `i` waits for, sorted.
    pub deps: Vec<Vec<usize>>,
    /// `dependents[i]`: the steps that wait for `i`, sorted.
    pub dependents: Vec<Vec<usize>>,
    /// For each step, its inputs that another step produces.
    pub upstream: Vec<HashMap<String, Upstream>>,
    /// Steps that read their own output, with a message.
    pub self_reads: Vec<(crate::diag::Pos, String)>,
}

/// Resolves an input path to a project-relative path when it lies inside the project.
pub fn project_relative(root: &Path, written: &str) -> Option<PathBuf> {
    let p = Path::new(written);
    if p.is_absolute() {
        let n = paths::normalize(p)?;
        let r = paths::normalize(root)?;
        n.strip_prefix(&r).ok().map(Path::to_path_buf)
    } else {
        paths::normalize(p)
    }
}

impl Dag {
    /// A graph from its edges (`deps[i]`: what `i` waits for), the inputs other steps
    /// produce, and the self-reads found while building it (see `spec::graph`).
    pub fn from_edges(
        deps: Vec<Vec<usize>>,
        upstream: Vec<HashMap<String, Upstream>>,
        self_reads: Vec<(crate::diag::Pos, String)>,
    ) -> Dag {
        let mut dependents = vec![Vec::new(); deps.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependents[d].push(i);
            }
        }
        Dag {
            deps,
            dependents,
            upstream,
            self_reads,
        }
    }

    /// A graph from explicit edges (`deps[i]` = what `i` waits for); for tests and tools.
    pub fn from_deps(deps: Vec<Vec<usize>>) -> Dag {
        let n = deps.len();
        let deps = deps
            .into_iter()
            .map(|d| d.into_iter().collect::<BTreeSet<_>>().into_iter().collect())
            .collect();
        Self::from_edges(deps, vec![HashMap::new(); n], Vec::new())
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.deps.len()
    }

    /// True for an empty pipeline.
    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
    }

    /// A topological order (Kahn, lowest index first). `None` when there is a cycle.
    pub fn topo_order(&self) -> Option<Vec<usize>> {
        let n = self.len();
        let mut indeg: Vec<usize> = self.deps.iter().map(Vec::len).collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &j in &self.dependents[i] {
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        (order.len() == n).then_some(order)
    }

    /// Every elementary cycle found by depth-first search, each written from its first
    /// step back to it: `[a, b, a]`. One cycle is reported per back edge.
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Color {
            White,
            Grey,
            Black,
        }
        let n = self.len();
        let mut color = vec![Color::White; n];
        let mut cycles = Vec::new();
        for start in 0..n {
            if color[start] != Color::White {
                continue;
            }
            // Iterative DFS along dependency edges (step -> what it waits for), reversed
            // at the end so the cycle reads in execution order.
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            color[start] = Color::Grey;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&dep) = self.deps[node].get(*next) {
                    *next += 1;
                    match color[dep] {
                        Color::White => {
                            color[dep] = Color::Grey;
                            stack.push((dep, 0));
                        }
                        Color::Grey => {
                            let from = stack.iter().position(|&(s, _)| s == dep).unwrap_or(0);
                            let mut cycle: Vec<usize> =
                                stack[from..].iter().map(|&(s, _)| s).collect();
                            cycle.reverse();
                            // Start the cycle at its smallest index for stable messages.
                            let min = cycle
                                .iter()
                                .enumerate()
                                .min_by_key(|(_, s)| **s)
                                .map(|(k, _)| k)
                                .unwrap_or(0);
                            cycle.rotate_left(min);
                            cycle.push(cycle[0]);
                            cycles.push(cycle);
                        }
                        Color::Black => {}
                    }
                } else {
                    color[node] = Color::Black;
                    stack.pop();
                }
            }
        }
        cycles
    }

    /// The steps reachable downstream of `from`, including `from`, sorted.
    pub fn downstream(&self, from: usize) -> Vec<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(self.dependents[i].iter().copied());
            }
        }
        seen.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random DAG: edges only from a higher to a lower position in a random permutation.
    fn arb_dag() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>)> {
        (1usize..40).prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::vec(
                    proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
                    n,
                ),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            )
                .prop_map(|(n, raw, perm)| {
                    // rank[perm[k]] = k; step perm[k] may depend only on perm[j] with j < k.
                    let mut deps = vec![Vec::new(); n];
                    for (k, picks) in raw.iter().enumerate() {
                        if k == 0 {
                            continue;
                        }
                        for p in picks {
                            deps[perm[k]].push(perm[p.index(k)]);
                        }
                    }
                    (deps, perm)
                })
        })
    }

    proptest! {
        #[test]
        fn topo_order_respects_every_edge((deps, _perm) in arb_dag()) {
            let dag = Dag::from_deps(deps.clone());
            let order = dag.topo_order().expect("acyclic by construction");
            prop_assert_eq!(order.len(), deps.len());
            let mut pos = vec![0; deps.len()];
            for (k, &s) in order.iter().enumerate() { pos[s] = k; }
            for (i, ds) in deps.iter().enumerate() {
                for &d in ds { prop_assert!(pos[d] < pos[i], "{} must come before {}", d, i); }
            }
            prop_assert!(dag.cycles().is_empty());
        }

        #[test]
        fn a_back_edge_is_reported_as_a_real_cycle((mut deps, perm) in arb_dag(), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
            let n = deps.len();
            prop_assume!(n >= 2);
            let (x, y) = { let (i, j) = (a.index(n), b.index(n)); if i < j { (i, j) } else if j < i { (j, i) } else { return Ok(()); } };
            // Make perm[x] depend on perm[y] (later in the order) and perm[y] on perm[x].
            deps[perm[x]].push(perm[y]);
            deps[perm[y]].push(perm[x]);
            let dag = Dag::from_deps(deps.clone());
            prop_assert!(dag.topo_order().is_none());
            let cycles = dag.cycles();
            prop_assert!(!cycles.is_empty());
            for c in cycles {
                prop_assert_eq!(c.first(), c.last());
                // Each consecutive pair a -> b means b waits for a.
                for w in c.windows(2) {
                    prop_assert!(deps[w[1]].contains(&w[0]), "{} -> {} is not an edge", w[0], w[1]);
                }
            }
        }

        #[test]
        fn downstream_is_closed_under_dependents((deps, _perm) in arb_dag(), s in any::<prop::sample::Index>()) {
            let dag = Dag::from_deps(deps);
            let from = s.index(dag.len());
            let down = dag.downstream(from);
            prop_assert!(down.contains(&from));
            for &d in &down {
                for &x in &dag.dependents[d] { prop_assert!(down.contains(&x)); }
            }
        }
    }
}
