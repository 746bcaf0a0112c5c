//! The worker's GPUs, handed to jobs by best fit. A job gets exactly the GPUs it asked
//! for as `CUDA_VISIBLE_DEVICES` (UUIDs); a job that asked for none sees none.

use nexa_shared::hardware::{self, Free, Gpu, Profile, Requirements};
use std::sync::Mutex;
use tokio::sync::Notify;

/// The GPUs of one worker and which are in use.
#[derive(Debug)]
pub struct GpuPool {
    profile: Profile,
    busy: Mutex<Vec<bool>>,
    freed: Notify,
}

/// GPUs held by one job; released on drop.
#[derive(Debug)]
pub struct GpuLease<'a> {
    pool: &'a GpuPool,
    indices: Vec<usize>,
}

impl GpuLease<'_> {
    /// The leased GPUs.
    pub fn gpus(&self) -> Vec<&Gpu> {
        self.indices
            .iter()
            .map(|&i| &self.pool.profile.gpus[i])
            .collect()
    }

    /// The value for `CUDA_VISIBLE_DEVICES`: UUIDs, comma-separated (empty for none).
    pub fn cuda_visible_devices(&self) -> String {
        self.gpus()
            .iter()
            .map(|g| g.uuid.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for GpuLease<'_> {
    fn drop(&mut self) {
        if self.indices.is_empty() {
            return;
        }
        let mut busy = self.pool.busy.lock().unwrap_or_else(|p| p.into_inner());
        for &i in &self.indices {
            busy[i] = false;
        }
        drop(busy);
        self.pool.freed.notify_waiters();
    }
}

impl GpuPool {
    /// A pool over the GPUs of `profile`.
    pub fn new(profile: Profile) -> Self {
        let n = profile.gpus.len();
        Self {
            profile,
            busy: Mutex::new(vec![false; n]),
            freed: Notify::new(),
        }
    }

    /// The profile the pool was made from.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    fn try_acquire(&self, req: &Requirements) -> Option<Vec<usize>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let free = Free {
            worker: "self",
            profile: &self.profile,
            slots: req.cpus.max(1),
            memory: u64::MAX,
            free_gpus: (0..busy.len()).filter(|&i| !busy[i]).collect(),
        };
        let probe = Requirements {
            memory: 0,
            ..req.clone()
        };
        let a = hardware::assign(&probe, std::slice::from_ref(&free))?;
        for &i in &a.gpus {
            busy[i] = true;
        }
        Some(a.gpus)
    }

    /// Takes the GPUs the coordinator reserved, by UUID. A UUID this worker does not have
    /// is an error (the coordinator's view of the worker is wrong).
    pub async fn acquire_named(&self, uuids: &[String]) -> Result<GpuLease<'_>, String> {
        let mut indices = Vec::new();
        for u in uuids {
            match self.profile.gpus.iter().position(|g| &g.uuid == u) {
                Some(i) => indices.push(i),
                None => {
                    return Err(format!(
                        "the coordinator reserved GPU {u}, which this worker does not have"
                    ));
                }
            }
        }
        loop {
            let notified = self.freed.notified();
            {
                let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
                if indices.iter().all(|&i| !busy[i]) {
                    for &i in &indices {
                        busy[i] = true;
                    }
                    return Ok(GpuLease {
                        pool: self,
                        indices,
                    });
                }
            }
            notified.await;
        }
    }

    /// Marks the GPUs named by UUID busy with no lease (a service holds them until
    /// [`GpuPool::release`]); returns their indices. Unknown UUIDs are skipped.
    pub fn hold(&self, uuids: &[String]) -> Vec<usize> {
        let indices: Vec<usize> = uuids
            .iter()
            .filter_map(|u| self.profile.gpus.iter().position(|g| &g.uuid == u))
            .collect();
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        for &i in &indices {
            busy[i] = true;
        }
        indices
    }

    /// Frees GPUs [`GpuPool::hold`] took.
    pub fn release(&self, indices: &[usize]) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        for &i in indices {
            if let Some(b) = busy.get_mut(i) {
                *b = false;
            }
        }
        drop(busy);
        self.freed.notify_waiters();
    }

    /// Waits until GPUs for `req` are free and takes them. Fails at once when this worker
    /// could never satisfy `req`.
    pub async fn acquire(&self, req: &Requirements) -> Result<GpuLease<'_>, String> {
        if req.gpus == 0 {
            return Ok(GpuLease {
                pool: self,
                indices: Vec::new(),
            });
        }
        let gpu_only = Requirements {
            cpus: 0,
            memory: 0,
            labels: Default::default(),
            ..req.clone()
        };
        if let Some(why) = hardware::why_unfit(&gpu_only, [(&self.profile, u32::MAX)]) {
            return Err(format!("this worker cannot run the job: {why}"));
        }
        loop {
            let notified = self.freed.notified();
            if let Some(indices) = self.try_acquire(req) {
                return Ok(GpuLease {
                    pool: self,
                    indices,
                });
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: u32, gib: u64) -> Gpu {
        Gpu {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "t".into(),
            memory_total: gib << 30,
            memory_free: gib << 30,
            compute_capability: (8, 0),
            mig_enabled: false,
        }
    }

    #[tokio::test]
    async fn gpus_are_leased_exclusively_and_released() {
        let pool = GpuPool::new(Profile {
            gpus: vec![gpu(0, 80), gpu(1, 24)],
            ..Profile::default()
        });
        let one = Requirements {
            gpus: 1,
            ..Requirements::default()
        };
        let a = pool.acquire(&one).await.expect("first");
        assert_eq!(
            a.cuda_visible_devices(),
            "GPU-1",
            "best fit: the smaller GPU"
        );
        let b = pool.acquire(&one).await.expect("second");
        assert_eq!(b.cuda_visible_devices(), "GPU-0");
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), pool.acquire(&one)).await;
        assert!(
            waiting.is_err(),
            "a third job waits while both GPUs are busy"
        );
        drop(a);
        let c = pool.acquire(&one).await.expect("after release");
        assert_eq!(c.cuda_visible_devices(), "GPU-1");
        drop(c);
        // A service holds GPU-1 past its job: jobs wait for the other one.
        let held = pool.hold(&["GPU-1".to_string()]);
        drop(b);
        let d = pool.acquire(&one).await.expect("the free one");
        assert_eq!(d.cuda_visible_devices(), "GPU-0");
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), pool.acquire(&one)).await;
        assert!(waiting.is_err(), "GPU-1 stays held by the service");
        pool.release(&held);
        let e = pool.acquire(&one).await.expect("after the service stopped");
        assert_eq!(e.cuda_visible_devices(), "GPU-1");
        drop((d, e));
        let three = Requirements {
            gpus: 3,
            ..Requirements::default()
        };
        assert!(
            pool.acquire(&three)
                .await
                .is_err_and(|e| e.contains("needs 3 GPUs"))
        );
        let none = pool
            .acquire(&Requirements::default())
            .await
            .expect("cpu job");
        assert_eq!(none.cuda_visible_devices(), "");
    }
}
