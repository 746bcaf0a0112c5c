//! A job's record in the scheduler, and the life it may lead (its states and the
//! changes between them).

use super::Credit;
use crate::planner::StepPlan;
use nexa_shared::ids::{JobId, WorkerId};
use nexa_shared::job::JobSpec;
use std::sync::Arc;
use tokio::time::Instant;

/// Where a job is in its life. Changed only through [`Job::set_state`], which refuses
/// a change this table does not allow:
///
/// ```text
/// Queued  -> Leased              dispatched to a worker
/// Leased  -> Queued              the lease expired, or the worker left before it got it
/// Leased  -> Sealing             its result was admitted (a replica: it waits for the quorum)
/// Sealing -> Sealing | Leased    a replica's quorum decided (sealed now, or judged again)
/// Queued | Leased | Sealing -> Backoff   it failed and will be retried
/// Backoff -> Queued              its retry is due
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobState {
    Queued,
    Backoff,
    Leased,
    Sealing,
}

impl JobState {
    /// Whether a job may go from this state to `to`.
    pub(super) fn may_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Leased)
                | (Leased, Queued)
                | (Leased, Sealing)
                | (Sealing, Sealing)
                | (Sealing, Leased)
                | (Queued | Leased | Sealing, Backoff)
                | (Backoff, Queued)
        )
    }
}

/// A job in the scheduler's memory: its own id and state, and what it runs by
/// reference. A fan-out's shard jobs share one spec (the step's) and the step's plan,
/// from which a shard's own spec (its id, its part as input) is made when it is leased:
/// a shard job costs its id and its state, not a copy of the step's params and inputs.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) id: JobId,
    pub(super) run_id: String,
    pub(super) step: usize,
    /// The shard's position among the plan's units.
    pub(super) shard: Option<usize>,
    /// What the step runs: shared by its shard jobs (its `job_id`, `shard` and the
    /// sharded input are the step's, not this job's: see [`Job::lease_spec`]).
    pub(super) spec: Arc<JobSpec>,
    /// A shard job's plan (its unit gives the part and the index).
    pub(super) plan: Option<Arc<StepPlan>>,
    pub(super) attempt: u32,
    pub(super) generation: u64,
    pub(super) worker: Option<WorkerId>,
    pub(super) state: JobState,
    pub(super) started: Option<Instant>,
    pub(super) deadline: Option<Instant>,
    /// For a replica: the unit (step or shard job id) it votes on.
    pub(super) unit: Option<String>,
    /// Credit the worker earns once the result is sealed.
    pub(super) pending_credit: Option<Credit>,
    /// When it last entered the queue (dispatch latency).
    pub(super) queued_at: Instant,
}

impl Job {
    /// Moves the job to `to`, if its life allows it (see [`JobState`]); an illegal
    /// change is refused, logged, and leaves the job as it was.
    pub(super) fn set_state(&mut self, to: JobState) -> bool {
        if self.state.may_become(to) {
            self.state = to;
            return true;
        }
        tracing::error!(job = %self.id, from = ?self.state, ?to, "refused an illegal job state change");
        false
    }

    /// The shard's `(index, count)`, for a shard job.
    pub(super) fn shard_of(&self) -> Option<(u32, u32)> {
        let set = self.plan.as_ref()?.shards.as_ref()?;
        let u = set.units.get(self.shard?)?;
        Some((u.index, set.len() as u32))
    }

    /// The spec a worker is leased: the shared one with this job's id, and for a shard
    /// its index and its part in place of the sharded input (made now, not kept).
    pub(super) fn lease_spec(&self) -> JobSpec {
        let mut spec = JobSpec::clone(&self.spec);
        spec.job_id = self.id.clone();
        if let Some(plan) = &self.plan
            && let Some(set) = &plan.shards
            && let Some(u) = self.shard.and_then(|k| set.units.get(k))
        {
            spec.shard = Some((u.index, set.len() as u32));
            spec.inputs = super::Engine::job_inputs(plan, Some(&set.input(u)));
        }
        spec
    }
}

impl Job {
    /// A job waiting in the queue for its first attempt.
    pub(super) fn queued(
        (id, run_id): (JobId, &str),
        (step, shard): (usize, Option<usize>),
        (spec, plan): (Arc<JobSpec>, Option<Arc<StepPlan>>),
        unit: Option<String>,
    ) -> Self {
        Self {
            id,
            run_id: run_id.to_string(),
            step,
            shard,
            spec,
            plan,
            attempt: 1,
            generation: 0,
            worker: None,
            state: JobState::Queued,
            started: None,
            deadline: None,
            unit,
            pending_credit: None,
            queued_at: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::{self, *};

    #[test]
    fn job_states_change_only_along_their_table() {
        let all = [Queued, Backoff, Leased, Sealing];
        let allowed: &[(JobState, JobState)] = &[
            (Queued, Leased),
            (Leased, Queued),
            (Leased, Sealing),
            (Sealing, Sealing),
            (Sealing, Leased),
            (Queued, Backoff),
            (Leased, Backoff),
            (Sealing, Backoff),
            (Backoff, Queued),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.may_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        // A job in backoff is never leased before its retry is due; a queued job is
        // never sealed without having been leased.
        assert!(!Backoff.may_become(Leased));
        assert!(!Queued.may_become(Sealing));
    }
}
