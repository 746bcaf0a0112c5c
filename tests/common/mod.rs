//! Helpers for end-to-end tests: a temp project, the real `nexa` binary, status reads.

#![allow(dead_code)]

pub mod mesh;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.path().join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(&p, content).expect("write");
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nexa"));
        c.current_dir(self.path())
            .args(args)
            .env("NEXA_LOG", "warn");
        c
    }

    pub fn nexa(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run nexa")
    }

    /// `nexa pipeline status FILE --json`, as (id, status) pairs.
    pub fn statuses(&self, file: &str) -> Vec<(String, String)> {
        let v = self.status_json(file);
        v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap_or_default().to_string(),
                    s["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn status_json(&self, file: &str) -> serde_json::Value {
        let out = self.nexa(&["pipeline", "status", file, "--json"]);
        assert!(out.status.success(), "status failed: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Lines of an executions log that steps append to (one line per execution).
    pub fn executions(&self) -> Vec<String> {
        self.read("executions.log")
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A pipeline `name` of steps `s0..s{n-1}`, each running the shell script `run(i)` and
/// writing `artifacts/s{i}`; `independent` gives every step `after: []`.
pub fn numbered_pipeline(
    name: &str,
    n: usize,
    independent: bool,
    run: impl Fn(usize) -> String,
) -> String {
    let after = if independent { "      after: []\n" } else { "" };
    let mut y = format!("pipeline:\n  name: {name}\n  steps:\n");
    for i in 0..n {
        y.push_str(&format!(
            "    - id: s{i}\n      uses: exec\n{after}      params: {{run: '{}'}}\n      out: artifacts/s{i}\n",
            run(i)
        ));
    }
    y
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Every directory under `root` whose name ends in `.tmp` or `.old`, and every artifact
/// directory (one holding meta.json) without COMPLETE.
pub fn half_artifacts(root: &Path) -> Vec<PathBuf> {
    let mut bad = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".tmp") || name.ends_with(".old") {
                    bad.push(p.clone());
                }
                if p.join("meta.json").exists() && !p.join("COMPLETE").exists() {
                    bad.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    bad
}

/// Every sealed artifact under `root`: its path and its `meta.json` hash.
pub fn sealed(root: &Path, out: &mut std::collections::BTreeMap<String, String>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if p.join("COMPLETE").exists()
            && let Ok(b) = std::fs::read(p.join("meta.json"))
            && let Ok(m) = serde_json::from_slice::<serde_json::Value>(&b)
            && let Some(h) = m["hash"].as_str()
        {
            out.insert(p.display().to_string(), h.to_string());
        }
        sealed(&p, out);
    }
}
