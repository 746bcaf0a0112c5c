//! The handle every caller holds: [`Coordinator`] sends [`Event`]s to the loop and
//! waits for its answers.

use super::*;

/// Why a result from a worker with no enrolled key is refused.
const NOT_ENROLLED: &str = "worker is not enrolled";

impl Coordinator {
    /// Starts the loop on the current tokio runtime.
    pub fn start(
        store: Arc<dyn Store>,
        config: EngineConfig,
    ) -> (Coordinator, tokio::task::JoinHandle<()>) {
        // The engine's own lane (its tasks, the sealer, the tick): unbounded, as each
        // event answers work the engine itself started. Callers' lane: bounded.
        let (tx, rx) = mpsc::unbounded_channel();
        let (calls, calls_rx) = mpsc::channel(CALLS);
        let cancels = Arc::new(Mutex::new(HashMap::new()));
        let tasks = crate::tasks::Tasks::start();
        // The tick expires leases (on the mesh) and retries what the store refused
        // (everywhere).
        {
            let tick = tx.clone();
            tasks.spawn("scheduler tick", async move {
                let mut every = tokio::time::interval(Duration::from_millis(250));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    if tick.send(Event::Tick).is_err() {
                        break;
                    }
                }
            });
        }
        let seal_tx = tx.clone();
        let sealer = SealQueue::start(
            store.clone(),
            Box::new(move |job, res| {
                let _ = seal_tx.send(Event::Sealed(job, res));
            }),
        );
        let fx = Box::new(effects::Spawned {
            tasks: tasks.clone(),
            tx: tx.clone(),
            sealer,
            writer: effects::Writer::start(tx.clone()),
        });
        let engine = Engine::new(store, config, fx, (rx, calls_rx), cancels.clone());
        let demand_waker = engine.demand_waker.clone();
        let handle = tokio::spawn(engine.run());
        let keys = Arc::new(std::sync::RwLock::new(HashMap::new()));
        (
            Coordinator {
                tx,
                calls,
                cancels,
                demand_waker,
                keys,
                tasks,
            },
            handle,
        )
    }

    /// The owner of the coordinator's background tasks: the mesh edge starts its own
    /// (progress relays, the metrics endpoint) through it too.
    pub fn tasks(&self) -> &crate::tasks::Tasks {
        &self.tasks
    }

    /// Queues a call without waiting: a full queue is an overload (UNAVAILABLE, which
    /// clients retry), never an unbounded backlog.
    pub(super) fn send(&self, e: Event) -> Result<()> {
        self.calls.try_send(e).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => Error::ShutDown,
        })
    }

    /// Queues a call, waiting while the queue is full (back-pressure on the caller).
    pub(super) async fn call(&self, e: Event) -> Result<()> {
        self.calls.send(e).await.map_err(|_| Error::ShutDown)
    }

    /// Submits a run; progress streams on the returned handle.
    pub async fn submit(&self, req: RunRequest) -> Result<RunHandle> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Submit(Box::new(req), tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)?
    }

    /// Enrols a worker under `id`.
    pub fn register_worker(&self, id: &str, info: WorkerInfo) -> Result<()> {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), info.key);
        self.send(Event::RegisterWorker(WorkerId::from(id), Box::new(info)))
    }

    /// Waits for a lease for `worker`; `None` when the coordinator shuts down.
    pub async fn lease(&self, worker: &str) -> Option<Lease> {
        let want = Want {
            slots: 1,
            wait: true,
        };
        self.lease_many(worker, want).await.into_iter().next()
    }

    /// Up to `want.slots` leases for `worker` in one answer: waits for the first when
    /// `want.wait` (empty: the coordinator shuts down), else answers at once.
    pub async fn lease_many(&self, worker: &str, want: Want) -> Vec<Lease> {
        let (tx, rx) = oneshot::channel();
        if self
            .call(Event::LeaseRequest(WorkerId::from(worker), want, tx))
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// A worker's heartbeat: it runs these `(job, generation)`; returns those it must
    /// kill, with their generations.
    /// `None` when the worker is banned (its heartbeat is refused).
    pub async fn heartbeat(
        &self,
        worker: &str,
        running: Vec<(JobId, u64)>,
        profile: Option<Profile>,
    ) -> Result<Option<Vec<(JobId, u64)>>> {
        let beat = Beat {
            running,
            services: Vec::new(),
            profile,
        };
        Ok(self.beat(worker, beat).await?.map(|a| a.cancel))
    }

    /// A worker's whole heartbeat: its attempts and its services. The answer lists the
    /// attempts to kill and the services to stop; `None` when the worker is banned.
    pub async fn beat(&self, worker: &str, beat: Beat) -> Result<Option<HeartbeatAnswer>> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Heartbeat(WorkerId::from(worker), Box::new(beat), tx))
            .await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Asks `worker` (through its next heartbeat) to stop the service that job
    /// `(job, generation)` started, SIGKILL after `grace`. False when no such service
    /// is held (it has stopped, or its worker never reported it).
    pub async fn stop_service(
        &self,
        worker: &str,
        job: JobId,
        generation: u64,
        grace: Duration,
    ) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::StopService(
            WorkerId::from(worker),
            job,
            generation,
            grace,
            tx,
        ))
        .await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// The waiting jobs of `scheduler`'s steps (`slurm`), one entry per shape: what a
    /// provider starts workers for.
    pub async fn demand(&self, scheduler: &str) -> Result<Vec<Demand>> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Demand(scheduler.to_string(), tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Resolves when jobs of a provided scheduler's steps have started waiting since
    /// the last time it resolved (a permit is kept when nobody waits), so a provider
    /// asks [`Coordinator::demand`] at once instead of at its next poll.
    pub async fn demand_changed(&self) {
        self.demand_waker.notified().await
    }

    /// Fails these steps `(run, index)` with `reason` if none of their jobs has
    /// started: a provider's workers cannot run them (Slurm refused or will never
    /// start their pilots).
    pub async fn fail_steps(&self, steps: Vec<(String, usize)>, reason: String) -> Result<()> {
        self.call(Event::FailSteps(steps, reason)).await
    }

    /// The services running on workers, as their heartbeats last said.
    pub async fn services(&self) -> Result<Vec<ServiceView>> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Services(tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Reports a job result. The signature is checked here, on the caller's thread,
    /// against the key the worker enrolled with; the loop acts on the verdict.
    pub fn job_progress(
        &self,
        worker: &str,
        job: JobId,
        generation: u64,
        progress: nexa_shared::job::JobProgress,
    ) -> Result<()> {
        self.send(Event::JobProgress(
            WorkerId::from(worker),
            job,
            generation,
            Box::new(progress),
        ))
    }

    /// Reports a finished job (fire-and-forget).
    pub fn report(&self, worker: &str, result: JobResult) -> Result<()> {
        let verdict = self.verify(worker, &result);
        self.send(Event::Report(
            WorkerId::from(worker),
            Box::new(result),
            verdict,
            None,
        ))
    }

    /// [`Coordinator::report`], waiting for the verdict: `Ok` when the result was
    /// admitted (it may still fail sealing), or why it was refused.
    pub async fn report_judged(
        &self,
        worker: &str,
        result: JobResult,
    ) -> Result<std::result::Result<(), String>> {
        let verdict = self.verify(worker, &result);
        self.judge(worker, result, verdict)
            .await?
            .await
            .map_err(|_| Error::ShutDown)
    }

    /// [`Coordinator::report_judged`] for many results of one worker: their signatures
    /// checked as one batch ([`signing::verify_results`]), then each judged by the loop
    /// in order; one verdict each, in order.
    pub async fn report_batch(
        &self,
        worker: &str,
        results: Vec<JobResult>,
    ) -> Result<Vec<std::result::Result<(), String>>> {
        let signed: Vec<std::result::Result<(), String>> = match self.enrolled_key(worker) {
            None => vec![Err(NOT_ENROLLED.to_string()); results.len()],
            Some(key) => {
                let refs: Vec<&JobResult> = results.iter().collect();
                signing::verify_results(&key, &refs)
                    .into_iter()
                    .map(|v| v.map_err(|e| e.to_string()))
                    .collect()
            }
        };
        let mut answers = Vec::with_capacity(results.len());
        for (result, verdict) in results.into_iter().zip(signed) {
            answers.push(self.judge(worker, result, verdict).await?);
        }
        let mut verdicts = Vec::with_capacity(answers.len());
        for rx in answers {
            verdicts.push(rx.await.map_err(|_| Error::ShutDown)?);
        }
        Ok(verdicts)
    }

    /// Hands `result`, with the verdict on its signature, to the loop to judge; the
    /// receiver gets the loop's verdict.
    async fn judge(
        &self,
        worker: &str,
        result: JobResult,
        signature: std::result::Result<(), String>,
    ) -> Result<oneshot::Receiver<std::result::Result<(), String>>> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Report(
            WorkerId::from(worker),
            Box::new(result),
            signature,
            Some(tx),
        ))
        .await?;
        Ok(rx)
    }

    /// The key `worker` enrolled with.
    fn enrolled_key(&self, worker: &str) -> Option<[u8; 32]> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(worker)
            .copied()
    }

    /// Checks `result`'s signature against the key `worker` enrolled with.
    pub(super) fn verify(
        &self,
        worker: &str,
        result: &JobResult,
    ) -> std::result::Result<(), String> {
        match self.enrolled_key(worker) {
            None => Err(NOT_ENROLLED.to_string()),
            Some(key) => signing::verify_result(&key, result).map_err(|e| e.to_string()),
        }
    }

    /// Whether `(job, generation)` is leased to `worker` now (and its run not cancelled).
    /// Only answers: the caller decides what a refusal counts as.
    pub async fn lease_live(&self, worker: &str, job: &str, generation: u64) -> Result<LeaseCheck> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::LeaseLive(
            WorkerId::from(worker),
            JobId::from(job),
            generation,
            tx,
        ))
        .await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Cancels a run: queued jobs are dropped, running ones killed, state saved.
    pub fn cancel(&self, run_id: &str) -> Result<()> {
        // The loop marks the run cancelled before it signals workers, so a job's
        // "cancelled" report always finds the run already cancelled.
        self.send(Event::Cancel(run_id.to_string()))
    }

    /// A signal that turns `true` when `run_id` is cancelled.
    pub fn cancellation(&self, run_id: &str) -> watch::Receiver<bool> {
        let mut g = self.lock_cancels();
        g.entry(run_id.to_string())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    /// Counts a refusal the gRPC edge made itself.
    pub fn count_refusal(&self, kind: EdgeRefusal) {
        if let Err(e) = self.send(Event::Refused(kind)) {
            tracing::warn!(error = %e, ?kind, "a refusal went uncounted");
        }
    }

    /// Results refused so far, by reason.
    pub async fn refusals(&self) -> Result<Refusals> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Refusals(tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Replication so far: (units run under validation, replica jobs made for them).
    /// `replicas / units - 1` is the extra work validation cost.
    pub async fn replication(&self) -> Result<(u64, u64)> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Replication(tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Gauges for the metrics endpoint; an answer also shows the loop is alive.
    pub async fn snapshot(&self) -> Result<crate::metrics::Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::Snapshot(tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Every enrolled worker, by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerView>> {
        let page = WorkerPage {
            after: None,
            limit: usize::MAX,
        };
        Ok(self.worker_page(page).await?.0)
    }

    /// One page of the workers, by id, and how many are enrolled in all.
    pub async fn worker_page(&self, page: WorkerPage) -> Result<(Vec<WorkerView>, usize)> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::ListWorkers(page, tx)).await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Drains, bans or re-activates a worker; false when there is no such worker.
    pub async fn set_worker_state(&self, worker: &str, state: AdminState) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.call(Event::SetWorkerState(worker.to_string(), state, tx))
            .await?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Stops the loop; waiting workers get `None`.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }

    pub(super) fn lock_cancels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine {
    /// The scheduler's state as the store left it, acting through `fx` and fed by `rx`.
    pub(super) fn new(
        store: Arc<dyn Store>,
        config: EngineConfig,
        fx: Box<dyn effects::Effects>,
        (rx, calls): (mpsc::UnboundedReceiver<Event>, mpsc::Receiver<Event>),
        cancels: Arc<Mutex<HashMap<String, watch::Sender<bool>>>>,
    ) -> Engine {
        let generations = generations::Generations::start(store.as_ref(), META_TREE);
        // Workers known before a restart come back offline, with their admin state and
        // record, until they enrol again.
        let workers: HashMap<WorkerId, Worker> = match state::load_workers(store.as_ref()) {
            Ok(records) => records
                .into_iter()
                .filter_map(|r| {
                    let id = WorkerId::from(r.id.as_str());
                    Worker::from_record(r).map(|w| (id, w))
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "loading worker records");
                HashMap::new()
            }
        };
        let refusals: Refusals = match store.get(META_TREE, REFUSALS_KEY) {
            Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading the refusal counters; starting from zero");
                Refusals::default()
            }),
            Ok(None) => Refusals::default(),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the refusal counters; starting from zero");
                Refusals::default()
            }
        };
        Engine {
            saved_refusals: Some(refusals),
            submitting: HashMap::new(),
            dirty_runs: Vec::new(),
            dirty_workers: Default::default(),
            votes: HashMap::new(),
            decided: HashMap::new(),
            replication: Default::default(),
            rng: {
                use rand_core::RngCore;
                rand_core::OsRng.next_u64() | 1
            },
            config,
            fx,
            granted: HashMap::new(),
            held_by_run: HashMap::new(),
            deadlines: Default::default(),
            store,
            rx,
            calls,
            cancels,
            workers,
            runs: HashMap::new(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            waiting: VecDeque::new(),
            generations,
            refusals,
            blame: blame::Blame::default(),
            demand_waker: Arc::default(),
        }
    }
}
