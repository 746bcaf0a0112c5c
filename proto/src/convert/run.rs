//! Run progress and step records between the wire (`RunEvent`, `StepRecord`) and
//! [`nexa_shared::record`]. A status the receiver does not know is an error naming its
//! field, never a silent PENDING.

use super::{ConvertError, err};
use crate::v1;
use nexa_shared::job::JobProgress;
use nexa_shared::record::{
    ArtifactInfo, Progress, RunOutcome, RunSummary, ShardRecord, StepRecord, StepStatus,
};
use std::time::Duration;

impl From<StepStatus> for v1::StepState {
    fn from(s: StepStatus) -> Self {
        match s {
            StepStatus::Pending => v1::StepState::Pending,
            StepStatus::Running => v1::StepState::Running,
            StepStatus::Complete => v1::StepState::Complete,
            StepStatus::Skipped => v1::StepState::Skipped,
            StepStatus::Failed => v1::StepState::Failed,
            StepStatus::Blocked => v1::StepState::Blocked,
            StepStatus::Cancelled => v1::StepState::Cancelled,
        }
    }
}

fn status_from_wire(
    message: &'static str,
    field: &'static str,
    v: i32,
) -> Result<StepStatus, ConvertError> {
    Ok(match v1::StepState::try_from(v) {
        Ok(v1::StepState::Pending) => StepStatus::Pending,
        Ok(v1::StepState::Running) => StepStatus::Running,
        Ok(v1::StepState::Complete) => StepStatus::Complete,
        Ok(v1::StepState::Skipped) => StepStatus::Skipped,
        Ok(v1::StepState::Failed) => StepStatus::Failed,
        Ok(v1::StepState::Blocked) => StepStatus::Blocked,
        Ok(v1::StepState::Cancelled) => StepStatus::Cancelled,
        Ok(v1::StepState::Unspecified) | Err(_) => {
            return Err(err(
                message,
                field,
                format!("{v} is not a known step state"),
            ));
        }
    })
}

impl From<RunOutcome> for v1::RunOutcome {
    fn from(o: RunOutcome) -> Self {
        match o {
            RunOutcome::Succeeded => v1::RunOutcome::Succeeded,
            RunOutcome::Failed => v1::RunOutcome::Failed,
            RunOutcome::Cancelled => v1::RunOutcome::Cancelled,
        }
    }
}

fn outcome_from_wire(v: i32) -> Result<RunOutcome, ConvertError> {
    Ok(match v1::RunOutcome::try_from(v) {
        Ok(v1::RunOutcome::Succeeded) => RunOutcome::Succeeded,
        Ok(v1::RunOutcome::Failed) => RunOutcome::Failed,
        Ok(v1::RunOutcome::Cancelled) => RunOutcome::Cancelled,
        Ok(v1::RunOutcome::Unspecified) | Err(_) => {
            return Err(err(
                "RunFinished",
                "outcome",
                format!("{v} is not a known outcome"),
            ));
        }
    })
}

impl From<&ShardRecord> for v1::ShardRecord {
    fn from(s: &ShardRecord) -> Self {
        Self {
            index: s.index,
            status: v1::StepState::from(s.status) as i32,
            cache_key: s.cache_key.as_ref().map(|k| k.to_string()),
            hash: s.hash.clone(),
            worker: s.worker.clone(),
            attempts: s.attempts,
            error: s.error.clone(),
        }
    }
}

impl TryFrom<v1::ShardRecord> for ShardRecord {
    type Error = ConvertError;

    fn try_from(s: v1::ShardRecord) -> Result<Self, ConvertError> {
        Ok(Self {
            index: s.index,
            status: status_from_wire("ShardRecord", "status", s.status)?,
            cache_key: s.cache_key.map(Into::into),
            hash: s.hash,
            worker: s.worker,
            attempts: s.attempts,
            error: s.error,
        })
    }
}

impl From<&StepRecord> for v1::StepRecord {
    fn from(r: &StepRecord) -> Self {
        let mut s = step_without_shards(r);
        s.shards = r.shards.iter().map(v1::ShardRecord::from).collect();
        s
    }
}

