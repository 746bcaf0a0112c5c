//! `runner`: what Nexa adds to a training run. The same `runners.train` driver, the
//! same data and params, run directly (`python run.py runners.train` with the job's
//! variables set by hand) and as a one-step pipeline through `nexa pipeline run` (from
//! nothing: no state, no cache), interleaved so both see the same machine.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PARAMS: &str = r#"{"model": {"config": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}}, "task": "sequence-classification", "max_length": 64, "batch_size": 32, "max_steps": STEPS, "learning_rate": 0.001, "logging_steps": 25, "seed": 42}"#;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark; `data` is a labelled JSONL file.
pub fn run(
    steps: u32,
    reps: usize,
    python: &str,
    nexa: &Path,
    data: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    std::fs::copy(data, root.join("train.jsonl")).with_context(|| data.display().to_string())?;
    let params = PARAMS.replace("STEPS", &steps.to_string());
    let drivers = nexa_shared::runners::materialise(
        &root.join("drivers"),
        nexa_shared::runners::TRAIN,
        None,
    )?;
    let job_params = {
        let mut v: serde_json::Value = serde_json::from_str(&params)?;
        v["backend"] = "hf".into();
        v.to_string()
    };
    let pipeline = format!(
        "pipeline:\n  name: bench_runner\n  steps:\n    - id: train\n      uses: runners.train\n      in: {{dataset: train.jsonl}}\n      params: {params}\n      out: artifacts/ckpt\n"
    );
    std::fs::write(root.join("p.yaml"), pipeline)?;
    let direct = |i: usize| -> anyhow::Result<f64> {
        let out: PathBuf = root.join(format!("direct-{i}"));
        let tmp = root.join(format!("direct-{i}.tmp"));
        std::fs::create_dir_all(&out)?;
        std::fs::create_dir_all(&tmp)?;
        let t = Instant::now();
        let o = Command::new(python)
            .arg("-u")
            .arg(drivers.join("run.py"))
            .arg(nexa_shared::runners::TRAIN)
            .current_dir(&tmp)
            .env("NEXA_OUT", &out)
            .env("NEXA_TMP", &tmp)
            .env("NEXA_IN_DATASET", root.join("train.jsonl"))
            .env("NEXA_PARAMS", &job_params)
            .env("CUDA_VISIBLE_DEVICES", "")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .output()?;
        let el = t.elapsed().as_secs_f64();
        if !o.status.success() {
            bail!("the driver failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(el)
    };
    let through_nexa = || -> anyhow::Result<f64> {
        for d in ["artifacts", ".nexa_state"] {
            let _ = std::fs::remove_dir_all(root.join(d));
        }
        let t = Instant::now();
        let o = Command::new(nexa)
            .current_dir(root)
            .args(["pipeline", "run", "p.yaml"])
            .env("NEXA_PYTHON", python)
            .output()?;
        let el = t.elapsed().as_secs_f64();
        if !o.status.success() {
            bail!("nexa failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(el)
    };
    // One of each first, untimed: the page cache holds torch for both.
    direct(0)?;
    through_nexa()?;
    let (mut d, mut n) = (Vec::new(), Vec::new());
    for i in 0..reps {
        d.push(direct(i + 1)?);
        n.push(through_nexa()?);
    }
    let (dm, nm) = (median(&mut d), median(&mut n));
    let over = nm - dm;
    let pct = 100.0 * over / dm;
    if json {
        println!(
            "{}",
            serde_json::json!({"steps": steps, "reps": reps, "direct_median_s": dm,
                "nexa_median_s": nm, "overhead_s": over, "overhead_pct": pct,
                "direct_s": d, "nexa_s": n})
        );
    } else {
        println!(
            "training {steps} steps with the runners.train driver, {reps} interleaved runs each"
        );
        println!("  direct (python run.py runners.train): median {dm:.2} s  {d:.2?}");
        println!("  nexa pipeline run (no cache, no state): median {nm:.2} s  {n:.2?}");
        println!(
            "  Nexa's overhead: {:.2} s = {pct:.1} % (goal <= 3 % or 2 s)",
            over
        );
    }
    Ok(())
}
