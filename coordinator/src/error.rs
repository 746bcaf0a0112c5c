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
    /// The coordinator's queue of calls is full: try again shortly.
    #[error("the coordinator is overloaded; try again shortly")]
    Overloaded,
    /// A request named something the coordinator does not know.
    #[error("{0}")]
    NotFound(String),
    /// A request that conflicts with what is going on (a run of that pipeline is
    /// already active).
    #[error("{0}")]
    Conflict(String),
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

impl Error {
    /// The gRPC code this error is answered with (`mesh::status` is the one place it
    /// becomes a `tonic::Status`): what a caller may retry is UNAVAILABLE (shutdown, a
    /// store or disk that may come back), bad input INVALID_ARGUMENT.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Domain(e) => domain_code(e),
            Error::Store(_) | Error::StoreLocked(_) | Error::ShutDown | Error::Overloaded => {
                Code::Unavailable
            }
            Error::NotFound(_) => Code::NotFound,
            Error::Server(_) | Error::Json(_) => Code::Internal,
            Error::Registry(_) | Error::Conflict(_) => Code::FailedPrecondition,
        }
    }
}

/// The gRPC code of a domain error.
pub fn domain_code(e: &nexa_shared::Error) -> tonic::Code {
    use nexa_shared::Error as D;
    use tonic::Code;
    match e {
        D::Invalid(_) | D::Parse(_) | D::UnsafePath(..) | D::Json { .. } | D::Shards(_) => {
            Code::InvalidArgument
        }
        D::Signature(_) => Code::PermissionDenied,
        D::Artifact { .. } => Code::FailedPrecondition,
        D::ManifestMismatch { .. } => Code::DataLoss,
        // A full disk is worth retrying once space returns; other I/O is ours.
        D::Io { source, .. } if source.raw_os_error() == Some(28) => Code::Unavailable,
        D::Io { .. } => Code::Internal,
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.to_string())
    }
}
