//! A run's record in the scheduler, and the life it may lead (its phases and the
//! changes between them).

use super::{ArtifactInfo, Progress, RunOutcome, RunSummary, StepRecord};
use crate::planner::{RunContext, StepPlan};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Where a run is in its life. Changed only through [`Run::set_phase`], which refuses
/// a change this table does not allow:
///
/// ```text
/// Submitting -> Running                  its records reached the store
/// Running    -> Cancelling               an operator or its caller cancelled it
/// Running | Cancelling -> Saving(o)      every step is final and no job is left
/// Saving(o)  -> Unsaved(o)               the store refused its final state
/// Unsaved(o) -> Saving(o)                the tick tries again, with the same outcome
/// Saving(o)  -> Finished(o)              its final state is durable: now it is told
/// ```
///
/// A run whose submit the store refused never leaves `Submitting`: it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RunPhase {
    Submitting,
    Running,
    Cancelling,
    Saving(RunOutcome),
    Unsaved(RunOutcome),
    Finished(RunOutcome),
}

impl RunPhase {
    /// Whether a run may go from this phase to `to`.
    pub(super) fn may_become(self, to: RunPhase) -> bool {
        use RunPhase::*;
        match (self, to) {
            (Submitting, Running) | (Running, Cancelling) => true,
            (Running | Cancelling, Saving(_)) => true,
            (Saving(a), Unsaved(b)) | (Unsaved(a), Saving(b)) | (Saving(a), Finished(b)) => a == b,
            _ => false,
        }
    }
}

pub(super) struct Run {
    pub(super) ctx: Arc<RunContext>,
    pub(super) records: Vec<StepRecord>,
    pub(super) plans: Vec<Option<Arc<StepPlan>>>,
    pub(super) busy: Vec<bool>,
    /// Progress lines for its caller (bounded: see [`Run::emit`]).
    progress: mpsc::Sender<Progress>,
    /// Its summary for its caller, sent once when it is finished.
    done: Option<oneshot::Sender<RunSummary>>,
    phase: RunPhase,
    /// Times its final state failed to reach the store in a row.
    pub(super) unsaved: u32,
    pub(super) started: Instant,
    pub(super) started_at: String,
    pub(super) last_mirror: Option<Instant>,
    pub(super) in_flight: usize,
    /// Steps changed since the last write-behind round (see `Engine::flush_dirty`).
    pub(super) dirty: Vec<usize>,
    /// Shards `(step, shard)` changed since the last round: written one by one.
    pub(super) dirty_shards: Vec<(usize, usize)>,
    /// Steps whose shards were all replaced (planned, cleared): written whole.
    pub(super) reset_shards: Vec<usize>,
    /// Steps not yet in a final state (kept by `set_status`, so finishing is O(1)).
    pub(super) unfinished: usize,
    /// Per step, its shards not yet in a final state (kept by `set_shard_status`, so
    /// telling whether a fan-out has settled is O(1), not a scan of every shard at
    /// every shard's end: 10^10 checks for 100,000 shards).
    pub(super) shards_open: Vec<usize>,
    /// Per step, its shards that have no job yet (see [`Unmade`]).
    pub(super) unmade: Vec<Unmade>,
}

/// A fan-out's shards that have no job yet. A step's shard jobs are made a window at
/// a time ([`super::SHARD_WINDOW`] live at most), as earlier ones end, so a
/// million-shard step holds a few thousand jobs, not a million.
#[derive(Debug, Default, Clone)]
pub(super) struct Unmade {
    /// Units before this position have a job or need none (cached).
    pub(super) next: usize,
    /// Shards from `next` on still waiting for a job.
    pub(super) left: usize,
    /// The step's spec, shared by the jobs still to be made.
    pub(super) spec: Option<Arc<nexa_shared::job::JobSpec>>,
}

impl Run {
    /// A submitted run, its records not yet in the store.
    pub(super) fn submitted(
        ctx: RunContext,
        records: Vec<StepRecord>,
        progress: mpsc::Sender<Progress>,
        done: oneshot::Sender<RunSummary>,
        started_at: String,
    ) -> Self {
        let n = records.len();
        Self {
            ctx: Arc::new(ctx),
            records,
            plans: vec![None; n],
            shards_open: vec![0; n],
            unmade: vec![Unmade::default(); n],
            busy: vec![false; n],
            progress,
            done: Some(done),
            phase: RunPhase::Submitting,
            unsaved: 0,
            started: Instant::now(),
            started_at,
            last_mirror: None,
            in_flight: 0,
            dirty: Vec::new(),
            dirty_shards: Vec::new(),
            reset_shards: Vec::new(),
            unfinished: n,
        }
    }

