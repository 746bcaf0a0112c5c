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

/// Every `uses` name validation accepts, with its availability.
pub const KNOWN: &[(&str, Availability)] = &[
    (EXEC, Availability::Available),
    ("runners.train", Availability::NotYetAvailable),
    ("runners.eval", Availability::NotYetAvailable),
    ("runners.serve", Availability::NotYetAvailable),
    ("core.registry.register", Availability::NotYetAvailable),
    ("core.registry.promote", Availability::NotYetAvailable),
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
