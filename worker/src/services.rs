//! Services this worker runs: the servers `runners.serve` jobs leave behind.
//!
//! A serve job is done once its server is healthy; the server runs on in its own
//! session. The worker adopts it from the job's `handle.json` (its pid, the id in its
//! environment, its endpoint and GPUs), keeps its GPUs out of the pool, checks its
//! health every second, lists it in every heartbeat and stops it when the coordinator
//! says so. The same checks serve `nexa serve` embedded, where the handle is all there
//! is.

use crate::gpus::GpuPool;
use nexa_shared::job::Lease;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One adopted service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Its name (the model's name in the API).
    pub name: String,
    /// The handle as its job sealed it.
    pub handle: serde_json::Value,
    /// The GPUs it holds (indices into the pool).
    gpus: Vec<usize>,
    /// Its GPUs by UUID.
    pub gpu_uuids: Vec<String>,
    /// What the last check found: healthy, and why not.
    pub healthy: bool,
    /// Why it is not healthy.
    pub detail: String,
}

/// The services of one worker, by the `(job, generation)` that started each.
#[derive(Debug, Default)]
pub struct ServiceTable {
    services: Mutex<HashMap<(String, u64), Service>>,
    /// The pool their GPUs were taken from.
    pool: Mutex<Option<Arc<GpuPool>>>,
    /// Stops under way (every heartbeat repeats a stop until it is done).
    stopping: Mutex<std::collections::HashSet<(String, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServiceTable {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adopts the server a succeeded serve job left running, from the `handle.json` in
    /// `out` (a dry run's handle starts nothing and is not adopted). Its GPUs stay taken
    /// in `pool` until it stops.
    pub fn adopt(&self, lease: &Lease, out: &Path, pool: &Arc<GpuPool>) -> Result<(), String> {
        let path = out.join("handle.json");
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let handle: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        if handle["status"] != "healthy" {
            return Ok(());
        }
        // The GPUs the job was given, not whatever its handle claims: a job cannot make
        // this worker hold GPUs it was not leased.
        let gpu_uuids: Vec<String> = if lease.job.requirements.gpus == 0 {
            Vec::new()
        } else if lease.gpus.is_empty() {
            let given = gpus_of(&handle);
            pool.profile()
                .gpus
                .iter()
                .filter(|g| given.contains(&g.uuid))
                .map(|g| g.uuid.clone())
                .collect()
        } else {
            lease.gpus.clone()
        };
        let name = handle["name"].as_str().unwrap_or("?").to_string();
        let gpus = pool.hold(&gpu_uuids);
        *lock(&self.pool) = Some(pool.clone());
        tracing::info!(service = %name, job = %lease.job.job_id, gpus = ?gpu_uuids, "adopted a service");
        lock(&self.services).insert(
            (lease.job.job_id.to_string(), lease.generation),
            Service {
                name,
                handle,
                gpus,
                gpu_uuids,
                healthy: true,
                detail: String::new(),
            },
        );
        Ok(())
    }

    /// What the services looked like at their last check: `(job, generation)` and each.
    pub fn snapshot(&self) -> Vec<((String, u64), Service)> {
        let mut v: Vec<_> = lock(&self.services)
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Checks every service's health now (blocking: HTTP with short timeouts).
    pub fn check(&self) {
        for (key, s) in self.snapshot() {
            let (healthy, detail) = match health(&s.handle) {
                Ok(()) => (true, String::new()),
                Err(why) => (false, why),
            };
            if let Some(e) = lock(&self.services).get_mut(&key) {
                if e.healthy && !healthy {
                    tracing::warn!(service = %e.name, reason = %detail, "service unhealthy");
                }
                e.healthy = healthy;
                e.detail = detail;
            }
        }
    }

    /// Checks health every `every` until the process ends.
    pub fn spawn_checks(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let table = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let t = table.clone();
                let _ = tokio::task::spawn_blocking(move || t.check()).await;
            }
        })
    }

    /// Stops the service of `(job, generation)` (blocking: SIGTERM, SIGKILL after
    /// `grace`), then forgets it and frees its GPUs. Unknown: nothing to do.
    pub fn stop(&self, job: &str, generation: u64, grace: Duration) {
        let key = (job.to_string(), generation);
        let Some(s) = lock(&self.services).get(&key).cloned() else {
            return;
        };
        if !lock(&self.stopping).insert(key.clone()) {
            return;
        }
        let how = stop(&s.handle, grace);
        tracing::info!(service = %s.name, job, how, "service stopped");
        lock(&self.services).remove(&key);
        lock(&self.stopping).remove(&key);
        if let Some(pool) = lock(&self.pool).as_ref() {
            pool.release(&s.gpus);
        }
    }
}

/// The GPUs a handle names (`CUDA_VISIBLE_DEVICES` of its job: UUIDs, comma-separated).
pub fn gpus_of(h: &serde_json::Value) -> Vec<String> {
    h["gpus"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

fn pid_of(h: &serde_json::Value) -> Option<i32> {
    h["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
}

/// The handle's process still runs and is that service (its environment carries the
/// service id), not a zombie.
pub fn alive(h: &serde_json::Value) -> bool {
    let (Some(pid), Some(id)) = (pid_of(h), h["service_id"].as_str()) else {
        return false;
    };
    let ours = u32::try_from(pid)
        .is_ok_and(|p| crate::exec::environ_has(p, &format!("NEXA_SERVICE_ID={id}")));
    ours && !exited(pid)
}

/// The process is gone, or has exited and waits only to be reaped.
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

/// Stops the service of handle `h`; returns what happened. A pid that no longer
/// carries the service's id is never signalled.
pub fn stop(h: &serde_json::Value, grace: Duration) -> &'static str {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if !alive(h) {
        return "already stopped";
    }
    let Some(pid) = pid_of(h) else {
        return "already stopped";
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        // Its environment goes before the process does: wait for the exit itself.
        if exited(pid) {
            return "stopped (SIGTERM)";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    "killed (SIGKILL after the grace period)"
}

/// Healthy: the process runs, `GET /health` is 200 and `GET /v1/models` lists the
/// handle's name. Otherwise, why not.
pub fn health(h: &serde_json::Value) -> Result<(), String> {
    if !alive(h) {
        return Err("its process is gone".into());
    }
    let (Some(endpoint), Some(name)) = (h["endpoint"].as_str(), h["name"].as_str()) else {
        return Err("the handle names no endpoint".into());
    };
    let Some(addr) = endpoint.strip_prefix("http://") else {
        return Err(format!("{endpoint} is not an http:// endpoint"));
    };
    match get(addr, "/health") {
        Some((200, _)) => {}
        Some((status, _)) => return Err(format!("GET /health answered {status}")),
        None => return Err("GET /health did not answer".into()),
    }
    let listed = get(addr, "/v1/models")
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["data"].as_array().cloned())
        .is_some_and(|models| models.iter().any(|m| m["id"] == name));
    if listed {
        Ok(())
    } else {
        Err(format!("GET /v1/models does not list '{name}'"))
    }
}

/// A plain HTTP/1.1 GET with a short timeout: (status, body).
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::net::ToSocketAddrs;
    let sock = addr.to_socket_addrs().ok()?.next()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.take(4 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
