//! The one place where wire types and domain types meet. Conversions from the wire are
//! `TryFrom` and fail naming the field that is missing or malformed. This file holds
//! hardware, jobs, leases and results; `run.rs` holds run progress and step records, `workers.rs` worker states.

mod lineage;
mod models;
mod run;
mod workers;

pub use workers::{admin_state_from_wire, worker_state_from_wire};

use crate::v1;
use nexa_shared::hardware::{Gpu, Profile, Requirements};
use nexa_shared::job::{JobInput, JobResult, JobSpec, Lease, Outcome, OutputFile};
use std::path::PathBuf;
use std::time::Duration;

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}: field '{field}' {problem}")]
pub struct ConvertError {
    /// The message type.
    pub message: &'static str,
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn err(message: &'static str, field: &'static str, problem: impl Into<String>) -> ConvertError {
    ConvertError {
        message,
        field,
        problem: problem.into(),
    }
}

impl From<&Gpu> for v1::Gpu {
    fn from(g: &Gpu) -> Self {
        Self {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total: g.memory_total,
            memory_free: g.memory_free,
            compute_major: g.compute_capability.0,
            compute_minor: g.compute_capability.1,
            mig_enabled: g.mig_enabled,
        }
    }
}

impl From<v1::Gpu> for Gpu {
    fn from(g: v1::Gpu) -> Self {
        Self {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            memory_total: g.memory_total,
            memory_free: g.memory_free,
            compute_capability: (g.compute_major, g.compute_minor),
            mig_enabled: g.mig_enabled,
        }
    }
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<&Profile> for v1::HardwareProfile {
    fn from(p: &Profile) -> Self {
        Self {
            hostname: p.hostname.clone(),
            os: p.os.clone(),
            arch: p.arch.clone(),
            cpu_model: p.cpu_model.clone(),
            cores: p.cores,
            memory_total: p.memory_total,
            memory_available: p.memory_available,
            disk_free: p.disk_free,
            gpus: p.gpus.iter().map(v1::Gpu::from).collect(),
            driver_version: p.driver_version.clone().unwrap_or_default(),
            cuda_version: p.cuda_version.clone().unwrap_or_default(),
            gpu_note: p.gpu_note.clone().unwrap_or_default(),
            labels: p.labels.clone().into_iter().collect(),
            runtimes_pending: p.runtimes_pending,
        }
    }
}

impl From<v1::HardwareProfile> for Profile {
    fn from(p: v1::HardwareProfile) -> Self {
        Self {
            hostname: p.hostname,
            os: p.os,
            arch: p.arch,
            cpu_model: p.cpu_model,
            cores: p.cores,
            memory_total: p.memory_total,
            memory_available: p.memory_available,
            disk_free: p.disk_free,
            gpus: p.gpus.into_iter().map(Gpu::from).collect(),
            driver_version: opt(p.driver_version),
            cuda_version: opt(p.cuda_version),
            gpu_note: opt(p.gpu_note),
            labels: p.labels.into_iter().collect(),
            runtimes_pending: p.runtimes_pending,
        }
    }
}

impl From<&Requirements> for v1::Requirements {
    fn from(r: &Requirements) -> Self {
        Self {
            cpus: r.cpus,
            memory: r.memory,
            gpus: r.gpus,
            gpu_memory: r.gpu_memory,
            compute_major: r.compute_capability.map(|c| c.0),
            compute_minor: r.compute_capability.map_or(0, |c| c.1),
            labels: r.labels.clone().into_iter().collect(),
            container: r.container,
        }
    }
}

impl From<v1::Requirements> for Requirements {
    fn from(r: v1::Requirements) -> Self {
        Self {
            cpus: r.cpus,
            memory: r.memory,
            gpus: r.gpus,
            gpu_memory: r.gpu_memory,
            compute_capability: r.compute_major.map(|m| (m, r.compute_minor)),
            labels: r.labels.into_iter().collect(),
            container: r.container,
        }
    }
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(j: &JobSpec) -> Self {
        Self {
            job_id: j.job_id.to_string(),
            run_id: j.run_id.to_string(),
            step_id: j.step_id.clone(),
            shard_index: j.shard.map_or(0, |s| s.0),
            shard_count: j.shard.map_or(0, |s| s.1),
            uses: j.uses.clone(),
            params_json: j.params.to_string(),
            inputs: j
                .inputs
                .iter()
                .map(|i| v1::JobInput {
                    name: i.name.clone(),
                    digest: i.digest.to_string(),
                    is_dir: i.is_dir,
                    file_name: i
                        .source
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("input")
                        .to_string(),
                })
                .collect(),
            output_names: j.outputs.clone(),
            timeout_ms: j.timeout.map_or(0, |t| t.as_millis() as u64),
            requirements: Some(v1::Requirements::from(&j.requirements)),
        }
    }
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = ConvertError;

