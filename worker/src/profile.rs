//! What this machine has: sysinfo for CPU, memory, disk and OS; NVML (through
//! nvml-wrapper, loaded at run time) for GPUs. A GPU is reported only when NVML confirms
//! it; without NVML the profile has no GPUs and says why.

use nexa_shared::hardware::{Gpu, Profile};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// Profiles the machine; `work_dir` is where free disk is measured. `runtimes` also
/// probes the job interpreter's Python packages ([`python_labels`]) and docker, which
/// takes a few hundred milliseconds.
pub fn profile(work_dir: &Path, runtimes: bool) -> Profile {
    profile_with(work_dir, runtimes, cfg!(feature = "fake-gpus"))
}

/// [`profile`], saying whether `NEXA_FAKE_GPUS` may replace NVML's answer (only in
/// builds with the test-only `fake-gpus` feature, and only when the caller allows it).
pub fn profile_with(work_dir: &Path, runtimes: bool, allow_fake_gpus: bool) -> Profile {
    let mut p = Profile::default();
    match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_cpu_all();
            sys.refresh_memory();
            p.cores = sys.cpus().len() as u32;
            p.cpu_model = sys
                .cpus()
                .first()
                .map(|c| c.brand().trim().to_string())
                .unwrap_or_default();
            p.memory_total = sys.total_memory();
            p.memory_available = sys.available_memory();
        }
        Err(e) => tracing::warn!(error = %e, "reading CPU and memory"),
    }
    if p.cores == 0 {
        p.cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
    }
    p.hostname = sysinfo::System::host_name().unwrap_or_default();
    p.os = sysinfo::System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.to_string());
    p.arch = sysinfo::System::cpu_arch();
    p.disk_free = disk_free(work_dir);
    gpus(&mut p);
    #[cfg(feature = "fake-gpus")]
    if allow_fake_gpus {
        fake_gpus(&mut p);
    }
    #[cfg(not(feature = "fake-gpus"))]
    let _ = allow_fake_gpus;
    if runtimes {
        p.labels = probe_runtimes();
    }
    p
}

fn disk_free(dir: &Path) -> u64 {
    let Ok(disks) = sysinfo::Disks::new_with_refreshed_list() else {
        return 0;
    };
    let dir = std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    disks
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
        .unwrap_or(0)
}

fn gpus(p: &mut Profile) {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            p.gpu_note = Some(format!("no GPUs: NVML unavailable ({e})"));
            return;
        }
    };
    p.driver_version = nvml.sys_driver_version().ok();
    p.cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            p.gpu_note = Some(format!("no GPUs: NVML could not count devices ({e})"));
            return;
        }
    };
    for i in 0..count {
        let dev = match nvml.device_by_index(i) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(index = i, error = %e, "NVML device skipped");
                continue;
            }
        };
        // A GPU whose identity or memory NVML cannot read is not reported.
        let (Ok(uuid), Ok(name), Ok(mem)) = (dev.uuid(), dev.name(), dev.memory_info()) else {
            tracing::warn!(
                index = i,
                "NVML could not read the device's uuid, name or memory; skipped"
            );
            continue;
        };
        let cc = dev
            .cuda_compute_capability()
            .map(|c| (c.major.max(0) as u32, c.minor.max(0) as u32))
            .unwrap_or((0, 0));
        p.gpus.push(Gpu {
            index: i,
            uuid,
            name,
            memory_total: mem.total,
            memory_free: mem.free,
            compute_capability: cc,
            mig_enabled: dev.mig_mode().map(|m| m.current == 1).unwrap_or(false),
        });
    }
    if p.gpus.is_empty() {
        p.gpu_note = Some("no GPUs: NVML found no devices".into());
    }
}

/// Test builds only: `NEXA_FAKE_GPUS` (a JSON list of GPUs, or `@FILE` holding one, read
/// again on every profile refresh) replaces what NVML found, so the scheduler can be
/// tested on machines without GPUs. The `fake-gpus` feature is enabled only by this
/// workspace's dev-dependencies; release builds cannot switch it on.
#[cfg(feature = "fake-gpus")]
fn fake_gpus(p: &mut Profile) {
    let Ok(mut text) = std::env::var("NEXA_FAKE_GPUS") else {
        return;
    };
    if let Some(file) = text.strip_prefix('@') {
        match std::fs::read_to_string(file) {
            Ok(t) => text = t,
            Err(e) => {
                tracing::error!(error = %e, file, "reading NEXA_FAKE_GPUS");
                return;
            }
        }
    }
    match serde_json::from_str::<Vec<Gpu>>(&text) {
        Ok(gpus) => {
            p.gpu_note = Some(format!(
                "{} fake GPUs from NEXA_FAKE_GPUS (test build)",
                gpus.len()
            ));
            p.gpus = gpus;
        }
        Err(e) => tracing::error!(error = %e, "NEXA_FAKE_GPUS is not a JSON list of GPUs"),
    }
}

fn runs(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One run of the job interpreter ([`crate::runners::python`]) that reports its version
/// and the versions of the packages the ML runners use, without importing them
/// (importing torch takes seconds): `python`, `python.torch` (and `python.torch.cuda`
/// for a CUDA build), `python.transformers`, `python.peft`, `python.axolotl`,
/// `python.vllm`, ...
const PY_PROBE: &str = r#"
import importlib.metadata as md, importlib.util as u, json, os, re, sys
out = {"python": "%d.%d" % sys.version_info[:2]}
for mod, dist in [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                  ("accelerate", "accelerate"), ("tokenizers", "tokenizers"),
                  ("axolotl", "axolotl"), ("vllm", "vllm")]:
    try:
        spec = u.find_spec(mod)
    except Exception:
        spec = None
    if spec is None:
        continue
    try:
        out["python." + mod] = md.version(dist)
    except Exception:
        out["python." + mod] = "unknown"
    if mod == "torch" and spec.submodule_search_locations:
        try:
            text = open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read()
            m = re.search(r"^cuda[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.M)
            if m:
                out["python.torch.cuda"] = m.group(1)
        except OSError:
            pass
print(json.dumps(out))
"#;

/// Runtimes this worker can offer jobs, as labels (a few hundred milliseconds: it runs
/// the job interpreter and docker).
pub fn probe_runtimes() -> BTreeMap<String, String> {
    let mut l = python_labels();
    if let Some(v) = runs("docker", &["version", "--format", "{{.Server.Version}}"]) {
        l.insert("docker".into(), v);
    }
    l
}

/// The `python.*` labels of the job interpreter (empty when it does not run).
pub fn python_labels() -> BTreeMap<String, String> {
    runs(&crate::runners::python(), &["-c", PY_PROBE])
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn profile_reads_this_machine_and_never_invents_gpus() {
        let p = super::profile(std::path::Path::new("."), true);
        assert!(p.cores >= 1);
        assert!(p.memory_total > 0);
        assert!(!p.arch.is_empty());
        // Here NVML may or may not exist: either GPUs came from NVML, or a note says why
        // there are none.
        assert!(!p.gpus.is_empty() || p.gpu_note.is_some());
        for g in &p.gpus {
            assert!(
                g.uuid.starts_with("GPU-") || g.uuid.starts_with("MIG-"),
                "{}",
                g.uuid
            );
            assert!(g.memory_total > 0);
        }
    }
}
