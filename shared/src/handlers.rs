//! The `uses` names this build knows, and which of them it can run.

/// Whether a handler can run in this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// It runs.
    Available,
    /// It is part of the spec but arrives with a later release.
    NotYetAvailable,
}

/// The `exec` handler: runs a command or a shell script.
pub const EXEC: &str = "exec";
/// Registers an artifact as the next version of a model.
pub const REGISTER: &str = "core.registry.register";
/// Points a model's tag at a version.
pub const PROMOTE: &str = "core.registry.promote";

/// Every `uses` name validation accepts, with its availability.
pub const KNOWN: &[(&str, Availability)] = &[
    (EXEC, Availability::Available),
    ("runners.train", Availability::Available),
    ("runners.eval", Availability::Available),
    ("runners.infer", Availability::Available),
    ("runners.serve", Availability::Available),
    (REGISTER, Availability::Available),
    (PROMOTE, Availability::Available),
];

/// Looks a `uses` name up.
pub fn lookup(uses: &str) -> Option<Availability> {
    KNOWN.iter().find(|(n, _)| *n == uses).map(|(_, a)| *a)
}

/// The message a step with a handler that is not available yet fails with.
pub fn not_available_message(uses: &str) -> String {
    format!(
        "handler '{uses}' is not available yet in this build (it is recognised by the spec; use 'exec' to run a command meanwhile)"
    )
}

/// The list of known names, for error messages.
pub fn known_names() -> String {
    KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// True for the handlers the coordinator runs itself (they act on its registry), never
/// a worker.
pub fn runs_on_coordinator(uses: &str) -> bool {
    uses == REGISTER || uses == PROMOTE
}

/// The params of a registry step (the seeds': `name`, `uri`, `meta`; `name`, `version`,
/// `tag`).
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryParams {
    /// `core.registry.register`.
    Register {
        /// The model.
        name: String,
        /// The step input to register (its name or its path); `None`: the only input.
        uri: Option<String>,
        /// Metadata: a JSON file's path, or inline.
        meta: Option<serde_json::Value>,
        /// `patch` (default), `minor` or `major`.
        bump: String,
    },
    /// `core.registry.promote`.
    Promote {
        /// The model.
        name: String,
        /// A version, or `latest`.
        version: String,
        /// The tag.
        tag: String,
    },
}

impl RegistryParams {
    /// Reads the params of a `uses` registry step.
    pub fn from_json(uses: &str, params: &serde_json::Value) -> Result<Self, String> {
        let obj = params.as_object();
        let get = |k: &str| obj.and_then(|o| o.get(k));
        let string = |k: &str| -> Result<String, String> {
            match get(k) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(_) => Err(format!("'params.{k}' must be a string")),
                None => Err(format!("'{uses}' needs 'params.{k}'")),
            }
        };
        let allowed: &[&str] = if uses == REGISTER {
            &["name", "uri", "meta", "bump"]
        } else {
            &["name", "version", "tag"]
        };
        if let Some(o) = obj {
            for k in o.keys() {
                if !allowed.contains(&k.as_str()) {
                    return Err(format!(
                        "unknown param '{k}' for '{uses}' (expected {})",
                        allowed.join(", ")
                    ));
                }
            }
        } else if !params.is_null() {
            return Err("'params' must be a mapping".into());
        }
        if uses == REGISTER {
            let bump = match get("bump") {
                None => "patch".to_string(),
                Some(_) => string("bump")?,
            };
            if !matches!(bump.as_str(), "patch" | "minor" | "major") {
                return Err(format!(
                    "'params.bump' must be patch, minor or major, not '{bump}'"
                ));
            }
            Ok(RegistryParams::Register {
                name: string("name")?,
                uri: get("uri").map(|_| string("uri")).transpose()?,
                meta: get("meta").cloned(),
                bump,
            })
        } else {
            Ok(RegistryParams::Promote {
                name: string("name")?,
                version: string("version")?,
                tag: string("tag")?,
            })
        }
    }
}
