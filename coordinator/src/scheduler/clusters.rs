//! What cluster providers (the Slurm provider) ask of the engine: the queued demand of
//! one scheduler's steps, grouped by shape, and failing steps whose pilots cannot run.

use super::*;

/// Jobs of `scheduler: <name>` steps waiting for a worker, of one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// What each job needs (cpus, memory, GPUs, labels such as `slurm.partition`).
    pub requirements: Requirements,
    /// Each job's timeout.
    pub timeout: Option<Duration>,
    /// How many wait (queued, or in backoff before a retry).
    pub queued: usize,
    /// The steps they belong to: (run, step index, step id).
    pub steps: Vec<(String, usize, String)>,
}

/// Whether a job needing `req` belongs to a scheduler a provider starts workers for
/// (under `config`): it waits for them, and only the provider fails it.
pub(super) fn provided(config: &EngineConfig, req: &Requirements) -> bool {
    req.labels
        .get(hardware::SCHEDULER_LABEL)
        .is_some_and(|s| config.provided_schedulers.contains(s))
}

impl Engine {
    /// A job needing `req` started waiting: if a provider starts workers for it, wake
    /// the provider ([`Coordinator::demand_changed`]).
    pub(super) fn wake_provider(&self, req: &Requirements) {
        if provided(&self.config, req) {
            self.demand_waker.notify_one();
        }
    }

    /// The waiting jobs of `scheduler`'s steps, one entry per shape.
    pub(super) fn demand(&self, scheduler: &str) -> Vec<Demand> {
        let mut out: Vec<Demand> = Vec::new();
        for j in self.jobs.values() {
            if !matches!(j.state, JobState::Queued | JobState::Backoff)
                || j.spec.requirements.labels.get(hardware::SCHEDULER_LABEL)
                    != Some(&scheduler.to_string())
            {
                continue;
            }
            let step = (j.run_id.clone(), j.step, j.spec.step_id.clone());
            match out
                .iter_mut()
                .find(|d| d.requirements == j.spec.requirements && d.timeout == j.spec.timeout)
            {
                Some(d) => {
                    d.queued += 1;
                    if !d.steps.contains(&step) {
                        d.steps.push(step);
                    }
                }
                None => out.push(Demand {
                    requirements: j.spec.requirements.clone(),
                    timeout: j.spec.timeout,
                    queued: 1,
                    steps: vec![step],
                }),
            }
        }
        for d in &mut out {
            d.steps.sort();
        }
        out
    }

    /// Fails each named step that has not started (all its jobs wait) with `reason`;
    /// a step with a job running or done is left alone.
    pub(super) fn fail_steps(&mut self, steps: &[(String, usize)], reason: &str) {
        for (run, i) in steps {
            self.fail_waiting_step(run, *i, reason.to_string());
        }
    }

    /// Fails step `i` of `run_id` with `why` if none of its jobs has left the queue;
    /// whether it did.
    pub(super) fn fail_waiting_step(&mut self, run_id: &str, i: usize, why: String) -> bool {
        let Some(run) = self.runs.get(run_id) else {
            return false;
        };
        if run.records.get(i).is_none_or(|r| r.status.is_final()) {
            return false;
        }
        let mine: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.run_id == run_id && j.step == i)
            .map(|(id, _)| id.clone())
            .collect();
        let started = mine.iter().any(|id| {
            self.jobs
                .get(id)
                .is_some_and(|j| !matches!(j.state, JobState::Queued | JobState::Backoff))
        });
        if started {
            return false;
        }
        for id in mine {
            self.jobs.remove(&id);
        }
        self.forget_unmade(run_id, i);
        self.step_failed(run_id, i, why);
        self.maybe_finish(run_id);
        true
    }
}
