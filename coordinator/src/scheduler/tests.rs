//! The engine's decisions under paused time: an [`Engine`] fed by hand, acting through
//! synchronous in-process [`Effects`] (work runs inline, sealing on the calling thread,
//! timers kept in a list that [`Harness::advance`] fires), on tokio's paused clock. No
//! runtime task, no thread, no sleep: each test runs in milliseconds and decides the
//! same way every time.

use super::effects::{Effects, Work};
use super::*;
use crate::MemStore;
use crate::sealing::group::{self, SealTask};
use nexa_shared::job::{Outcome, OutputFile};

/// A timer the engine set: when it fires, and what it delivers.
type Timers = Arc<Mutex<Vec<(Instant, Event)>>>;

/// Effects that run everything at once on the caller's thread.
struct Inline {
    tx: mpsc::UnboundedSender<Event>,
    store: Arc<dyn Store>,
    timers: Timers,
    /// The writer's backlog the engine is shown (a slow disk, when set high).
    backlog: Arc<std::sync::atomic::AtomicUsize>,
}

impl Effects for Inline {
    fn spawn(&self, work: Work) {
        if let Some(ev) = work() {
            let _ = self.tx.send(ev);
        }
    }

    fn later(&self, delay: Duration, event: Event) {
        self.timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now() + delay, event));
    }

    fn persist(&self, write: super::effects::Write) {
        if let Some(ev) = write() {
            let _ = self.tx.send(ev);
        }
    }

    fn drain(&self) {}

    fn backlog(&self) -> usize {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn seal(&self, task: SealTask) -> bool {
        let tx = self.tx.clone();
        group::seal_one(
            task,
            self.store.as_ref(),
            &(Box::new(move |job, res| {
                let _ = tx.send(Event::Sealed(job, res));
            }) as group::Done),
        );
        true
    }
}

/// An engine, its timers and a project directory.
/// The answer to a lease request the harness sent.
pub(super) struct Asked(oneshot::Receiver<Vec<Lease>>);

impl Asked {
    /// The first lease granted, `None` for an empty answer (the loop stopped, or nothing
    /// fitted a request that does not wait); an error while none came yet.
    pub(super) fn try_recv(&mut self) -> Result<Option<Lease>, oneshot::error::TryRecvError> {
        self.0.try_recv().map(|v| v.into_iter().next())
    }

    /// Every lease granted in the answer.
    pub(super) fn all(&mut self) -> Vec<Lease> {
        self.0.try_recv().expect("an answer at once")
    }
}

pub(super) struct Harness {
    pub(super) engine: Engine,
    timers: Timers,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    store: Arc<dyn Store>,
    pub(super) project: tempfile::TempDir,
}