    fn try_from(j: v1::JobSpec) -> Result<Self, ConvertError> {
        const M: &str = "JobSpec";
        if j.job_id.is_empty() {
            return Err(err(M, "job_id", "is empty"));
        }
        let params = serde_json::from_str(&j.params_json)
            .map_err(|e| err(M, "params_json", e.to_string()))?;
        let shard = (j.shard_count > 0).then_some((j.shard_index, j.shard_count));
        let mut inputs = Vec::with_capacity(j.inputs.len());
        for i in j.inputs {
            nexa_shared::digest::parse(&i.digest)
                .map_err(|e| err(M, "inputs.digest", e.to_string()))?;
            let file_name = nexa_shared::paths::safe_component(&i.file_name);
            inputs.push(JobInput {
                name: i.name,
                digest: i.digest.into(),
                is_dir: i.is_dir,
                source: PathBuf::from(file_name),
                range: None,
            });
        }
        Ok(Self {
            job_id: j.job_id.into(),
            run_id: j.run_id.into(),
            step_id: j.step_id,
            shard,
            uses: j.uses,
            params,
            inputs,
            outputs: j.output_names,
            timeout: (j.timeout_ms > 0).then(|| Duration::from_millis(j.timeout_ms)),
            requirements: j.requirements.map(Requirements::from).unwrap_or_default(),
        })
    }
}

impl From<&Lease> for v1::Lease {
    fn from(l: &Lease) -> Self {
        Self {
            job: Some(v1::JobSpec::from(&l.job)),
            generation: l.generation,
            attempt: l.attempt,
            deadline_unix_ms: 0,
        }
    }
}

/// A lease from the wire, with the GPUs the coordinator reserved for it.
pub fn lease_from_wire(l: v1::Lease, gpus: Vec<String>) -> Result<Lease, ConvertError> {
    let job = l.job.ok_or_else(|| err("Lease", "job", "is missing"))?;
    Ok(Lease {
        job: JobSpec::try_from(job)?,
        generation: l.generation,
        attempt: l.attempt,
        gpus,
    })
}

fn outcome_to_wire(o: Outcome) -> v1::JobOutcome {
    match o {
        Outcome::Succeeded => v1::JobOutcome::Succeeded,
        Outcome::Failed => v1::JobOutcome::Failed,
        Outcome::TimedOut => v1::JobOutcome::TimedOut,
        Outcome::Cancelled => v1::JobOutcome::Cancelled,
    }
}

impl From<&JobResult> for v1::JobResult {
    fn from(r: &JobResult) -> Self {
        Self {
            job_id: r.job_id.to_string(),
            generation: r.generation,
            attempt: r.attempt,
            outcome: outcome_to_wire(r.outcome) as i32,
            exit_code: r.exit_code,
            outputs: r
                .outputs
                .iter()
                .map(|o| v1::OutputFile {
                    output: o.output.clone(),
                    path: o.path.clone(),
                    size: o.size,
                    digest: o.digest.to_string(),
                })
                .collect(),
            started_unix_ms: r.started_ms,
            ended_unix_ms: r.ended_ms,
            error: r.error.clone(),
            worker_public_key: r.worker_key.to_vec(),
            signature: r.signature.clone(),
            progress: r.progress.as_ref().map(v1::JobProgress::from),
        }
    }
}

impl TryFrom<v1::JobResult> for JobResult {
    type Error = ConvertError;

