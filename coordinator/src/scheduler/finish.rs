//! Retries, cancellation and the end of a run.

use super::*;

impl Engine {
    pub(super) fn job_failed(&mut self, job_id: &str, error: String, retryable: bool) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let (run_id, i, shard) = (job.run_id.clone(), job.step, job.shard);
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let retries = run.ctx.pipeline.steps[i].retries;
        if retryable && !run.cancelled() && job.attempt <= retries.count {
            let delay = retries.delay(job.attempt);
            job.attempt += 1;
            job.set_state(JobState::Backoff);
            job.worker = None;
            run.emit(Progress::Retry {
                job: job_id.to_string(),
                attempt: job.attempt,
                delay,
                error: error.clone(),
            });
            tracing::info!(job = %job_id, attempt = job.attempt, delay_ms = delay.as_millis() as u64, error = %error, "retrying job");
            self.fx.later(delay, Event::RetryDue(JobId::from(job_id)));
            return;
        }
        self.jobs.remove(job_id);
        if let Some(w) = self.blame.gave_up(job_id) {
            self.record_outcome(&w, false);
        }
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        let status = if run.cancelled() {
            StepStatus::Cancelled
        } else {
            StepStatus::Failed
        };
        match shard {
            None => {
                if status == StepStatus::Cancelled {
                    self.set_status(&run_id, i, status, Some("run cancelled".into()));
                } else {
                    self.step_failed(&run_id, i, error);
                }
            }
            Some(k) => {
                run.records[i].shards[k].error = Some(error);
                self.set_shard_status(&run_id, i, k, status);
            }
        }
        self.maybe_finish(&run_id);
    }

    pub(super) fn step_done(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let next = run.ctx.dag.dependents[i].clone();
        self.schedule_ready(run_id, Some(&next));
    }

    pub(super) fn step_failed(&mut self, run_id: &str, i: usize, error: String) {
        tracing::info!(run = %run_id, step = i, error = %error, "step failed");
        self.set_status(run_id, i, StepStatus::Failed, Some(error));
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let failed_id = run.records[i].id.clone();
        let blocked: Vec<usize> = run
            .ctx
            .dag
            .downstream(i)
            .into_iter()
            .filter(|&d| d != i && run.records[d].status == StepStatus::Pending)
            .collect();
        for d in blocked {
            self.set_status(
                run_id,
                d,
                StepStatus::Blocked,
                Some(format!("blocked by failed step '{failed_id}'")),
            );
        }
    }

    pub(super) fn on_cancel(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        // A cancel after the run ended (it is being saved) changes nothing.
        if !run.phase().may_become(RunPhase::Cancelling) {
            return;
        }
        run.set_phase(RunPhase::Cancelling);
        tracing::info!(run = %run_id, "cancelling run");
        if let Some(tx) = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(run_id)
        {
            let _ = tx.send(true);
        }
        // Drop queued and backing-off jobs; leased ones are killed by their workers and
        // report Cancelled.
        let dropped: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.run_id == run_id && matches!(j.state, JobState::Queued | JobState::Backoff)
            })
            .map(|(id, _)| id.clone())
            .collect::<Vec<JobId>>();
        for id in dropped {
            self.job_failed(&id, "cancelled".into(), false);
        }
        self.cancel_unmade(run_id);
        self.cancel_pending(run_id);
        self.maybe_finish(run_id);
    }

    /// Marks a cancelled run's steps that have not started (and are not being planned)
    /// Cancelled.
    pub(super) fn cancel_pending(&mut self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let pending: Vec<usize> = (0..run.records.len())
            .filter(|&i| run.records[i].status == StepStatus::Pending && !run.busy[i])
            .collect();
        for i in pending {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
        }
    }

    pub(super) fn maybe_finish(&mut self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.in_flight > 0 || run.unfinished > 0 {
            return;
        }
        debug_assert!(run.records.iter().all(|r| r.status.is_final()));
        if self.jobs.values().any(|j| j.run_id == run_id) {
            return;
        }
        let outcome = match run.phase() {
            // The store refused it before: the same outcome is saved again.
            RunPhase::Unsaved(o) => o,
            RunPhase::Running | RunPhase::Cancelling => outcome_of(run),
            // Being saved (or already over): nothing to do.
            _ => return,
        };
        // The run is over only once the store says so: until its final state is durable
        // nobody is told, and the tick tries again (a full disk, an I/O error).
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if !run.set_phase(RunPhase::Saving(outcome)) {
            return;
        }
        let rec = RunRecord {
            run_id: run_id.to_string(),
            pipeline: run.ctx.pipeline.name.clone(),
            started_at: run.started_at.clone(),
            finished_at: Some(now_rfc3339()),
            outcome: outcome.into(),
        };
        let (store, records) = (self.store.clone(), run.records.clone());
        let (pipeline, rid) = (run.ctx.pipeline.name.clone(), run_id.to_string());
        self.fx.persist(Box::new(move || {
            let refs: Vec<&StepRecord> = records.iter().collect();
            let saved = state::save_steps(store.as_ref(), &pipeline, &refs)
                .and_then(|_| state::save_run(store.as_ref(), &rec))
                .and_then(|_| store.flush())
                .map_err(|e| format!("{e:#}"));
            Some(Event::RunSaved(rid, outcome, saved))
        }));
    }

    /// A finished run's final state reached the store (or did not: then it stays open
    /// and the tick tries again); only now is it reported.
    pub(super) fn on_run_saved(
        &mut self,
        run_id: &str,
        outcome: RunOutcome,
        saved: std::result::Result<(), String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if let Err(e) = saved {
            run.set_phase(RunPhase::Unsaved(outcome));
            run.unsaved += 1;
            if run.unsaved == 1 {
                tracing::error!(error = %e, run = %run_id, "saving the finished run; retried every tick, nobody is told before it is saved");
            }
            return;
        }
        let Some(mut run) = self.runs.remove(run_id) else {
            return;
        };
        self.granted.remove(run_id);
        self.blame.run_finished(run_id);
        write_mirror(self.fx.as_ref(), &mut run);
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
        tracing::info!(run = %run_id, ?outcome, elapsed_ms = run.started.elapsed().as_millis() as u64, "run finished");
        let summary = RunSummary {
            run_id: RunId::from(run_id),
            pipeline: run.ctx.pipeline.name.clone(),
            outcome,
            steps: run.records.clone(),
            elapsed: run.started.elapsed(),
        };
        run.finish(summary);
    }
}

