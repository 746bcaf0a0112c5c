//! The operators' HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is
//! up) and `/readyz` (the scheduler loop answers and the data disk is above its floor).

use crate::Coordinator;
use crate::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// State of the HTTP handlers.
#[derive(Clone)]
struct Http {
    coord: Coordinator,
    metrics: Arc<Metrics>,
    store_size: Arc<dyn Fn() -> u64 + Send + Sync>,
    disk: Arc<crate::disk::DiskGuard>,
}

async fn metrics_handler(
    axum::extract::State(h): axum::extract::State<Http>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let snapshot = h.coord.snapshot().await;
    let refusals = h.coord.refusals().await;
    let replication = h.coord.replication().await;
    let (Ok(snap), Ok(refusals), Ok(replication)) = (snapshot, refusals, replication) else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler has stopped\n",
        )
            .into_response();
    };
    let to_i64 = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    h.metrics.disk_free.set(to_i64(h.disk.free()));
    h.metrics.disk_floor.set(to_i64(h.disk.floor()));
    h.metrics.disk_low.set(i64::from(h.disk.is_low()));
    let tasks = h.coord.tasks();
    h.metrics.background_tasks.set(to_i64(tasks.running()));
    let panics = &h.metrics.background_task_panics;
    panics.inc_by(tasks.panicked().saturating_sub(panics.get()));
    let body = h
        .metrics
        .render(&snap, &refusals.counts(), replication, (h.store_size)());
    (
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        body,
    )
        .into_response()
}

async fn ready_handler(
    axum::extract::State(h): axum::extract::State<Http>,
) -> (axum::http::StatusCode, &'static str) {
    if h.disk.is_low() {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the data disk is below its free-space floor\n",
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), h.coord.snapshot()).await {
        Ok(Ok(_)) => (axum::http::StatusCode::OK, "ready\n"),
        _ => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler loop does not answer\n",
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    coord: Coordinator,
    metrics: Arc<Metrics>,
    store_size: Arc<dyn Fn() -> u64 + Send + Sync>,
    disk: Arc<crate::disk::DiskGuard>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(ready_handler))
        .with_state(Http {
            coord,
            metrics,
            store_size,
            disk,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
