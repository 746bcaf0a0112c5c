//! The scheduler loop: one task owns all run, step and job state and consumes a closed
//! set of [`Event`]s. Handlers (the in-process worker link today, the gRPC edge with the
//! mesh) talk to it only through [`Coordinator`].

use crate::planner::{self, Plan, RunContext, StepPlan};
pub use crate::sealing::group::{SealFailure, SealedJob, WrongResult};
use crate::sealing::group::{SealQueue, SealTask, keep_log};
pub use api::*;
pub use clusters::Demand;
pub use event::{Event, Unsaved};
pub use services::{Beat, HeartbeatAnswer, ServiceBeat, ServiceView};

mod acceptance;
mod api;
mod blame;
#[cfg(test)]
mod cluster_tests;
mod clusters;
mod deadlines;
mod effects;
mod event;
mod finish;
mod generations;
mod handle;
mod jobs;
mod leasing;
mod placement;
mod replication;
mod results;
mod run;
mod runs;
#[cfg(test)]
mod service_tests;
mod services;
mod tasks;
#[cfg(test)]
mod tests;
mod window;
#[cfg(test)]
mod window_tests;
mod workers;
use crate::state::{self, ArtifactInfo, RunRecord, ShardRecord, StepRecord, StepStatus};
use crate::{Error, Result, Store, mirror};
use finish::{cleanup_failed, requirements_of, write_mirror};
use jobs::{Job, JobState};
use nexa_shared::hardware::{self, Profile, Requirements};
use nexa_shared::ids::{JobId, RunId, WorkerId};
use nexa_shared::job::{JobInput, JobResult, JobSpec, Lease, Outcome};
use nexa_shared::spec::Loaded;
use nexa_shared::{paths, signing};
use run::{Run, RunPhase};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock: the engine's unit tests run it paused.
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How far into the queue fair share looks for other runs' jobs.
const FAIR_SCAN: usize = 4096;

/// Failures in a row after which a worker is throttled.
const THROTTLE_AFTER: u32 = 3;
/// Failures among its last [`RECENT`] results after which a worker gets no more work
/// until an operator re-activates it.
const QUARANTINE_AFTER: usize = 10;
/// How many recent results count.
const RECENT: usize = 12;

/// How many callers' events may wait for the loop; beyond, calls are refused as an
/// overload (UNAVAILABLE) or wait (`Coordinator::call`).
pub const CALLS: usize = 65_536;

/// How many progress lines may wait for a run's reader (see [`RunHandle`]): enough for
/// a burst of every step of a 10,000-step pipeline skipped at once, a few lines each.
pub const PROGRESS: usize = 65_536;

/// The most events handled between two write-behind rounds.
const BURST: usize = 512;

/// A handle to the coordinator loop; cheap to clone.
#[derive(Clone, Debug)]
pub struct Coordinator {
    /// The engine's own lane, for shutting it down.
    tx: mpsc::UnboundedSender<Event>,
    /// Callers' lane, bounded ([`CALLS`]).
    calls: mpsc::Sender<Event>,
    cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    /// Woken when jobs of a provided scheduler's steps start waiting (see
    /// [`Coordinator::demand_changed`]).
    demand_waker: Arc<tokio::sync::Notify>,
    /// Enrolled workers' public keys, for checking result signatures off the loop.
    keys: Arc<std::sync::RwLock<HashMap<String, [u8; 32]>>>,
    /// The owner of every background task (see `crate::tasks`).
    tasks: crate::tasks::Tasks,
}

/// What one leased job holds on its worker.
#[derive(Debug, Clone, Default)]
struct Alloc {
    cpus: u32,
    memory: u64,
    gpus: Vec<usize>,
}

#[derive(Debug)]
struct Worker {
    info: WorkerInfo,
    alloc: HashMap<JobId, Alloc>,
    /// Services it runs, by the `(job, generation)` that started them (see `services`).
    services: HashMap<(JobId, u64), services::Held>,
    /// GPUs handed to jobs since the last profile refresh: their reported free memory
    /// may show our own job, which the exclusive reservation already accounts for.
    touched_gpus: std::collections::BTreeSet<usize>,
    /// Its record per kind of job.
    trust: BTreeMap<String, crate::quorum::Trust>,
    /// Credit for accepted work.
    credit: Credit,
    last_seen: Instant,
    lost: bool,
    /// A silence reminder for it is in `Engine::deadlines` (one at most).
    reminded: bool,
    admin: AdminState,
    succeeded: u64,
    failed: u64,
    consecutive_failures: u32,
    recent: VecDeque<bool>,
    throttled_until: Option<Instant>,
}

