//! The one error type of `nexa-coordinator`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A domain error (spec, artifact, digest, signature).
    #[error(transparent)]
    Domain(#[from] nexa_shared::Error),
    /// The run-state store failed.
    #[error("store: {0}")]
    Store(String),
    /// The state store is held by another process.
    #[error("the run state at {0} is in use by another nexa process (wait for it, or stop it)")]
    StoreLocked(String),
    /// The coordinator loop has stopped.
    #[error("the coordinator has shut down")]
    ShutDown,
    /// A request named something the coordinator does not know.
    #[error("{0}")]
    NotFound(String),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Server(String),
    /// A registry operation was refused (bad name, unknown version, unsealed or
    /// tampered artifact, a tag that would point at a deleted version).
    #[error("registry: {0}")]
    Registry(String),
    /// JSON encoding or decoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.to_string())
    }
}
