//! Runs and steps: submitting a run, the write-behind of step records, planning
//! results, and turning a ready step into jobs.

use super::*;
use run::Unmade;

impl Engine {
    /// Takes a submitted run: its records are written on the write-behind thread, and
    /// only once they are (`on_submit_saved`) does it start and the caller hear of it.
    pub(super) fn submit(&mut self, req: RunRequest, reply: oneshot::Sender<Result<RunHandle>>) {
        match self.prepare(req) {
            Ok((run, handle)) => {
                let run_id = handle.run_id.clone();
                let (store, pipeline) = (self.store.clone(), run.ctx.pipeline.name.clone());
                let records = run.records.clone();
                let rec = RunRecord {
                    run_id: run_id.to_string(),
                    pipeline: pipeline.clone(),
                    started_at: run.started_at.clone(),
                    finished_at: None,
                    outcome: state::RunState::Running,
                };
                self.submitting.insert(run_id.clone(), (run, handle, reply));
                self.fx.persist(Box::new(move || {
                    let refs: Vec<&StepRecord> = records.iter().collect();
                    let saved = state::save_steps(store.as_ref(), &pipeline, &refs)
                        .and_then(|_| state::save_run(store.as_ref(), &rec));
                    Some(Event::SubmitSaved(run_id, saved))
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// A submitted run's records reached the store: it starts. Or they did not: the
    /// submit is refused and nothing of it runs.
    pub(super) fn on_submit_saved(&mut self, run_id: &str, saved: Result<()>) {
        let Some((run, handle, reply)) = self.submitting.remove(run_id) else {
            return;
        };
        if let Err(e) = saved {
            self.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(run_id);
            let _ = reply.send(Err(e));
            return;
        }
        let mut run = run;
        run.set_phase(RunPhase::Running);
        tracing::info!(run = %run_id, pipeline = %run.ctx.pipeline.name, steps = run.records.len(), "run submitted");
        self.runs.insert(RunId::from(run_id), run);
        self.plan_prefix(run_id);
        let _ = reply.send(Ok(handle));
    }

    /// A submitted run as the engine keeps it, and the caller's handle to it.
    fn prepare(&mut self, req: RunRequest) -> Result<(Run, RunHandle)> {
        let run_id = req.run_id.clone().unwrap_or_else(new_run_id);
        if self.runs.contains_key(&run_id) || self.submitting.contains_key(&run_id) {
            return Err(Error::Conflict(format!("run {run_id} is already active")));
        }
        let p = &req.loaded.pipeline;
        let n = p.steps.len();
        let mut forced = vec![false; n];
        if let Some(from) = &req.from {
            let i = p
                .steps
                .iter()
                .position(|s| &s.id.value == from)
                .ok_or_else(|| {
                    Error::NotFound(format!("no step '{from}' in pipeline '{}'", p.name))
                })?;
            for d in req.loaded.dag.downstream(i) {
                forced[d] = true;
            }
        }
        let project = std::path::absolute(&req.project)
            .map_err(|e| Error::Domain(nexa_shared::Error::io("resolve", &req.project, e)))?;
        let state_dir = project
            .join(".nexa_state")
            .join(paths::safe_component(&p.name));
        let records: Vec<StepRecord> = p
            .steps
            .iter()
            .map(|s| StepRecord::pending(&s.id.value, &run_id))
            .collect();
        let (ptx, prx) = mpsc::channel(self.config.progress_lines.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        let ctx = RunContext {
            run_id: run_id.to_string(),
            pipeline: req.loaded.pipeline,
            dag: req.loaded.dag,
            project,
            state_dir,
            verify: req.verify,
            forced,
            git_sha: req.git_sha,
            confined: req.confined,
        };
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(run_id.to_string())
            .or_insert_with(|| watch::channel(false).0);
        let run = Run::submitted(ctx, records, ptx, done_tx, now_rfc3339());
        Ok((run, RunHandle::new(run_id, prx, done_rx)))
    }

    /// Plans every PENDING step whose dependencies are all done.
    pub(super) fn schedule_ready(&mut self, run_id: &str, candidates: Option<&[usize]>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.cancelled() {
            return;
        }
        let all: Vec<usize>;
        let candidates = match candidates {
            Some(c) => c,
            None => {
                all = (0..run.records.len()).collect();
                &all
            }
        };
        let ready: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| {
                run.records[i].status == StepStatus::Pending
                    && !run.busy[i]
                    && run.ctx.dag.deps[i]
                        .iter()
                        .all(|&d| run.records[d].status.is_done())
            })
            .collect();
        for i in ready {
            run.busy[i] = true;
            run.in_flight += 1;
            let ctx = run.ctx.clone();
            let done = run.upstream_outputs(i);
            let rid = run_id.to_string();
            tasks::blocking(
                self.fx.as_ref(),
                move || planner::plan_step(&ctx, i, &done),
                move |plan| {
                    let plan = plan.unwrap_or_else(|why| Plan::Failed {
                        cache_key: None,
                        error: format!("planning the step {why}"),
                    });
                    Event::Planned(rid, i, plan)
                },
            );
        }
    }

    /// Moves shard `k` of step `i` to `status` and tells the run's watchers; a final
    /// status is persisted and may settle the step (all its shards final).
    pub(super) fn set_shard_status(
        &mut self,
        run_id: &str,
        i: usize,
        k: usize,
        status: StepStatus,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let s = &mut run.records[i].shards[k];
        match (s.status.is_final(), status.is_final()) {
            (false, true) => run.shards_open[i] = run.shards_open[i].saturating_sub(1),
            (true, false) => run.shards_open[i] += 1,
            _ => {}
        }
        s.status = status;
        let index = s.index;
        run.emit(Progress::Shard {
            step: run.records[i].id.clone(),
            index,
            status,
        });
        self.persist_shard(run_id, i, k);
        if status.is_final() {
            self.persist(run_id, i);
            if self.runs.get(run_id).is_some_and(|r| r.unmade[i].left > 0) {
                self.make_shard_jobs(run_id, i);
                self.dispatch();
            }
            self.shard_settled(run_id, i);
        }
    }

    pub(super) fn set_status(
        &mut self,
        run_id: &str,
        i: usize,
        status: StepStatus,
        detail: Option<String>,
    ) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let rec = &mut run.records[i];
        match (rec.status.is_final(), status.is_final()) {
            (false, true) => run.unfinished -= 1,
            (true, false) => run.unfinished += 1,
            _ => {}
        }
        rec.status = status;
        if matches!(
            status,
            StepStatus::Failed | StepStatus::Blocked | StepStatus::Cancelled
        ) {
            rec.error = detail.clone();
        } else if status != StepStatus::Running {
            rec.error = None;
        }
        let id = rec.id.clone();
        run.emit(Progress::Step {
            step: id,
            status,
            detail,
        });
        self.persist(run_id, i);
    }

    pub(super) fn snapshot(&self) -> crate::metrics::Snapshot {
        let now = Instant::now();
        let mut s = crate::metrics::Snapshot::default();
        for w in self.workers.values() {
            *s.workers_by_state.entry(w.state(now)).or_default() += 1;
            if w.lost {
                continue;
            }
            let model = w
                .info
                .profile
                .gpus
                .first()
                .map_or("none".to_string(), |g| g.name.clone());
            *s.workers_by_gpu_model.entry(model).or_default() += 1;
            let held: Vec<usize> = w.alloc.values().flat_map(|a| a.gpus.clone()).collect();
            for (i, g) in w.info.profile.gpus.iter().enumerate() {
                if !held.contains(&i) {
                    s.gpus_available += 1;
                    s.gpu_memory_available_bytes +=
                        i64::try_from(g.memory_free).unwrap_or(i64::MAX);
                }
            }
        }
        for j in self.jobs.values() {
            let n = match j.state {
                JobState::Queued => &mut s.jobs.queued,
                JobState::Backoff => &mut s.jobs.backoff,
                JobState::Leased => &mut s.jobs.leased,
                JobState::Sealing => &mut s.jobs.sealing,
            };
            *n += 1;
        }
        s.jobs.queued += self.unmade_jobs() as i64;
        s.runs_active = self.runs.len() as i64;
        s
    }

    /// Marks a step record (without its shards) for the next write-behind round.
    pub(super) fn persist(&mut self, run_id: &str, i: usize) {
        if let Some(run) = self.dirty_run(run_id) {
            run.dirty.push(i);
        }
    }

    /// The run `run_id`, listed for the next write-behind round (what of it to write
    /// is for the caller to add).
    fn dirty_run(&mut self, run_id: &str) -> Option<&mut Run> {
        let run = self.runs.get_mut(run_id)?;
        if run.is_clean() {
            self.dirty_runs.push(run_id.to_string());
        }
        Some(run)
    }

    /// Marks shard `k` of step `i` for the next write-behind round (that shard alone:
    /// a fan-out's round writes what changed, not every shard again).
    pub(super) fn persist_shard(&mut self, run_id: &str, i: usize, k: usize) {
        if let Some(run) = self.dirty_run(run_id) {
            run.dirty_shards.push((i, k));
        }
    }

    /// Marks step `i` to be written whole, every shard with it (its shards were
    /// replaced: planned, or cleared).
    pub(super) fn persist_all_shards(&mut self, run_id: &str, i: usize) {
        if let Some(run) = self.dirty_run(run_id) {
            run.reset_shards.push(i);
        }
    }

    /// Queues a write of every step record changed since the last round, one batch per
    /// run, and of the mirrors that are due, on the write-behind thread. Runs after each
    /// burst of events, so a busy coordinator writes once per burst rather than once per
    /// change. What the store refuses comes back as [`Event::Unsaved`] and is written
    /// again in the next round: a store that failed once (a full disk, an I/O error) is
    /// caught up when it works.
    pub(super) fn flush_dirty(&mut self) {
        // A slow disk: the writer is behind, so this round waits (what is dirty stays
        // dirty, and is written whole by a later round: the tick makes one at least
        // every 250 ms).
        if self.fx.backlog() >= effects::WRITE_BACKLOG {
            return;
        }
        if self.saved_refusals != Some(self.refusals) {
            self.saved_refusals = Some(self.refusals);
            let (store, refusals) = (self.store.clone(), self.refusals);
            self.fx.persist(Box::new(move || {
                let saved = serde_json::to_vec(&refusals)
                    .map_err(crate::Error::from)
                    .and_then(|b| store.put(META_TREE, REFUSALS_KEY, &b));
                let e = saved.err()?;
                tracing::error!(error = %format!("{e:#}"), "saving the refusal counters");
                Some(Event::Unsaved(Unsaved::Refusals))
            }));
        }
        if !self.dirty_workers.is_empty() {
            let ids: Vec<WorkerId> = std::mem::take(&mut self.dirty_workers)
                .into_iter()
                .collect();
            let recs: Vec<state::WorkerRecord> = ids
                .iter()
                .filter_map(|id| self.workers.get(id).map(|w| w.record_of(id)))
                .collect();
            let store = self.store.clone();
            self.fx.persist(Box::new(move || {
                let e = state::save_workers(store.as_ref(), &recs).err()?;
                tracing::error!(error = %format!("{e:#}"), "saving worker records; retried with the next round");
                Some(Event::Unsaved(Unsaved::Workers(ids)))
            }));
        }
        for run_id in std::mem::take(&mut self.dirty_runs) {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let mut dirty = std::mem::take(&mut run.dirty);
            let mut reset = std::mem::take(&mut run.reset_shards);
            let mut shards = std::mem::take(&mut run.dirty_shards);
            for v in [&mut dirty, &mut reset] {
                v.sort_unstable();
                v.dedup();
            }
            shards.sort_unstable();
            shards.dedup();
            // Steps whose shards were replaced go whole; the others without their
            // shards (a cheap copy), with only the shards that changed.
            let whole: Vec<StepRecord> = reset.iter().map(|&i| run.records[i].clone()).collect();
            let bare: Vec<StepRecord> = dirty
                .iter()
                .filter(|i| reset.binary_search(i).is_err())
                .map(|&i| without_shards(&mut run.records[i]))
                .collect();
            let changed: Vec<(String, state::ShardRecord)> = shards
                .iter()
                .filter(|(i, _)| reset.binary_search(i).is_err())
                .filter_map(|&(i, k)| {
                    let rec = &run.records[i];
                    rec.shards.get(k).map(|s| (rec.id.clone(), s.clone()))
                })
                .collect();
            let mut touched = dirty;
            touched.extend(reset);
            touched.extend(shards.iter().map(|&(i, _)| i));
            touched.sort_unstable();
            touched.dedup();
            let (store, pipeline) = (self.store.clone(), run.ctx.pipeline.name.clone());
            self.fx.persist(Box::new(move || {
                let refs: Vec<&StepRecord> = whole.iter().collect();
                let e = state::save_steps(store.as_ref(), &pipeline, &refs)
                    .and_then(|()| state::save_progress(store.as_ref(), &pipeline, &bare, &changed))
                    .err()?;
                tracing::error!(error = %format!("{e:#}"), run = %run_id, "saving step state; retried with the next round");
                Some(Event::Unsaved(Unsaved::Steps(run_id, touched)))
            }));
            // The mirror is rewritten whole: space the writes out as the pipeline grows
            // (every 250 ms up to 1,000 steps and shards, proportionally longer beyond).
            let size =
                run.records.len() + run.records.iter().map(|r| r.shards.len()).sum::<usize>();
            let every = Duration::from_millis(250) * (size / 1000).max(1) as u32;
            if run.last_mirror.is_none_or(|t| t.elapsed() >= every) {
                write_mirror(self.fx.as_ref(), run);
            }
        }
    }

    /// A write the store refused: written again in the next round.
    pub(super) fn on_unsaved(&mut self, what: Unsaved) {
        match what {
            Unsaved::Refusals => self.saved_refusals = None,
            Unsaved::Workers(ids) => self.dirty_workers.extend(ids),
            Unsaved::Steps(run_id, steps) => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if run.is_clean() {
                    self.dirty_runs.push(run_id);
                }
                // Written whole next round: which of their shards changed is not kept.
                run.dirty.extend(steps.iter().copied());
                run.reset_shards.extend(steps);
            }
        }
    }

    pub(super) fn on_planned(&mut self, run_id: &str, i: usize, plan: Plan) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.busy[i] = false;
        run.in_flight -= 1;
        self.apply_plan(run_id, i, plan);
        self.maybe_finish(run_id);
    }

    /// Plans, in one blocking task, every step reachable from the roots through steps
    /// that turn out SKIPPED: a fully cached pipeline is decided in one pass instead of
    /// one round trip per step. Steps it does not reach are planned as they get ready.
    pub(super) fn plan_prefix(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.busy.iter_mut().for_each(|b| *b = true);
        run.in_flight += 1;
        let ctx = run.ctx.clone();
        let rid = run_id.to_string();
        // A batch that panicked plans nothing: its steps are then planned one by one,
        // and a step whose planning panics again fails with the reason.
        tasks::blocking(
            self.fx.as_ref(),
            move || {
                let order = ctx.dag.topo_order().unwrap_or_default();
                let mut done: BTreeMap<usize, BTreeMap<String, ArtifactInfo>> = BTreeMap::new();
                let mut plans = Vec::new();
                for i in order {
                    let deps = &ctx.dag.deps[i];
                    if !deps.iter().all(|d| done.contains_key(d)) {
                        continue;
                    }
                    let upstream = deps
                        .iter()
                        .filter_map(|d| done.get(d).map(|o| (*d, o.clone())))
                        .collect();
                    let plan = planner::plan_step(&ctx, i, &upstream);
                    if let Plan::Skipped { outputs, .. } = &plan {
                        done.insert(i, outputs.clone());
                    }
                    plans.push((i, plan));
                }
                plans
            },
            move |plans| Event::PlannedBatch(rid, plans.unwrap_or_default()),
        );
    }

    pub(super) fn on_planned_batch(&mut self, run_id: &str, plans: Vec<(usize, Plan)>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.in_flight -= 1;
        // Every step stays busy while the batch is applied, so nothing is planned twice.
        for (i, plan) in plans {
            self.apply_plan(run_id, i, plan);
        }
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        // The whole prefix shows in the mirror at the next write-behind round.
        run.last_mirror = None;
        run.busy.iter_mut().for_each(|b| *b = false);
        // Nothing is busy now: every step not started of a cancelled run is cancelled.
        if run.cancelled() {
            self.cancel_pending(run_id);
        }
        self.schedule_ready(run_id, None);
        self.maybe_finish(run_id);
    }

    pub(super) fn apply_plan(&mut self, run_id: &str, i: usize, plan: Plan) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.cancelled() {
            self.set_status(
                run_id,
                i,
                StepStatus::Cancelled,
                Some("run cancelled".into()),
            );
            return;
        }
        match plan {
            Plan::Skipped { cache_key, outputs } => {
                run.records[i].cache_key = Some(cache_key);
                run.records[i].outputs = outputs;
                if !run.records[i].shards.is_empty() {
                    run.records[i].shards.clear();
                    self.persist_all_shards(run_id, i);
                }
                self.set_status(run_id, i, StepStatus::Skipped, Some("cache hit".into()));
                self.step_done(run_id, i);
            }
            Plan::Failed { cache_key, error } => {
                run.records[i].cache_key = cache_key;
                self.step_failed(run_id, i, error);
            }
            Plan::Run(plan) => self.start_step(run_id, i, plan),
        }
    }

    pub(super) fn job_inputs(
        plan: &StepPlan,
        replace: Option<&planner::ResolvedInput>,
    ) -> Vec<JobInput> {
        plan.inputs
            .iter()
            .map(|r| {
                let r = match replace {
                    Some(p) if p.name == r.name => p,
                    _ => r,
                };
                JobInput {
                    name: r.name.clone(),
                    digest: r.digest.clone().into(),
                    is_dir: r.is_dir,
                    source: r.path.clone(),
                    range: r.range.clone(),
                }
            })
            .collect()
    }

    pub(super) fn start_step(&mut self, run_id: &str, i: usize, plan: Arc<StepPlan>) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if nexa_shared::handlers::runs_on_coordinator(&run.ctx.pipeline.steps[i].uses.value) {
            self.run_on_coordinator(run_id, i, plan);
            return;
        }
        let requirements = requirements_of(&run.ctx.pipeline.steps[i]);
        let provided = super::clusters::provided(&self.config, &requirements);
        // A job no enrolled worker could ever run fails, saying why, instead of waiting
        // forever: at once embedded, after a grace period for workers to join on a mesh;
        // a provided scheduler's job waits for the workers its provider starts.
        if !provided
            && hardware::why_unfit(
                &requirements,
                self.workers
                    .values()
                    .filter(|w| !w.lost)
                    .map(|w| (&w.info.profile, w.info.slots)),
            )
            .is_some()
        {
            if self.config.unfit_grace.is_zero() {
                run.records[i].cache_key = Some(plan.cache_key.clone());
                self.fail_unfit(run_id, i);
                return;
            }
            self.fx.later(
                self.config.unfit_grace,
                Event::UnfitCheck(run_id.to_string(), i),
            );
        }
        let step = &run.ctx.pipeline.steps[i];
        let rec = &mut run.records[i];
        rec.cache_key = Some(plan.cache_key.clone());
        rec.outputs.clear();
        rec.attempts = 0;
        rec.worker = None;
        rec.log = None;
        rec.progress = None;
        // One spec for the step, shared by its shard jobs (each one's own spec is made
        // from it and the plan when it is leased).
        let base = Arc::new(JobSpec {
            job_id: JobId::for_step(run_id, &step.id.value),
            run_id: RunId::from(run_id),
            step_id: step.id.value.clone(),
            shard: None,
            uses: step.uses.value.clone(),
            params: if nexa_shared::runners::is_runner(&step.uses.value) {
                nexa_shared::runners::job_params(
                    &step.uses.value,
                    step.backend.as_deref(),
                    &step.params,
                )
            } else {
                step.params.clone()
            },
            inputs: Self::job_inputs(&plan, None),
            outputs: plan.outputs.keys().cloned().collect(),
            timeout: step.timeout,
            requirements,
        });
        let had_shards = !rec.shards.is_empty();
        let mut unmade = 0;
        match &plan.shards {
            None => {
                run.shards_open[i] = 0;
                rec.shards.clear();
            }
            Some(set) => {
                let units = &set.units;
                let count = units.len() as u32;
                rec.shards = units
                    .iter()
                    .map(|u| ShardRecord {
                        index: u.index,
                        status: if u.cached.is_some() {
                            StepStatus::Skipped
                        } else {
                            StepStatus::Pending
                        },
                        cache_key: Some(u.cache_key()),
                        hash: u.cached.as_ref().map(|c| c.hash.clone()),
                        worker: u.cached.as_ref().and_then(|c| c.worker.clone()),
                        attempts: 0,
                        error: None,
                    })
                    .collect();
                unmade = units.iter().filter(|u| u.cached.is_none()).count();
                run.shards_open[i] = unmade;
                run.emit(Progress::Shards {
                    step: step.id.value.clone(),
                    count,
                    cached: (units.len() - unmade) as u32,
                });
            }
        }
        // Shards made (or an earlier plan's cleared): the step is written whole once;
        // later rounds write the shards that change.
        let planned_shards = plan.shards.is_some() || had_shards;
        let sharded = plan.shards.is_some();
        run.plans[i] = Some(plan);
        run.unmade[i] = Unmade {
            next: 0,
            left: unmade,
            spec: sharded.then(|| base.clone()),
        };
        if planned_shards {
            self.persist_all_shards(run_id, i);
        }
        self.set_status(run_id, i, StepStatus::Running, None);
        if sharded && unmade == 0 {
            // Every shard came from cache: assemble straight away.
            self.start_assembly(run_id, i);
            return;
        }
        self.wake_provider(&base.requirements);
        if sharded {
            // The first window of shard jobs; the rest as these end.
            self.make_shard_jobs(run_id, i);
        } else {
            let id = base.job_id.clone();
            self.queue_job(run_id, (i, None), id, base);
        }
        self.dispatch();
    }

    /// Makes job `id` (step `i`, shard `k` of the plan's units) and queues it: with
    /// the step's `validation`, as the first replica of its unit (the other replicas are
    /// made when it is leased to a worker that is not trusted).
    pub(super) fn queue_job(
        &mut self,
        run_id: &str,
        (i, shard): (usize, Option<usize>),
        mut id: JobId,
        spec: Arc<JobSpec>,
    ) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let plan = shard.and(run.plans[i].clone());
        let validation = run.ctx.pipeline.steps[i]
            .validation
            .or(self.config.default_validation);
        let unit = validation.map(|v| {
            let unit = id.to_string();
            id = JobId::replica(&unit, 0);
            self.votes
                .insert(unit.clone(), replication::Vote::new(v, spec.uses.clone()));
            self.replication.units += 1;
            self.replication.replicas += 1;
            unit
        });
        let job = Job::queued((id.clone(), run_id), (i, shard), (spec, plan), unit);
        self.jobs.insert(id.clone(), job);
        self.queue.push_back(id);
    }
}

/// A copy of `rec` without its shards (they are written on their own), made without
/// copying them.
fn without_shards(rec: &mut StepRecord) -> StepRecord {
    let shards = std::mem::take(&mut rec.shards);
    let copy = rec.clone();
    rec.shards = shards;
    copy
}