struct Engine {
    store: Arc<dyn Store>,
    /// Runs with step records waiting for the write-behind round.
    dirty_runs: Vec<String>,
    /// Workers whose records changed since the last round.
    dirty_workers: std::collections::BTreeSet<WorkerId>,
    /// Replicated units waiting for their quorum, by unit id.
    /// (Snapshot for metrics: see `snapshot`.)
    votes: HashMap<String, replication::Vote>,
    /// Decided units with replicas still running, by unit id.
    decided: HashMap<String, replication::Decided>,
    /// Replication figures: units validated and replica jobs made for them.
    replication: replication::Counters,
    /// State of the spot-check random generator (xorshift, seeded at start).
    rng: u64,
    /// Everything done outside the loop's state (see `effects`).
    fx: Box<dyn effects::Effects>,
    /// The engine's own events: its tasks, the sealer, the tick.
    rx: mpsc::UnboundedReceiver<Event>,
    /// Callers' events (bounded).
    calls: mpsc::Receiver<Event>,
    cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    workers: HashMap<WorkerId, Worker>,
    config: EngineConfig,
    /// Leases granted per active run (fair share).
    granted: HashMap<String, u64>,
    /// Jobs held on workers now (in their allocations), per run: fair share's running
    /// count, kept as allocations change instead of counted over every worker per pick.
    held_by_run: HashMap<String, usize>,
    /// When leases run out and silent workers count as lost (the tick's reminders).
    deadlines: deadlines::Deadlines,
    runs: HashMap<RunId, Run>,
    jobs: HashMap<JobId, Job>,
    queue: VecDeque<JobId>,
    waiting: VecDeque<Waiter>,
    /// Lease generations (fencing tokens that only grow).
    generations: generations::Generations,
    refusals: Refusals,
    /// Whose fault failed jobs are.
    blame: blame::Blame,
    /// Wakes a cluster provider when jobs of its scheduler start waiting.
    demand_waker: Arc<tokio::sync::Notify>,
    /// The refusal counters as last queued for the store; `None`: that write failed.
    saved_refusals: Option<Refusals>,
    /// Submitted runs whose records are being written, with the caller's handle and
    /// reply: they start once written.
    submitting: HashMap<RunId, (Run, RunHandle, oneshot::Sender<Result<RunHandle>>)>,
}

/// The store tree of the engine's own counters.
const META_TREE: &str = "meta";
/// The refusal counters' key in it.
const REFUSALS_KEY: &str = "refusals";

/// A new run id, `YYYYMMDDTHHMMSS-xxxx` (UTC): sortable by start time, unique enough per
/// process.
pub fn new_run_id() -> RunId {
    let now = std::time::SystemTime::now();
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let stamp: String = now_rfc3339()
        .chars()
        .filter(|c| !matches!(c, '-' | ':' | 'Z'))
        .collect();
    RunId::from(format!(
        "{stamp}-{:04x}",
        (nanos ^ std::process::id()) & 0xffff
    ))
}

/// RFC 3339 with seconds, UTC.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

