//! A pilot's batch script: the `#SBATCH` lines of its shape, then `nexa-worker join`
//! in the allocation, with the labels that reserve it for slurm steps and say when
//! its allocation ends. The enrolment token is not in it (it travels in the job's
//! environment); every value in it is a checked Slurm word or shell-quoted.

use super::{Shape, SlurmConfig};

/// The label value pilots carry (with [`nexa_shared::hardware::SCHEDULER_LABEL`]).
pub const SLURM: &str = "slurm";

/// The comment a pilot of `shape` carries: how a restarted coordinator knows it.
pub fn comment(shape: &Shape) -> String {
    format!("nexa-pilot:shape={}", shape.key())
}

/// The shape key in a pilot's comment, if it is one of ours.
pub fn shape_key_of(comment: &str) -> Option<&str> {
    comment.strip_prefix("nexa-pilot:shape=")
}

/// Single-quotes `s` for `sh`.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script of a pilot of `shape`, that leaves after `max_idle` without a job
/// (`None`: it stays until its walltime, one kept for `min_pilots`).
pub fn render(shape: &Shape, cfg: &SlurmConfig, max_idle: Option<std::time::Duration>) -> String {
    let mut s = String::from("#!/bin/sh\n");
    let mut opt = |line: String| {
        s.push_str("#SBATCH ");
        s.push_str(&line);
        s.push('\n');
    };
    opt(format!("--job-name={}", cfg.job_name));
    opt(format!("--comment={}", comment(shape)));
    opt("--nodes=1".into());
    opt("--ntasks=1".into());
    opt(format!("--cpus-per-task={}", shape.cpus));
    opt(format!("--mem={}M", shape.memory_mb));
    opt(format!("--time={}", shape.minutes));
    if shape.gpus > 0 {
        opt(format!("--gres=gpu:{}", shape.gpus));
    }
    for (what, v) in shape.placement() {
        opt(format!("--{what}={v}"));
    }
    // The batch shell (the worker) hears TERM this long before the walltime: it takes
    // no more jobs and lets the running ones end.
    opt(format!("--signal=B:TERM@{}", cfg.drain.as_secs().max(1)));
    opt(format!("--output={}/%x-%j.log", cfg.log_dir.display()));
    for l in &cfg.sbatch_lines {
        opt(l.clone());
    }
    let mut join = vec![
        quote(&cfg.worker),
        "join".into(),
        quote(&cfg.url),
        "--slots".into(),
        shape.cpus.to_string(),
        "--name".into(),
        "\"slurm-$SLURM_JOB_ID\"".into(),
        "--work-dir".into(),
        "\"$dir/work\"".into(),
        "--key".into(),
        "\"$dir/worker.key\"".into(),
        "--label".into(),
        format!("{}={SLURM}", nexa_shared::hardware::SCHEDULER_LABEL),
        "--label".into(),
        format!("{}=\"$end\"", nexa_shared::hardware::WALLTIME_END_LABEL),
    ];
    // The partition is the pilot's own label (from Slurm); the rest are given.
    for (what, v) in shape.placement().filter(|(k, _)| *k != "partition") {
        join.push("--label".into());
        join.push(quote(&format!("slurm.{what}={v}")));
    }
    if !shape.runtimes {
        join.push("--no-probe".into());
    }
    if let Some(idle) = max_idle {
        join.push("--max-idle".into());
        join.push(format!("{}s", idle.as_secs().max(1)));
    }
    join.extend(cfg.worker_args.iter().map(|a| quote(a)));
    s.push_str(&format!(
        r#"# A Nexa pilot: a worker that takes only `scheduler: slurm` jobs, as long as this
# allocation lasts (it ends at $end) or until it has had no job for its idle time.
end=$(( $(date +%s) + {secs} ))
dir="${{TMPDIR:-/tmp}}/nexa-pilot-$SLURM_JOB_ID"
mkdir -p "$dir"
{join} &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
wait $pid
status=$?
if kill -0 $pid 2>/dev/null; then wait $pid; status=$?; fi
rm -rf "$dir"
exit $status
"#,
        secs = shape.minutes * 60,
        join = join.join(" ")
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_script_asks_for_the_shape_and_starts_a_reserved_worker_without_the_token() {
        let mut cfg = SlurmConfig::new("http://login:7070".into(), "nexa-pilot-ab12".into());
        cfg.token = Some("secret-token".into());
        cfg.worker = "/opt/nexa/bin/nexa-worker".into();
        cfg.worker_args = vec!["--ca".into(), "/shared/it's ca.pem".into()];
        cfg.sbatch_lines = vec!["--reservation=r1".into()];
        cfg.idle_timeout = Duration::from_secs(90);
        let shape = Shape {
            cpus: 2,
            memory_mb: 4096,
            gpus: 1,
            minutes: 61,
            partition: Some("gpu".into()),
            account: Some("proj".into()),
            qos: None,
            constraint: Some("a100&ib".into()),
            runtimes: false,
        };
        let s = render(&shape, &cfg, Some(cfg.idle_timeout));
        assert!(s.contains(" --no-probe"), "nothing needs the probe");
        let probing = Shape {
            runtimes: true,
            ..shape.clone()
        };
        assert!(!render(&probing, &cfg, None).contains("--no-probe"));
        assert_ne!(probing.key(), shape.key(), "not interchangeable");
        assert!(
            !render(&shape, &cfg, None).contains("--max-idle"),
            "kept for min-pilots"
        );
        for line in [
            "#SBATCH --job-name=nexa-pilot-ab12\n",
            "#SBATCH --cpus-per-task=2\n",
            "#SBATCH --mem=4096M\n",
            "#SBATCH --time=61\n",
            "#SBATCH --gres=gpu:1\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --account=proj\n",
            "#SBATCH --constraint=a100&ib\n",
            "#SBATCH --signal=B:TERM@60\n",
            "#SBATCH --reservation=r1\n",
            "end=$(( $(date +%s) + 3660 ))\n",
        ] {
            assert!(s.contains(line), "missing {line:?} in\n{s}");
        }
        assert!(!s.contains("--qos"), "none asked");
        assert!(s.contains(&format!("#SBATCH --comment={}\n", comment(&shape))));
        assert!(s.contains("'/opt/nexa/bin/nexa-worker' join 'http://login:7070' --slots 2"));
        assert!(s.contains("--label scheduler=slurm --label slurm.end=\"$end\""));
        assert!(s.contains("--label 'slurm.account=proj'"));
        assert!(s.contains("--max-idle 90s"));
        assert!(s.contains(r"'/shared/it'\''s ca.pem'"), "shell-quoted: {s}");
        assert!(
            !s.contains("secret-token"),
            "the token is never in the script"
        );
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "sh -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(shape_key_of(&comment(&shape)), Some(shape.key().as_str()));
    }
}