    /// Nothing of it waits for the next write-behind round.
    pub(super) fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.dirty_shards.is_empty() && self.reset_shards.is_empty()
    }

    /// Where the run is in its life.
    pub(super) fn phase(&self) -> RunPhase {
        self.phase
    }

    /// Moves the run to `to`, if its life allows it (see [`RunPhase`]); an illegal
    /// change is refused, logged, and leaves the run as it was.
    pub(super) fn set_phase(&mut self, to: RunPhase) -> bool {
        if self.phase.may_become(to) {
            self.phase = to;
            return true;
        }
        tracing::error!(run = %self.ctx.run_id, from = ?self.phase, ?to, "refused an illegal run phase change");
        false
    }

    /// Whether the run was cancelled: none of its jobs is leased or retried again.
    pub(super) fn cancelled(&self) -> bool {
        matches!(
            self.phase,
            RunPhase::Cancelling
                | RunPhase::Saving(RunOutcome::Cancelled)
                | RunPhase::Unsaved(RunOutcome::Cancelled)
                | RunPhase::Finished(RunOutcome::Cancelled)
        )
    }

    /// Tells the run's caller how it goes. The channel is bounded ([`super::PROGRESS`]
    /// lines): a caller that stops reading loses progress lines, never the engine's
    /// memory or time; its summary comes apart (see [`Run::finish`]), so it is never
    /// lost.
    pub(super) fn emit(&self, p: Progress) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.progress.try_send(p) {
            tracing::debug!(run = %self.ctx.run_id, "the run's reader is behind; a progress line was dropped");
        }
    }

    /// The end of the run's life: its final state is durable, and its caller gets the
    /// summary (after every progress line sent before it).
    pub(super) fn finish(&mut self, summary: RunSummary) {
        if self.set_phase(RunPhase::Finished(summary.outcome))
            && let Some(done) = self.done.take()
        {
            let _ = done.send(summary);
        }
    }

    /// The sealed outputs of step `i`'s dependencies (all the planner may read).
    pub(super) fn upstream_outputs(
        &self,
        i: usize,
    ) -> BTreeMap<usize, BTreeMap<String, ArtifactInfo>> {
        self.ctx.dag.deps[i]
            .iter()
            .filter(|&&d| self.records[d].status.is_done())
            .map(|&d| (d, self.records[d].outputs.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::RunOutcome::{self, *};
    use super::RunPhase::{self, *};

    #[test]
    fn run_phases_change_only_along_their_table() {
        let outcomes = [Succeeded, Failed, Cancelled];
        let mut all = vec![Submitting, Running, Cancelling];
        for o in outcomes {
            all.extend([Saving(o), Unsaved(o), Finished(o)]);
        }
        let allowed = |from: RunPhase, to: RunPhase| -> bool {
            let same = |a: RunOutcome, b: RunOutcome| a == b;
            match (from, to) {
                (Submitting, Running) | (Running, Cancelling) => true,
                (Running, Saving(_)) | (Cancelling, Saving(_)) => true,
                (Saving(a), Unsaved(b)) => same(a, b),
                (Unsaved(a), Saving(b)) => same(a, b),
                (Saving(a), Finished(b)) => same(a, b),
                _ => false,
            }
        };
        for &from in &all {
            for &to in &all {
                assert_eq!(from.may_become(to), allowed(from, to), "{from:?} -> {to:?}");
            }
        }
        // A finished run never changes again; a run is never told it finished before
        // its final state was saved; a cancel after the end changes nothing; a retried
        // save never changes the outcome.
        for &to in &all {
            for o in outcomes {
                assert!(!Finished(o).may_become(to));
            }
        }
        assert!(!Running.may_become(Finished(Succeeded)));
        assert!(!Unsaved(Failed).may_become(Finished(Failed)));
        assert!(!Saving(Succeeded).may_become(Cancelling));
        assert!(!Unsaved(Succeeded).may_become(Saving(Failed)));
        assert!(!Submitting.may_become(Saving(Failed)));
    }
}