impl Engine {
    async fn run(mut self) {
        loop {
            // The engine's own events first: they finish work callers wait for.
            let ev = tokio::select! {
                biased;
                Some(ev) = self.rx.recv() => ev,
                Some(ev) = self.calls.recv() => ev,
                else => break,
            };
            if matches!(ev, Event::Shutdown) {
                break;
            }
            self.handle(ev);
            // Handle what else has queued, then write what changed once.
            for _ in 0..BURST {
                match self.rx.try_recv().or_else(|_| self.calls.try_recv()) {
                    Ok(Event::Shutdown) => {
                        self.flush_dirty();
                        return self.stop();
                    }
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            self.flush_dirty();
        }
        self.stop();
    }

    /// The end of the loop: waiting workers hear there is no more work; the store is
    /// flushed.
    fn stop(mut self) {
        for w in self.waiting.drain(..) {
            let _ = w.reply.send(Vec::new());
        }
        // What is queued for the store is written before the last flush; then what the
        // last rounds held back (a writer that was behind), and that too is waited for.
        self.fx.drain();
        self.flush_dirty();
        self.fx.drain();
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %format!("{e:#}"), "flushing the store at shutdown");
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Submit(req, reply) => self.submit(*req, reply),
            Event::SubmitSaved(run, saved) => self.on_submit_saved(&run, saved),
            Event::RunSaved(run, outcome, saved) => self.on_run_saved(&run, outcome, saved),
            Event::Unsaved(what) => self.on_unsaved(what),
            Event::GenerationsReserved(mark) => self.generations.written_ahead(mark),
            Event::RegisterWorker(id, info) => {
                tracing::info!(worker = %id, gpus = info.profile.gpus.len(), slots = info.slots, "worker enrolled");
                // Re-enrolment keeps the worker's record (its admin state, error history).
                match self.workers.get_mut(&id) {
                    Some(w) => {
                        w.info = *info;
                        w.last_seen = Instant::now();
                        w.lost = false;
                    }
                    None => {
                        self.workers.insert(id.clone(), Worker::new(*info));
                    }
                }
                self.watch_silence(&id);
                self.dirty_workers.insert(id);
                self.dispatch();
            }
            Event::JobProgress(worker, job, generation, progress) => {
                self.on_job_progress(&worker, &job, generation, *progress);
            }
            Event::Heartbeat(worker, beat, reply) => {
                let banned = self
                    .workers
                    .get(&worker)
                    .is_some_and(|w| w.admin == AdminState::Ban);
                let answer = (!banned).then(|| {
                    let Beat {
                        running,
                        services,
                        profile,
                    } = *beat;
                    HeartbeatAnswer {
                        cancel: self.on_heartbeat(&worker, &running, profile.map(Box::new)),
                        stop_services: self.on_service_beats(&worker, &services),
                    }
                });
                let _ = reply.send(answer);
            }
            Event::StopService(worker, job, generation, grace, reply) => {
                let _ = reply.send(self.stop_service(&worker, &job, generation, grace));
            }
            Event::Services(reply) => {
                let _ = reply.send(self.services());
            }
            Event::LeaseLive(worker, job, generation, reply) => {
                let check = match self.jobs.get(&job) {
                    None => LeaseCheck::Unknown,
                    Some(j)
                        if j.state == JobState::Leased
                            && j.generation == generation
                            && j.worker.as_deref() == Some(worker.as_str())
                            && !self.runs.get(&j.run_id).is_some_and(|r| r.cancelled()) =>
                    {
                        LeaseCheck::Live
                    }
                    Some(_) => LeaseCheck::Stale,
                };
                let _ = reply.send(check);
            }
            Event::Tick => self.on_tick(),
            Event::UnfitCheck(run, step) => self.fail_unfit(&run, step),
            Event::LeaseRequest(worker, want, reply) => {
                let w = Waiter {
                    worker,
                    slots: want.slots.max(1),
                    reply,
                };
                if want.wait {
                    self.waiting.push_back(w);
                    self.dispatch();
                } else if let Some(w) = self.grant(w) {
                    let _ = w.reply.send(Vec::new());
                }
            }
            Event::Report(worker, result, verdict, reply) => {
                let admitted = self.on_report(&worker, *result, verdict);
                if let Some(r) = reply {
                    let _ = r.send(admitted);
                }
            }
            Event::Planned(run, step, plan) => self.on_planned(&run, step, plan),
            Event::PlannedBatch(run, plans) => self.on_planned_batch(&run, plans),
            Event::Sealed(job, res) => self.on_sealed(&job, res),
            Event::Assembled(run, step, res) => self.on_assembled(&run, step, res),
            Event::Replication(reply) => {
                let _ = reply.send((self.replication.units, self.replication.replicas));
            }
            Event::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Event::CoordinatorStepDone(run, step, res) => {
                self.on_coordinator_step_done(&run, step, res)
            }
            Event::RetryDue(job) => {
                if let Some(j) = self.jobs.get_mut(&job)
                    && j.state == JobState::Backoff
                {
                    j.set_state(JobState::Queued);
                    j.queued_at = Instant::now();
                    self.queue.push_back(job);
                    self.dispatch();
                }
            }
            Event::Cancel(run) => self.on_cancel(&run),
            Event::Refused(kind) => self.refusals.count(kind.into()),
            Event::Refusals(reply) => {
                let _ = reply.send(self.refusals);
            }
            Event::ListWorkers(page, reply) => {
                let _ = reply.send(self.worker_page(&page));
            }
            Event::SetWorkerState(id, state, reply) => {
                let found = match self.workers.get_mut(&id) {
                    Some(w) => {
                        w.admin = state;
                        if state == AdminState::Active {
                            w.recent.clear();
                            w.consecutive_failures = 0;
                            w.throttled_until = None;
                        }
                        tracing::info!(worker = %id, ?state, "operator set worker state");
                        true
                    }
                    None => false,
                };
                // An operator's decision is durable before it is acknowledged: the
                // writer thread answers once it has written and flushed it.
                let rec = self.workers.get(&id).map(|w| w.record_of(&id));
                let store = self.store.clone();
                self.fx.persist(Box::new(move || {
                    if let Some(rec) = rec
                        && let Err(e) =
                            state::save_workers(store.as_ref(), &[rec]).and_then(|_| store.flush())
                    {
                        tracing::error!(error = %format!("{e:#}"), worker = %id, "saving the worker's state");
                    }
                    let _ = reply.send(found);
                    None
                }));
                self.dispatch();
            }
            Event::Demand(scheduler, reply) => {
                let _ = reply.send(self.demand(&scheduler));
            }
            Event::FailSteps(steps, reason) => self.fail_steps(&steps, &reason),
            Event::Shutdown => {}
        }
    }
}
