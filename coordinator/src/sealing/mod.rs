//! Sealing: everything that turns a verified result into sealed artifacts and records
//! where they came from. The scheduler depends on this module and never the reverse.
//!
//! - [`stage`]: checks a worker's staged files against its signed result and the plan
//!   (names, sizes, digests) and prepares them for sealing; typed refusals.
//! - [`group`]: the group-sealing thread ([`group::SealQueue`]) and the assembly of a
//!   sharded step's outputs.
//! - [`lineage`]: the lineage graph in the store: recorded only here, when artifacts
//!   are sealed or assembled, and queried both ways.

pub mod group;
pub mod lineage;
pub mod stage;
