//! Results: admitting or refusing a report, sealing it, sharded steps' assembly and
//! the steps the coordinator runs itself.

use super::acceptance::{self, Refusal, StaleWhy};
use super::*;

impl Engine {
    /// Takes a reported result: the verdict says whether it was admitted (it may still
    /// fail sealing later) or refused, and why.
    pub(super) fn on_report(
        &mut self,
        worker: &str,
        result: JobResult,
        verdict: std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        if let Err(why) = self.admit(worker, &result, verdict) {
            // Nothing of a refused result is kept.
            cleanup_failed(self.fx.as_ref(), None, result.staging.clone());
            return Err(why);
        }
        if let Some(p) = result.progress.clone() {
            // Before the step changes state, so the job's last word is shown first.
            self.record_progress(&result.job_id, p);
        }
        self.accept(worker, result);
        Ok(())
    }

    /// The checks a result must pass before anything of it is used (see
    /// `acceptance::judge`): a live lease of this worker, the enrolled key's signature,
    /// a run that is not cancelled. A refusal is counted by its kind and acted on.
    pub(super) fn admit(
        &mut self,
        worker: &str,
        result: &JobResult,
        verdict: std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let job = self.jobs.get(&result.job_id);
        let facts = acceptance::Facts {
            job,
            enrolled: self.workers.get(worker).map(|w| (w.info.key, w.admin)),
            verdict: &verdict,
            cancelled: job
                .and_then(|j| self.runs.get(&j.run_id))
                .is_some_and(|r| r.cancelled()),
        };
        let refusal = match acceptance::judge(worker, result, &facts) {
            Ok(()) => {
                // The job no longer runs on the worker, whatever the result says; a
                // server it left running keeps the job's GPUs.
                if job.is_some_and(|j| services::starts_service(&j.spec, result)) {
                    self.hold_for_service(&result.job_id, result.generation);
                } else {
                    self.release(&result.job_id);
                }
                return Ok(());
            }
            Err(r) => r,
        };
        if let Some(kind) = refusal.kind() {
            self.refusals.count(kind);
        }
        let (job_id, generation) = (&result.job_id, result.generation);
        match &refusal {
            Refusal::UnknownJob => {
                tracing::warn!(job = %job_id, worker, "refused result for an unknown or finished job");
            }
            Refusal::NotLiveLease(StaleWhy::Ended) => {
                tracing::warn!(job = %job_id, worker, generation, "refused result: its lease expired or ended before it arrived");
            }
            Refusal::NotLiveLease(StaleWhy::OldGeneration) => {
                let current = self.jobs.get(job_id).map(|j| j.generation);
                tracing::warn!(job = %job_id, worker, generation, ?current, "refused result from a stale lease generation");
            }
            Refusal::NotLiveLease(StaleWhy::OtherWorker) => {
                tracing::warn!(job = %job_id, worker, generation, "refused result: the job is leased to another worker");
            }
            Refusal::Banned => {
                tracing::warn!(job = %job_id, worker, "refused result from a banned worker");
                self.release(job_id);
                self.job_failed(job_id, "result refused: the worker is banned".into(), true);
            }
            Refusal::NotEnrolled | Refusal::WrongKey | Refusal::BadSignature(_) => {
                tracing::warn!(job = %job_id, worker, error = %refusal, "refused result: bad signature");
                self.release(job_id);
                self.record_outcome(worker, false);
                self.job_failed(job_id, format!("result refused: {refusal}"), true);
            }
            Refusal::Cancelled => {
                tracing::info!(job = %job_id, worker, outcome = ?result.outcome, "result of a cancelled run discarded");
                self.release(job_id);
                self.job_failed(job_id, "cancelled".into(), false);
            }
        }
        Err(refusal.to_string())
    }

