//! Validation across steps: duplicate ids, `after` targets, output paths (contained,
//! not overlapping, not too long for the file system), shards, the DAG and its cycles.

use super::*;

/// The project-relative path of every output of every step, resolved and contained.
/// Steps whose paths are unsafe are left out (validation reports them).
pub fn output_paths(p: &Pipeline, root: &Path) -> Vec<(usize, String, PathBuf)> {
    let mut out = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        for (name, path) in s.outputs.entries() {
            if let Ok(rel) = paths::contained(root, &path.value) {
                out.push((i, name.to_string(), rel));
            }
        }
    }
    out
}

/// Why an `out` path is too long for the file system, if it is.
pub(super) fn out_too_long(rel: &Path) -> Option<String> {
    let bytes = rel.as_os_str().len();
    if bytes > MAX_OUT_PATH {
        return Some(format!(
            "is {bytes} bytes long; at most {MAX_OUT_PATH} are allowed"
        ));
    }
    let depth = rel.components().count();
    if depth > MAX_OUT_DEPTH {
        return Some(format!(
            "is {depth} directories deep; at most {MAX_OUT_DEPTH} are allowed"
        ));
    }
    rel.components()
        .map(|c| c.as_os_str().len())
        .find(|&n| n > MAX_OUT_COMPONENT)
        .map(|n| format!("has a {n}-byte component; at most {MAX_OUT_COMPONENT} bytes are allowed"))
}

pub(super) fn validate(p: &Pipeline, root: &Path, d: &mut Diagnostics) -> Dag {
    // Duplicate ids.
    let mut ids: HashMap<&str, &Step> = HashMap::new();
    for s in &p.steps {
        if let Some(first) = ids.get(s.id.value.as_str()) {
            d.push(
                s.id.pos,
                format!(
                    "duplicate step id '{}' (first defined at line {})",
                    s.id.value, first.id.pos.line
                ),
            );
        } else {
            ids.insert(&s.id.value, s);
        }
    }
    // Unknown `after` targets.
    for s in &p.steps {
        for a in s.after.iter().flatten() {
            if a.value == s.id.value {
                d.push(
                    a.pos,
                    format!("step '{}': 'after' names the step itself", s.id.value),
                );
            } else if !ids.contains_key(a.value.as_str()) {
                d.push(
                    a.pos,
                    format!(
                        "step '{}': 'after' names unknown step '{}'",
                        s.id.value, a.value
                    ),
                );
            }
        }
    }
    // Output paths: contained, and no two steps writing the same place.
    let mut outs: Vec<(usize, PathBuf, Pos)> = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        for (name, path) in s.outputs.entries() {
            match paths::contained(root, &path.value) {
                Ok(rel) => {
                    if let Some(why) = out_too_long(&rel) {
                        d.push(
                            path.pos,
                            format!("step '{}': output '{name}' path {why}", s.id.value),
                        );
                    }
                    if rel.starts_with(".nexa_state") {
                        d.push(
                            path.pos,
                            format!(
                                "step '{}': 'out' must not write into .nexa_state",
                                s.id.value
                            ),
                        );
                    }
                    outs.push((i, rel, path.pos));
                }
                Err(e) => d.push(
                    path.pos,
                    format!("step '{}': output '{name}' path {e}", s.id.value),
                ),
            }
        }
    }
    // Sorted component-wise, every path that lies inside another follows it directly.
    let mut sorted: Vec<usize> = (0..outs.len()).collect();
    sorted.sort_by(|&x, &y| outs[x].1.cmp(&outs[y].1).then(outs[x].2.cmp(&outs[y].2)));
    for (k, &x) in sorted.iter().enumerate() {
        for &y in &sorted[k + 1..] {
            if !outs[y].1.starts_with(&outs[x].1) {
                break;
            }
            // Report at whichever was written later in the file.
            let (a, b) = if outs[x].2 <= outs[y].2 {
                (x, y)
            } else {
                (y, x)
            };
            let (ia, pa, _) = &outs[a];
            let (ib, pb, posb) = &outs[b];
            let what = if pa == pb {
                "the same"
            } else {
                "an overlapping"
            };
            let msg = if ia == ib {
                format!(
                    "step '{}' writes {what} 'out' path twice: {}",
                    p.steps[*ib].id.value,
                    pb.display()
                )
            } else {
                format!(
                    "steps '{}' and '{}' write {what} 'out' path: {}",
                    p.steps[*ia].id.value,
                    p.steps[*ib].id.value,
                    pb.display()
                )
            };
            d.push(*posb, msg);
        }
    }
    // Shards must split one of the step's inputs, into an output.
    for s in &p.steps {
        if let Some(sh) = &s.shards
            && !s.inputs.contains_key(&sh.over.value)
        {
            d.push(
                sh.over.pos,
                format!(
                    "step '{}': 'shards.over' names '{}', which is not one of its inputs ({})",
                    s.id.value,
                    sh.over.value,
                    s.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if handlers::lookup(&s.uses.value) == Some(Availability::Available)
            && s.shards.is_some()
            && matches!(s.outputs, Outputs::None)
        {
            d.push(
                s.pos,
                format!("step '{}': a sharded step needs an 'out'", s.id.value),
            );
        }
    }
    let dag = super::graph::build(p, root);
    for (pos, msg) in &dag.self_reads {
        d.push(*pos, msg.clone());
    }
    for cycle in dag.cycles() {
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| p.steps[i].id.value.as_str())
            .collect();
        let first = cycle[0];
        d.push(
            p.steps[first].id.pos,
            format!("dependency cycle: {}", names.join(" -> ")),
        );
    }
    dag
}
