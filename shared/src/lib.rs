//! Nexa's domain crate: the pipeline spec (v2) and its validation, the DAG, cache keys,
//! content digests, the atomic artifact protocol, input sharding, and the job / lease /
//! result types that the coordinator and workers exchange.
//!
//! Architecture invariant: this crate does no I/O beyond the local filesystem and never
//! opens a socket. It knows nothing of gRPC or prost.

pub mod artifact;
pub mod cache;
pub mod dag;
pub mod diag;
pub mod digest;
pub mod disk;
pub mod error;
pub mod failpoint;
pub mod handlers;
pub mod hardware;
pub mod ids;
pub mod job;
pub mod lineage;
pub mod logging;
pub mod models;
pub mod paths;
pub mod provenance;
pub mod record;
pub mod runners;
pub mod shard;
pub mod signing;
pub mod spec;
pub mod units;
pub mod yaml;

pub use error::{Error, Result};
