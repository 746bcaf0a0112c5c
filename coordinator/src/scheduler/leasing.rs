//! Leasing: fair-share picking, dispatch to waiting workers, steps no worker can run,
//! heartbeats and lease expiry.

use super::*;

/// How soon a step no enrolled worker can run is looked at again while a worker is
/// still probing its runtimes ([`Profile::runtimes_pending`]).
const RUNTIMES_RECHECK: Duration = Duration::from_millis(500);

impl Engine {
    /// The first queued job (in order) that fits `worker`'s free capacity, with the
    /// GPUs it gets. Drops stale queue entries it passes.
    pub(super) fn pick_job(&mut self, worker: &str) -> Option<(JobId, Vec<usize>)> {
        let w = self.workers.get(worker)?;
        if !w.eligible(Instant::now()) {
            return None;
        }
        let free = w.free();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Lazily: placement stops a few entries in, however long the queue.
        let queued = |id: &JobId| self.jobs.get(id).filter(|j| j.state == JobState::Queued);
        let choice = placement::pick(
            self.queue.iter().map(|id| placement::Entry {
                run: queued(id).map(|j| j.run_id.as_str()),
            }),
            self.runs.len(),
            FAIR_SCAN,
            |pos| {
                let job = self.queue.get(pos).and_then(queued)?;
                if let Some(u) = &job.unit
                    && !self.replica_ok(u, worker)
                {
                    return None;
                }
                // A pilot near the end of its allocation takes only what ends in time.
                if !hardware::walltime_ok(job.spec.timeout, &w.info.profile, now_unix) {
                    return None;
                }
                hardware::assign(&job.spec.requirements, std::slice::from_ref(&free))
                    .map(|a| a.gpus)
            },
            |run| self.held_by_run.get(run).copied().unwrap_or(0),
            |run| self.granted.get(run).copied().unwrap_or(0),
        );
        let (pos, gpus) = choice.chosen?;
        let job_id = self.queue.get(pos)?.clone();
        for p in choice.stale.into_iter().rev() {
            self.queue.remove(p);
        }
        let idx = self.queue.iter().position(|j| j == &job_id)?;
        self.queue.remove(idx);
        Some((job_id, gpus))
    }

