//! When leases run out and silent workers count as lost, as two min-heaps, so that the
//! tick looks only at what is due instead of scanning every job and worker.
//!
//! An entry is a reminder, not the truth: the engine checks the job's (or worker's)
//! current state when one comes due. A heartbeat only moves `Job::deadline` or
//! `Worker::last_seen` forward (O(1), no heap work); the reminder that comes due early
//! is put back at the new time. So a lease has at most one entry, and a worker one.

use nexa_shared::ids::{JobId, WorkerId};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use tokio::time::Instant;

/// The reminders of lease deadlines and worker silences.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    leases: BinaryHeap<Reverse<(Instant, JobId, u64)>>,
    silences: BinaryHeap<Reverse<(Instant, WorkerId)>>,
}

impl Deadlines {
    /// Reminds at `at` of the lease of `job` under `generation`.
    pub(super) fn lease(&mut self, at: Instant, job: JobId, generation: u64) {
        self.leases.push(Reverse((at, job, generation)));
    }

    /// Reminds at `at` to see whether `worker` has been silent too long.
    pub(super) fn silence(&mut self, at: Instant, worker: WorkerId) {
        self.silences.push(Reverse((at, worker)));
    }

    /// Takes the lease reminders due by `now`, earliest first.
    pub(super) fn due_leases(&mut self, now: Instant) -> Vec<(JobId, u64)> {
        let mut due = Vec::new();
        while self
            .leases
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= now)
        {
            if let Some(Reverse((_, job, generation))) = self.leases.pop() {
                due.push((job, generation));
            }
        }
        due
    }

    /// Takes the worker reminders due by `now`, earliest first.
    pub(super) fn due_silences(&mut self, now: Instant) -> Vec<WorkerId> {
        let mut due = Vec::new();
        while self
            .silences
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            if let Some(Reverse((_, worker))) = self.silences.pop() {
                due.push(worker);
            }
        }
        due
    }

    /// Reminders held, leases and workers (what the heaps cost).
    #[cfg(test)]
    pub(super) fn len(&self) -> (usize, usize) {
        (self.leases.len(), self.silences.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_what_is_due_comes_out_earliest_first() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.lease(t0 + Duration::from_secs(3), "r/b".into(), 2);
        d.lease(t0 + Duration::from_secs(1), "r/a".into(), 1);
        d.lease(t0 + Duration::from_secs(9), "r/c".into(), 3);
        d.silence(t0 + Duration::from_secs(5), "w1".into());
        assert!(d.due_leases(t0).is_empty());
        assert_eq!(
            d.due_leases(t0 + Duration::from_secs(3)),
            vec![("r/a".into(), 1), ("r/b".into(), 2)]
        );
        assert_eq!(d.len(), (1, 1));
        assert!(d.due_silences(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(
            d.due_silences(t0 + Duration::from_secs(5)),
            vec![WorkerId::from("w1")]
        );
        assert_eq!(d.len(), (1, 0));
    }
}
