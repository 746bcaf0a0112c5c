//! The one error type of `nexa-worker`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A domain error (digest, path, signature).
    #[error(transparent)]
    Domain(#[from] nexa_shared::Error),
    /// Staging an input failed.
    #[error("staging input '{name}': {reason}")]
    Stage {
        /// The input's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The job could not be started.
    #[error("starting the job: {0}")]
    Spawn(String),
}
