//! The `nexa` operator CLI as a library: the embedded engine (an in-process coordinator
//! and worker talking over the same job/lease/result path as the mesh) and the
//! `nexa pipeline ...` commands. `main.rs` only calls [`cli::main`].

pub mod cli;
pub mod embedded;
pub mod lineage_cmd;
pub mod models;
pub mod remote;
pub mod render;
pub mod serve;
pub mod slurm;
pub mod summary;
pub mod viz;
pub mod workers_cmd;
