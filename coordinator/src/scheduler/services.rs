//! Services: the servers `runners.serve` jobs leave running on their workers.
//!
//! A serve job is COMPLETE once its server is healthy, but the server keeps what it was
//! given: the GPUs of the job's lease stay held on the worker (no other job gets them)
//! for as long as the worker reports the service in its heartbeats. A heartbeat lists
//! every service the worker runs with its health; one that is no longer listed has
//! stopped and its GPUs are free again. A stop asked by an operator travels back in the
//! heartbeat's answer. The handles themselves are durable in the store (see
//! `crate::services`); this is only their live half.

use super::*;

/// How long a replaced service gets between SIGTERM and SIGKILL.
const REPLACED_GRACE: Duration = Duration::from_secs(10);

/// What a held service looks like to the engine.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The service's name (`params.name`, else the step id).
    name: String,
    /// The worker's GPUs (indices into its profile) the service holds.
    gpus: Vec<usize>,
    /// When the hold began: a heartbeat sent before the worker knew of the service may
    /// arrive after it, so an unconfirmed hold survives heartbeats for a while.
    since: Instant,
    /// Seen in a heartbeat at least once.
    confirmed: bool,
    /// What the worker last said: healthy, and why not.
    healthy: Option<bool>,
    detail: String,
    /// An operator asked it to stop, with this grace period.
    stop: Option<Duration>,
}

/// A service a worker says it runs (one entry of a heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBeat {
    /// The job that started it.
    pub job_id: JobId,
    /// That job's lease generation.
    pub generation: u64,
    /// `/health` answers 200 and `/v1/models` lists the model.
    pub healthy: bool,
    /// Why not, when not healthy.
    pub detail: String,
    /// The GPUs it holds, by UUID.
    pub gpu_uuids: Vec<String>,
}

/// A worker's heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// The attempts it runs, as `(job, generation)`.
    pub running: Vec<(JobId, u64)>,
    /// The services it runs.
    pub services: Vec<ServiceBeat>,
    /// A fresh hardware reading, when there is one.
    pub profile: Option<Profile>,
}

/// What a heartbeat is answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// Attempts to kill, as `(job, generation)`.
    pub cancel: Vec<(JobId, u64)>,
    /// Services to stop: `(job, generation, grace period)`.
    pub stop_services: Vec<(JobId, u64, Duration)>,
}

/// A service as the engine knows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Its worker.
    pub worker: WorkerId,
    /// The job that started it, and its generation.
    pub job_id: JobId,
    /// The generation.
    pub generation: u64,
    /// What its worker last said (`None`: not reported yet).
    pub healthy: Option<bool>,
    /// Why it is not healthy.
    pub detail: String,
    /// A stop was asked and not yet confirmed.
    pub stopping: bool,
    /// Its worker stopped heartbeating.
    pub worker_lost: bool,
}

/// The name a serve job's service goes by: `params.name`, else its step's id.
fn name_of(spec: &JobSpec) -> String {
    spec.params
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or(&spec.step_id)
        .to_string()
}

/// Whether a result ends a job whose server keeps running: a succeeded
/// `runners.serve` job that was not a dry run.
pub(super) fn starts_service(spec: &JobSpec, result: &JobResult) -> bool {
    spec.uses == nexa_shared::runners::SERVE
        && result.outcome == Outcome::Succeeded
        && spec.params.get("dry_run").and_then(|v| v.as_bool()) != Some(true)
}

