//! Prometheus metrics, declared in one place (served by `mesh::http` at the edge).
//!
//! Labels are low-cardinality only (worker state, job state, refusal reason, GPU
//! model): never a job, run or worker id. Gauges are read from an engine snapshot at
//! scrape time; histograms are observed where the events happen.

use nexa_shared::record::WorkerState;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the engine reports at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Workers by state.
    pub workers_by_state: BTreeMap<WorkerState, i64>,
    /// Enrolled, not lost workers by GPU model (`none` for CPU-only ones).
    pub workers_by_gpu_model: BTreeMap<String, i64>,
    /// GPUs of live workers not held by a job.
    pub gpus_available: i64,
    /// Memory of those GPUs, as last reported free.
    pub gpu_memory_available_bytes: i64,
    /// Jobs by state.
    pub jobs: JobCounts,
    /// Runs in progress.
    pub runs_active: i64,
}

/// Jobs by state, as the `nexa_jobs{state}` gauge shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Waiting for a worker (the queue depth).
    pub queued: i64,
    /// Leased to a worker.
    pub leased: i64,
    /// Reported and being sealed.
    pub sealing: i64,
    /// Waiting out a retry's backoff.
    pub backoff: i64,
}

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    workers: IntGaugeVec,
    workers_by_gpu_model: IntGaugeVec,
    gpus_available: IntGauge,
    gpu_memory_available: IntGauge,
    jobs: IntGaugeVec,
    queue_depth: IntGauge,
    runs_active: IntGauge,
    store_bytes: IntGauge,
    /// Free bytes on the data disk.
    pub disk_free: IntGauge,
    /// The free-space floor.
    pub disk_floor: IntGauge,
    /// 1 while the data disk is below its floor (no new work is taken).
    pub disk_low: IntGauge,
    /// Background tasks running now (timers, feeds, blocking work; see `crate::tasks`).
    pub background_tasks: IntGauge,
    /// Background tasks that panicked since the coordinator started.
    pub background_task_panics: prometheus::IntCounter,
    refused: IntCounterVec,
    replication: IntCounterVec,
    /// Seconds from a job being queued to its lease.
    pub dispatch_latency: Histogram,
    /// Seconds a job ran on its worker (from the signed start and end).
    pub job_duration: Histogram,
    /// Jobs finished, by outcome.
    pub jobs_finished: IntCounterVec,
    /// Artifact and input bytes through the coordinator, by direction (`in`: uploads
    /// from workers and project files from operators; `out`: inputs fetched by workers
    /// and artifacts pulled by operators).
    pub artifact_bytes: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), &[label])?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Declares every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new_custom(Some("nexa".into()), None)?;
        let refused = counter_vec(
            &r,
            "results_refused_total",
            "Results, uploads and leases refused or expired, by reason",
            "reason",
        )?;
        let replication = counter_vec(
            &r,
            "replication_jobs_total",
            "Jobs under validation (kind=unit) and the replica jobs run for them (kind=replica)",
            "kind",
        )?;
        let jobs_finished = counter_vec(
            &r,
            "jobs_finished_total",
            "Job results received, by outcome",
            "outcome",
        )?;
        let artifact_bytes = counter_vec(
            &r,
            "artifact_bytes_total",
            "Artifact and input bytes through the coordinator, by direction",
            "direction",
        )?;
        for d in ["in", "out"] {
            artifact_bytes.with_label_values(&[d]);
        }
        Ok(Self {
            workers: gauge_vec(&r, "workers", "Enrolled workers by state", "state")?,
            workers_by_gpu_model: gauge_vec(
                &r,
                "workers_by_gpu_model",
                "Live workers by the model of their first GPU (none: CPU only)",
                "model",
            )?,
            gpus_available: gauge(
                &r,
                "gpus_available",
                "GPUs of live workers not held by a job",
            )?,
            gpu_memory_available: gauge(
                &r,
                "gpu_memory_available_bytes",
                "Free memory of the GPUs not held by a job, as last reported",
            )?,
            jobs: gauge_vec(&r, "jobs", "Jobs by state", "state")?,
            queue_depth: gauge(&r, "queue_depth", "Jobs waiting for a worker")?,
            runs_active: gauge(&r, "runs_active", "Runs in progress")?,
            store_bytes: gauge(&r, "store_size_bytes", "Bytes the sled store takes on disk")?,
            disk_free: gauge(
                &r,
                "disk_free_bytes",
                "Free bytes on the data directory's disk",
            )?,
            disk_floor: gauge(
                &r,
                "disk_floor_bytes",
                "Free bytes the data disk keeps: below it no new work is taken",
            )?,
            disk_low: gauge(
                &r,
                "disk_low",
                "1 while the data disk is below its free-space floor",
            )?,
            background_tasks: gauge(
                &r,
                "background_tasks",
                "Background tasks of the coordinator running now",
            )?,
            background_task_panics: {
                let c = prometheus::IntCounter::new(
                    "background_task_panics_total",
                    "Background tasks of the coordinator that panicked",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            dispatch_latency: histogram(
                &r,
                "dispatch_latency_seconds",
                "From a job being queued to its lease",
                prometheus::exponential_buckets(0.0005, 4.0, 10)?,
            )?,
            job_duration: histogram(
                &r,
                "job_duration_seconds",
                "How long jobs ran on their workers",
                prometheus::exponential_buckets(0.01, 4.0, 12)?,
            )?,
            refused,
            replication,
            jobs_finished,
            artifact_bytes,
            registry: r,
        })
    }

    /// Brings the gauges and totals up to date and renders the text exposition.
    pub fn render(
        &self,
        snap: &Snapshot,
        refusals: &[(&'static str, u64)],
        replication: (u64, u64),
        store_bytes: u64,
    ) -> Vec<u8> {
        self.workers.reset();
        for (state, n) in &snap.workers_by_state {
            self.workers.with_label_values(&[state.as_str()]).set(*n);
        }
        self.workers_by_gpu_model.reset();
        for (model, n) in &snap.workers_by_gpu_model {
            self.workers_by_gpu_model
                .with_label_values(&[model.as_str()])
                .set(*n);
        }
        self.jobs.reset();
        let j = snap.jobs;
        for (state, n) in [
            ("queued", j.queued),
            ("leased", j.leased),
            ("sealing", j.sealing),
            ("backoff", j.backoff),
        ] {
            self.jobs.with_label_values(&[state]).set(n);
        }
        self.gpus_available.set(snap.gpus_available);
        self.gpu_memory_available
            .set(snap.gpu_memory_available_bytes);
        self.queue_depth.set(j.queued);
        self.runs_active.set(snap.runs_active);
        self.store_bytes
            .set(i64::try_from(store_bytes).unwrap_or(i64::MAX));
        // The engine keeps the totals; counters catch up to them.
        let catch_up = |c: prometheus::IntCounter, total: u64| {
            c.inc_by(total.saturating_sub(c.get()));
        };
        for (reason, n) in refusals {
            catch_up(self.refused.with_label_values(&[reason]), *n);
        }
        catch_up(self.replication.with_label_values(&["unit"]), replication.0);
        catch_up(
            self.replication.with_label_values(&["replica"]),
            replication.1,
        );
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        buf
    }
}

/// Counts `bytes` of artifact traffic in `direction` (`in` or `out`), when exporting.
pub fn count_bytes(m: Option<&Arc<Metrics>>, direction: &str, bytes: u64) {
    if let Some(m) = m {
        m.artifact_bytes
            .with_label_values(&[direction])
            .inc_by(bytes);
    }
}
