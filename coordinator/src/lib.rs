//! The Nexa coordinator: turns submitted pipelines into jobs, hands jobs to workers as
//! fenced leases, verifies what comes back, seals artifacts and keeps run state.
//!
//! Architecture invariant: exactly one task (the loop in [`scheduler`]) owns the
//! scheduler's state; everything else talks to it by [`scheduler::Event`] messages.
//! Blocking work (planning, assembly, registry steps) runs on the blocking pool, sealing
//! on one group-sealing thread ([`sealing::group`]); both report back as events.

pub mod certs;
pub mod disk;
pub mod error;
pub mod mesh;
pub mod metrics;
pub mod mirror;
pub mod planner;
pub mod quorum;
pub mod recover;
pub mod registry;
pub mod scheduler;
pub mod sealing;
pub mod services;
pub mod slurm;
pub mod state;
pub mod store;
pub mod tasks;

pub use error::{Error, Result};
pub use scheduler::{Coordinator, Progress, RunRequest, RunSummary};
pub use state::StepStatus;
pub use store::{MemStore, SledStore, Store};
