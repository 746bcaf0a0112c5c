//! Whether a reported result may be used at all: a pure judgement over what the engine
//! knows of its job and worker, returning accept or a typed [`Refusal`]. The engine
//! (`results.rs`) counts each refusal by its [`Refused`] kind and acts on it.

use super::jobs::{Job, JobState};
use super::{AdminState, Refused};
use nexa_shared::job::JobResult;

/// Why a result was refused; its text is what the worker is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    /// No such job: finished already (a replay) or never made.
    #[error("unknown or finished job")]
    UnknownJob,
    /// The job is not leased to this worker under this generation.
    #[error("not this worker's live lease of the job (expired, reassigned or stale)")]
    NotLiveLease(StaleWhy),
    /// The worker is not enrolled.
    #[error("worker is not enrolled")]
    NotEnrolled,
    /// Signed with another key than the enrolled one.
    #[error("result was not signed with the enrolled key")]
    WrongKey,
    /// An operator banned the worker.
    #[error("the worker is banned")]
    Banned,
    /// The signature did not verify.
    #[error("{0}")]
    BadSignature(String),
    /// Its run was cancelled: nothing more of it is sealed.
    #[error("the run was cancelled")]
    Cancelled,
}

/// Which part of a live lease a stale result missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StaleWhy {
    /// The lease expired or ended before the result arrived.
    Ended,
    /// An older generation than the live lease's.
    OldGeneration,
    /// The job is leased to another worker.
    OtherWorker,
}

impl Refusal {
    /// The counter it goes to; none for a cancelled run's result (discarded, not
    /// refused).
    pub(super) fn kind(&self) -> Option<Refused> {
        match self {
            Refusal::UnknownJob => Some(Refused::UnknownJob),
            Refusal::NotLiveLease(_) => Some(Refused::Stale),
            Refusal::Banned => Some(Refused::Banned),
            Refusal::NotEnrolled | Refusal::WrongKey | Refusal::BadSignature(_) => {
                Some(Refused::Signature)
            }
            Refusal::Cancelled => None,
        }
    }
}

/// What the engine knows when a result arrives.
pub(super) struct Facts<'a> {
    /// The job the result answers, if it exists.
    pub(super) job: Option<&'a Job>,
    /// The reporting worker's enrolled key and admin state, if it is enrolled.
    pub(super) enrolled: Option<([u8; 32], AdminState)>,
    /// The signature's verdict against the enrolled key (checked off the loop).
    pub(super) verdict: &'a Result<(), String>,
    /// Whether the job's run was cancelled.
    pub(super) cancelled: bool,
}

