//! Credentials on the wire: the bearer token of a call, and comparing secrets in
//! constant time (so that how long a refusal takes says nothing of how much of a guess
//! was right).

use tonic::Status;

/// The token of `authorization: Bearer <token>`, if the call carries one.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the operator token in `metadata`. The server also runs this as an interceptor,
/// on the headers alone, so a caller without the token is refused before a byte of its
/// request body is read (a 63 MB unauthenticated Submit costs nothing).
pub fn check_operator_token(
    metadata: &tonic::metadata::MetadataMap,
    expected: &str,
) -> Result<(), Status> {
    match bearer(metadata) {
        Some(t) if secrets_equal(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(Status::unauthenticated("wrong operator token")),
        None => Err(Status::unauthenticated(
            "this call needs the operator token (authorization: Bearer <token>)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"ab"));
        assert!(!secrets_equal(b"", b"a"));
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m), None);
        m.insert("authorization", "Bearer t0k".parse().expect("header"));
        assert_eq!(bearer(&m), Some("t0k"));
        assert!(check_operator_token(&m, "t0k").is_ok());
        assert!(check_operator_token(&m, "t0x").is_err());
    }
}