    fn try_from(r: v1::JobResult) -> Result<Self, ConvertError> {
        const M: &str = "JobResult";
        let outcome = match v1::JobOutcome::try_from(r.outcome) {
            Ok(v1::JobOutcome::Succeeded) => Outcome::Succeeded,
            Ok(v1::JobOutcome::Failed) => Outcome::Failed,
            Ok(v1::JobOutcome::TimedOut) => Outcome::TimedOut,
            Ok(v1::JobOutcome::Cancelled) => Outcome::Cancelled,
            _ => {
                return Err(err(
                    M,
                    "outcome",
                    format!("{} is not a known outcome", r.outcome),
                ));
            }
        };
        let worker_key: [u8; 32] = r
            .worker_public_key
            .as_slice()
            .try_into()
            .map_err(|_| err(M, "worker_public_key", "must be 32 bytes"))?;
        if r.job_id.is_empty() {
            return Err(err(M, "job_id", "is empty"));
        }
        Ok(Self {
            job_id: r.job_id.into(),
            generation: r.generation,
            attempt: r.attempt,
            outcome,
            exit_code: r.exit_code,
            outputs: r
                .outputs
                .into_iter()
                .map(|o| OutputFile {
                    output: o.output,
                    path: o.path,
                    size: o.size,
                    digest: o.digest.into(),
                })
                .collect(),
            started_ms: r.started_unix_ms,
            ended_ms: r.ended_unix_ms,
            error: r.error,
            staging: None,
            log: None,
            progress: r
                .progress
                .map(nexa_shared::job::JobProgress::try_from)
                .transpose()?,
            worker_key,
            signature: r.signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_and_bad_ones_name_the_field() {
        let r = JobResult {
            job_id: "r/s/1".into(),
            generation: 7,
            attempt: 2,
            outcome: Outcome::Failed,
            exit_code: Some(3),
            outputs: vec![OutputFile {
                output: "out".into(),
                path: "a/b".into(),
                size: 1,
                digest: "blake3:00".into(),
            }],
            started_ms: 1,
            ended_ms: 2,
            error: "boom".into(),
            staging: None,
            log: None,
            progress: Some(nexa_shared::job::JobProgress {
                records: Some(400),
                total: Some(400),
                ..Default::default()
            }),
            worker_key: [9; 32],
            signature: vec![1, 2],
        };
        let back = JobResult::try_from(v1::JobResult::from(&r)).expect("round trip");
        assert_eq!(back, r);
        let mut wire = v1::JobResult::from(&r);
        wire.worker_public_key = vec![1];
        let e = JobResult::try_from(wire).expect_err("short key");
        assert_eq!(e.field, "worker_public_key");
        let mut wire = v1::JobResult::from(&r);
        wire.outcome = 0;
        assert_eq!(
            JobResult::try_from(wire).expect_err("unspecified").field,
            "outcome"
        );
    }

    #[test]
    fn specs_and_profiles_round_trip() {
        let spec = JobSpec {
            job_id: "r/s".into(),
            run_id: "r".into(),
            step_id: "s".into(),
            shard: Some((1, 4)),
            uses: "exec".into(),
            params: serde_json::json!({"cmd": ["true"]}),
            inputs: vec![JobInput {
                name: "data".into(),
                digest: format!("blake3:{}", "0".repeat(64)).into(),
                is_dir: false,
                source: PathBuf::from("x.csv"),
                range: None,
            }],
            outputs: vec!["out".into()],
            timeout: Some(Duration::from_secs(5)),
            requirements: Requirements {
                gpus: 1,
                compute_capability: Some((9, 0)),
                ..Requirements::default()
            },
        };
        assert_eq!(
            JobSpec::try_from(v1::JobSpec::from(&spec)).expect("spec"),
            spec
        );
        let p = Profile {
            hostname: "h".into(),
            gpus: vec![Gpu {
                index: 0,
                uuid: "GPU-1".into(),
                name: "n".into(),
                memory_total: 1,
                memory_free: 1,
                compute_capability: (9, 0),
                mig_enabled: false,
            }],
            driver_version: Some("580".into()),
            runtimes_pending: true,
            ..Profile::default()
        };
        assert_eq!(Profile::from(v1::HardwareProfile::from(&p)), p);
    }
}
