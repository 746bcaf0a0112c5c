//! Parsing spec v2 from the positioned YAML tree: every field of a pipeline and its
//! steps, each problem pushed with its position.

use super::sections::{
    parse_resources, parse_retries, parse_shards, parse_slurm, parse_validation,
};
use super::*;

const STEP_FIELDS: &[&str] = &[
    "id",
    "uses",
    "backend",
    "scheduler",
    "in",
    "out",
    "params",
    "after",
    "cache_hint",
    "retries",
    "timeout",
    "resources",
    "shards",
    "validation",
    "slurm",
];

pub(super) fn map_entries<'a>(
    node: &'a Node,
    what: &str,
    d: &mut Diagnostics,
) -> Option<&'a [(Node, Node)]> {
    match &node.kind {
        NodeKind::Map(e) => Some(e),
        _ => {
            d.push(
                node.pos,
                format!("'{what}' must be a mapping, found {}", node.kind_name()),
            );
            None
        }
    }
}

pub(super) fn string_of(node: &Node, what: &str, d: &mut Diagnostics) -> Option<Spanned<String>> {
    match &node.kind {
        NodeKind::Scalar { text, .. } if !node.is_null() => Some(Spanned {
            value: text.clone(),
            pos: node.pos,
        }),
        _ => {
            d.push(
                node.pos,
                format!("'{what}' must be a string, found {}", node.kind_name()),
            );
            None
        }
    }
}

pub(super) fn unknown_field(d: &mut Diagnostics, key: &Node, ctx: &str, allowed: &[&str]) {
    d.push(
        key.pos,
        format!(
            "unknown field '{}' in {ctx} (expected one of: {})",
            key.as_str().unwrap_or("?"),
            allowed.join(", ")
        ),
    );
}

pub(super) fn check_duplicate_keys(entries: &[(Node, Node)], ctx: &str, d: &mut Diagnostics) {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for (k, _) in entries {
        if let Some(name) = k.as_str()
            && let Some(first) = seen.insert(name, k.pos)
        {
            d.push(
                k.pos,
                format!(
                    "duplicate key '{name}' in {ctx} (first at line {})",
                    first.line
                ),
            );
        }
    }
}

/// Parses the positioned tree into a [`Pipeline`], recording shape errors.
pub(super) fn parse(file: &str, src: &str, d: &mut Diagnostics) -> Option<Pipeline> {
    let root = match crate::yaml::parse(src) {
        Ok(Some(n)) => n,
        Ok(None) => {
            d.push(
                Pos { line: 1, col: 1 },
                "empty file: expected 'pipeline:' with 'name' and 'steps'",
            );
            return None;
        }
        Err(e) => {
            d.push(e.pos, format!("invalid YAML: {}", e.message));
            return None;
        }
    };
    let top = map_entries(&root, "the document", d)?;
    check_duplicate_keys(top, "the document", d);
    let mut pipeline_node = None;
    for (k, v) in top {
        match k.as_str() {
            Some("pipeline") => pipeline_node = Some(v),
            _ => unknown_field(d, k, "the document", &["pipeline"]),
        }
    }
    let Some(pnode) = pipeline_node else {
        d.push(root.pos, "missing field 'pipeline'");
        return None;
    };
    let pentries = map_entries(pnode, "pipeline", d)?;
    check_duplicate_keys(pentries, "pipeline", d);
    let mut name = None;
    let mut steps_node = None;
    for (k, v) in pentries {
        match k.as_str() {
            Some("name") => name = string_of(v, "pipeline.name", d),
            Some("steps") => steps_node = Some(v),
            _ => unknown_field(d, k, "pipeline", &["name", "steps"]),
        }
    }
    let name = match name {
        Some(n) => {
            if n.value.is_empty()
                || !n
                    .value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                || n.value.starts_with('.')
                || n.value.len() > MAX_NAME
            {
                d.push(
                    n.pos,
                    format!(
                        "'pipeline.name' {:?} must use only letters, digits, '_', '-', '.', not start with '.' and be at most {MAX_NAME} characters (it names a state directory)",
                        n.value
                    ),
                );
            }
            n.value
        }
        None => {
            if !pentries.iter().any(|(k, _)| k.as_str() == Some("name")) {
                d.push(pnode.pos, "missing field 'pipeline.name'");
            }
            String::new()
        }
    };
    let mut steps = Vec::new();
    match steps_node {
        None => d.push(pnode.pos, "missing field 'pipeline.steps'"),
        Some(sn) => match &sn.kind {
            NodeKind::Seq(items) => {
                if items.is_empty() {
                    d.push(sn.pos, "'pipeline.steps' is empty");
                }
                for (i, item) in items.iter().enumerate() {
                    if let Some(step) = parse_step(item, i, d) {
                        steps.push(step);
                    }
                }
            }
            _ => d.push(
                sn.pos,
                format!("'pipeline.steps' must be a list, found {}", sn.kind_name()),
            ),
        },
    }
    Some(Pipeline {
        name,
        steps,
        file: file.to_string(),
    })
}

