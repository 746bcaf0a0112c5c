//! Leases and reports as the worker service hands them out and takes them in, and
//! `Exchange`: a worker's results and its ask for more work in one call.

use super::worker_service::{
    MAX_ATTEMPTS_PER_INPUT, MAX_SERVED, Served, WorkerApi, forget_oldest, lock,
};
use crate::scheduler::Want;
use nexa_proto::v1;
use nexa_shared::job::{JobResult, Lease};
use std::time::{Duration, Instant};
use tonic::Status;

/// The most results, and the most leases, one `Exchange` call may carry.
pub const MAX_EXCHANGE: usize = 1_024;

impl WorkerApi {
    /// Up to `want.slots` leases for `worker`, waiting up to `wait` (capped by the
    /// mesh's longest lease wait) for the first when `want.wait`. Each lease's inputs
    /// become fetchable by this worker for that attempt.
    pub(super) async fn leases(
        &self,
        worker: &str,
        want: Want,
        wait: Duration,
    ) -> Result<Vec<v1::LeaseResponse>, Status> {
        let wait = wait.min(self.cfg.max_lease_wait);
        // Below the disk's floor nothing is leased: its outputs would have nowhere to go.
        // The worker asks again; the jobs stay queued.
        if self.cfg.disk.as_ref().is_some_and(|g| g.is_low()) {
            if want.wait {
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
            return Ok(Vec::new());
        }
        let leases = if want.wait {
            let waited = tokio::select! {
                r = tokio::time::timeout(wait, self.coord.lease_many(worker, want)) => r,
                () = self.cfg.stopped() => Ok(Vec::new()),
            };
            match waited {
                Ok(l) if l.is_empty() => {
                    return Err(Status::unavailable("the coordinator is shutting down"));
                }
                Ok(l) => l,
                Err(_) => return Ok(Vec::new()),
            }
        } else {
            self.coord.lease_many(worker, want).await
        };
        self.serve_inputs(worker, &leases);
        Ok(leases
            .iter()
            .map(|l| v1::LeaseResponse {
                lease: Some(v1::Lease::from(l)),
                gpu_uuids: l.gpus.clone(),
            })
            .collect())
    }

    /// Makes the inputs `leases` name fetchable by `worker`, each for its attempt.
    fn serve_inputs(&self, worker: &str, leases: &[Lease]) {
        if leases.is_empty() {
            return;
        }
        {
            let mut served = lock(&self.served);
            let now = Instant::now();
            for i in leases.iter().flat_map(|l| &l.job.inputs) {
                served.insert(
                    i.digest.to_string(),
                    Served {
                        path: i.source.clone(),
                        is_dir: i.is_dir,
                        range: i.range.clone(),
                        at: now,
                    },
                );
            }
            if served.len() > MAX_SERVED {
                forget_oldest(&mut served, MAX_SERVED / 2);
            }
        }
        let mut leased = lock(&self.leased_inputs);
        let mine = leased.entry(worker.to_string()).or_default();
        for lease in leases {
            for i in &lease.job.inputs {
                let attempts = mine.entry(i.digest.to_string()).or_default();
                if attempts.len() >= MAX_ATTEMPTS_PER_INPUT {
                    attempts.remove(0);
                }
                attempts.push((lease.job.job_id.to_string(), lease.generation));
            }
        }
    }

    /// Readies a result for the engine: its attempt's staging tree is closed to further
    /// uploads, the attempt's inputs are no longer fetchable, and what unfinished
    /// streams left is removed; the result names its staging tree and its log.
    pub(super) async fn prepare_report(
        &self,
        worker: &str,
        result: JobResult,
    ) -> Result<JobResult, Status> {
        let mut ready = self.prepare_reports(worker, vec![result]).await?;
        ready
            .pop()
            .ok_or_else(|| Status::internal("a result was lost readying it"))
    }

    /// [`WorkerApi::prepare_report`] for many results, their file system work in one
    /// trip to the blocking pool.
    async fn prepare_reports(
        &self,
        worker: &str,
        mut results: Vec<JobResult>,
    ) -> Result<Vec<JobResult>, Status> {
        let mut trees = Vec::with_capacity(results.len());
        for result in &results {
            // Uploads created the staging directory; a job with no files and no log has
            // none (the sealer then seals an empty payload).
            let staging = self.staging(worker, &result.job_id, result.generation);
            // From here on nothing can be added to the attempt's staging tree.
            self.gates.close(&staging);
            self.forget_inputs(worker, &result.job_id, result.generation);
            trees.push(staging);
        }
        // What unfinished streams left, and whether there is a log: off the runtime.
        let (trees, logs) = tokio::task::spawn_blocking(move || {
            let logs: Vec<_> = trees
                .iter()
                .map(|staging| {
                    let _ = std::fs::remove_dir_all(super::uploads::parts_dir(staging));
                    let log = staging.join(".log").join("log");
                    log.is_file().then_some(log)
                })
                .collect();
            (trees, logs)
        })
        .await
        .map_err(super::status::join)?;
        for ((result, staging), log) in results.iter_mut().zip(trees).zip(logs) {
            result.log = log;
            result.staging = Some(staging);
        }
        nexa_shared::fail_point!(
            "report.judge",
            Status::unavailable(nexa_shared::failpoint::injected("report.judge").to_string())
        );
        Ok(results)
    }

    /// One `Exchange` call of `worker`: its results judged first, each exactly as one
    /// sent alone to `Report` (a malformed one is refused on its own, not the call),
    /// then up to `want` leases. The call waits for work only when it carries no
    /// results, so that verdicts are never held back.
    pub(super) async fn exchange_for(
        &self,
        worker: &str,
        req: v1::ExchangeRequest,
    ) -> Result<v1::ExchangeResponse, Status> {
        if req.results.len() > MAX_EXCHANGE || req.want as usize > MAX_EXCHANGE {
            return Err(Status::invalid_argument(format!(
                "an exchange carries at most {MAX_EXCHANGE} results and asks for at most \
                 {MAX_EXCHANGE} leases (got {} results, want {})",
                req.results.len(),
                req.want
            )));
        }
        let waits = req.results.is_empty() && req.wait_ms > 0;
        let mut verdicts = vec![None; req.results.len()];
        let mut judged = Vec::with_capacity(req.results.len());
        let mut slots = Vec::with_capacity(req.results.len());
        for (i, r) in req.results.into_iter().enumerate() {
            match JobResult::try_from(r) {
                Ok(result) => {
                    judged.push(result);
                    slots.push(i);
                }
                Err(e) => verdicts[i] = Some(Err(format!("malformed result: {e}"))),
            }
        }
        if !judged.is_empty() {
            let judged = self.prepare_reports(worker, judged).await?;
            let answers = self.coord.report_batch(worker, judged).await?;
            for (i, verdict) in slots.into_iter().zip(answers) {
                verdicts[i] = Some(verdict);
            }
        }
        let leases = if req.want == 0 {
            Vec::new()
        } else {
            let want = Want {
                slots: req.want as usize,
                wait: waits,
            };
            self.leases(worker, want, Duration::from_millis(req.wait_ms))
                .await?
        };
        Ok(v1::ExchangeResponse {
            verdicts: verdicts
                .into_iter()
                .map(|v| {
                    let v = v.unwrap_or_else(|| Err("not judged".to_string()));
                    v1::ReportResponse {
                        accepted: v.is_ok(),
                        reason: v.err().unwrap_or_default(),
                    }
                })
                .collect(),
            leases,
        })
    }
}
