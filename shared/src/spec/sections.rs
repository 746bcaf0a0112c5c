//! A step's sections, each parsed from its YAML node with every problem pushed at
//! its position: `retries`, `slurm` (and the check of one sbatch value), `resources`,
//! `shards` and `validation`.

use super::parse::{check_duplicate_keys, map_entries, parse_u32, string_of, unknown_field};
use super::*;

/// The fields of a step's `slurm:` overrides (each becomes an sbatch option of the
/// pilots that run it).
pub const SLURM_FIELDS: &[&str] = &["partition", "account", "qos", "constraint"];

pub(super) fn parse_retries(v: &Node, label: &str, d: &mut Diagnostics) -> Retries {
    let mut r = Retries::default();
    match &v.kind {
        NodeKind::Scalar { .. } => {
            if let Some(n) = parse_u32(v, "retries", label, d) {
                r.count = n;
            }
        }
        NodeKind::Map(es) => {
            for (k, val) in es {
                match k.as_str() {
                    Some("count") => {
                        if let Some(n) = parse_u32(val, "retries.count", label, d) {
                            r.count = n;
                        }
                    }
                    Some("backoff") => match val.as_str().map(units::parse_duration) {
                        Some(Ok(b)) => r.backoff = b,
                        Some(Err(e)) => d.push(val.pos, format!("{label}: 'retries.backoff': {e}")),
                        None => d.push(
                            val.pos,
                            format!("{label}: 'retries.backoff' must be a duration"),
                        ),
                    },
                    _ => unknown_field(d, k, "retries", &["count", "backoff"]),
                }
            }
        }
        NodeKind::Seq(_) => d.push(
            v.pos,
            format!("{label}: 'retries' must be a number or {{count, backoff}}"),
        ),
    }
    r
}

/// A step's `slurm:` overrides: only with `scheduler: slurm`, only the known fields,
/// each a value sbatch reads as one word (no spaces, quotes or newlines: it goes into a
/// batch script's `#SBATCH` line).
pub(super) fn parse_slurm(
    v: &Node,
    label: &str,
    scheduler: Option<&str>,
    d: &mut Diagnostics,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if scheduler != Some("slurm") {
        d.push(
            v.pos,
            format!("{label}: 'slurm' options go with 'scheduler: slurm'"),
        );
    }
    let Some(es) = map_entries(v, "slurm", d) else {
        return out;
    };
    check_duplicate_keys(es, "slurm", d);
    for (k, val) in es {
        let Some(name) = k.as_str().filter(|n| SLURM_FIELDS.contains(n)) else {
            unknown_field(d, k, &format!("{label}'s slurm"), SLURM_FIELDS);
            continue;
        };
        let Some(text) = string_of(val, &format!("slurm.{name}"), d) else {
            continue;
        };
        if let Err(e) = check_slurm_value(&text.value) {
            d.push(val.pos, format!("{label}: 'slurm.{name}': {e}"));
            continue;
        }
        out.insert(name.to_string(), text.value);
    }
    out
}

/// A value for an sbatch option written into a batch script: 1–200 characters of
/// letters, digits and `_ - . , : | & ! * [ ] ( ) = @ +` (partition lists, constraint
/// expressions, QOS and account names).
pub fn check_slurm_value(v: &str) -> std::result::Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '_' | '-'
                        | '.'
                        | ','
                        | ':'
                        | '|'
                        | '&'
                        | '!'
                        | '*'
                        | '['
                        | ']'
                        | '('
                        | ')'
                        | '='
                        | '@'
                        | '+'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a Slurm name or expression (letters, digits and _-.,:|&!*[]()=@+ only, at most 200)"
        ))
    }
}