/// Judges `result` from `worker`; checks run in order, the first failing one wins.
pub(super) fn judge(worker: &str, result: &JobResult, f: &Facts<'_>) -> Result<(), Refusal> {
    let job = f.job.ok_or(Refusal::UnknownJob)?;
    if job.state != JobState::Leased {
        return Err(Refusal::NotLiveLease(StaleWhy::Ended));
    }
    if job.generation != result.generation {
        return Err(Refusal::NotLiveLease(StaleWhy::OldGeneration));
    }
    if job.worker.as_deref() != Some(worker) {
        return Err(Refusal::NotLiveLease(StaleWhy::OtherWorker));
    }
    match f.enrolled {
        None => return Err(Refusal::NotEnrolled),
        // The verdict was reached against the enrolled key (see `Coordinator::report`);
        // a worker that re-enrolled with another key since has another id.
        Some((key, _)) if key != result.worker_key => return Err(Refusal::WrongKey),
        Some((_, AdminState::Ban)) => return Err(Refusal::Banned),
        Some(_) => f.verdict.clone().map_err(Refusal::BadSignature)?,
    }
    if f.cancelled {
        return Err(Refusal::Cancelled);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexa_shared::job::{JobSpec, Outcome};

    fn leased(worker: &str, generation: u64) -> Job {
        let spec = JobSpec {
            job_id: "r/s".into(),
            ..Default::default()
        };
        let mut j = Job::queued(
            ("r/s".into(), "r"),
            (0, None),
            (std::sync::Arc::new(spec), None),
            None,
        );
        j.set_state(JobState::Leased);
        j.generation = generation;
        j.worker = Some(worker.into());
        j
    }

    fn result(generation: u64, key: [u8; 32]) -> JobResult {
        JobResult {
            job_id: "r/s".into(),
            generation,
            attempt: 1,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            outputs: Vec::new(),
            started_ms: 0,
            ended_ms: 0,
            error: String::new(),
            staging: None,
            log: None,
            progress: None,
            worker_key: key,
            signature: Vec::new(),
        }
    }

    /// Judges `r` from `worker` given those facts.
    fn check(
        worker: &str,
        r: &JobResult,
        job: Option<&Job>,
        enrolled: Option<([u8; 32], AdminState)>,
        verdict: Result<(), String>,
        cancelled: bool,
    ) -> Result<(), Refusal> {
        let f = Facts {
            job,
            enrolled,
            verdict: &verdict,
            cancelled,
        };
        judge(worker, r, &f)
    }

    #[test]
    fn each_check_refuses_with_its_reason_in_order() {
        let (key, other) = ([1; 32], [2; 32]);
        let job = leased("w1", 7);
        let active = Some((key, AdminState::Active));
        let ok = || Ok(());
        let r = result(7, key);
        assert_eq!(check("w1", &r, Some(&job), active, ok(), false), Ok(()));
        // A draining worker's results still count.
        let drain = Some((key, AdminState::Drain));
        assert_eq!(check("w1", &r, Some(&job), drain, ok(), false), Ok(()));
        assert_eq!(
            check("w1", &r, None, active, ok(), false),
            Err(Refusal::UnknownJob)
        );
        assert_eq!(
            check("w1", &result(6, key), Some(&job), active, ok(), false),
            Err(Refusal::NotLiveLease(StaleWhy::OldGeneration))
        );
        assert_eq!(
            check("w2", &r, Some(&job), active, ok(), false),
            Err(Refusal::NotLiveLease(StaleWhy::OtherWorker))
        );
        let mut ended = leased("w1", 7);
        ended.set_state(JobState::Sealing);
        assert_eq!(
            check("w1", &r, Some(&ended), active, ok(), false),
            Err(Refusal::NotLiveLease(StaleWhy::Ended))
        );
        assert_eq!(
            check("w1", &r, Some(&job), None, ok(), false),
            Err(Refusal::NotEnrolled)
        );
        assert_eq!(
            check("w1", &result(7, other), Some(&job), active, ok(), false),
            Err(Refusal::WrongKey)
        );
        let ban = Some((key, AdminState::Ban));
        assert_eq!(
            check("w1", &r, Some(&job), ban, Err("bad".into()), false),
            Err(Refusal::Banned),
            "a ban is checked before the signature"
        );
        assert_eq!(
            check("w1", &r, Some(&job), active, Err("bad".into()), true),
            Err(Refusal::BadSignature("bad".into())),
            "the signature before cancellation"
        );
        assert_eq!(
            check("w1", &r, Some(&job), active, ok(), true),
            Err(Refusal::Cancelled)
        );
    }

    #[test]
    fn refusals_count_by_kind_and_a_cancelled_run_is_not_a_refusal() {
        assert_eq!(Refusal::UnknownJob.kind(), Some(Refused::UnknownJob));
        assert_eq!(
            Refusal::NotLiveLease(StaleWhy::Ended).kind(),
            Some(Refused::Stale)
        );
        assert_eq!(Refusal::WrongKey.kind(), Some(Refused::Signature));
        assert_eq!(Refusal::Banned.kind(), Some(Refused::Banned));
        assert_eq!(Refusal::Cancelled.kind(), None);
    }
}