impl Harness {
    pub(super) fn new(config: EngineConfig) -> Harness {
        let store: Arc<dyn Store> = Arc::new(MemStore::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let timers: Timers = Arc::default();
        let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fx = Box::new(Inline {
            tx,
            store: store.clone(),
            timers: timers.clone(),
            backlog: backlog.clone(),
        });
        // Callers' lane unused: the tests hand events to the engine directly.
        let (_, calls) = mpsc::channel(1);
        let engine = Engine::new(store.clone(), config, fx, (rx, calls), Arc::default());
        Harness {
            engine,
            timers,
            backlog,
            store,
            project: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A mesh-like engine: leases live `ttl` without a heartbeat.
    pub(super) fn mesh(ttl: Duration) -> Harness {
        Harness::new(EngineConfig {
            lease_ttl: Some(ttl),
            unfit_grace: Duration::from_secs(60),
            ..EngineConfig::embedded()
        })
    }

    /// Handles `ev` and everything it caused, then the write-behind round.
    pub(super) fn send(&mut self, ev: Event) {
        self.engine.handle(ev);
        while let Ok(ev) = self.engine.rx.try_recv() {
            self.engine.handle(ev);
        }
        self.engine.flush_dirty();
        // Every engine test checks the running count fair share reads.
        let mut held: HashMap<String, usize> = HashMap::new();
        for w in self.engine.workers.values() {
            for job_id in w.alloc.keys() {
                if let Some(j) = self.engine.jobs.get(job_id) {
                    *held.entry(j.run_id.to_string()).or_default() += 1;
                }
            }
        }
        assert_eq!(self.engine.held_by_run, held, "jobs held per run");
        // And the open shards a fan-out's end is told by.
        for run in self.engine.runs.values() {
            let open: Vec<usize> = run
                .records
                .iter()
                .map(|r| r.shards.iter().filter(|s| !s.status.is_final()).count())
                .collect();
            assert_eq!(run.shards_open, open, "open shards per step");
        }
    }

    /// Moves the paused clock on by `d`, fires the timers that are due (in order), then
    /// ticks.
    pub(super) async fn advance(&mut self, d: Duration) {
        tokio::time::advance(d).await;
        let now = Instant::now();
        let due: Vec<Event> = {
            let mut timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
            timers.sort_by_key(|(t, _)| *t);
            let n = timers.iter().take_while(|(t, _)| *t <= now).count();
            timers.drain(..n).map(|(_, e)| e).collect()
        };
        for ev in due {
            self.send(ev);
        }
        self.send(Event::Tick);
    }

    pub(super) fn submit(&mut self, yaml: &str) -> RunHandle {
        let loaded =
            nexa_shared::spec::load_str("t.yaml", yaml, self.project.path()).expect("valid");
        let (tx, mut rx) = oneshot::channel();
        self.send(Event::Submit(
            Box::new(RunRequest {
                loaded,
                project: self.project.path().to_path_buf(),
                verify: false,
                from: None,
                git_sha: None,
                run_id: None,
                confined: false,
            }),
            tx,
        ));
        rx.try_recv().expect("answered").expect("submitted")
    }

    pub(super) fn enrol(&mut self, id: &str, slots: u32) {
        let info = WorkerInfo {
            name: id.into(),
            key: key_of(id),
            profile: Profile {
                cores: 8,
                memory_total: 8 << 30,
                ..Default::default()
            },
            slots,
        };
        self.send(Event::RegisterWorker(id.into(), Box::new(info)));
    }

    /// Asks for a lease for `worker`; the receiver holds it once one is granted.
    pub(super) fn ask(&mut self, worker: &str) -> Asked {
        self.ask_many(worker, 1, true)
    }

    /// Asks for up to `slots` leases for `worker`, waiting for the first or not.
    pub(super) fn ask_many(&mut self, worker: &str, slots: usize, wait: bool) -> Asked {
        let (tx, rx) = oneshot::channel();
        self.send(Event::LeaseRequest(worker.into(), Want { slots, wait }, tx));
        Asked(rx)
    }

    pub(super) fn lease(&mut self, worker: &str) -> Lease {
        self.ask(worker)
            .try_recv()
            .expect("a lease at once")
            .expect("a lease, not the end")
    }

    /// Reports `result` from `worker` (signature checked by the caller: good).
    pub(super) fn report(
        &mut self,
        worker: &str,
        mut result: JobResult,
    ) -> std::result::Result<(), String> {
        result.worker_key = key_of(worker);
        let (tx, mut rx) = oneshot::channel();
        self.send(Event::Report(
            worker.into(),
            Box::new(result),
            Ok(()),
            Some(tx),
        ));
        rx.try_recv().expect("answered")
    }

    pub(super) fn heartbeat(
        &mut self,
        worker: &str,
        running: &[(JobId, u64)],
    ) -> Vec<(JobId, u64)> {
        let (tx, mut rx) = oneshot::channel();
        let beat = Beat {
            running: running.to_vec(),
            ..Beat::default()
        };
        self.send(Event::Heartbeat(worker.into(), Box::new(beat), tx));
        rx.try_recv().expect("answered").expect("not banned").cancel
    }

    pub(super) fn live(&mut self, worker: &str, lease: &Lease) -> LeaseCheck {
        let (tx, mut rx) = oneshot::channel();
        self.send(Event::LeaseLive(
            worker.into(),
            lease.job.job_id.clone(),
            lease.generation,
            tx,
        ));
        rx.try_recv().expect("answered")
    }

    /// A successful result of `lease` whose output `out` holds `x.txt` = `content`.
    pub(super) fn succeeded(&self, lease: &Lease, content: &[u8]) -> JobResult {
        let staging = self
            .project
            .path()
            .join("staging")
            .join(format!("{}-{}", lease.job.job_id, lease.generation));
        let dir = staging.join("out");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("x.txt"), content).expect("write");
        JobResult {
            outputs: vec![OutputFile {
                output: "out".into(),
                path: "x.txt".into(),
                size: content.len() as u64,
                digest: nexa_shared::digest::format(&blake3::hash(content)).into(),
            }],
            staging: Some(staging),
            ..failed(lease, "")
        }
    }
}

/// A worker's public key, made from its id.
pub(super) fn key_of(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// A failed result of `lease`.
fn failed(lease: &Lease, error: &str) -> JobResult {
    JobResult {
        job_id: lease.job.job_id.clone(),
        generation: lease.generation,
        attempt: lease.attempt,
        outcome: if error.is_empty() {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        },
        exit_code: Some(if error.is_empty() { 0 } else { 1 }),
        outputs: Vec::new(),
        started_ms: 1,
        ended_ms: 2,
        error: error.into(),
        staging: None,
        log: None,
        progress: None,
        worker_key: [0; 32],
        signature: Vec::new(),
    }
}

/// `n` independent exec steps (`after: []`), each with output `out`.
pub(super) fn steps(name: &str, n: usize, extra: &str) -> String {
    let mut y = format!("pipeline:\n  name: {name}\n  steps:\n");
    for i in 0..n {
        y.push_str(&format!(
            "    - id: s{i}\n      uses: exec\n      after: []\n{extra}      params: {{cmd: [\"echo\", \"{i}\"]}}\n      out: artifacts/{name}-{i}\n"
        ));
    }
    y
}

/// Everything the run has streamed so far; its summary if it finished.
pub(super) fn drain(run: &mut RunHandle) -> (Vec<Progress>, Option<RunSummary>) {
    let mut seen = Vec::new();
    let mut end = None;
    while let Some(p) = run.try_recv() {
        if let Progress::Finished(s) = &p {
            end = Some(s.clone());
        }
        seen.push(p);
    }
    (seen, end)
}

#[tokio::test(start_paused = true)]
async fn a_lease_without_heartbeats_expires_at_its_ttl_and_goes_to_another_worker_fenced() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    let mut run = h.submit(&steps("ttl", 1, ""));
    h.enrol("w1", 1);
    let first = h.lease("w1");
    h.enrol("w2", 1);
    let waiting = h.ask("w2");

    h.heartbeat("w2", &[]);
    h.advance(Duration::from_secs(29)).await;
    h.heartbeat("w2", &[]);
    assert_eq!(h.live("w1", &first), LeaseCheck::Live, "within its ttl");
    assert_eq!(h.engine.refusals.lease_expiries, 0);

    h.advance(Duration::from_secs(2)).await;
    assert_eq!(h.engine.refusals.lease_expiries, 1);
    assert_eq!(h.live("w1", &first), LeaseCheck::Stale, "expired");
    let second = { waiting }.try_recv().expect("w2 leased").expect("a lease");
    assert_eq!(second.job.job_id, first.job.job_id);
    assert!(
        second.generation > first.generation,
        "a new, higher generation"
    );
    assert_eq!(second.attempt, first.attempt + 1);

    // The expired worker's late result is refused as stale; the live one seals.
    let late = h.succeeded(&first, b"late");
    assert!(h.report("w1", late).is_err());
    assert_eq!(h.engine.refusals.stale, 1);
    let honest = h.succeeded(&second, b"on time");
    h.report("w2", honest).expect("admitted");
    let (_, end) = drain(&mut run);
    let end = end.expect("finished");
    assert_eq!(end.outcome, RunOutcome::Succeeded);
    let w2: String = key_of("w2").iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(end.steps[0].worker, Some(w2), "w2 did the work");
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_keeps_a_lease_alive_and_names_the_stale_attempts_to_kill() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    let _run = h.submit(&steps("hb", 1, ""));
    h.enrol("w1", 1);
    let l = h.lease("w1");
    let running = vec![(l.job.job_id.clone(), l.generation)];
    for _ in 0..5 {
        h.advance(Duration::from_secs(20)).await;
        assert!(h.heartbeat("w1", &running).is_empty(), "its live lease");
    }
    assert_eq!(h.live("w1", &l), LeaseCheck::Live, "100 s on, still leased");
    let stale = vec![(l.job.job_id.clone(), l.generation - 1)];
    assert_eq!(
        h.heartbeat("w1", &stale),
        stale,
        "an old generation is killed"
    );
}

/// Expiry is kept as reminders (see `deadlines`): a heartbeat only moves the deadline,
/// the early reminder is put back, and a worker lost, back and silent again is lost
/// again; a job leased again is not expired by its first lease's reminder.
#[tokio::test(start_paused = true)]
async fn silent_workers_are_lost_each_time_and_renewed_leases_outlive_their_first_reminder() {
    let ttl = Duration::from_secs(30);
    let mut h = Harness::mesh(ttl);
    let _run = h.submit(&steps("rem", 1, ""));
    h.enrol("w1", 1);
    h.enrol("w2", 1);
    let lost = |h: &Harness, w: &str| h.engine.workers.get(w).is_some_and(|w| w.lost);
    let l1 = h.lease("w1");
    let running = vec![(l1.job.job_id.clone(), l1.generation)];
    // w1 beats every 10 s for 100 s; w2 says nothing.
    for _ in 0..10 {
        h.advance(Duration::from_secs(10)).await;
        h.heartbeat("w1", &running);
    }
    assert_eq!(
        h.live("w1", &l1),
        LeaseCheck::Live,
        "renewed past its first deadline"
    );
    assert!(!lost(&h, "w1"));
    assert!(lost(&h, "w2"), "silent past the ttl");
    assert_eq!(
        h.engine.deadlines.len().1,
        1,
        "w1's one reminder; w2's went"
    );
    // Back, then silent again: lost again.
    h.heartbeat("w2", &[]);
    assert!(!lost(&h, "w2"));
    h.advance(Duration::from_secs(10)).await;
    h.heartbeat("w1", &running);
    assert!(!lost(&h, "w2"), "within its ttl");
    h.advance(Duration::from_secs(25)).await;
    assert!(lost(&h, "w2"), "silent again");
    assert_eq!(h.engine.deadlines.len().0, 1, "one reminder per live lease");
    // Enrolling again (a restarted worker process) sets no second reminder.
    for _ in 0..3 {
        h.enrol("w1", 1);
    }
    assert_eq!(
        h.engine.deadlines.len().1,
        1,
        "w1's one reminder (w2 is lost)"
    );

    // w1 stops: its lease expires; the job's next lease (w2, back) is not expired by
    // the first lease's reminders.
    h.heartbeat("w2", &[]);
    let again = h.ask("w2");
    h.advance(Duration::from_secs(20)).await;
    h.heartbeat("w2", &[]);
    h.advance(Duration::from_secs(11)).await;
    assert_eq!(h.live("w1", &l1), LeaseCheck::Stale);
    let l2 = { again }.try_recv().expect("w2 leased").expect("a lease");
    assert_eq!(l2.job.job_id, l1.job.job_id);
    let running2 = vec![(l2.job.job_id.clone(), l2.generation)];
    for _ in 0..5 {
        h.advance(Duration::from_secs(10)).await;
        h.heartbeat("w2", &running2);
    }
    assert_eq!(h.live("w2", &l2), LeaseCheck::Live);
    assert_eq!(h.engine.refusals.lease_expiries, 1, "only w1's");
}

/// A fan-out settles when its last shard does, not before (the harness checks the
/// open-shard count against a recount after every event); a failed shard's retry
/// reopens nothing it should not.
#[tokio::test(start_paused = true)]
async fn a_fan_out_settles_at_its_last_shard_and_only_then_assembles() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    std::fs::write(h.project.path().join("data.txt"), "a\nb\nc\n").expect("write");
    let mut run = h.submit(&steps(
        "fan",
        1,
        "      in: {d: data.txt}\n      shards: {over: d, count: 3}\n      retries: {count: 1, backoff: 1s}\n",
    ));
    h.enrol("w1", 3);
    let leases: Vec<Lease> = (0..3).map(|_| h.lease("w1")).collect();
    let open = |h: &Harness| {
        h.engine
            .runs
            .values()
            .map(|r| r.shards_open[0])
            .sum::<usize>()
    };
    assert_eq!(open(&h), 3);
    h.report("w1", failed(&leases[0], "exit 1"))
        .expect("admitted");
    assert_eq!(open(&h), 3, "a shard that will be retried is still open");
    let ok = h.succeeded(&leases[1], b"b");
    h.report("w1", ok).expect("admitted");
    let ok = h.succeeded(&leases[2], b"c");
    h.report("w1", ok).expect("admitted");
    assert_eq!(open(&h), 1);
    let busy = |h: &Harness| h.engine.runs.values().map(|r| r.in_flight).sum::<usize>();
    assert_eq!(busy(&h), 0, "no assembly while a shard is open");
    let step = |h: &Harness| h.engine.runs.values().map(|r| r.records[0].status).next();
    assert_eq!(
        step(&h),
        Some(StepStatus::Running),
        "not assembled with a shard open"
    );
    let (_, end) = drain(&mut run);
    assert!(end.is_none(), "not settled while a shard is open");
    let mut next = h.ask("w1");
    h.advance(Duration::from_secs(2)).await;
    let retry = next.try_recv().expect("leased").expect("a lease");
    let ok = h.succeeded(&retry, b"a");
    h.report("w1", ok).expect("admitted");
    assert_eq!(open(&h), 0);
    let (_, end) = drain(&mut run);
    assert_eq!(end.expect("finished").outcome, RunOutcome::Succeeded);
}

/// A fan-out's shard jobs hold one spec between them (the step's), not a copy each;
/// each lease is still made whole: the shard's own id, index and count, and its part
/// (here a range of the input) in place of the sharded input, the other input as is.
#[tokio::test(start_paused = true)]
async fn shard_jobs_share_their_steps_spec_and_each_lease_carries_its_own_part() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    std::fs::write(h.project.path().join("data.txt"), "a\nb\nc\nd\n").expect("write");
    std::fs::write(h.project.path().join("model.bin"), "m").expect("write");
    let _run = h.submit(&steps(
        "share",
        1,
        "      in: {d: data.txt, m: model.bin}\n      shards: {over: d, records: 1}\n",
    ));
    let jobs: Vec<&Job> = h.engine.jobs.values().collect();
    assert_eq!(jobs.len(), 4);
    assert!(
        jobs.iter().all(|j| Arc::ptr_eq(&j.spec, &jobs[0].spec)),
        "one spec for the step's four shard jobs"
    );
    assert_eq!(Arc::strong_count(&jobs[0].spec), 4);
    h.enrol("w1", 4);
    let mut leases: Vec<Lease> = (0..4).map(|_| h.lease("w1")).collect();
    leases.sort_by_key(|l| l.job.shard);
    for (i, l) in leases.iter().enumerate() {
        assert_eq!(l.job.shard, Some((i as u32, 4)));
        assert_eq!(l.job.job_id.to_string(), format!("{}/s0/{i}", l.job.run_id));
        let d = l.job.inputs.iter().find(|x| x.name == "d").expect("d");
        let range = d.range.as_ref().expect("a range shard");
        assert_eq!(
            range.spans,
            vec![(2 * i as u64, 2)],
            "record {i} of the input"
        );
        assert_eq!(
            d.source.file_name().and_then(|n| n.to_str()),
            Some(format!("part-{i:05}.txt").as_str())
        );
        let m = l.job.inputs.iter().find(|x| x.name == "m").expect("m");
        assert!(m.range.is_none() && m.source.ends_with("model.bin"));
    }
    let digests: std::collections::BTreeSet<_> = leases
        .iter()
        .flat_map(|l| l.job.inputs.iter().filter(|x| x.name == "d"))
        .map(|x| x.digest.to_string())
        .collect();
    assert_eq!(digests.len(), 4, "each part its own digest");
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_retried_after_its_backoff_and_not_before() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    let mut run = h.submit(&steps(
        "retry",
        1,
        "      retries: {count: 2, backoff: 10s}\n",
    ));
    h.enrol("w1", 1);
    let l1 = h.lease("w1");
    h.report("w1", failed(&l1, "exit 1")).expect("admitted");
    let (seen, _) = drain(&mut run);
    assert!(
        seen.iter().any(|p| matches!(p, Progress::Retry { attempt: 2, delay, .. } if *delay == Duration::from_secs(10))),
        "{seen:?}"
    );
    let mut next = h.ask("w1");
    h.advance(Duration::from_millis(9_900)).await;
    assert!(next.try_recv().is_err(), "not before its backoff");
    h.advance(Duration::from_millis(200)).await;
    let l2 = next.try_recv().expect("leased").expect("a lease");
    assert_eq!(l2.attempt, 2);
    assert!(l2.generation > l1.generation);

