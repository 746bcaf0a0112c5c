//! What a client does about a failed call, decided once from its gRPC code: the worker's
//! link and the CLI both ask [`on_error`] instead of keeping lists of their own.

use tonic::Code;

/// What to do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The coordinator is away (down, restarting, the connection dropped): reconnect
    /// and try again.
    Reconnect,
    /// The coordinator does not know this worker's session (it restarted): enrol again.
    Reenrol,
    /// A passing failure on the coordinator's side: back off and try again.
    Backoff,
    /// The coordinator refused the call for good: retrying cannot fix it.
    GiveUp,
}

/// The one table of gRPC codes: shutdown, overload and a full disk are UNAVAILABLE
/// (retried); bad input, refusals and missing things are never retried.
pub fn on_error(code: Code) -> OnError {
    match code {
        Code::Unavailable | Code::Unknown | Code::Cancelled => OnError::Reconnect,
        Code::Unauthenticated => OnError::Reenrol,
        Code::InvalidArgument
        | Code::NotFound
        | Code::DataLoss
        | Code::ResourceExhausted
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => OnError::GiveUp,
        Code::Ok | Code::DeadlineExceeded | Code::Aborted | Code::Internal => OnError::Backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_is_retried_and_refusals_are_not() {
        assert_eq!(on_error(Code::Unavailable), OnError::Reconnect);
        assert_eq!(on_error(Code::Unauthenticated), OnError::Reenrol);
        assert_eq!(on_error(Code::Internal), OnError::Backoff);
        for c in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::DataLoss,
        ] {
            assert_eq!(on_error(c), OnError::GiveUp, "{c:?}");
        }
    }
}
