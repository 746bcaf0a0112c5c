//! The one error type of `nexa-shared`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the domain crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed on `path`.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The pipeline file is invalid; every problem found is listed.
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<crate::diag::Diagnostic>),
    /// An artifact on disk does not match its metadata.
    #[error("artifact {path}: {reason}")]
    Artifact {
        /// The artifact directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// What a worker uploaded is not what it signed: the worker's fault, never the
    /// coordinator's.
    #[error("artifact {path}: uploaded payload does not match the signed manifest: {reason}")]
    ManifestMismatch {
        /// The artifact directory.
        path: PathBuf,
        /// The first difference.
        reason: String,
    },
    /// JSON could not be encoded or decoded.
    #[error("json in {context}: {source}")]
    Json {
        /// Where the JSON came from.
        context: String,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A value could not be parsed (a size, a duration, a digest).
    #[error("{0}")]
    Parse(String),
    /// A signature or key was rejected.
    #[error("signature: {0}")]
    Signature(String),
    /// An input cannot be cut into shards as the step asks (too many of them).
    #[error("{0}")]
    Shards(String),
    /// A name or path from outside would escape its directory.
    #[error("unsafe path {0:?}: {1}")]
    UnsafePath(String, &'static str),
}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Adds path context to `std::io::Result`.
pub trait IoContext<T> {
    /// Maps an I/O error into [`Error::Io`] naming the operation and the path.
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