pub(super) fn parse_step(node: &Node, index: usize, d: &mut Diagnostics) -> Option<Step> {
    let ctx = format!("steps[{index}]");
    let entries = map_entries(node, &ctx, d)?;
    check_duplicate_keys(entries, &ctx, d);
    let get = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    };
    for (k, _) in entries {
        if !k.as_str().is_some_and(|n| STEP_FIELDS.contains(&n)) {
            unknown_field(d, k, &format!("step {ctx}"), STEP_FIELDS);
        }
    }
    let id = match get("id") {
        Some(v) => string_of(v, "id", d),
        None => {
            d.push(node.pos, format!("{ctx}: missing field 'id'"));
            None
        }
    };
    if let Some(id) = &id
        && !id
            .value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        d.push(
            id.pos,
            format!(
                "step id {:?} must use only letters, digits, '_', '-', '.'",
                id.value
            ),
        );
    }
    if let Some(id) = &id
        && id.value.len() > MAX_NAME
    {
        d.push(
            id.pos,
            format!(
                "step id is {} characters; at most {MAX_NAME} are allowed (it names files and directories)",
                id.value.len()
            ),
        );
    }
    let label = id
        .as_ref()
        .map(|i| format!("step '{}'", i.value))
        .unwrap_or(ctx.clone());
    let uses = match get("uses") {
        Some(v) => string_of(v, "uses", d),
        None => {
            d.push(node.pos, format!("{label}: missing field 'uses'"));
            None
        }
    };
    if let Some(u) = &uses
        && handlers::lookup(&u.value).is_none()
    {
        d.push(
            u.pos,
            format!(
                "{label}: unknown handler 'uses: {}' (known: {})",
                u.value,
                handlers::known_names()
            ),
        );
    }
    let opt_string = |name: &str, d: &mut Diagnostics| {
        get(name).and_then(|v| {
            if v.is_null() {
                None
            } else {
                string_of(v, name, d).map(|s| s.value)
            }
        })
    };
    let backend = opt_string("backend", d);
    let scheduler = opt_string("scheduler", d);
    if let (Some(s), Some(v)) = (&scheduler, get("scheduler"))
        && !matches!(s.as_str(), "local" | "slurm" | "k8s" | "mesh")
    {
        d.push(
            v.pos,
            format!("{label}: unknown scheduler '{s}' (expected local, slurm, k8s or mesh)"),
        );
    }
    let cache_hint = opt_string("cache_hint", d);

    let mut inputs = BTreeMap::new();
    if let Some(v) = get("in")
        && !v.is_null()
        && let Some(es) = map_entries(v, "in", d)
    {
        check_duplicate_keys(es, "in", d);
        for (k, val) in es {
            let Some(name) = k.as_str() else { continue };
            if !valid_name(name) {
                d.push(
                    k.pos,
                    format!("{label}: input name '{name}' must use only letters, digits and '_' (at most {MAX_NAME})"),
                );
            }
            if let Some(p) = string_of(val, &format!("in.{name}"), d) {
                inputs.insert(name.to_string(), p);
            }
        }
    }

    let outputs = match get("out") {
        None => Outputs::None,
        Some(v) if v.is_null() => Outputs::None,
        Some(v) => match &v.kind {
            NodeKind::Scalar { .. } => string_of(v, "out", d)
                .map(Outputs::Single)
                .unwrap_or(Outputs::None),
            NodeKind::Map(es) => {
                check_duplicate_keys(es, "out", d);
                let mut m = BTreeMap::new();
                for (k, val) in es {
                    let Some(name) = k.as_str() else { continue };
                    if !valid_name(name) {
                        d.push(k.pos, format!("{label}: output name '{name}' must use only letters, digits and '_' (at most {MAX_NAME})"));
                    }
                    if let Some(p) = string_of(val, &format!("out.{name}"), d) {
                        m.insert(name.to_string(), p);
                    }
                }
                Outputs::Named(m)
            }
            NodeKind::Seq(_) => {
                d.push(
                    v.pos,
                    format!(
                        "{label}: 'out' must be a path or a mapping of name: path, found a list"
                    ),
                );
                Outputs::None
            }
        },
    };

    let params = get("params")
        .map(Node::to_json)
        .unwrap_or(serde_json::Value::Null);

    let after = match get("after") {
        None => None,
        Some(v) => match &v.kind {
            NodeKind::Seq(items) => Some(
                items
                    .iter()
                    .filter_map(|i| string_of(i, "after[]", d))
                    .collect(),
            ),
            NodeKind::Scalar { .. } if !v.is_null() => string_of(v, "after", d).map(|s| vec![s]),
            _ => {
                d.push(
                    v.pos,
                    format!("{label}: 'after' must be a list of step ids"),
                );
                None
            }
        },
    };

    let retries = get("retries")
        .map(|v| parse_retries(v, &label, d))
        .unwrap_or_default();
    let timeout = get("timeout").and_then(|v| {
        let s = string_of(v, "timeout", d)?;
        match units::parse_duration(&s.value) {
            Ok(t) if t.is_zero() => {
                d.push(v.pos, format!("{label}: 'timeout' must be more than zero"));
                None
            }
            Ok(t) => Some(t),
            Err(e) => {
                d.push(v.pos, format!("{label}: 'timeout': {e}"));
                None
            }
        }
    });
    let resources = get("resources")
        .map(|v| parse_resources(v, &label, d))
        .unwrap_or_default();
    let shards = get("shards").and_then(|v| parse_shards(v, &label, d));
    let validation = get("validation").and_then(|v| parse_validation(v, &label, d));
    let slurm = get("slurm")
        .map(|v| parse_slurm(v, &label, scheduler.as_deref(), d))
        .unwrap_or_default();

    // Handler-specific params, checked where the positions are known.
    if let Some(u) = &uses
        && u.value == handlers::EXEC
        && let Err(msg) = ExecParams::from_json(&params)
    {
        let pos = get("params").map(|p| p.pos).unwrap_or(node.pos);
        d.push(pos, format!("{label}: {msg}"));
    }

    if let Some(u) = &uses
        && crate::runners::is_runner(&u.value)
    {
        let pos = get("params").map(|p| p.pos).unwrap_or(node.pos);
        let names: Vec<&str> = inputs.keys().map(String::as_str).collect();
        for msg in crate::runners::check(&u.value, backend.as_deref(), &params, &names) {
            d.push(pos, format!("{label}: {msg}"));
        }
    }

    if let Some(u) = &uses
        && handlers::runs_on_coordinator(&u.value)
    {
        let pos = get("params").map(|p| p.pos).unwrap_or(node.pos);
        match handlers::RegistryParams::from_json(&u.value, &params) {
            Err(msg) => d.push(pos, format!("{label}: {msg}")),
            Ok(handlers::RegistryParams::Register { uri, .. }) => {
                let named = uri.as_deref().is_none_or(|u| {
                    inputs.contains_key(u) || inputs.values().any(|w| w.value == u)
                });
                if uri.is_none() && inputs.len() != 1 {
                    d.push(
                        pos,
                        format!(
                            "{label}: '{}' registers one of its inputs: give it exactly one 'in', or name one in 'params.uri'",
                            u.value
                        ),
                    );
                } else if !named {
                    d.push(
                        pos,
                        format!(
                            "{label}: 'params.uri' must name one of the step's inputs (by name or path), so that the registered artifact is ordered and hashed like any input"
                        ),
                    );
                }
            }
            Ok(_) => {}
        }
        if !matches!(outputs, Outputs::None) {
            let pos = get("out").map(|p| p.pos).unwrap_or(node.pos);
            d.push(
                pos,
                format!(
                    "{label}: '{}' writes to the registry, not to an artifact: remove 'out'",
                    u.value
                ),
            );
        }
        if let Some(sh) = get("shards") {
            d.push(sh.pos, format!("{label}: '{}' cannot be sharded", u.value));
        }
    }

    Some(Step {
        id: id?,
        uses: uses?,
        backend,
        scheduler,
        inputs,
        outputs,
        params,
        after,
        cache_hint,
        retries,
        timeout,
        resources,
        shards,
        validation,
        slurm,
        pos: node.pos,
    })
}

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn parse_u32(v: &Node, what: &str, label: &str, d: &mut Diagnostics) -> Option<u32> {
    match v.as_str().map(str::parse::<u32>) {
        Some(Ok(n)) => Some(n),
        _ => {
            d.push(
                v.pos,
                format!("{label}: '{what}' must be a non-negative integer"),
            );
            None
        }
    }
}