    // The second backoff doubles; after the last retry the step fails.
    h.report("w1", failed(&l2, "exit 1")).expect("admitted");
    let mut next = h.ask("w1");
    h.advance(Duration::from_millis(19_900)).await;
    assert!(next.try_recv().is_err(), "the backoff doubles");
    h.advance(Duration::from_millis(200)).await;
    let l3 = next.try_recv().expect("leased").expect("a lease");
    h.report("w1", failed(&l3, "exit 1")).expect("admitted");
    let (_, end) = drain(&mut run);
    let end = end.expect("finished");
    assert_eq!(end.outcome, RunOutcome::Failed);
    assert_eq!(end.steps[0].status, StepStatus::Failed);
    assert_eq!(end.steps[0].attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn cancelling_drops_queued_jobs_kills_leased_ones_and_finishes_cancelled() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    let mut run = h.submit(&steps("cancel", 3, ""));
    h.enrol("w1", 1);
    let l = h.lease("w1");
    h.send(Event::Cancel(run.run_id.to_string()));
    let running = vec![(l.job.job_id.clone(), l.generation)];
    assert_eq!(h.heartbeat("w1", &running), running, "its worker kills it");
    assert_eq!(h.live("w1", &l), LeaseCheck::Stale);
    let mut none = h.ask("w1");
    assert!(
        none.try_recv().is_err(),
        "nothing of a cancelled run is leased"
    );
    let refused = h.report("w1", failed(&l, "killed"));
    assert_eq!(refused, Err("the run was cancelled".to_string()));
    let (_, end) = drain(&mut run);
    let end = end.expect("finished");
    assert_eq!(end.outcome, RunOutcome::Cancelled);
    assert!(
        end.steps.iter().all(|s| s.status == StepStatus::Cancelled),
        "{:?}",
        end.steps.iter().map(|s| s.status).collect::<Vec<_>>()
    );
    h.advance(Duration::from_secs(60)).await;
    assert!(none.try_recv().is_err(), "nor later");
}

#[tokio::test(start_paused = true)]
async fn fair_share_alternates_between_runs_instead_of_draining_the_first() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    let mut big = h.submit(&steps("big", 6, ""));
    let mut small = h.submit(&steps("small", 2, ""));
    h.enrol("w1", 4);
    let leases: Vec<Lease> = (0..4)
        .map(|i| {
            h.ask("w1")
                .try_recv()
                .unwrap_or_else(|e| panic!("lease {i}: {e}"))
                .expect("a lease")
        })
        .collect();
    let from_small = leases
        .iter()
        .filter(|l| l.job.job_id.starts_with(small.run_id.as_str()))
        .count();
    assert_eq!(
        from_small, 2,
        "the small run gets half the slots, not what is left"
    );
    for l in &leases {
        let r = h.succeeded(l, l.job.job_id.as_bytes());
        h.report("w1", r).expect("admitted");
    }
    assert!(drain(&mut small).1.is_some(), "the small run finished");
    assert!(drain(&mut big).1.is_none(), "the big one goes on");
}