impl Engine {
    /// The job's lease ended with a server left running: its GPUs move from the job to
    /// the service instead of being freed.
    /// A service of the same name that was running is asked to stop: a re-run replaces
    /// its services (the new one is already healthy; the handle now names it).
    pub(super) fn hold_for_service(&mut self, job_id: &JobId, generation: u64) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let Some(worker) = job.worker.clone() else {
            return;
        };
        let name = name_of(&job.spec);
        for (id, w) in &mut self.workers {
            for ((old, g), h) in &mut w.services {
                if h.name == name && h.stop.is_none() {
                    tracing::info!(service = %name, job = %old, generation = g, worker = %id, "replaced by a new run: stopping it");
                    h.stop = Some(REPLACED_GRACE);
                }
            }
        }
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let Some(a) = w.alloc.remove(job_id) else {
            return;
        };
        tracing::info!(job = %job_id, worker = %worker, gpus = ?a.gpus, "service started: its GPUs stay held");
        w.services.insert(
            (job_id.clone(), generation),
            Held {
                name,
                gpus: a.gpus,
                since: Instant::now(),
                confirmed: false,
                healthy: None,
                detail: String::new(),
                stop: None,
            },
        );
        self.unhold(job_id);
        // Its CPUs and memory came back.
        self.dispatch();
    }

    /// A heartbeat's services: holds follow what the worker says it runs. Returns the
    /// stops to send back.
    pub(super) fn on_service_beats(
        &mut self,
        worker: &str,
        beats: &[ServiceBeat],
    ) -> Vec<(JobId, u64, Duration)> {
        let grace = self
            .config
            .lease_ttl
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_secs(5));
        let Some(w) = self.workers.get_mut(worker) else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut freed = false;
        let reported: std::collections::HashSet<(&JobId, u64)> =
            beats.iter().map(|b| (&b.job_id, b.generation)).collect();
        w.services.retain(|(job, generation), held| {
            let keep = reported.contains(&(job, *generation))
                || (!held.confirmed && now.duration_since(held.since) < grace);
            if !keep {
                tracing::info!(job = %job, worker, "service stopped: its GPUs are free");
                freed |= !held.gpus.is_empty();
            }
            keep
        });
        for b in beats {
            let key = (b.job_id.clone(), b.generation);
            let gpus: Vec<usize> = b
                .gpu_uuids
                .iter()
                .filter_map(|u| w.info.profile.gpus.iter().position(|g| &g.uuid == u))
                .collect();
            let held = w.services.entry(key).or_insert_with(|| Held {
                // A service this engine did not start (a restarted coordinator): held as
                // its worker says.
                name: String::new(),
                gpus: gpus.clone(),
                since: now,
                confirmed: true,
                healthy: None,
                detail: String::new(),
                stop: None,
            });
            held.confirmed = true;
            held.healthy = Some(b.healthy);
            held.detail.clone_from(&b.detail);
        }
        if freed {
            self.dispatch();
        }
        let Some(w) = self.workers.get(worker) else {
            return Vec::new();
        };
        w.services
            .iter()
            .filter_map(|((job, generation), h)| h.stop.map(|g| (job.clone(), *generation, g)))
            .collect()
    }

    /// An operator asks `worker` to stop the service of `(job, generation)`; false when
    /// the engine knows no such service (it has stopped).
    pub(super) fn stop_service(
        &mut self,
        worker: &str,
        job_id: &JobId,
        generation: u64,
        grace: Duration,
    ) -> bool {
        let Some(h) = self
            .workers
            .get_mut(worker)
            .and_then(|w| w.services.get_mut(&(job_id.clone(), generation)))
        else {
            return false;
        };
        h.stop = Some(grace);
        true
    }

    /// The step of a serve job could not be sealed: the server it left must not run on
    /// with nothing pointing at it.
    pub(super) fn stop_services_of(&mut self, job_id: &str) {
        for w in self.workers.values_mut() {
            for ((job, _), h) in &mut w.services {
                if job.as_str() == job_id && h.stop.is_none() {
                    h.stop = Some(REPLACED_GRACE);
                }
            }
        }
    }

    /// Every service the engine holds, by worker.
    pub(super) fn services(&self) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .workers
            .iter()
            .flat_map(|(id, w)| {
                w.services
                    .iter()
                    .map(move |((job, generation), h)| ServiceView {
                        worker: id.clone(),
                        job_id: job.clone(),
                        generation: *generation,
                        healthy: h.healthy,
                        detail: h.detail.clone(),
                        stopping: h.stop.is_some(),
                        worker_lost: w.lost,
                    })
            })
            .collect();
        out.sort_by(|a, b| (&a.worker, &a.job_id).cmp(&(&b.worker, &b.job_id)));
        out
    }
}

impl Worker {
    /// The GPUs its services hold.
    pub(super) fn service_gpus(&self) -> impl Iterator<Item = usize> + '_ {
        self.services.values().flat_map(|h| h.gpus.iter().copied())
    }
}
