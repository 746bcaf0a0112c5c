//! Replication and quorum in the scheduler: a step with `validation` runs each of its
//! jobs (a "unit") as replicas on distinct workers; the result that a quorum agrees on
//! is sealed, the others are refused and their workers lose trust. Adaptive: a worker
//! trusted for a kind of job gets it alone, spot-checked with a probability that falls
//! as its record grows (BOINC's adaptive replication).

use super::{Credit, Engine, Job, JobState, Refused};
use crate::quorum::{self, Trust};
use nexa_shared::hardware::Profile;
use nexa_shared::ids::{JobId, WorkerId};
use nexa_shared::job::{JobResult, JobSpec};
use nexa_shared::spec::Validation;
use std::collections::BTreeSet;

/// A unit waiting for its quorum.
#[derive(Debug)]
pub(super) struct Vote {
    validation: Validation,
    /// The kind of job (its `uses`), which trust is kept per.
    kind: String,
    /// With `homogeneous`: the hardware class of the first replica's worker.
    class: Option<String>,
    /// Workers that were given a replica (no worker gets two).
    workers: BTreeSet<String>,
    /// Replica jobs made so far.
    made: u32,
    /// Decided when the first replica is leased: `true` when its worker is trusted and
    /// the job was not picked for a spot check (its result is accepted alone).
    single: Option<bool>,
    /// Results in: (worker, result, replica job id).
    results: Vec<(String, JobResult, String)>,
}

impl Vote {
    pub(super) fn new(validation: Validation, kind: String) -> Self {
        Self {
            validation,
            kind,
            class: None,
            workers: BTreeSet::new(),
            made: 1,
            single: None,
            results: Vec::new(),
        }
    }
}

/// A decided unit whose leased replicas are still running: their results are judged
/// against the sealed one when they come (a slow liar is caught all the same).
#[derive(Debug)]
pub(super) struct Decided {
    canonical: JobResult,
    kind: String,
    compare: nexa_shared::spec::Compare,
    pending: usize,
}

/// Replication figures since the coordinator started.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counters {
    /// Units run under validation.
    pub units: u64,
    /// Replica jobs made for them (`replicas / units - 1` is the extra work).
    pub replicas: u64,
}

/// The credit a result earns: its duration times the CPU slots and GPUs it held.
pub(super) fn credit_of(spec: &JobSpec, r: &JobResult) -> Credit {
    let secs = r.ended_ms.saturating_sub(r.started_ms) as f64 / 1000.0;
    Credit {
        cpu_seconds: secs * f64::from(spec.requirements.cpus.max(1)),
        gpu_seconds: secs * f64::from(spec.requirements.gpus),
    }
}

/// A worker's hardware class for homogeneous redundancy: GPU architecture and driver
/// major for GPU jobs, CPU architecture and OS otherwise.
fn class_of(p: &Profile, gpu_job: bool) -> String {
    if gpu_job {
        let cc = p.gpus.first().map(|g| g.compute_capability.0).unwrap_or(0);
        let driver = p
            .driver_version
            .as_deref()
            .and_then(|d| d.split('.').next())
            .unwrap_or("?");
        format!("gpu sm{cc} driver {driver}")
    } else {
        format!("cpu {} {}", p.arch, p.os)
    }
}

