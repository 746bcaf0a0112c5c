//! The Nexa coordinator: turns submitted pipelines into jobs, hands jobs to workers as
//! fenced leases, verifies what comes back, seals artifacts and keeps run state.
//!
//! Architecture invariant: exactly one task (the loop in [`engine`]) owns the scheduler's
//! state; everything else talks to it by [`engine::Event`] messages. Blocking work
//! (hashing, splitting) runs on the blocking pool, sealing on one group-sealing thread
//! ([`seal_queue`]); both report back as events.

pub mod certs;
pub mod disk;
pub mod engine;
pub mod error;
pub mod lineage;
pub mod mesh;
pub mod metrics;
pub mod mirror;
pub mod planner;
pub mod quorum;
pub mod recover;
pub mod registry;
pub mod seal_queue;
pub mod sealer;
pub mod state;
pub mod store;

pub use engine::{Coordinator, Progress, RunRequest, RunSummary};
pub use error::{Error, Result};
pub use state::StepStatus;
pub use store::{MemStore, SledStore, Store};