#[tokio::test(start_paused = true)]
async fn a_step_no_worker_can_run_fails_after_its_grace_with_the_reason() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    h.enrol("w1", 1);
    let mut run = h.submit(&steps("unfit", 1, "      resources: {gpus: 1}\n"));
    h.advance(Duration::from_secs(59)).await;
    assert!(drain(&mut run).1.is_none(), "waits for a worker to join");
    h.advance(Duration::from_secs(2)).await;
    let end = drain(&mut run).1.expect("failed");
    assert_eq!(end.outcome, RunOutcome::Failed);
    let error = end.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.starts_with("no enrolled worker can run this step"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_quorum_accepts_agreeing_replicas_and_outvotes_the_liar() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    let mut run = h.submit(&steps(
        "quorum",
        1,
        "      validation: {replicas: 3, quorum: 2}\n",
    ));
    for w in ["w1", "w2", "w3"] {
        h.enrol(w, 1);
    }
    let leases: Vec<(String, Lease)> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| (w.to_string(), h.lease(w)))
        .collect();
    let unique: std::collections::BTreeSet<&str> =
        leases.iter().map(|(_, l)| l.job.job_id.as_str()).collect();
    assert_eq!(unique.len(), 3, "three replica jobs on three workers");
    for (w, l) in &leases {
        let answer: &[u8] = if w == "w3" { b"41" } else { b"42" };
        let r = h.succeeded(l, answer);
        h.report(w, r).expect("admitted");
    }
    let end = drain(&mut run).1.expect("finished");
    assert_eq!(end.outcome, RunOutcome::Succeeded);
    assert_eq!(h.engine.refusals.outvoted, 1, "the liar is outvoted");
    assert_eq!(h.engine.replication.units, 1);
    let sealed = end.steps[0].outputs.get("out").expect("sealed output");
    let text = std::fs::read(h.project.path().join(&sealed.path).join("x.txt")).expect("read");
    assert_eq!(text, b"42", "the majority's answer is what is sealed");
}