impl Engine {
    fn next_random(&mut self) -> f64 {
        // xorshift64*: enough for spot checks.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether `worker` may take a replica of `unit`: never two of one unit, and with
    /// homogeneous redundancy only workers of the first one's class.
    pub(super) fn replica_ok(&self, unit: &str, worker: &str) -> bool {
        let Some(v) = self.votes.get(unit) else {
            return true;
        };
        if v.workers.contains(worker) {
            return false;
        }
        if !v.validation.homogeneous {
            return true;
        }
        let Some(w) = self.workers.get(worker) else {
            return false;
        };
        let gpu_job = self
            .jobs
            .get(&JobId::replica(unit, 0))
            .is_some_and(|j| j.spec.requirements.gpus > 0);
        let mine = class_of(&w.info.profile, gpu_job);
        match &v.class {
            Some(class) => &mine == class,
            // The first replica only goes to a class with enough workers for a quorum,
            // or the unit could never be decided.
            None => {
                let peers = self
                    .workers
                    .values()
                    .filter(|o| {
                        !o.lost
                            && o.admin == super::AdminState::Active
                            && class_of(&o.info.profile, gpu_job) == mine
                    })
                    .count();
                peers >= v.validation.quorum as usize
            }
        }
    }

    /// A replica was leased: remember the worker; on the first, decide between a
    /// trusted single result and full replication.
    pub(super) fn on_replica_leased(&mut self, unit: &str, worker: &str) {
        let gpu_job = self
            .jobs
            .get(&JobId::replica(unit, 0))
            .is_some_and(|j| j.spec.requirements.gpus > 0);
        let profile_class = self
            .workers
            .get(worker)
            .map(|w| class_of(&w.info.profile, gpu_job));
        let trust = {
            let Some(v) = self.votes.get(unit) else {
                return;
            };
            self.workers
                .get(worker)
                .and_then(|w| w.trust.get(&v.kind).cloned())
                .unwrap_or_default()
        };
        let roll = self.next_random();
        let Some(v) = self.votes.get_mut(unit) else {
            return;
        };
        v.workers.insert(worker.to_string());
        if v.validation.homogeneous && v.class.is_none() {
            v.class = profile_class;
        }
        if v.single.is_some() {
            return;
        }
        let single = trust.trusted() && roll >= trust.spot_check_probability();
        v.single = Some(single);
        if !single {
            let more = v.validation.replicas.saturating_sub(1);
            for _ in 0..more {
                self.add_replica(unit);
            }
        }
    }

    /// Queues one more replica of `unit`.
    fn add_replica(&mut self, unit: &str) {
        let Some(v) = self.votes.get_mut(unit) else {
            return;
        };
        let k = v.made;
        v.made += 1;
        self.replication.replicas += 1;
        let Some(first) = self.jobs.get(&JobId::replica(unit, 0)) else {
            return;
        };
        let job = Job::queued(
            (JobId::replica(unit, k), &first.run_id),
            (first.step, first.shard),
            (first.spec.clone(), first.plan.clone()),
            Some(unit.to_string()),
        );
        let id = job.id.clone();
        self.jobs.insert(id.clone(), job);
        self.queue.push_back(id);
    }

    /// The replica jobs of `unit` (`made` of them so far) not yet reported: queued,
    /// leased or backing off. Looked up by id, so it costs the replicas, not the queue.
    fn outstanding(&self, unit: &str, made: u32) -> Vec<JobId> {
        (0..made)
            .map(|k| JobId::replica(unit, k))
            .filter(|id| {
                self.jobs.get(id).is_some_and(|j| {
                    matches!(
                        j.state,
                        JobState::Queued | JobState::Leased | JobState::Backoff
                    )
                })
            })
            .collect()
    }

    /// A replica's verified result: count it, and decide when a quorum agrees.
    pub(super) fn on_replica_result(&mut self, job_id: &str, worker: &str, result: JobResult) {
        let Some(unit) = self.jobs.get(job_id).and_then(|j| j.unit.clone()) else {
            return;
        };
        let Some(v) = self.votes.get_mut(&unit) else {
            // The unit was decided while this replica ran: judge it against the result
            // that was sealed.
            self.judge_late(&unit, job_id, worker, result);
            return;
        };
        v.results
            .push((worker.to_string(), result, job_id.to_string()));
        let needed = if v.single == Some(true) {
            1
        } else {
            v.validation.quorum as usize
        };
        let refs: Vec<&JobResult> = v.results.iter().map(|r| &r.1).collect();
        let group = quorum::largest_agreeing(&refs, v.validation.compare);
        if group.len() >= needed {
            self.decide(&unit, &group);
            return;
        }
        let made = self.votes.get(&unit).map_or(0, |v| v.made);
        if !self.outstanding(&unit, made).is_empty() {
            return;
        }
        // Every replica is in and no quorum: ask more workers, up to twice the replicas.
        let (made, limit, got, largest) = {
            let Some(v) = self.votes.get(&unit) else {
                return;
            };
            (
                v.made,
                v.validation.replicas * 2,
                v.results.len(),
                group.len(),
            )
        };
        // Only a worker that has not had a replica of this unit can break the tie.
        let fresh = {
            let Some(v) = self.votes.get(&unit) else {
                return;
            };
            self.workers
                .iter()
                .any(|(id, w)| !w.lost && !v.workers.contains(id.as_str()))
        };
        if made < limit && fresh {
            self.add_replica(&unit);
            self.dispatch();
            return;
        }
        tracing::warn!(unit = %unit, results = got, largest, needed, "no quorum");
        if let Some(v) = self.votes.remove(&unit) {
            for (_, r, id) in &v.results {
                if let Some(s) = &r.staging {
                    let _ = nexa_shared::artifact::remove_tree(s);
                }
                if id != job_id {
                    self.jobs.remove(id);
                }
            }
        }
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.set_state(JobState::Leased);
        }
        self.job_failed(
            job_id,
            format!(
                "no quorum: {got} results, the largest agreeing group has {largest}, {needed} needed"
            ),
            false,
        );
    }

    /// A replica that reported after its unit was decided: agreeing earns trust and
    /// credit, disagreeing loses trust, as if it had been in time.
    fn judge_late(&mut self, unit: &str, job_id: &str, worker: &str, result: JobResult) {
        let job = self.jobs.remove(job_id);
        let run_id = job.as_ref().map(|j| j.run_id.clone());
        let spec = job.map(|j| j.spec);
        self.judge_late_result(unit, worker, spec, result);
        if let Some(r) = run_id {
            self.maybe_finish(&r);
        }
    }