/// How a run whose steps are all final ended.
fn outcome_of(run: &Run) -> RunOutcome {
    if run.cancelled()
        || run
            .records
            .iter()
            .any(|r| r.status == StepStatus::Cancelled)
    {
        RunOutcome::Cancelled
    } else if run
        .records
        .iter()
        .any(|r| r.status == StepStatus::Failed || r.status == StepStatus::Blocked)
    {
        RunOutcome::Failed
    } else {
        RunOutcome::Succeeded
    }
}

/// After a failed job: keep its log with the run state (`.nexa_state/<pipeline>/logs`)
/// and drop what it staged, off the loop. Both go on the write-behind thread, in order
/// before the run's own final save: when the run reports its end (naming that log), the
/// log is there. As a task on the blocking pool, it could still be waiting when the run
/// ended, and be dropped at shutdown (seen in CI: the log of an earlier run was read).
pub(super) fn cleanup_failed(
    fx: &dyn effects::Effects,
    log: Option<(PathBuf, PathBuf)>,
    staging: Option<PathBuf>,
) {
    fx.persist(Box::new(move || {
        keep_log(log);
        if let Some(s) = staging {
            let _ = nexa_shared::artifact::remove_tree(&s);
        }
        None
    }));
}

/// Queues a rewrite of the run's `pipeline_state.json` (behind the store writes).
pub(super) fn write_mirror(fx: &dyn effects::Effects, run: &mut Run) {
    run.last_mirror = Some(Instant::now());
    let m = mirror::Mirror {
        pipeline: run.ctx.pipeline.name.clone(),
        run_id: run.ctx.run_id.clone(),
        updated_at: now_rfc3339(),
        steps: run.records.clone(),
    };
    let dir = run.ctx.state_dir.clone();
    fx.persist(Box::new(move || {
        if let Err(e) = mirror::write(&dir, &m) {
            tracing::warn!(error = %e, "writing pipeline_state.json");
        }
        None
    }));
}

/// What a step's jobs need from a worker: its resources, a container runtime when it
/// names an image, and the Python packages of its runner (labels `python.<package>`,
/// any version).
pub(super) fn requirements_of(step: &nexa_shared::spec::Step) -> Requirements {
    use nexa_shared::runners;
    let mut r = Requirements::from(&step.resources);
    r.container = step.image().is_some();
    if runners::is_runner(&step.uses.value) {
        for p in runners::packages(&step.uses.value, step.backend.as_deref(), &step.params) {
            r.labels.insert(runners::label(p), runners::ANY.into());
        }
    }
    if let Some(s) = step.scheduler.as_deref()
        && matches!(s, "slurm" | "k8s")
    {
        r.labels
            .insert(hardware::SCHEDULER_LABEL.into(), s.to_string());
    }
    // A step's Slurm overrides go to pilots submitted with them: a pilot carries its
    // partition (from Slurm) and the account, QOS and constraint it was submitted with.
    for (k, v) in &step.slurm {
        r.labels.insert(format!("slurm.{k}"), v.clone());
    }
    if step.uses.value == runners::SERVE {
        r.labels.insert(
            hardware::SERVICES_LABEL.into(),
            nexa_shared::runners::ANY.into(),
        );
    }
    r
}