pub(super) fn parse_resources(v: &Node, label: &str, d: &mut Diagnostics) -> Resources {
    const FIELDS: &[&str] = &["cpus", "memory", "gpus", "gpu_memory", "compute_capability"];
    let mut r = Resources::default();
    let Some(es) = map_entries(v, "resources", d) else {
        return r;
    };
    check_duplicate_keys(es, "resources", d);
    for (k, val) in es {
        let size = |d: &mut Diagnostics, what: &str| match val.as_str().map(units::parse_size) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                d.push(val.pos, format!("{label}: 'resources.{what}': {e}"));
                None
            }
            None => {
                d.push(
                    val.pos,
                    format!("{label}: 'resources.{what}' must be a size like 40GiB"),
                );
                None
            }
        };
        match k.as_str() {
            Some("cpus") => r.cpus = parse_u32(val, "resources.cpus", label, d),
            Some("gpus") => r.gpus = parse_u32(val, "resources.gpus", label, d),
            Some("memory") => r.memory = size(d, "memory"),
            Some("gpu_memory") => r.gpu_memory = size(d, "gpu_memory"),
            Some("compute_capability") => {
                let parsed = val.as_str().and_then(|s| {
                    let (a, b) = s.split_once('.').unwrap_or((s, "0"));
                    Some((a.parse().ok()?, b.parse().ok()?))
                });
                match parsed {
                    Some(cc) => r.compute_capability = Some(cc),
                    None => d.push(
                        val.pos,
                        format!("{label}: 'resources.compute_capability' must look like 8.0"),
                    ),
                }
            }
            _ => unknown_field(d, k, "resources", FIELDS),
        }
    }
    r
}

pub(super) fn parse_shards(v: &Node, label: &str, d: &mut Diagnostics) -> Option<Shards> {
    use crate::shard::{Cut, MAX_SHARDS};
    const CUTS: [&str; 3] = ["count", "records", "size"];
    let es = map_entries(v, "shards", d)?;
    check_duplicate_keys(es, "shards", d);
    let mut over = None;
    let mut cuts: Vec<(&str, Option<Cut>)> = Vec::new();
    for (k, val) in es {
        match k.as_str() {
            Some("over") => over = string_of(val, "shards.over", d),
            Some("count") => {
                let n = parse_u32(val, "shards.count", label, d);
                if n.is_some_and(|c| c == 0 || u64::from(c) > MAX_SHARDS) {
                    d.push(
                        val.pos,
                        format!("{label}: 'shards.count' must be between 1 and {MAX_SHARDS}"),
                    );
                    return None;
                }
                cuts.push(("count", n.map(Cut::Count)));
            }
            Some("records") => {
                let n = parse_u32(val, "shards.records", label, d);
                if n == Some(0) {
                    d.push(
                        val.pos,
                        format!("{label}: 'shards.records' must be at least 1"),
                    );
                    return None;
                }
                cuts.push(("records", n.map(|n| Cut::Records(u64::from(n)))));
            }
            Some("size") => {
                let n = match val.as_str().map(crate::units::parse_size) {
                    Some(Ok(0)) | None => {
                        d.push(
                            val.pos,
                            format!("{label}: 'shards.size' must be a size above zero, e.g. 64MiB"),
                        );
                        return None;
                    }
                    Some(Err(e)) => {
                        d.push(val.pos, format!("{label}: 'shards.size': {e}"));
                        return None;
                    }
                    Some(Ok(n)) => n,
                };
                cuts.push(("size", Some(Cut::Bytes(n))));
            }
            _ => unknown_field(d, k, "shards", &["over", "count", "records", "size"]),
        }
    }
    if over.is_none() && !es.iter().any(|(k, _)| k.as_str() == Some("over")) {
        d.push(
            v.pos,
            format!("{label}: 'shards' needs 'over' (an input name)"),
        );
    }
    let cut = match cuts.as_slice() {
        [] => {
            d.push(
                v.pos,
                format!(
                    "{label}: 'shards' needs one of {} (how to cut the input)",
                    CUTS.map(|c| format!("'{c}'")).join(", ")
                ),
            );
            return None;
        }
        [(_, cut)] => (*cut)?,
        [(a, _), (b, _), ..] => {
            d.push(
                v.pos,
                format!("{label}: 'shards' takes one of 'count', 'records' and 'size', not both '{a}' and '{b}'"),
            );
            return None;
        }
    };
    Some(Shards { over: over?, cut })
}