    /// A replica of a decided unit that will not report (it failed, or its lease
    /// expired): forget it.
    pub(super) fn drop_late_replica(&mut self, job_id: &str) -> bool {
        let Some(unit) = self.jobs.get(job_id).and_then(|j| j.unit.clone()) else {
            return false;
        };
        if self.votes.contains_key(&unit) {
            return false;
        }
        self.release(job_id);
        let run_id = self.jobs.remove(job_id).map(|j| j.run_id);
        if let Some(d) = self.decided.get_mut(&unit) {
            d.pending = d.pending.saturating_sub(1);
            if d.pending == 0 {
                self.decided.remove(&unit);
            }
        }
        if let Some(r) = run_id {
            self.maybe_finish(&r);
        }
        true
    }

    fn judge_late_result(
        &mut self,
        unit: &str,
        worker: &str,
        spec: Option<std::sync::Arc<JobSpec>>,
        result: JobResult,
    ) {
        let Some(d) = self.decided.get_mut(unit) else {
            if let Some(s) = &result.staging {
                let _ = nexa_shared::artifact::remove_tree(s);
            }
            return;
        };
        // The winner's files are sealed by now: compare manifests (with a tolerance,
        // a late result whose bytes differ is neither credited nor held against it).
        let same = result.outputs == d.canonical.outputs;
        let verdict = match (same, d.compare) {
            (true, _) => Some(true),
            (false, nexa_shared::spec::Compare::Exact) => Some(false),
            (false, nexa_shared::spec::Compare::Tolerance(_)) => None,
        };
        let kind = d.kind.clone();
        d.pending = d.pending.saturating_sub(1);
        if d.pending == 0 {
            self.decided.remove(unit);
        }
        if let Some(s) = &result.staging {
            let _ = nexa_shared::artifact::remove_tree(s);
        }
        let Some(agreed) = verdict else {
            return;
        };
        if let Some(w) = self.workers.get_mut(worker) {
            let t = w.trust.entry(kind).or_default();
            if agreed {
                t.validated();
                if let Some(spec) = &spec {
                    let c = credit_of(spec, &result);
                    w.credit.cpu_seconds += c.cpu_seconds;
                    w.credit.gpu_seconds += c.gpu_seconds;
                }
            } else {
                t.invalidated();
            }
            self.dirty_workers.insert(WorkerId::from(worker));
        }
        if !agreed {
            self.refusals.count(Refused::Outvoted);
            tracing::warn!(unit, worker, "late result outvoted by the quorum");
            self.record_outcome(worker, false);
        }
    }

    /// A quorum agreed: seal the first agreeing result; the agreeing workers earn trust
    /// and credit, the others lose trust; unfinished replicas are dropped.
    fn decide(&mut self, unit: &str, group: &[usize]) {
        let Some(v) = self.votes.remove(unit) else {
            return;
        };
        let single = v.single == Some(true);
        let mut winner = None;
        for (i, (worker, result, id)) in v.results.into_iter().enumerate() {
            let agreed = group.contains(&i);
            let credit = self.jobs.get(&id).map(|j| credit_of(&j.spec, &result));
            if let Some(w) = self.workers.get_mut(&worker) {
                let t: &mut Trust = w.trust.entry(v.kind.clone()).or_default();
                match (agreed, single) {
                    (true, true) => t.accepted_alone(),
                    (true, false) => t.validated(),
                    (false, _) => t.invalidated(),
                }
                if agreed && let Some(c) = credit {
                    w.credit.cpu_seconds += c.cpu_seconds;
                    w.credit.gpu_seconds += c.gpu_seconds;
                }
                self.dirty_workers.insert(WorkerId::from(worker.as_str()));
            }
            if !agreed {
                self.refusals.count(Refused::Outvoted);
                tracing::warn!(unit, worker = %worker, "result outvoted by the quorum");
                self.record_outcome(&worker, false);
            }
            if winner.is_none() && agreed {
                winner = Some((id, result));
            } else {
                if let Some(s) = &result.staging {
                    let _ = nexa_shared::artifact::remove_tree(s);
                }
                self.jobs.remove(&id);
            }
        }
        // Replicas still queued are not needed any more; running ones finish and are
        // judged against the winner when they report.
        let mut running = 0;
        for id in self.outstanding(unit, v.made) {
            if self
                .jobs
                .get(&id)
                .is_some_and(|j| j.state == JobState::Leased)
            {
                running += 1;
            } else {
                self.jobs.remove(&id);
            }
        }
        if let Some((id, result)) = winner {
            if running > 0 {
                let mut canonical = result.clone();
                canonical.staging = None;
                self.decided.insert(
                    unit.to_string(),
                    Decided {
                        canonical,
                        kind: v.kind.clone(),
                        compare: v.validation.compare,
                        pending: running,
                    },
                );
            }
            self.start_sealing(&id, result, None);
        }
    }
}
