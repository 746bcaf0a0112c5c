//! The worker's own metrics (`nexa-worker join --metrics-listen ADDR`): `/metrics`
//! (Prometheus text), `/healthz` (the process is up) and `/readyz` (enrolled, and the
//! last heartbeat reached the coordinator). For a volunteer's or a cluster's own
//! monitoring; the coordinator's metrics already cover the mesh. Labels: the job's
//! outcome only.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::future::Future;
use std::sync::Arc;

/// Every metric the worker exports.
pub struct WorkerMetrics {
    registry: Registry,
    /// Jobs finished here, by outcome (`succeeded`, `failed`, `timed_out`, `cancelled`).
    pub jobs_finished: IntCounterVec,
    /// Seconds jobs ran here.
    pub job_duration: Histogram,
    /// Jobs running now.
    pub running: IntGauge,
    /// Slots offered.
    pub slots: IntGauge,
    /// GPUs offered.
    pub gpus: IntGauge,
    /// 1 when every job runs in a sandboxed container (`--executor docker`).
    pub sandboxed: IntGauge,
    /// 1 while the last heartbeat reached the coordinator.
    pub connected: IntGauge,
    /// Heartbeats that did not reach the coordinator.
    pub heartbeat_failures: IntCounter,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("running", &self.running.get())
            .field("connected", &self.connected.get())
            .finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// Registers every metric under the `nexa_worker_` prefix.
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new_custom(Some("nexa_worker".into()), None)?;
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let jobs_finished = IntCounterVec::new(
            Opts::new(
                "jobs_finished_total",
                "Jobs finished on this worker, by outcome.",
            ),
            &["outcome"],
        )?;
        r.register(Box::new(jobs_finished.clone()))?;
        let job_duration = Histogram::with_opts(
            HistogramOpts::new("job_duration_seconds", "Seconds jobs ran on this worker.").buckets(
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ],
            ),
        )?;
        r.register(Box::new(job_duration.clone()))?;
        let heartbeat_failures = IntCounter::new(
            "heartbeat_failures_total",
            "Heartbeats that did not reach the coordinator.",
        )?;
        r.register(Box::new(heartbeat_failures.clone()))?;
        Ok(Self {
            jobs_finished,
            job_duration,
            running: gauge("jobs_running", "Jobs running on this worker now.")?,
            slots: gauge("slots", "Job slots this worker offers.")?,
            gpus: gauge("gpus", "GPUs this worker offers.")?,
            sandboxed: gauge(
                "sandboxed",
                "1 when every job runs in a sandboxed container (--executor docker).",
            )?,
            connected: gauge(
                "connected",
                "1 while the last heartbeat reached the coordinator.",
            )?,
            heartbeat_failures,
            registry: r,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        buf
    }

    /// Records a finished job.
    pub fn finished(&self, outcome: &str, seconds: f64) {
        self.jobs_finished.with_label_values(&[outcome]).inc();
        self.job_duration.observe(seconds.max(0.0));
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(m): axum::extract::State<Arc<WorkerMetrics>>| async move {
                    (
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        m.render(),
                    )
                },
            ),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(
                |axum::extract::State(m): axum::extract::State<Arc<WorkerMetrics>>| async move {
                    if m.connected.get() == 1 {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not connected to the coordinator\n",
                        )
                    }
                },
            ),
        )
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn finished_jobs_are_counted_by_outcome_only() {
        let m = super::WorkerMetrics::new().expect("metrics");
        m.finished("succeeded", 1.5);
        m.finished("failed", 0.2);
        m.finished("succeeded", 0.1);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(
            text.contains("nexa_worker_jobs_finished_total{outcome=\"succeeded\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nexa_worker_jobs_finished_total{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nexa_worker_job_duration_seconds_count 3"),
            "{text}"
        );
    }
}