    /// Acts on an admitted result: seal it, wait for its quorum, or fail or retry it.
    pub(super) fn accept(&mut self, worker: &str, result: JobResult) {
        // A job's own failure is judged when the job ends (see `blame`).
        if matches!(result.outcome, Outcome::Failed | Outcome::TimedOut)
            && let Some(j) = self.jobs.get(&result.job_id)
        {
            self.blame.attempt_failed(&j.run_id, &result.job_id, worker);
        }
        if let Some(m) = &self.config.metrics {
            let secs = result.ended_ms.saturating_sub(result.started_ms) as f64 / 1000.0;
            m.job_duration.observe(secs);
            let outcome = match result.outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed => "failed",
                Outcome::TimedOut => "timed_out",
                Outcome::Cancelled => "cancelled",
            };
            m.jobs_finished.with_label_values(&[outcome]).inc();
        }
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return;
        };
        if job.unit.is_some() && result.outcome != Outcome::Succeeded {
            let job_id = result.job_id.clone();
            if self.drop_late_replica(&job_id) {
                cleanup_failed(self.fx.as_ref(), None, result.staging.clone());
                return;
            }
        }
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return;
        };
        if job.unit.is_some() && result.outcome == Outcome::Succeeded {
            // A replica: its result waits for the quorum before anything is sealed.
            job.set_state(JobState::Sealing);
            let job_id = result.job_id.clone();
            self.on_replica_result(&job_id, worker, result);
            return;
        }
        job.pending_credit = Some(replication::credit_of(&job.spec, &result));
        let mut log_copy = None;
        if let Some(run) = self.runs.get_mut(&job.run_id) {
            let rec = &mut run.records[job.step];
            let duration = result.ended_ms.saturating_sub(result.started_ms);
            let name = match job.shard {
                None => format!("{}.log", rec.id),
                Some(k) => format!("{}.shard-{k:05}.log", rec.id),
            };
            let dest = run
                .ctx
                .state_dir
                .join("logs")
                .join(paths::safe_component(&name));
            match job.shard {
                None => {
                    rec.log = Some(run.ctx.rel(&dest));
                    rec.duration_ms = Some(duration);
                }
                Some(k) => rec.shards[k].worker = Some(hex::encode(result.worker_key)),
            }
            log_copy = result.log.clone().map(|src| (src, dest));
        }
        match result.outcome {
            Outcome::Succeeded => {
                let job_id = result.job_id.clone();
                self.start_sealing(&job_id, result, log_copy);
            }
            Outcome::Cancelled => {
                cleanup_failed(self.fx.as_ref(), log_copy, result.staging.clone());
                self.job_failed(&result.job_id, "cancelled".into(), false)
            }
            Outcome::TimedOut => {
                cleanup_failed(self.fx.as_ref(), log_copy, result.staging.clone());
                let msg = format!("timed out; {}", tail(&result.error, 2000));
                self.job_failed(&result.job_id, msg, true)
            }
            Outcome::Failed => {
                cleanup_failed(self.fx.as_ref(), log_copy, result.staging.clone());
                let msg = match (result.exit_code, result.error.is_empty()) {
                    (Some(c), true) => format!("exit status {c}"),
                    (Some(c), false) => format!("exit status {c}: {}", tail(&result.error, 2000)),
                    (None, true) => "killed by a signal".to_string(),
                    (None, false) => tail(&result.error, 2000),
                };
                self.job_failed(&result.job_id, msg, true)
            }
        }
    }

    /// Hands an accepted result to the sealing thread.
    pub(super) fn start_sealing(
        &mut self,
        job_id: &str,
        result: JobResult,
        log_copy: Option<(PathBuf, PathBuf)>,
    ) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.set_state(JobState::Sealing);
        let Some(run) = self.runs.get_mut(&job.run_id) else {
            return;
        };
        let Some(plan) = run.plans[job.step].clone() else {
            return;
        };
        run.in_flight += 1;
        // On the mesh the coordinator's store keeps the handle of a server the job left
        // running (embedded, the CLI keeps it in the project's store).
        let service = (self.config.registry.is_some()
            && services::starts_service(&job.spec, &result))
        .then(|| {
            let worker_id = job.worker.clone().unwrap_or_default();
            crate::services::Owner {
                worker_name: self
                    .workers
                    .get(worker_id.as_str())
                    .map(|w| w.info.name.clone())
                    .unwrap_or_default(),
                worker_id: worker_id.to_string(),
                job_id: job_id.to_string(),
                generation: result.generation,
            }
        });
        let task = SealTask {
            job_id: job_id.to_string(),
            ctx: run.ctx.clone(),
            plan,
            shard: job.shard,
            result,
            log_copy,
            service,
        };
        if !self.fx.seal(task) {
            tracing::error!("the sealing thread is gone");
        }
    }

    pub(super) fn on_sealed(
        &mut self,
        job_id: &str,
        res: std::result::Result<SealedJob, SealFailure>,
    ) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let (run_id, i, shard) = (job.run_id.clone(), job.step, job.shard);
        if let Some(run) = self.runs.get_mut(&run_id) {
            run.in_flight -= 1;
        }
        let pending_credit = job.pending_credit;
        // Only a wrong result is the worker's fault here; a seal that failed for the
        // coordinator's own reasons (its disk) is not.
        let worker_fault = res.as_ref().err().is_some_and(|e| e.wrong.is_some());
        if let Some(w) = job.worker.clone() {
            if res.is_ok() || worker_fault {
                self.record_outcome(&w, res.is_ok());
            }
            if res.is_ok() {
                // Workers that failed what this one could run are charged now.
                for failed in self.blame.succeeded(job_id, &w) {
                    self.record_outcome(&failed, false);
                }
            }
            if res.is_ok()
                && let Some(c) = pending_credit
                && let Some(ws) = self.workers.get_mut(&w)
            {
                ws.credit.cpu_seconds += c.cpu_seconds;
                ws.credit.gpu_seconds += c.gpu_seconds;
                self.dirty_workers.insert(w.clone());
            }
        }
        match res {
            Err(e) => {
                if e.wrong == Some(WrongResult::ManifestMismatch) {
                    self.refusals.count(Refused::Digest);
                }
                tracing::warn!(job = %job_id, error = %e, "sealing failed");
                self.stop_services_of(job_id);
                self.job_failed(job_id, format!("sealing outputs: {e}"), true);
            }
            Ok(SealedJob::Step(outputs)) => {
                let worker = self.jobs.remove(job_id).and_then(|j| j.worker);
                let key = worker.and_then(|w| self.workers.get(&w).map(|i| i.info.key));
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                run.records[i].outputs = outputs;
                run.records[i].worker = key.map(hex::encode);
                self.set_status(&run_id, i, StepStatus::Complete, None);
                self.step_done(&run_id, i);
            }
            Ok(SealedJob::Shard(sealed)) => {
                let worker = self.jobs.remove(job_id).and_then(|j| j.worker);
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                let k = shard.unwrap_or(0);
                let s = &mut run.records[i].shards[k];
                s.hash = Some(sealed);
                s.error = None;
                if s.worker.is_none() {
                    s.worker =
                        worker.and_then(|w| self.workers.get(&w).map(|i| hex::encode(i.info.key)));
                }
                self.set_shard_status(&run_id, i, k, StepStatus::Complete);
            }
        }
        self.maybe_finish(&run_id);
    }

    /// A shard reached a final state: when all have, fail the step or assemble it.
    pub(super) fn shard_settled(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.shards_open[i] > 0 {
            return;
        }
        let shards = &run.records[i].shards;
        let failed: Vec<String> = shards
            .iter()
            .filter(|s| s.status == StepStatus::Failed)
            .map(|s| format!("shard {}: {}", s.index, s.error.clone().unwrap_or_default()))
            .collect();
        if run.cancelled() || shards.iter().any(|s| s.status == StepStatus::Cancelled) {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
        } else if !failed.is_empty() {
            let total = shards.len();
            let msg = format!(
                "{} of {total} shards failed; {}",
                failed.len(),
                failed.join("; ")
            );
            self.step_failed(run_id, i, msg);
        } else {
            self.start_assembly(run_id, i);
        }
    }

    pub(super) fn start_assembly(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(plan) = run.plans[i].clone() else {
            return;
        };
        run.in_flight += 1;
        let ctx = run.ctx.clone();
        let rid = run_id.to_string();
        let store = self.store.clone();
        tasks::blocking(
            self.fx.as_ref(),
            move || crate::sealing::group::assemble(store.as_ref(), &ctx, &plan),
            move |res| {
                let res = res.unwrap_or_else(|why| Err(format!("assembling the step {why}")));
                Event::Assembled(rid, i, res)
            },
        );
    }

    /// Runs a `core.registry.*` step here, on the blocking pool: it acts on the
    /// coordinator's registry, so it never goes to a worker.
    pub(super) fn run_on_coordinator(&mut self, run_id: &str, i: usize, plan: Arc<StepPlan>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let step = &run.ctx.pipeline.steps[i];
        let params =
            nexa_shared::handlers::RegistryParams::from_json(&step.uses.value, &step.params);
        let inputs: Vec<(String, String, PathBuf)> = plan
            .inputs
            .iter()
            .map(|r| (r.name.clone(), r.uri.clone(), r.path.clone()))
            .collect();
        let rec = &mut run.records[i];
        rec.cache_key = Some(plan.cache_key.clone());
        rec.outputs.clear();
        run.in_flight += 1;
        let project = run.ctx.project.clone();
        let registry = self.config.registry.clone();
        let mirror = self.config.registry_mirror.clone();
        let rid = run_id.to_string();
        self.set_status(run_id, i, StepStatus::Running, None);
        tasks::blocking(
            self.fx.as_ref(),
            move || {
                params.and_then(|p| {
                    let store: Arc<dyn Store> = match registry {
                        Some(s) => s,
                        None => Arc::new(
                            crate::SledStore::open(&project.join(".nexa_state").join("registry"))
                                .map_err(|e| e.to_string())?,
                        ),
                    };
                    crate::registry::run_step(store.as_ref(), mirror, &project, &p, &inputs)
                        .map_err(|e| e.to_string())
                })
            },
            move |res| {
                let res = res.unwrap_or_else(|why| Err(format!("the registry step {why}")));
                Event::CoordinatorStepDone(rid, i, res)
            },
        );
    }

    pub(super) fn on_coordinator_step_done(
        &mut self,
        run_id: &str,
        i: usize,
        res: std::result::Result<(String, bool), String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        match res {
            Ok((what, changed)) => {
                tracing::info!(run = %run_id, step = %run.records[i].id, "{what}");
                // Finding the work already done is a cache hit, as for any other step.
                let status = if changed {
                    StepStatus::Complete
                } else {
                    StepStatus::Skipped
                };
                self.set_status(run_id, i, status, Some(what));
                self.step_done(run_id, i);
            }
            Err(e) => self.step_failed(run_id, i, e),
        }
        self.maybe_finish(run_id);
    }

    pub(super) fn on_assembled(
        &mut self,
        run_id: &str,
        i: usize,
        res: std::result::Result<BTreeMap<String, ArtifactInfo>, String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        match res {
            Ok(outputs) => {
                run.records[i].outputs = outputs;
                self.set_status(run_id, i, StepStatus::Complete, None);
                self.step_done(run_id, i);
            }
            Err(e) => self.step_failed(run_id, i, format!("assembling shards: {e}")),
        }
        self.maybe_finish(run_id);
    }
}
