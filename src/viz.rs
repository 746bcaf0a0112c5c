//! Drawing a pipeline's DAG: as text, DOT (Graphviz) or Mermaid.

use nexa_shared::spec::{Loaded, Outputs, Step};
use std::fmt::Write;

/// Output formats of `nexa pipeline viz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Indented text, in execution order.
    Text,
    /// Graphviz DOT.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

fn outs(step: &Step) -> String {
    match &step.outputs {
        Outputs::None => String::new(),
        Outputs::Single(p) => p.value.clone(),
        Outputs::Named(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.value))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn label(step: &Step) -> String {
    let mut l = format!("{} ({})", step.id.value, step.uses.value);
    if let Some(s) = &step.shards {
        let _ = match s.cut {
            nexa_shared::shard::Cut::Count(n) => write!(l, " x{n} shards over {}", s.over.value),
            cut => write!(l, " {cut} over {}", s.over.value),
        };
    }
    l
}

/// Renders the DAG.
pub fn render(loaded: &Loaded, format: Format) -> String {
    let p = &loaded.pipeline;
    let dag = &loaded.dag;
    let order = dag
        .topo_order()
        .unwrap_or_else(|| (0..p.steps.len()).collect());
    let mut s = String::new();
    match format {
        Format::Text => {
            let _ = writeln!(s, "pipeline {} ({} steps)", p.name, p.steps.len());
            // Depth = longest path from a root, so parallel steps share a level.
            let mut depth = vec![0usize; p.steps.len()];
            for &i in &order {
                depth[i] = dag.deps[i].iter().map(|&d| depth[d] + 1).max().unwrap_or(0);
            }
            for &i in &order {
                let step = &p.steps[i];
                let indent = "  ".repeat(depth[i] + 1);
                let deps: Vec<&str> = dag.deps[i]
                    .iter()
                    .map(|&d| p.steps[d].id.value.as_str())
                    .collect();
                let _ = write!(s, "{indent}{}", label(step));
                if !deps.is_empty() {
                    let _ = write!(s, "  <- {}", deps.join(", "));
                }
                let o = outs(step);
                if !o.is_empty() {
                    let _ = write!(s, "  -> {o}");
                }
                s.push('\n');
            }
        }
        Format::Dot => {
            let _ = writeln!(
                s,
                "digraph {:?} {{\n  rankdir=LR;\n  node [shape=box];",
                p.name
            );
            for step in &p.steps {
                let shape = if step.shards.is_some() {
                    ", style=\"rounded,bold\""
                } else {
                    ""
                };
                let _ = writeln!(s, "  {:?} [label={:?}{shape}];", step.id.value, label(step));
            }
            for (i, deps) in dag.deps.iter().enumerate() {
                for &d in deps {
                    let _ = writeln!(
                        s,
                        "  {:?} -> {:?};",
                        p.steps[d].id.value, p.steps[i].id.value
                    );
                }
            }
            s.push_str("}\n");
        }
        Format::Mermaid => {
            s.push_str("flowchart LR\n");
            let node = |i: usize| format!("s{i}");
            for (i, step) in p.steps.iter().enumerate() {
                let text = label(step).replace('"', "'");
                let _ = writeln!(s, "  {}[\"{text}\"]", node(i));
            }
            for (i, deps) in dag.deps.iter().enumerate() {
                for &d in deps {
                    let _ = writeln!(s, "  {} --> {}", node(d), node(i));
                }
            }
        }
    }
    s
}