    /// Hands queued jobs to waiting workers, each job to a worker it fits.
    /// Waiters are looked at only while jobs are queued, so an event costs nothing per
    /// idle worker; those that got nothing keep their places.
    pub(super) fn dispatch(&mut self) {
        let mut unserved = Vec::new();
        while !self.queue.is_empty() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            if w.reply.is_closed() {
                continue;
            }
            if let Some(w) = self.grant(w) {
                unserved.push(w);
            }
        }
        for w in unserved.into_iter().rev() {
            self.waiting.push_front(w);
        }
    }

    /// Leases up to `w.slots` queued jobs that fit `w`'s worker and sends them in one
    /// answer. Gives the waiter back when none fits; a worker that went away meanwhile
    /// gets its jobs put back at the head of the queue, in order.
    pub(super) fn grant(&mut self, w: Waiter) -> Option<Waiter> {
        let mut granted: Vec<(JobId, Lease)> = Vec::new();
        while granted.len() < w.slots {
            let Some((job_id, gpu_idx)) = self.pick_job(&w.worker) else {
                break;
            };
            let Some(lease) = self.lease_job(&w.worker, &job_id, gpu_idx) else {
                break;
            };
            granted.push((job_id, lease));
        }
        if granted.is_empty() {
            return Some(w);
        }
        let (ids, leases): (Vec<JobId>, Vec<Lease>) = granted.into_iter().unzip();
        if w.reply.send(leases).is_err() {
            // The worker went away between asking and now: put the jobs back.
            for job_id in ids.into_iter().rev() {
                self.release(&job_id);
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    j.set_state(JobState::Queued);
                    j.worker = None;
                    j.deadline = None;
                }
                self.queue.push_front(job_id);
            }
            return None;
        }
        for job_id in &ids {
            self.on_leased(&w.worker, job_id);
        }
        None
    }

    /// Leases `job_id` to `worker` with the GPUs `gpu_idx` (a new generation, its
    /// deadline, the worker's allocation) and returns the lease to send.
    fn lease_job(
        &mut self,
        worker: &WorkerId,
        job_id: &JobId,
        gpu_idx: Vec<usize>,
    ) -> Option<Lease> {
        let resident = self.is_resident(worker);
        let job = self.jobs.get_mut(job_id)?;
        if let Some(m) = &self.config.metrics {
            m.dispatch_latency
                .observe(job.queued_at.elapsed().as_secs_f64());
        }
        job.generation = self.generations.take(self.store.as_ref(), META_TREE);
        if let Some(mark) = self.generations.ahead() {
            let store = self.store.clone();
            self.fx.persist(Box::new(move || {
                let written = store
                    .put(META_TREE, generations::KEY, &mark.to_be_bytes())
                    .and_then(|()| store.flush());
                if let Err(e) = &written {
                    tracing::error!(error = %format!("{e:#}"), "reserving lease generations ahead");
                }
                Some(Event::GenerationsReserved(written.ok().map(|()| mark)))
            }));
        }
        *self.granted.entry(job.run_id.clone()).or_default() += 1;
        job.worker = Some(worker.clone());
        job.set_state(JobState::Leased);
        job.started = Some(Instant::now());
        job.deadline = self
            .config
            .lease_ttl
            .filter(|_| !resident)
            .map(|t| Instant::now() + t);
        if let Some(d) = job.deadline {
            self.deadlines.lease(d, job_id.clone(), job.generation);
        }
        let w = self.workers.get_mut(worker);
        let gpus: Vec<String> = w
            .as_ref()
            .map(|w| {
                gpu_idx
                    .iter()
                    .filter_map(|&g| w.info.profile.gpus.get(g).map(|x| x.uuid.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let lease = Lease {
            job: job.lease_spec(),
            generation: job.generation,
            attempt: job.attempt,
            gpus,
        };
        if let Some(w) = w {
            w.touched_gpus.extend(gpu_idx.iter().copied());
            let before = w.alloc.insert(
                job_id.clone(),
                Alloc {
                    cpus: job.spec.requirements.cpus.max(1),
                    memory: job.spec.requirements.memory,
                    gpus: gpu_idx,
                },
            );
            if before.is_none() {
                *self.held_by_run.entry(job.run_id.to_string()).or_default() += 1;
            }
        }
        Some(lease)
    }

    /// What follows a lease the worker received: replica bookkeeping, attempts on the
    /// step's record, a shard's status.
    fn on_leased(&mut self, worker: &WorkerId, job_id: &JobId) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let (run_id, step, shard, attempt) = (job.run_id.clone(), job.step, job.shard, job.attempt);
        tracing::debug!(job = %job_id, worker = %worker, attempt, "leased");
        if let Some(unit) = job.unit.clone() {
            self.on_replica_leased(&unit, worker);
        }
        if let Some(run) = self.runs.get_mut(&run_id) {
            match shard {
                None => run.records[step].attempts = attempt,
                Some(k) => run.records[step].shards[k].attempts = attempt,
            }
        }
        if let Some(k) = shard {
            self.set_shard_status(&run_id, step, k, StepStatus::Running);
        }
    }

    /// Fails step `i` of a run when no enrolled worker could ever run it and none of its
    /// jobs has started, dropping its queued jobs.
    pub(super) fn fail_unfit(&mut self, run_id: &str, i: usize) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        if run.records[i].status.is_final() {
            return;
        }
        let requirements = requirements_of(&run.ctx.pipeline.steps[i]);
        // A cluster scheduler with a provider (Slurm) has workers coming: the provider
        // fails the step when its pilots cannot run.
        if super::clusters::provided(&self.config, &requirements) {
            return;
        }
        let Some(why) = hardware::why_unfit(
            &requirements,
            self.workers
                .values()
                .filter(|w| !w.lost)
                .map(|w| (&w.info.profile, w.info.slots)),
        ) else {
            return;
        };
        if self
            .workers
            .values()
            .any(|w| !w.lost && w.info.profile.runtimes_pending)
        {
            // A worker still probing its runtimes may yet carry the labels this step
            // needs: look again once its profile has had time to arrive.
            self.fx
                .later(RUNTIMES_RECHECK, Event::UnfitCheck(run_id.to_string(), i));
            return;
        }
        self.fail_waiting_step(
            run_id,
            i,
            format!("no enrolled worker can run this step: {why}"),
        );
    }

    pub(super) fn record_outcome(&mut self, worker: &str, ok: bool) {
        if !self.config.throttle_failing_workers {
            return;
        }
        if let Some(w) = self.workers.get_mut(worker) {
            w.record(ok, worker);
            self.dirty_workers.insert(WorkerId::from(worker));
        }
    }

    /// Frees what a job held on its worker.
    pub(super) fn release(&mut self, job_id: &str) {
        let Some(worker) = self.jobs.get(job_id).and_then(|j| j.worker.clone()) else {
            return;
        };
        if let Some(w) = self.workers.get_mut(&worker)
            && w.alloc.remove(job_id).is_some()
        {
            self.unhold(job_id);
            // Capacity came back: someone waiting may fit now.
            self.dispatch();
        }
    }

    /// Counts `job_id` off its run's jobs held on workers (its allocation was freed).
    pub(super) fn unhold(&mut self, job_id: &str) {
        let Some(run) = self.jobs.get(job_id).map(|j| j.run_id.to_string()) else {
            return;
        };
        if let Some(n) = self.held_by_run.get_mut(&run) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held_by_run.remove(&run);
            }
        }
    }

    pub(super) fn on_heartbeat(
        &mut self,
        worker: &str,
        running: &[(JobId, u64)],
        profile: Option<Box<Profile>>,
    ) -> Vec<(JobId, u64)> {
        let ttl = self.config.lease_ttl;
        let Some(w) = self.workers.get_mut(worker) else {
            return running.to_vec();
        };
        w.last_seen = Instant::now();
        let back = w.lost;
        w.lost = false;
        let mut relabelled = false;
        if let Some(p) = profile {
            relabelled = p.labels != w.info.profile.labels;
            w.refresh_profile(*p);
        }
        if back {
            tracing::info!(worker, "worker is back");
            // Its reminder went when it was found lost.
            self.watch_silence(&WorkerId::from(worker));
        }
        let mut cancel = Vec::new();
        for (job_id, generation) in running {
            match self.jobs.get_mut(job_id) {
                Some(j)
                    if j.state == JobState::Leased
                        && j.generation == *generation
                        && j.worker.as_deref() == Some(worker) =>
                {
                    j.deadline = ttl.map(|t| Instant::now() + t);
                    let cancelled = self.runs.get(&j.run_id).is_some_and(|r| r.cancelled());
                    if cancelled {
                        cancel.push((job_id.clone(), *generation));
                    }
                }
                // Not this worker's any more (expired, finished, reassigned): stop that
                // attempt (only that one: the same job may be leased here again).
                _ => cancel.push((job_id.clone(), *generation)),
            }
        }
        if relabelled {
            // New labels (runtimes probed after enrolment): waiting jobs may fit now.
            self.dispatch();
        }
        cancel
    }

    /// A running job's progress: kept on its step's record (unsharded steps) and sent to
    /// the run's watchers, unless the job is not leased to `worker` under `generation`
    /// (a stale attempt, or a worker speaking of a job it does not hold).
    pub(super) fn on_job_progress(
        &mut self,
        worker: &str,
        job_id: &JobId,
        generation: u64,
        progress: nexa_shared::job::JobProgress,
    ) {
        let Some(j) = self.jobs.get(job_id) else {
            return;
        };
        if j.state != JobState::Leased
            || j.generation != generation
            || j.worker.as_deref() != Some(worker)
        {
            return;
        }
        self.record_progress(job_id, progress);
    }

    /// Keeps what a job said of its progress on its step's record (unless it is one
    /// shard of many) and tells the run's watchers; a repeat of the last word is kept
    /// quiet.
    pub(super) fn record_progress(
        &mut self,
        job_id: &JobId,
        progress: nexa_shared::job::JobProgress,
    ) {
        let Some(j) = self.jobs.get(job_id) else {
            return;
        };
        let (run_id, step, shard) = (j.run_id.clone(), j.step, j.shard_of());
        let Some(run) = self.runs.get_mut(&run_id) else {
            return;
        };
        if shard.is_none() {
            if run.records[step].progress.as_ref() == Some(&progress) {
                return;
            }
            run.records[step].progress = Some(progress.clone());
        }
        run.emit(Progress::Job {
            step: run.records[step].id.clone(),
            shard: shard.map(|(index, _)| index),
            progress,
        });
        if shard.is_none() {
            self.persist(&run_id, step);
        }
    }

    /// A worker whose leases never expire (the embedded one).
    fn is_resident(&self, worker: &str) -> bool {
        self.config.resident_workers.iter().any(|r| r == worker)
    }

    /// Sets the reminder to see whether `worker` fell silent, one ttl after it was last
    /// heard from (on the mesh; never for a resident worker, never a second one).
    pub(super) fn watch_silence(&mut self, worker: &WorkerId) {
        let Some(ttl) = self.config.lease_ttl else {
            return;
        };
        if self.is_resident(worker.as_str()) {
            return;
        }
        if let Some(w) = self.workers.get_mut(worker)
            && !w.reminded
        {
            w.reminded = true;
            self.deadlines.silence(w.last_seen + ttl, worker.clone());
        }
    }

    pub(super) fn on_tick(&mut self) {
        // Runs whose final state the store refused: try again.
        let unsaved: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, r)| matches!(r.phase(), RunPhase::Unsaved(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for run_id in unsaved {
            self.maybe_finish(&run_id);
        }
        // Waiters whose callers went away (dispatch skips the queue-less case).
        self.waiting.retain(|w| !w.reply.is_closed());
        let Some(ttl) = self.config.lease_ttl else {
            return;
        };
        let now = Instant::now();
        for id in self.deadlines.due_silences(now) {
            let resident = self.is_resident(&id);
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            w.reminded = false;
            if w.lost || resident {
                continue;
            }
            let due = w.last_seen + ttl;
            if now <= due {
                // Heard from since the reminder was set: remind again at the new time.
                w.reminded = true;
                self.deadlines.silence(due, id);
                continue;
            }
            w.lost = true;
            tracing::warn!(worker = %id, "worker lost: no heartbeat within the lease ttl");
        }
        let mut expired = Vec::new();
        for (job_id, generation) in self.deadlines.due_leases(now) {
            let Some(j) = self.jobs.get(&job_id) else {
                continue;
            };
            if j.state != JobState::Leased || j.generation != generation {
                // Finished, released or leased again since: another reminder (or none).
                continue;
            }
            match j.deadline {
                Some(d) if d < now => expired.push(job_id),
                Some(d) => self.deadlines.lease(d, job_id, generation),
                None => {}
            }
        }
        for job_id in expired {
            if self.drop_late_replica(&job_id) {
                self.refusals.count(Refused::LeaseExpired);
                continue;
            }
            self.release(&job_id);
            let Some(j) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            self.refusals.count(Refused::LeaseExpired);
            // A cancelled run's job is never leased again: its lease ending ends it.
            if self.runs.get(&j.run_id).is_some_and(|r| r.cancelled()) {
                tracing::info!(job = %job_id, "lease of a cancelled run's job expired; dropping it");
                self.job_failed(&job_id, "cancelled".into(), false);
                continue;
            }
            tracing::warn!(job = %job_id, worker = ?j.worker, generation = j.generation, "lease expired; requeueing");
            j.attempt += 1;
            j.set_state(JobState::Queued);
            if super::clusters::provided(&self.config, &j.spec.requirements) {
                self.demand_waker.notify_one();
            }
            j.worker = None;
            j.deadline = None;
            j.queued_at = Instant::now();
            if let Some(run) = self.runs.get(&j.run_id) {
                run.emit(Progress::Retry {
                    job: job_id.to_string(),
                    attempt: j.attempt,
                    delay: Duration::ZERO,
                    error: "lease expired (worker lost or unreachable)".into(),
                });
            }
            self.queue.push_back(job_id);
        }
        self.dispatch();
    }
}
