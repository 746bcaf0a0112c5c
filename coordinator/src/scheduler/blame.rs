//! Whose fault is a failed job: the job's or the worker's.
//!
//! A job's own failure (its command exits non-zero, times out, or its input cannot be
//! staged) is judged when the job ends, not at each attempt:
//! - it succeeded in the end on another worker: the workers that failed it are charged
//!   (it could run; they could not run it);
//! - it failed on two or more distinct workers: it is the job's fault, nobody is charged;
//! - it failed, every attempt on one worker: charged only when that worker's failures
//!   follow it across jobs (two or more such jobs among its recent ones).
//!
//! Results that are wrong (a bad signature, uploads that do not match the signed
//! manifest, an outvoted replica) are always the worker's: they are charged directly,
//! not through here. So a pipeline that fails everywhere never quarantines honest
//! volunteers, and a broken host still is.

use std::collections::{HashMap, HashSet, VecDeque};

/// How many of a worker's jobs that failed only there are remembered.
const REMEMBERED: usize = 12;

/// The failure history the verdicts are drawn from.
#[derive(Debug, Default)]
pub(super) struct Blame {
    /// Per job id (unfinished jobs): its run, and the workers its attempts failed on.
    failed_on: HashMap<String, (String, HashSet<String>)>,
    /// Per worker: the jobs that failed there and nowhere else, oldest first.
    lone: HashMap<String, VecDeque<String>>,
}

impl Blame {
    /// Records that an attempt of `job` (of `run`) failed on `worker`.
    pub(super) fn attempt_failed(&mut self, run: &str, job: &str, worker: &str) {
        self.failed_on
            .entry(job.to_string())
            .or_insert_with(|| (run.to_string(), HashSet::new()))
            .1
            .insert(worker.to_string());
    }

    /// `job` succeeded on `worker`: the workers whose attempts of it failed are charged.
    pub(super) fn succeeded(&mut self, job: &str, worker: &str) -> Vec<String> {
        let Some((_, failed)) = self.failed_on.remove(job) else {
            return Vec::new();
        };
        let mut charged: Vec<String> = failed.into_iter().filter(|w| w != worker).collect();
        charged.sort();
        charged
    }

    /// `job` failed for good: the worker to charge, if its failures follow it.
    pub(super) fn gave_up(&mut self, job: &str) -> Option<String> {
        let (_, failed) = self.failed_on.remove(job)?;
        if failed.len() != 1 {
            return None;
        }
        let worker = failed.into_iter().next()?;
        let mine = self.lone.entry(worker.clone()).or_default();
        mine.push_back(job.to_string());
        while mine.len() > REMEMBERED {
            mine.pop_front();
        }
        (mine.len() >= 2).then_some(worker)
    }

    /// Forgets a finished run's unfinished jobs.
    pub(super) fn run_finished(&mut self, run_id: &str) {
        self.failed_on.retain(|_, (r, _)| r != run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_fails_on_distinct_workers_is_the_jobs_fault() {
        let mut b = Blame::default();
        for w in ["w1", "w2", "w1", "w3"] {
            b.attempt_failed("r", "r/a", w);
        }
        assert_eq!(b.gave_up("r/a"), None);
        b.attempt_failed("r", "r/b", "w2");
        b.attempt_failed("r", "r/b", "w1");
        assert_eq!(b.gave_up("r/b"), None);
    }

    #[test]
    fn a_job_that_fails_on_one_worker_and_succeeds_on_another_charges_the_first() {
        let mut b = Blame::default();
        b.attempt_failed("r", "r/a", "broken");
        assert_eq!(b.succeeded("r/a", "good"), vec!["broken".to_string()]);
        // Retried on the same worker and then succeeded: a flake, nobody charged.
        b.attempt_failed("r", "r/b", "good");
        assert!(b.succeeded("r/b", "good").is_empty());
    }

    #[test]
    fn lone_failures_count_only_when_they_follow_the_worker() {
        let mut b = Blame::default();
        b.attempt_failed("r", "r/a", "w");
        assert_eq!(
            b.gave_up("r/a"),
            None,
            "one job failing on the only worker tried"
        );
        b.attempt_failed("r", "r/b", "w");
        assert_eq!(b.gave_up("r/b"), Some("w".to_string()));
        b.attempt_failed("r", "r/c", "w");
        b.run_finished("r");
        assert_eq!(
            b.gave_up("r/c"),
            None,
            "a finished run's jobs are forgotten"
        );
    }
}
