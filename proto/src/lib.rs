//! The Nexa wire protocol, package `nexa.v1`.
//!
//! Only this crate and the gRPC edge know these prost types; the domain types live in
//! `nexa-shared` and conversions are written once at the edge.

#![allow(missing_docs, clippy::all)]

/// Protocol version checked at enrolment.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod chunks;
pub mod convert;
pub mod retry;

/// Generated messages and services of `nexa.v1`.
pub mod v1 {
    tonic::include_proto!("nexa.v1");
}
