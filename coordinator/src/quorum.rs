//! Replication and quorum for untrusted workers (BOINC's validation and adaptive
//! replication), as pure functions: which results agree, and how much a worker is
//! trusted.

use nexa_shared::job::JobResult;
use nexa_shared::spec::Compare;
use std::path::Path;

/// Consecutive quorum-validated results after which a worker is trusted for a kind of
/// job.
pub const TRUST_AFTER: u64 = 10;
/// The least probability with which a trusted worker's result is still spot-checked.
pub const MIN_SPOT_CHECK: f64 = 0.02;
/// Files larger than this are compared by digest only, even with a tolerance.
const MAX_TOLERANT_BYTES: u64 = 16 << 20;

/// A worker's record for one kind of job.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trust {
    /// Accepted results since the last invalid one (validated or trusted singles).
    pub streak: u64,
    /// Quorum-validated results since the last invalid one.
    pub validated_streak: u64,
    /// Results a quorum agreed with, ever.
    pub valid: u64,
    /// Results a quorum disagreed with, ever.
    pub invalid: u64,
}

impl Trust {
    /// Trusted: enough validated results in a row.
    pub fn trusted(&self) -> bool {
        self.validated_streak >= TRUST_AFTER
    }

    /// The probability that a job this worker takes is replicated anyway: 1 until it is
    /// trusted, then 1/streak, never below [`MIN_SPOT_CHECK`].
    pub fn spot_check_probability(&self) -> f64 {
        if !self.trusted() {
            return 1.0;
        }
        (1.0 / self.streak.max(1) as f64).clamp(MIN_SPOT_CHECK, 1.0)
    }

    /// A quorum agreed with its result.
    pub fn validated(&mut self) {
        self.valid += 1;
        self.streak += 1;
        self.validated_streak += 1;
    }

    /// Its result was accepted alone (it was trusted and not spot-checked).
    pub fn accepted_alone(&mut self) {
        self.streak += 1;
    }

    /// A quorum disagreed with its result: trust starts over.
    pub fn invalidated(&mut self) {
        self.invalid += 1;
        self.streak = 0;
        self.validated_streak = 0;
    }
}

/// Whether two results agree under `compare`. Results carry their signed manifests;
/// with a tolerance, files whose digests differ are read from the results' staging
/// directories and compared number by number.
pub fn agree(a: &JobResult, b: &JobResult, compare: Compare) -> bool {
    if a.outputs.len() != b.outputs.len() {
        return false;
    }
    for (x, y) in a.outputs.iter().zip(&b.outputs) {
        if x.output != y.output || x.path != y.path {
            return false;
        }
        if x.digest == y.digest && x.size == y.size {
            continue;
        }
        let Compare::Tolerance(rel) = compare else {
            return false;
        };
        if x.size > MAX_TOLERANT_BYTES || y.size > MAX_TOLERANT_BYTES {
            return false;
        }
        let read = |r: &JobResult, o: &nexa_shared::job::OutputFile| {
            r.staging
                .as_deref()
                .map(|s| s.join(&o.output).join(&o.path))
                .and_then(|p: std::path::PathBuf| std::fs::read_to_string(Path::new(&p)).ok())
        };
        match (read(a, x), read(b, y)) {
            (Some(p), Some(q)) if close_texts(&p, &q, rel) => {}
            _ => return false,
        }
    }
    true
}

/// Two texts are close when they parse as the same JSON up to `rel` on every number,
/// or, failing that, have the same words with numbers within `rel`.
pub fn close_texts(a: &str, b: &str, rel: f64) -> bool {
    if let (Ok(x), Ok(y)) = (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        return close_json(&x, &y, rel);
    }
    let (wa, wb): (Vec<&str>, Vec<&str>) = (
        a.split_whitespace().collect(),
        b.split_whitespace().collect(),
    );
    wa.len() == wb.len() && wa.iter().zip(&wb).all(|(p, q)| {
        p == q || matches!((p.parse::<f64>(), q.parse::<f64>()), (Ok(x), Ok(y)) if close(x, y, rel))
    })
}

fn close(x: f64, y: f64, rel: f64) -> bool {
    x == y || (x - y).abs() <= rel * x.abs().max(y.abs())
}

fn close_json(a: &serde_json::Value, b: &serde_json::Value, rel: f64) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => close(x, y, rel),
            _ => x == y,
        },
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close_json(p, q, rel))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| close_json(v, w, rel)))
        }
        _ => a == b,
    }
}

/// The largest group of mutually agreeing results (indices into `results`, in order),
/// each grouped with the first result it agrees with.
pub fn largest_agreeing(results: &[&JobResult], compare: Compare) -> Vec<usize> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match groups.iter_mut().find(|g| agree(results[g[0]], r, compare)) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
        .into_iter()
        .max_by_key(|g| (g.len(), std::cmp::Reverse(g[0])))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexa_shared::job::{Outcome, OutputFile};

    fn result(digest: &str) -> JobResult {
        JobResult {
            job_id: "j".into(),
            generation: 1,
            attempt: 1,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            outputs: vec![OutputFile {
                output: "out".into(),
                path: "answer".into(),
                size: 3,
                digest: digest.into(),
            }],
            started_ms: 0,
            ended_ms: 1000,
            error: String::new(),
            staging: None,
            log: None,
            progress: None,
            worker_key: [0; 32],
            signature: Vec::new(),
        }
    }

    #[test]
    fn the_majority_wins_and_a_liar_is_left_out() {
        let (good, bad) = (result("blake3:aa"), result("blake3:bb"));
        let good2 = result("blake3:aa");
        let all = [&bad, &good, &good2];
        assert_eq!(largest_agreeing(&all, Compare::Exact), [1, 2]);
        let split = [&good, &bad];
        assert_eq!(largest_agreeing(&split, Compare::Exact).len(), 1);
    }

    #[test]
    fn tolerance_compares_numbers_in_json_and_text() {
        assert!(close_texts(
            r#"{"loss": 0.5000, "n": [1, 2]}"#,
            r#"{"loss": 0.50001, "n": [1, 2]}"#,
            1e-3
        ));
        assert!(!close_texts(r#"{"loss": 0.5}"#, r#"{"loss": 0.6}"#, 1e-3));
        assert!(!close_texts(r#"{"loss": 0.5}"#, r#"{"lost": 0.5}"#, 1e-3));
        assert!(close_texts("acc 0.9100\nn 10\n", "acc 0.91001 n 10", 1e-3));
        assert!(!close_texts("acc 0.91 n 10", "acc 0.91 n 11", 1e-3));
    }

    #[test]
    fn trust_is_earned_by_validated_results_and_lost_at_once() {
        let mut t = Trust::default();
        for _ in 0..TRUST_AFTER - 1 {
            t.validated();
            t.accepted_alone();
        }
        assert!(!t.trusted(), "singles do not earn trust");
        assert_eq!(t.spot_check_probability(), 1.0);
        t.validated();
        assert!(t.trusted());
        let p = t.spot_check_probability();
        assert!((MIN_SPOT_CHECK..0.1).contains(&p), "{p}");
        for _ in 0..1000 {
            t.accepted_alone();
        }
        assert_eq!(t.spot_check_probability(), MIN_SPOT_CHECK);
        t.invalidated();
        assert!(!t.trusted());
        assert_eq!(t.spot_check_probability(), 1.0);
        assert_eq!((t.valid, t.invalid), (TRUST_AFTER, 1));
    }
}
