//! The control service's `Services` and `StopService`: the handles in the store (see
//! `crate::services`) joined with what the workers' heartbeats say of them (see
//! `scheduler::services`).

use super::status;
use crate::scheduler::ServiceView;
use crate::{Coordinator, Store};
use nexa_proto::v1;
use nexa_shared::ids::JobId;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// Where a handle says its service runs.
fn place(h: &serde_json::Value) -> (String, JobId, u64) {
    (
        h["worker_id"].as_str().unwrap_or_default().to_string(),
        JobId::from(h["job_id"].as_str().unwrap_or_default().to_string()),
        h["generation"].as_u64().unwrap_or(0),
    )
}

/// The engine's view of the handle's service, if it holds it.
fn live<'a>(h: &serde_json::Value, views: &'a [ServiceView]) -> Option<&'a ServiceView> {
    let (worker, job, generation) = place(h);
    views
        .iter()
        .find(|v| v.worker.as_str() == worker && v.job_id == job && v.generation == generation)
}

/// Its state and why: see `v1::Service::state`.
fn state_of(h: &serde_json::Value, views: &[ServiceView]) -> (&'static str, String) {
    if h["status"] == "dry_run" {
        return ("dry_run", "a dry run: nothing was started".into());
    }
    match live(h, views) {
        None => (
            "stopped",
            "its worker does not report it running".to_string(),
        ),
        Some(v) if v.worker_lost => (
            "lost",
            "its worker stopped heartbeating; the service may still run there".into(),
        ),
        Some(v) if v.stopping => ("stopping", "a stop was sent to its worker".into()),
        Some(v) if v.healthy == Some(false) => ("unhealthy", v.detail.clone()),
        Some(_) => ("healthy", String::new()),
    }
}

fn to_wire(h: &serde_json::Value, views: &[ServiceView]) -> v1::Service {
    let s = |k: &str| h[k].as_str().unwrap_or_default().to_string();
    let (state, detail) = state_of(h, views);
    v1::Service {
        name: s("name"),
        backend: s("backend"),
        endpoint: s("endpoint"),
        worker_id: s("worker_id"),
        worker_name: s("worker"),
        state: state.into(),
        detail,
        model: s("model"),
        model_digest: s("model_digest"),
        pipeline: s("pipeline"),
        run_id: s("run_id"),
        handle_json: h.to_string(),
    }
}

/// `Services`: every handle (or the one named), with its state now.
pub async fn services(
    coord: &Coordinator,
    store: Arc<dyn Store>,
    name: String,
) -> Result<v1::ServicesResponse, Status> {
    let handles = status::blocking(move || {
        if name.is_empty() {
            return crate::services::list(store.as_ref()).map_err(Status::from);
        }
        match crate::services::get(store.as_ref(), &name).map_err(Status::from)? {
            Some(h) => Ok(vec![h]),
            None => Err(Status::not_found(format!(
                "no service named '{name}' (nexa serve list)"
            ))),
        }
    })
    .await?;
    let views = coord.services().await?;
    Ok(v1::ServicesResponse {
        services: handles.iter().map(|h| to_wire(h, &views)).collect(),
    })
}

/// `StopService`: asks the service's worker to stop it (through its heartbeats) and
/// waits until the worker no longer reports it; then the handle is forgotten.
pub async fn stop(
    coord: &Coordinator,
    store: Arc<dyn Store>,
    name: String,
    grace: Duration,
    heartbeat: Duration,
) -> Result<v1::StopServiceResponse, Status> {
    let lookup = {
        let (store, name) = (store.clone(), name.clone());
        status::blocking(move || crate::services::get(store.as_ref(), &name).map_err(Status::from))
    };
    let Some(h) = lookup.await? else {
        return Err(Status::not_found(format!(
            "no service named '{name}' (nexa serve list)"
        )));
    };
    let forget = |outcome: &str| {
        let (store, name, outcome) = (store.clone(), name.clone(), outcome.to_string());
        async move {
            status::blocking(move || {
                crate::services::remove(store.as_ref(), &name).map_err(Status::from)
            })
            .await?;
            Ok(v1::StopServiceResponse { outcome })
        }
    };
    if h["status"] == "dry_run" {
        return forget("removed (a dry run started nothing)").await;
    }
    let (worker, job, generation) = place(&h);
    if !coord
        .stop_service(&worker, job.clone(), generation, grace)
        .await?
    {
        return forget("already stopped").await;
    }
    // The worker hears of it at its next heartbeat, signals, waits out the grace
    // period, and its heartbeat after that no longer lists the service.
    let deadline = tokio::time::Instant::now() + grace + heartbeat * 3 + Duration::from_secs(10);
    loop {
        let views = coord.services().await?;
        match live(&h, &views) {
            None => return forget("stopped").await,
            Some(v) if v.worker_lost => {
                return Err(Status::unavailable(format!(
                    "the worker of '{name}' stopped heartbeating: the stop is sent when it is back"
                )));
            }
            Some(_) if tokio::time::Instant::now() > deadline => {
                return Err(Status::deadline_exceeded(format!(
                    "the worker of '{name}' has not confirmed the stop; it is sent again at its next heartbeat"
                )));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