/// A step record on the wire without its shards: what a run's end carries (a
/// million shards' records were ~1 GB as messages; each was streamed as it changed,
/// and the step records `Status` answers with hold them).
fn step_without_shards(r: &StepRecord) -> v1::StepRecord {
    {
        v1::StepRecord {
            id: r.id.clone(),
            status: v1::StepState::from(r.status) as i32,
            cache_key: r.cache_key.as_ref().map(|k| k.to_string()),
            outputs: r
                .outputs
                .iter()
                .map(|(name, a)| {
                    let wire = v1::Artifact {
                        path: a.path.clone(),
                        hash: a.hash.clone(),
                        bytes: a.bytes,
                    };
                    (name.clone(), wire)
                })
                .collect(),
            run_id: r.run_id.clone(),
            attempts: r.attempts,
            error: r.error.clone(),
            worker: r.worker.clone(),
            log: r.log.clone(),
            shards: Vec::new(),
            duration_ms: r.duration_ms,
            progress: r.progress.as_ref().map(v1::JobProgress::from),
        }
    }
}

impl TryFrom<v1::StepRecord> for StepRecord {
    type Error = ConvertError;

    fn try_from(r: v1::StepRecord) -> Result<Self, ConvertError> {
        const M: &str = "StepRecord";
        if r.id.is_empty() {
            return Err(err(M, "id", "is empty"));
        }
        Ok(Self {
            status: status_from_wire(M, "status", r.status)?,
            id: r.id,
            cache_key: r.cache_key.map(Into::into),
            outputs: r
                .outputs
                .into_iter()
                .map(|(name, a)| {
                    let info = ArtifactInfo {
                        path: a.path,
                        hash: a.hash,
                        bytes: a.bytes,
                    };
                    (name, info)
                })
                .collect(),
            run_id: r.run_id,
            attempts: r.attempts,
            error: r.error,
            worker: r.worker,
            log: r.log,
            shards: r
                .shards
                .into_iter()
                .map(ShardRecord::try_from)
                .collect::<Result<_, _>>()?,
            duration_ms: r.duration_ms,
            progress: r.progress.map(JobProgress::try_from).transpose()?,
        })
    }
}

impl From<&Progress> for v1::RunEvent {
    fn from(p: &Progress) -> Self {
        use v1::run_event::Event as E;
        let event = match p {
            Progress::Step {
                step,
                status,
                detail,
            } => E::Step(v1::StepChanged {
                step: step.clone(),
                status: v1::StepState::from(*status) as i32,
                detail: detail.clone(),
            }),
            Progress::Shards {
                step,
                count,
                cached,
            } => E::Shards(v1::ShardsPlanned {
                step: step.clone(),
                count: *count,
                cached: *cached,
            }),
            Progress::Shard {
                step,
                index,
                status,
            } => E::Shard(v1::ShardChanged {
                step: step.clone(),
                index: *index,
                status: v1::StepState::from(*status) as i32,
            }),
            Progress::Retry {
                job,
                attempt,
                delay,
                error,
            } => E::Retry(v1::JobRetried {
                job: job.clone(),
                attempt: *attempt,
                delay_s: delay.as_secs_f64(),
                error: error.clone(),
            }),
            Progress::Job {
                step,
                shard,
                progress,
            } => E::Progress(v1::JobProgressed {
                step: step.clone(),
                shard: *shard,
                progress: Some(v1::JobProgress::from(progress)),
            }),
            Progress::Finished(s) => E::Finished(v1::RunFinished {
                run_id: s.run_id.to_string(),
                pipeline: s.pipeline.clone(),
                outcome: v1::RunOutcome::from(s.outcome) as i32,
                steps: s.steps.iter().map(step_without_shards).collect(),
                elapsed_s: s.elapsed.as_secs_f64(),
            }),
        };
        Self { event: Some(event) }
    }
}

impl TryFrom<v1::RunEvent> for Progress {
    type Error = ConvertError;