impl std::str::FromStr for Validation {
    type Err = String;

    /// `replicas=N,quorum=K[,tolerance=R][,homogeneous]`, as an operator gives a
    /// coordinator-wide default (`nexa-coordinator serve --validate ...`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut replicas = None;
        let mut quorum = None;
        let mut compare = Compare::Exact;
        let mut homogeneous = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("'{k}' needs a whole number, not '{v}'"))
            };
            match k {
                "replicas" => replicas = Some(num(v)?),
                "quorum" => quorum = Some(num(v)?),
                "tolerance" => match v.parse::<f64>() {
                    Ok(t) if t.is_finite() && t >= 0.0 => compare = Compare::Tolerance(t),
                    _ => return Err(format!("'tolerance' needs a relative amount, not '{v}'")),
                },
                "exact" => compare = Compare::Exact,
                "homogeneous" => homogeneous = true,
                other => {
                    return Err(format!(
                        "unknown validation setting '{other}' (replicas, quorum, tolerance, exact, homogeneous)"
                    ));
                }
            }
        }
        let replicas = replicas.unwrap_or(2);
        let quorum = quorum.unwrap_or(replicas / 2 + 1);
        if !(1..=16).contains(&replicas) || quorum == 0 || quorum > replicas {
            return Err(format!(
                "validation needs 1 <= quorum <= replicas <= 16 (got replicas {replicas}, quorum {quorum})"
            ));
        }
        Ok(Validation {
            replicas,
            quorum,
            compare,
            homogeneous,
        })
    }
}

pub(super) fn parse_validation(v: &Node, label: &str, d: &mut Diagnostics) -> Option<Validation> {
    let es = map_entries(v, "validation", d)?;
    check_duplicate_keys(es, "validation", d);
    let mut replicas = None;
    let mut quorum = None;
    let mut compare = Compare::Exact;
    let mut homogeneous = false;
    for (k, val) in es {
        match k.as_str() {
            Some("replicas") => replicas = parse_u32(val, "validation.replicas", label, d),
            Some("quorum") => quorum = parse_u32(val, "validation.quorum", label, d),
            Some("homogeneous") => match val.as_str() {
                Some("true") => homogeneous = true,
                Some("false") => homogeneous = false,
                _ => d.push(
                    val.pos,
                    format!("{label}: 'validation.homogeneous' must be true or false"),
                ),
            },
            Some("compare") => {
                match (val.as_str(), &val.kind) {
                    (Some("exact"), _) => compare = Compare::Exact,
                    (_, NodeKind::Map(m))
                        if m.len() == 1 && m[0].0.as_str() == Some("tolerance") =>
                    {
                        match m[0].1.as_str().map(str::parse::<f64>) {
                        Some(Ok(t)) if t.is_finite() && t >= 0.0 => compare = Compare::Tolerance(t),
                        _ => d.push(
                            m[0].1.pos,
                            format!(
                                "{label}: 'validation.compare.tolerance' must be a relative amount such as 0.001"
                            ),
                        ),
                    }
                    }
                    _ => d.push(
                        val.pos,
                        format!(
                            "{label}: 'validation.compare' must be exact or {{tolerance: <rel>}}"
                        ),
                    ),
                }
            }
            _ => unknown_field(
                d,
                k,
                "validation",
                &["replicas", "quorum", "compare", "homogeneous"],
            ),
        }
    }
    let replicas = replicas.unwrap_or(2);
    let quorum = quorum.unwrap_or(replicas / 2 + 1);
    if !(1..=16).contains(&replicas) || quorum == 0 || quorum > replicas {
        d.push(
            v.pos,
            format!(
                "{label}: 'validation' needs 1 <= quorum <= replicas <= 16 (got replicas {replicas}, quorum {quorum})"
            ),
        );
        return None;
    }
    Some(Validation {
        replicas,
        quorum,
        compare,
        homogeneous,
    })
}
