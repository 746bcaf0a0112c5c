//! The one place errors become `tonic::Status`: every handler returns `Status::from`
//! (or `?`) on a crate error, whose [`crate::Error::code`] decides the code. I/O at the
//! edge goes through [`io`], which keeps the operation and path in the message.

use tonic::Status;

impl From<crate::Error> for Status {
    fn from(e: crate::Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// A domain error's status (spec, digest, path, artifact, signature).
pub fn domain(e: nexa_shared::Error) -> Status {
    crate::Error::from(e).into()
}

/// Maps an I/O error of `op` on `path` to its status (a full disk: UNAVAILABLE).
pub fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> Status + 'a {
    move |e| domain(nexa_shared::Error::io(op, path, e))
}

/// Runs a handler's blocking work (file and store I/O) on the blocking pool, never on
/// the runtime; a task that did not finish is INTERNAL.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(join)?
}

/// A blocking task of a handler that did not finish (it panicked or was cancelled).
pub fn join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a blocking task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn retryable_errors_are_unavailable_and_bad_input_is_invalid() {
        let cases: Vec<(crate::Error, Code)> = vec![
            (crate::Error::ShutDown, Code::Unavailable),
            (crate::Error::Overloaded, Code::Unavailable),
            (crate::Error::Store("x".into()), Code::Unavailable),
            (crate::Error::StoreLocked("x".into()), Code::Unavailable),
            (crate::Error::NotFound("x".into()), Code::NotFound),
            (crate::Error::Registry("x".into()), Code::FailedPrecondition),
            (
                nexa_shared::Error::Parse("bad digest".into()).into(),
                Code::InvalidArgument,
            ),
            (
                nexa_shared::Error::UnsafePath("../x".into(), "escapes").into(),
                Code::InvalidArgument,
            ),
            (
                nexa_shared::Error::io("write", "/d/x", std::io::Error::from_raw_os_error(28))
                    .into(),
                Code::Unavailable,
            ),
            (
                nexa_shared::Error::io("write", "/d/x", std::io::Error::other("boom")).into(),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{text}");
            assert_eq!(s.message(), text);
        }
    }
}
