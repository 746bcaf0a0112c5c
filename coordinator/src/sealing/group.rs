//! Group sealing. Verified results queue here and one thread seals whatever has queued
//! since its last round as a group ([`artifact::seal_group`]): the artifact protocol's
//! three durability points (payload, rename, `COMPLETE`) are then flushed once per group
//! instead of once per artifact. An idle coordinator seals a lone result at once, with
//! targeted fsyncs; a busy one makes larger groups on its own.

use crate::planner::{RunContext, StepPlan};
use crate::sealing::lineage;
use crate::sealing::stage::{self, Staged};
pub use crate::sealing::stage::{SealFailure, WrongResult};
use crate::state::ArtifactInfo;
use nexa_shared::artifact;
use nexa_shared::job::JobResult;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

/// What sealing produced.
#[derive(Debug)]
pub enum SealedJob {
    /// An unsharded step's artifacts.
    Step(BTreeMap<String, ArtifactInfo>),
    /// One shard: its payload hash (the rest is in its sealed `meta.json`, which
    /// assembly reads back).
    Shard(String),
}

/// The most results sealed in one group.
const MAX_GROUP: usize = 1024;

/// One verified result to seal.
#[derive(Debug)]
pub struct SealTask {
    /// The job it answers.
    pub job_id: String,
    /// Its run.
    pub ctx: Arc<RunContext>,
    /// Its step's plan.
    pub plan: Arc<StepPlan>,
    /// The shard, for a sharded step.
    pub shard: Option<usize>,
    /// The verified result, with its staging directory.
    pub result: JobResult,
    /// The job log to keep: (staged log, destination).
    pub log_copy: Option<(PathBuf, PathBuf)>,
    /// The job left a server running whose handle the coordinator's store keeps (see
    /// `crate::services`): where it runs.
    pub service: Option<crate::services::Owner>,
}

impl SealTask {
    /// The artifact directories this task will write.
    fn outs(&self) -> Vec<PathBuf> {
        match self.shard {
            None => self.plan.outputs.values().cloned().collect(),
            Some(k) => self
                .plan
                .shards
                .as_ref()
                .and_then(|set| set.units.get(k).map(|u| vec![set.dir(u)]))
                .unwrap_or_default(),
        }
    }
}

/// Called with each task's outcome, in the order the tasks were sealed.
pub type Done = Box<dyn Fn(String, Result<SealedJob, SealFailure>) + Send>;

/// The queue in front of the sealing thread; cheap to clone.
///
/// Bounded by the leases: the scheduler queues one task per admitted result, and only a
/// job in `Sealing` has one, so at most as many wait as there are worker slots (and a
/// quorum's replicas). It never has to refuse or block the loop.
#[derive(Debug, Clone)]
pub struct SealQueue {
    tx: mpsc::Sender<SealTask>,
}

/// Where sealed steps' lineage is recorded, before the engine hears of them.
pub type LineageStore = Arc<dyn crate::Store>;

impl SealQueue {
    /// Starts the sealing thread; it ends when every handle is dropped. Like
    /// `std::thread::spawn`, panics only when the OS cannot start a thread.
    pub fn start(store: LineageStore, done: Done) -> Self {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("nexa-sealer".into())
            .spawn(move || run(&rx, store.as_ref(), &done));
        if let Err(e) = spawned {
            panic!("starting the sealing thread: {e}");
        }
        Self { tx }
    }

    /// Queues a task; false when the sealing thread is gone.
    pub fn push(&self, task: SealTask) -> bool {
        self.tx.send(task).is_ok()
    }
}

/// Seals one task on the calling thread (the scheduler's synchronous test effects).
pub fn seal_one(task: SealTask, store: &dyn crate::Store, done: &Done) {
    seal_guarded(vec![task], store, done);
}

fn run(rx: &mpsc::Receiver<SealTask>, store: &dyn crate::Store, done: &Done) {
    let mut deferred: VecDeque<SealTask> = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(t) => t,
            None => match rx.recv() {
                Ok(t) => t,
                Err(_) => return,
            },
        };
        let mut taken: HashSet<PathBuf> = first.outs().into_iter().collect();
        let mut group = vec![first];
        let mut later = VecDeque::new();
        while group.len() < MAX_GROUP {
            let Some(t) = deferred.pop_front().or_else(|| rx.try_recv().ok()) else {
                break;
            };
            // Two results for one artifact directory never share a group.
            let outs = t.outs();
            if outs.iter().any(|o| taken.contains(o)) {
                later.push_back(t);
            } else {
                taken.extend(outs);
                group.push(t);
            }
        }
        later.extend(deferred.drain(..));
        deferred = later;
        seal_guarded(group, store, done);
    }
}

