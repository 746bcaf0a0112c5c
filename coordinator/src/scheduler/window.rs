//! A fan-out's shard jobs, made a window at a time: at most
//! [`EngineConfig::shard_window`] of a step's shard jobs are alive (queued, leased,
//! sealing or backing off) at once, and more are made as they end (see
//! [`SHARD_WINDOW`] for why).

use super::*;

impl Engine {
    /// Tops step `i`'s shard jobs up to the window live, once no more than half
    /// the window is (so a window is made in batches, not one job per finished shard).
    /// Nothing is made for a run being cancelled or a step no longer running.
    pub(super) fn make_shard_jobs(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let left = run.unmade[i].left;
        if left == 0 || run.cancelled() || run.records[i].status != StepStatus::Running {
            return;
        }
        let window = self.config.shard_window.max(1);
        let live = run.shards_open[i].saturating_sub(left);
        if live > window / 2 {
            return;
        }
        let (Some(plan), Some(spec)) = (run.plans[i].clone(), run.unmade[i].spec.clone()) else {
            return;
        };
        let Some(units) = plan.shards.as_ref().map(|s| &s.units) else {
            return;
        };
        let step = run.ctx.pipeline.steps[i].id.value.clone();
        let mut made = Vec::new();
        let mut k = run.unmade[i].next;
        while k < units.len() && live + made.len() < window {
            if run.records[i].shards[k].status == StepStatus::Pending {
                made.push(k);
            }
            k += 1;
        }
        run.unmade[i].next = k;
        run.unmade[i].left = left.saturating_sub(made.len());
        if run.unmade[i].left == 0 {
            run.unmade[i].spec = None;
        }
        for k in made {
            let id = JobId::for_shard(run_id, &step, units[k].index);
            self.queue_job(run_id, (i, Some(k)), id, spec.clone());
        }
    }

    /// A cancelled run's shards that never had a job are Cancelled, as its queued jobs
    /// are.
    pub(super) fn cancel_unmade(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let mut cancel = Vec::new();
        for (i, u) in run.unmade.iter_mut().enumerate() {
            if u.left == 0 {
                continue;
            }
            let shards = &run.records[i].shards;
            cancel.extend(
                (u.next..shards.len())
                    .filter(|&k| shards[k].status == StepStatus::Pending)
                    .map(|k| (i, k)),
            );
            *u = run::Unmade::default();
        }
        for (i, k) in cancel {
            if let Some(run) = self.runs.get_mut(run_id) {
                run.records[i].shards[k].error = Some("cancelled".into());
            }
            self.set_shard_status(run_id, i, k, StepStatus::Cancelled);
        }
    }

    /// Shards of step `i` that will never get a job now (the step failed as a whole).
    pub(super) fn forget_unmade(&mut self, run_id: &str, i: usize) {
        if let Some(u) = self.runs.get_mut(run_id).and_then(|r| r.unmade.get_mut(i)) {
            *u = run::Unmade::default();
        }
    }

    /// Shards of every step still waiting for a job (counted as queued).
    pub(super) fn unmade_jobs(&self) -> usize {
        self.runs
            .values()
            .flat_map(|r| r.unmade.iter())
            .map(|u| u.left)
            .sum()
    }
}
