//! The closed set of messages the scheduler loop consumes.

use super::*;

/// The closed set of messages the scheduler loop consumes.
#[derive(Debug)]
pub enum Event {
    /// Start a run.
    Submit(Box<RunRequest>, oneshot::Sender<Result<RunHandle>>),
    /// A worker joined with its public key, hardware profile and slots.
    RegisterWorker(WorkerId, Box<WorkerInfo>),
    /// A worker has free slots and asks for leases (up to [`Want::slots`]).
    LeaseRequest(WorkerId, Want, oneshot::Sender<Vec<Lease>>),
    /// A worker is alive and runs these jobs and services; the reply lists the attempts
    /// it must kill and the services it must stop (`None`: it is banned).
    Heartbeat(
        WorkerId,
        Box<Beat>,
        oneshot::Sender<Option<HeartbeatAnswer>>,
    ),
    /// An operator asks a worker to stop the service of `(job, generation)` within a
    /// grace period; the reply says whether the engine knows that service.
    StopService(WorkerId, JobId, u64, Duration, oneshot::Sender<bool>),
    /// The services the engine holds.
    Services(oneshot::Sender<Vec<ServiceView>>),
    /// A running job said how far it is; kept only when `(job, generation)` is leased
    /// to this worker.
    JobProgress(WorkerId, JobId, u64, Box<nexa_shared::job::JobProgress>),
    /// Is `(job, generation)` leased to this worker right now? Uploads and input fetches
    /// are served only for live leases.
    LeaseLive(WorkerId, JobId, u64, oneshot::Sender<LeaseCheck>),
    /// Time passed: expire leases whose deadline is gone.
    Tick,
    /// The grace period of a step no worker could run is over.
    UnfitCheck(String, usize),
    /// A worker reports a job.
    /// A result and the verdict on its signature against the worker's enrolled key,
    /// checked by the caller so that the loop never spends time on curve arithmetic.
    Report(
        WorkerId,
        Box<JobResult>,
        std::result::Result<(), String>,
        Option<oneshot::Sender<std::result::Result<(), String>>>,
    ),
    /// Planning of a step finished.
    Planned(String, usize, Plan),
    /// The first planning pass over a run finished.
    PlannedBatch(String, Vec<(usize, Plan)>),
    /// Sealing of a job's outputs finished.
    Sealed(String, std::result::Result<SealedJob, SealFailure>),
    /// Replication figures: (units validated, replica jobs made).
    Replication(oneshot::Sender<(u64, u64)>),
    /// Gauges for the metrics endpoint.
    Snapshot(oneshot::Sender<crate::metrics::Snapshot>),
    /// A step the coordinator ran itself (`core.registry.*`) finished: what it did, or why
    /// it failed.
    CoordinatorStepDone(String, usize, std::result::Result<(String, bool), String>),
    /// Assembly of a sharded step finished.
    Assembled(
        String,
        usize,
        std::result::Result<BTreeMap<String, ArtifactInfo>, String>,
    ),
    /// A job's backoff elapsed.
    RetryDue(JobId),
    /// Cancel a run.
    Cancel(String),
    /// Read the refusal counters.
    Refusals(oneshot::Sender<Refusals>),
    /// Count a refusal made at the gRPC edge.
    Refused(EdgeRefusal),
    /// One page of the workers, by id: those after `after`, at most `limit`.
    ListWorkers(WorkerPage, oneshot::Sender<(Vec<WorkerView>, usize)>),
    /// Drain, ban or re-activate a worker.
    SetWorkerState(String, AdminState, oneshot::Sender<bool>),
    /// The lease generation mark written ahead is durable (`Some`) or not.
    GenerationsReserved(Option<u64>),
    /// A write-behind round's write failed: mark it unsaved again.
    Unsaved(Unsaved),
    /// A submitted run's records were written, or why not.
    SubmitSaved(RunId, Result<()>),
    /// A finished run's final state was written and flushed, or why not.
    RunSaved(String, RunOutcome, std::result::Result<(), String>),
    /// The waiting jobs of one cluster scheduler's steps, by shape (its provider asks).
    Demand(String, oneshot::Sender<Vec<Demand>>),
    /// Fail these steps (run, index), if none of their jobs has started, with this
    /// reason (a provider whose workers cannot run them).
    FailSteps(Vec<(String, usize)>, String),
    /// Stop the loop.
    Shutdown,
}

/// What a failed write-behind write leaves unsaved (written again in the next round).
#[derive(Debug)]
pub enum Unsaved {
    /// The refusal counters.
    Refusals,
    /// These workers' records.
    Workers(Vec<WorkerId>),
    /// These steps of a run.
    Steps(String, Vec<usize>),
}