/// [`seal_tasks`], owned: should it panic, every task of the group is reported failed
/// with the reason (the coordinator's fault, not the worker's) and the thread goes on,
/// so no job waits for ever on a seal that will not come.
fn seal_guarded(group: Vec<SealTask>, store: &dyn crate::Store, done: &Done) {
    let ids: Vec<String> = group.iter().map(|t| t.job_id.clone()).collect();
    let sealed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        seal_tasks(group, store, done)
    }));
    if let Err(payload) = sealed {
        let why = format!(
            "sealing panicked: {}",
            crate::tasks::panic_message(payload.as_ref())
        );
        tracing::error!(reason = %why, jobs = ids.len(), "a sealing group failed");
        for id in ids {
            done(id, Err(SealFailure::ours(why.clone())));
        }
    }
}

/// Stages every task, seals all their artifacts as one group, records the sealed steps'
/// lineage, then reports each task.
fn seal_tasks(group: Vec<SealTask>, store: &dyn crate::Store, done: &Done) {
    let mut staged: Vec<Result<Vec<Staged>, SealFailure>> = Vec::with_capacity(group.len());
    let mut requests = Vec::new();
    for t in &group {
        keep_log(t.log_copy.clone());
        let s = match t.shard {
            None => stage::stage_step(&t.ctx, &t.plan, &t.result),
            Some(k) => match t.plan.shards.as_ref().and_then(|s| s.units.get(k)) {
                Some(unit) => stage::stage_shard(&t.ctx, &t.plan, unit, &t.result).map(|s| vec![s]),
                None => Err(SealFailure::ours(format!("no shard {k} in plan"))),
            },
        };
        if let Ok(list) = &s {
            requests.extend(list.iter().map(|x| (x.out.clone(), x.req.clone())));
        }
        staged.push(s);
    }
    nexa_shared::fail_point!("sealer.group");
    let mut sealed = artifact::seal_group(requests).into_iter();
    let mut nodes = Vec::new();
    let mut outcomes = Vec::with_capacity(group.len());
    for (t, s) in group.into_iter().zip(staged) {
        let res = s.and_then(|list| {
            let mut metas = Vec::with_capacity(list.len());
            let mut first_err = None;
            for x in list {
                match sealed.next() {
                    Some(Ok((meta, _))) => metas.push((x, meta)),
                    Some(Err(e)) => {
                        first_err.get_or_insert(SealFailure::from(e));
                    }
                    None => {
                        first_err.get_or_insert(SealFailure::ours("the group lost a result"));
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if t.shard.is_none() {
                nodes.extend(
                    metas
                        .iter()
                        .map(|(x, meta)| lineage::node_of(&t.ctx.project, &x.out, meta)),
                );
            }
            if let Some(owner) = &t.service
                && let Some((x, _)) = metas.first()
            {
                crate::services::record(store, &t.ctx, &x.out, owner);
            }
            finish(&t, metas)
        });
        if let Some(staging) = &t.result.staging {
            // Outputs were moved into the artifact; drop what is left.
            let _ = artifact::remove_tree(staging);
        }
        outcomes.push((t.job_id, res));
    }
    if !nodes.is_empty()
        && let Err(e) = lineage::record(store, &nodes)
    {
        tracing::error!(error = %format!("{e:#}"), "recording lineage");
    }
    for (job_id, res) in outcomes {
        done(job_id, res);
    }
}

/// What the engine records for a sealed task.
fn finish(t: &SealTask, metas: Vec<(Staged, artifact::Meta)>) -> Result<SealedJob, SealFailure> {
    match t.shard {
        None => Ok(SealedJob::Step(
            metas
                .into_iter()
                .map(|(x, meta)| {
                    let info = ArtifactInfo {
                        path: t.ctx.rel(&x.out),
                        hash: meta.hash,
                        bytes: meta.bytes,
                    };
                    (x.output, info)
                })
                .collect::<BTreeMap<_, _>>(),
        )),
        Some(_) => {
            let (_, meta) = metas
                .into_iter()
                .next()
                .ok_or_else(|| SealFailure::ours("the shard sealed nothing"))?;
            Ok(SealedJob::Shard(meta.hash))
        }
    }
}

/// Copies a job's log next to the run's state.
pub fn keep_log(copy: Option<(PathBuf, PathBuf)>) {
    let Some((src, dest)) = copy else {
        return;
    };
    if let Some(dir) = dest.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::copy(&src, &dest) {
        tracing::warn!(error = %e, log = %src.display(), "keeping the job log");
    }
}

/// Assembles a sharded step's artifacts from its sealed shards (see
/// [`stage::assemble`]) and records their lineage: with the seals above, the one place
/// lineage is recorded.
pub fn assemble(
    store: &dyn crate::Store,
    ctx: &RunContext,
    plan: &StepPlan,
) -> Result<BTreeMap<String, ArtifactInfo>, String> {
    let outputs = stage::assemble(ctx, plan)?;
    let nodes: Vec<_> = outputs
        .values()
        .filter_map(|a| lineage::node_from_disk(&ctx.project, &ctx.project.join(&a.path)))
        .collect();
    if let Err(e) = lineage::record(store, &nodes) {
        tracing::error!(error = %format!("{e:#}"), "recording lineage");
    }
    Ok(outputs)
}