#[tokio::test(start_paused = true)]
async fn a_report_for_an_unknown_job_or_an_old_generation_is_refused_and_counted() {
    let mut h = Harness::mesh(Duration::from_secs(600));
    let mut run = h.submit(&steps("stale", 1, ""));
    h.enrol("w1", 1);
    let l = h.lease("w1");
    let mut old = h.succeeded(&l, b"x");
    old.generation = l.generation - 1;
    assert!(h.report("w1", old).is_err());
    assert_eq!(h.engine.refusals.stale, 1);
    let mut unknown = h.succeeded(&l, b"x");
    unknown.job_id = "no-such-job".into();
    assert!(h.report("w1", unknown).is_err());
    assert_eq!(h.engine.refusals.unknown_job, 1);
    let ok = h.succeeded(&l, b"x");
    h.report("w1", ok.clone()).expect("admitted");
    assert!(drain(&mut run).1.is_some());
    assert!(h.report("w1", ok).is_err(), "a replay");
    assert_eq!(h.engine.refusals.unknown_job, 2);
}

#[test]
fn a_panicking_task_becomes_the_event_that_says_why() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fx = Inline {
        tx,
        store: Arc::new(MemStore::default()),
        timers: Arc::default(),
        backlog: Arc::default(),
    };
    tasks::blocking(
        &fx,
        || -> usize { panic!("the planner fell over") },
        |out| Event::UnfitCheck(out.err().unwrap_or_default(), 0),
    );
    match rx.try_recv() {
        Ok(Event::UnfitCheck(why, 0)) => assert!(why.contains("the planner fell over"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_full_call_queue_is_an_overload_not_a_backlog() {
    let (coord, _loop) =
        Coordinator::start(Arc::new(MemStore::default()), EngineConfig::embedded());
    // On this single-threaded runtime the loop runs only when the test yields: fill
    // its queue of calls.
    for _ in 0..CALLS {
        coord.cancel("no-such-run").expect("queued");
    }
    let err = coord.cancel("no-such-run").expect_err("the queue is full");
    assert!(matches!(err, Error::Overloaded), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    // An async call waits for room instead; once the loop drains, calls go through.
    let workers = tokio::time::timeout(Duration::from_secs(30), coord.list_workers())
        .await
        .expect("answered once the loop drained its queue")
        .expect("listed");
    assert!(workers.is_empty());
    coord.cancel("no-such-run").expect("room again");
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_never_reads_misses_progress_lines_but_never_the_summary() {
    let lines = 64;
    let mut h = Harness::new(EngineConfig {
        lease_ttl: Some(Duration::from_secs(30)),
        unfit_grace: Duration::from_secs(60),
        progress_lines: lines,
        ..EngineConfig::embedded()
    });
    // More steps than progress lines may wait: each one's changes are lines.
    let n = lines + 50;
    let mut run = h.submit(&steps("lagging", n, ""));
    h.send(Event::Cancel(run.run_id.to_string()));
    let (seen, end) = drain(&mut run);
    let end = end.expect("the summary comes whatever was missed");
    assert_eq!(end.outcome, RunOutcome::Cancelled);
    assert_eq!(end.steps.len(), n);
    assert!(
        end.steps.iter().all(|s| s.status == StepStatus::Cancelled),
        "the summary is whole"
    );
    // What waited for the reader was capped; the summary came after it.
    assert_eq!(seen.len(), lines + 1, "capped lines, then the summary");
    assert!(matches!(seen.last(), Some(Progress::Finished(_))));
    assert!(run.try_recv().is_none(), "nothing after the summary");
}

#[tokio::test(start_paused = true)]
async fn a_writer_that_is_behind_holds_the_rounds_back_and_loses_no_change() {
    let mut h = Harness::mesh(Duration::from_secs(30));
    let run = h.submit(&steps("slow", 2, ""));
    h.enrol("w1", 1);
    let stored = |h: &Harness| -> Vec<StepStatus> {
        // By step id, in order.
        state::load_steps(h.store.as_ref(), "slow")
            .expect("load")
            .into_values()
            .map(|r| r.status)
            .collect()
    };
    let before = stored(&h);
    assert!(!before.contains(&StepStatus::Complete), "{before:?}");
    // The disk is slow: the writer has a backlog. A step finishes, but the round holds
    // back: nothing more is queued for the writer.
    h.backlog
        .store(effects::WRITE_BACKLOG, std::sync::atomic::Ordering::Relaxed);
    let l = h.lease("w1");
    let done = h.succeeded(&l, b"out");
    h.report("w1", done).expect("admitted");
    assert_eq!(stored(&h), before, "held back");
    h.advance(Duration::from_secs(1)).await;
    assert_eq!(stored(&h), before, "still held back");
    // The writer caught up: the next round (the tick's) writes what changed meanwhile.
    h.backlog.store(0, std::sync::atomic::Ordering::Relaxed);
    h.advance(Duration::from_millis(250)).await;
    let after = stored(&h);
    assert!(after.contains(&StepStatus::Complete), "{after:?}");
    drop(run);
}

#[tokio::test(start_paused = true)]
async fn one_ask_gets_as_many_leases_as_free_slots_and_one_that_does_not_wait_is_answered_at_once()
{
    let mut h = Harness::mesh(Duration::from_secs(30));
    let mut run = h.submit(&steps("many", 5, ""));
    h.enrol("w", 3);
    // Eight wanted, three slots free: three leases in one answer, each its own job.
    let first = h.ask_many("w", 8, true).all();
    assert_eq!(first.len(), 3, "as many as the worker's free slots");
    let mut ids: Vec<String> = first.iter().map(|l| l.job.job_id.to_string()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three different jobs");
    assert!(first.windows(2).all(|p| p[0].generation < p[1].generation));
    for l in &first {
        assert_eq!(h.live("w", l), LeaseCheck::Live);
    }
    // No slot free: an ask that does not wait is answered at once, empty, and not kept.
    assert!(h.ask_many("w", 8, false).all().is_empty());
    assert!(h.engine.waiting.is_empty(), "nothing left waiting");
    // One result in: one slot free, one lease.
    let done = h.succeeded(&first[0], b"0");
    h.report("w", done).expect("admitted");
    let second = h.ask_many("w", 8, false).all();
    assert_eq!(second.len(), 1);
    // Another worker takes the last queued job; then the queue is empty.
    h.enrol("v", 8);
    let last = h.ask_many("v", 8, false).all();
    assert_eq!(last.len(), 1, "one job left");
    assert!(h.ask_many("v", 8, false).all().is_empty());
    // With nothing queued, an ask that waits is kept waiting.
    let mut waiting = h.ask_many("v", 8, true);
    assert!(waiting.try_recv().is_err(), "waits");
    for l in first[1..].iter().chain(&second).chain(&last) {
        let r = h.succeeded(l, b"x");
        let worker = if last.contains(l) { "v" } else { "w" };
        h.report(worker, r).expect("admitted");
    }
    let (_, end) = drain(&mut run);
    assert_eq!(end.expect("finished").outcome, RunOutcome::Succeeded);
    assert!(
        waiting.try_recv().is_err(),
        "nothing more to lease: still waiting"
    );
}