    fn try_from(e: v1::RunEvent) -> Result<Self, ConvertError> {
        use v1::run_event::Event as E;
        Ok(match e.event {
            None => return Err(err("RunEvent", "event", "is missing")),
            Some(E::Step(s)) => Progress::Step {
                status: status_from_wire("StepChanged", "status", s.status)?,
                step: s.step,
                detail: s.detail,
            },
            Some(E::Shards(s)) => Progress::Shards {
                step: s.step,
                count: s.count,
                cached: s.cached,
            },
            Some(E::Shard(s)) => Progress::Shard {
                status: status_from_wire("ShardChanged", "status", s.status)?,
                step: s.step,
                index: s.index,
            },
            Some(E::Retry(r)) => Progress::Retry {
                delay: Duration::try_from_secs_f64(r.delay_s)
                    .map_err(|_| err("JobRetried", "delay_s", "is not a duration"))?,
                job: r.job,
                attempt: r.attempt,
                error: r.error,
            },
            Some(E::Progress(p)) => Progress::Job {
                step: p.step,
                shard: p.shard,
                progress: p
                    .progress
                    .map(JobProgress::try_from)
                    .transpose()?
                    .ok_or_else(|| err("JobProgressed", "progress", "is missing"))?,
            },
            Some(E::Finished(f)) => Progress::Finished(RunSummary {
                outcome: outcome_from_wire(f.outcome)?,
                elapsed: Duration::try_from_secs_f64(f.elapsed_s)
                    .map_err(|_| err("RunFinished", "elapsed_s", "is not a duration"))?,
                run_id: f.run_id.into(),
                pipeline: f.pipeline,
                steps: f
                    .steps
                    .into_iter()
                    .map(StepRecord::try_from)
                    .collect::<Result<_, _>>()?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StepRecord {
        let mut r = StepRecord::pending("train", "20261201T000000-abcd");
        r.status = StepStatus::Complete;
        r.cache_key = Some("k".into());
        r.outputs.insert(
            "model".into(),
            ArtifactInfo {
                path: "artifacts/model".into(),
                hash: "blake3:00".into(),
                bytes: 7,
            },
        );
        r.shards.push(ShardRecord {
            index: 3,
            status: StepStatus::Skipped,
            cache_key: None,
            hash: Some("blake3:01".into()),
            worker: Some("ab".into()),
            attempts: 2,
            error: None,
        });
        r.duration_ms = Some(12);
        r
    }

    #[test]
    fn every_progress_event_round_trips() {
        let events = vec![
            Progress::Step {
                step: "a".into(),
                status: StepStatus::Blocked,
                detail: Some("upstream failed".into()),
            },
            Progress::Step {
                step: "a".into(),
                status: StepStatus::Running,
                detail: None,
            },
            Progress::Shards {
                step: "a".into(),
                count: 9,
                cached: 4,
            },
            Progress::Shard {
                step: "a".into(),
                index: 8,
                status: StepStatus::Cancelled,
            },
            Progress::Retry {
                job: "r/a".into(),
                attempt: 2,
                delay: Duration::from_millis(1500),
                error: "exit 1".into(),
            },
            Progress::Finished(RunSummary {
                run_id: "r".into(),
                pipeline: "p".into(),
                outcome: RunOutcome::Cancelled,
                steps: vec![record()],
                elapsed: Duration::from_millis(250),
            }),
        ];
        for p in events {
            let back = Progress::try_from(v1::RunEvent::from(&p)).expect("round trip");
            // A run's end carries its step records without their shards (each shard was
            // an event of its own; `Status` has them all).
            let want = match p {
                Progress::Finished(mut s) => {
                    assert!(s.steps.iter().any(|r| !r.shards.is_empty()));
                    for r in &mut s.steps {
                        r.shards.clear();
                    }
                    Progress::Finished(s)
                }
                p => p,
            };
            assert_eq!(format!("{back:?}"), format!("{want:?}"));
        }
    }

    #[test]
    fn unknown_states_and_missing_events_name_their_field() {
        let mut wire = v1::RunEvent::from(&Progress::Step {
            step: "a".into(),
            status: StepStatus::Failed,
            detail: None,
        });
        if let Some(v1::run_event::Event::Step(s)) = &mut wire.event {
            s.status = 0;
        }
        let e = Progress::try_from(wire).expect_err("unspecified state");
        assert_eq!((e.message, e.field), ("StepChanged", "status"));
        let e = Progress::try_from(v1::RunEvent { event: None }).expect_err("no event");
        assert_eq!(e.field, "event");
        let mut r = v1::StepRecord::from(&record());
        r.shards[0].status = 99;
        let e = StepRecord::try_from(r).expect_err("unknown shard state");
        assert_eq!((e.message, e.field), ("ShardRecord", "status"));
    }
}

impl From<&JobProgress> for v1::JobProgress {
    fn from(p: &JobProgress) -> Self {
        Self {
            step: p.step,
            total: p.total,
            loss: p.loss,
            records: p.records,
        }
    }
}

impl TryFrom<v1::JobProgress> for JobProgress {
    type Error = ConvertError;

    fn try_from(p: v1::JobProgress) -> Result<Self, ConvertError> {
        if p.loss.is_some_and(|l| !l.is_finite()) {
            return Err(err("JobProgress", "loss", "is not a finite number"));
        }
        Ok(Self {
            step: p.step,
            total: p.total,
            loss: p.loss,
            records: p.records,
        })
    }
}
