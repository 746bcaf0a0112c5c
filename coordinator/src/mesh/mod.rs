//! The gRPC edge of the coordinator: the worker service (enrolment by challenge, leases,
//! heartbeats, uploads, results, input downloads) over tonic. Handlers translate wire
//! messages with `nexa_proto::convert` and talk to the engine through [`Coordinator`].

mod auth;
mod control_service;
mod exchange;
mod http;
mod large_requests;
mod receive;
mod server;
mod service_control;
pub mod status;
mod uploads;
mod worker_service;

pub use control_service::{ControlApi, SUBMISSIONS_TREE, Submission};
pub use server::{ServeConfig, open_store, serve, serve_opened, serve_with_metrics};
pub use worker_service::WorkerApi;

use crate::Coordinator;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of the mesh edge.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Where uploads are staged (`<data>/staging`).
    pub data_dir: PathBuf,
    /// The token workers must present to enrol; `None` opens enrolment to anyone.
    pub enrol_token: Option<String>,
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
    /// The largest output file a worker may upload.
    pub max_upload_file: u64,
    /// The most one job (one attempt) may upload in all.
    pub max_upload_job: u64,
    /// How long one lease call may wait for work.
    pub max_lease_wait: Duration,
    /// The largest control message (a submission: pipeline YAML plus the project files
    /// sent inline). 64 MiB holds a 200,000-step pipeline.
    pub max_submit_bytes: usize,
    /// Where artifact traffic is counted (set by `serve_with_metrics`).
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// Free bytes the data disk must keep: below it no new work is taken.
    pub min_free: u64,
    /// The guard of that floor (set by `serve_with_metrics`).
    pub disk: Option<std::sync::Arc<crate::disk::DiskGuard>>,
    /// Turns true when the server starts shutting down: long-polls and watch streams end
    /// then, so a graceful stop takes no longer than the calls in progress need.
    pub stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

impl MeshConfig {
    /// Resolves when the server starts shutting down (never, without a signal).
    pub async fn stopped(&self) {
        match self.stopping.clone() {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    }
}

impl MeshConfig {
    /// Defaults for a data directory: heartbeats every 2 s, leases live 3 heartbeats
    /// (so one late heartbeat never costs a lease), uploads up to 64 GiB per file and 256 GiB per job, 1 GiB kept free on the data disk.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            enrol_token: None,
            heartbeat_interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(6),
            max_upload_file: 64 << 30,
            max_upload_job: 256 << 30,
            max_lease_wait: Duration::from_secs(20),
            max_submit_bytes: 64 << 20,
            metrics: None,
            min_free: 1 << 30,
            disk: None,
            stopping: None,
        }
    }
}

/// Builds the tonic service for workers.
pub fn worker_service(
    coord: Coordinator,
    config: MeshConfig,
) -> nexa_proto::v1::worker_service_server::WorkerServiceServer<WorkerApi> {
    nexa_proto::v1::worker_service_server::WorkerServiceServer::new(WorkerApi::new(coord, config))
        .max_decoding_message_size(8 << 20)
}
