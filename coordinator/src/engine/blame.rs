//! Whose fault is a failed job: the step's or the worker's.
//!
//! A job's own failure (its command exits non-zero, times out, or its input cannot be
//! staged) is the step's fault when the same step has failed on another worker too, and
//! is charged to a worker only when that worker's failures follow it across steps (two
//! or more distinct steps among its recent failures that failed on no other worker). Results that are wrong (a bad
//! signature, uploads that do not match the signed manifest, a replica outvoted) are
//! always the worker's: they are charged directly, not through here. So a pipeline that
//! fails everywhere never quarantines honest volunteers, and a broken host still is.

use std::collections::{HashMap, HashSet, VecDeque};

/// A step of a run.
pub(super) type StepKey = (String, usize);

/// How many of a worker's recent job failures are remembered.
const REMEMBERED: usize = 12;

/// The failure history the verdicts are drawn from.
#[derive(Debug, Default)]
pub(super) struct Blame {
    /// Per step: the workers it failed on.
    failed_on: HashMap<StepKey, HashSet<String>>,
    /// Per worker: the steps of its recent job failures, oldest first.
    recent: HashMap<String, VecDeque<StepKey>>,
}

impl Blame {
    /// Records that `step` failed on `worker`; true when that counts against the worker.
    pub(super) fn job_failed(&mut self, worker: &str, step: StepKey) -> bool {
        let workers = self.failed_on.entry(step.clone()).or_default();
        let elsewhere = workers.iter().any(|w| w != worker);
        workers.insert(worker.to_string());
        let mine = self.recent.entry(worker.to_string()).or_default();
        mine.push_back(step);
        while mine.len() > REMEMBERED {
            mine.pop_front();
        }
        if elsewhere {
            return false;
        }
        // Evidence against the worker: the distinct steps of its recent failures that
        // failed nowhere else.
        let failed_on = &self.failed_on;
        let only_here: HashSet<&StepKey> = mine
            .iter()
            .filter(|k| {
                failed_on
                    .get(*k)
                    .is_none_or(|ws| ws.iter().all(|w| w == worker))
            })
            .collect();
        only_here.len() >= 2
    }

    /// Forgets a finished run's steps.
    pub(super) fn run_finished(&mut self, run_id: &str) {
        self.failed_on.retain(|(r, _), _| r != run_id);
        for steps in self.recent.values_mut() {
            steps.retain(|(r, _)| r != run_id);
        }
        self.recent.retain(|_, s| !s.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: usize) -> StepKey {
        ("run".into(), i)
    }

    #[test]
    fn a_step_that_fails_on_distinct_workers_is_the_steps_fault() {
        let mut b = Blame::default();
        // One step, retried: never charged, on one worker or on several.
        assert!(!b.job_failed("w1", step(0)));
        assert!(!b.job_failed("w1", step(0)));
        assert!(!b.job_failed("w2", step(0)));
        assert!(!b.job_failed("w3", step(0)));
        // A second step that fails elsewhere too is not charged either.
        assert!(!b.job_failed("w2", step(1)));
        assert!(!b.job_failed("w1", step(1)));
    }

    #[test]
    fn failures_that_follow_a_worker_across_steps_are_its_own() {
        let mut b = Blame::default();
        assert!(!b.job_failed("broken", step(0)));
        assert!(b.job_failed("broken", step(1)));
        assert!(b.job_failed("broken", step(2)));
        // The same steps succeed elsewhere (no failures recorded there).
        b.run_finished("run");
        assert!(
            !b.job_failed("broken", step(0)),
            "a finished run is forgotten"
        );
    }
}
