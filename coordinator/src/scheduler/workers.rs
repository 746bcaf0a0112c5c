//! Worker health: what a worker's record says about it (throttling, quarantine,
//! admin state) and how much of it is free.

use super::*;

impl Engine {
    /// One page of the workers by id (see [`WorkerPage`]) and how many are enrolled in
    /// all. Only the page's workers are described; the ids are sorted, not the views.
    pub(super) fn worker_page(&self, page: &WorkerPage) -> (Vec<WorkerView>, usize) {
        let mut ids: Vec<&WorkerId> = self
            .workers
            .keys()
            .filter(|id| page.after.as_ref().is_none_or(|a| *id > a))
            .collect();
        let limit = page.limit.min(ids.len());
        if limit < ids.len() {
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        let now = Instant::now();
        let views = ids
            .into_iter()
            .filter_map(|id| self.workers.get(id).map(|w| w.view(id, now)))
            .collect();
        (views, self.workers.len())
    }
}

impl Worker {
    /// What `nexa workers` shows of it.
    fn view(&self, id: &WorkerId, now: Instant) -> WorkerView {
        WorkerView {
            id: id.clone(),
            name: self.info.name.clone(),
            state: self.state(now),
            profile: self.info.profile.clone(),
            slots: self.info.slots,
            running: self.alloc.len() as u32,
            succeeded: self.succeeded,
            failed: self.failed,
            key: self.info.key,
            trust: self.trust.clone(),
            credit: self.credit,
        }
    }

    /// The part of the state that is stored.
    pub(super) fn record_of(&self, id: &str) -> state::WorkerRecord {
        state::WorkerRecord {
            id: id.to_string(),
            name: self.info.name.clone(),
            public_key: hex::encode(self.info.key),
            slots: self.info.slots,
            profile: self.info.profile.clone(),
            admin: self.admin,
            succeeded: self.succeeded,
            failed: self.failed,
            recent: self.recent.iter().copied().collect(),
            trust: self.trust.clone(),
            cpu_seconds: self.credit.cpu_seconds,
            gpu_seconds: self.credit.gpu_seconds,
        }
    }

    /// A worker known from before a restart: offline until it enrols again.
    pub(super) fn from_record(r: state::WorkerRecord) -> Option<Self> {
        let key: [u8; 32] = hex::decode(&r.public_key).ok()?.try_into().ok()?;
        let mut w = Self::new(WorkerInfo {
            name: r.name,
            key,
            profile: r.profile,
            slots: r.slots,
        });
        w.admin = r.admin;
        w.succeeded = r.succeeded;
        w.failed = r.failed;
        w.recent = r.recent.into_iter().collect();
        w.trust = r.trust;
        w.credit = Credit {
            cpu_seconds: r.cpu_seconds,
            gpu_seconds: r.gpu_seconds,
        };
        w.lost = true;
        Some(w)
    }

    pub(super) fn new(info: WorkerInfo) -> Self {
        Self {
            info,
            alloc: HashMap::new(),
            services: HashMap::new(),
            touched_gpus: Default::default(),
            trust: BTreeMap::new(),
            credit: Credit::default(),
            last_seen: Instant::now(),
            lost: false,
            reminded: false,
            admin: AdminState::Active,
            succeeded: 0,
            failed: 0,
            consecutive_failures: 0,
            recent: VecDeque::new(),
            throttled_until: None,
        }
    }

    /// Takes a freshly read profile. Free GPU memory is trusted only for GPUs no job of
    /// ours held since the last refresh; ours count as wholly free (they are reserved
    /// whole, and the reading may include our own job's use).
    pub(super) fn refresh_profile(&mut self, mut p: Profile) {
        let ours: std::collections::BTreeSet<usize> = self
            .alloc
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .chain(self.service_gpus())
            .collect();
        for &g in self.touched_gpus.iter().chain(&ours) {
            if let Some(gpu) = p.gpus.get_mut(g) {
                gpu.memory_free = gpu.memory_total;
            }
        }
        self.touched_gpus = ours;
        self.info.profile = p;
    }

    pub(super) fn quarantined(&self) -> bool {
        self.recent.iter().filter(|ok| !**ok).count() >= QUARANTINE_AFTER
    }

    /// Whether it may get a new lease now.
    pub(super) fn eligible(&self, now: Instant) -> bool {
        self.admin == AdminState::Active
            && !self.lost
            && !self.quarantined()
            && self.throttled_until.is_none_or(|t| t <= now)
    }

    /// How it stands now: the operator's say first, then its health.
    pub(super) fn state(&self, now: Instant) -> WorkerState {
        match self.admin {
            AdminState::Ban => WorkerState::Banned,
            AdminState::Drain => WorkerState::Draining,
            AdminState::Active if self.lost => WorkerState::Lost,
            AdminState::Active if self.quarantined() => WorkerState::Quarantined,
            AdminState::Active if self.throttled_until.is_some_and(|t| t > now) => {
                WorkerState::Throttled
            }
            AdminState::Active => WorkerState::Active,
        }
    }

    /// Records a result: a run of failures throttles the worker (doubling each time),
    /// too many among its recent results stop it getting work (BOINC#3061).
    pub(super) fn record(&mut self, ok: bool, id: &str) {
        let was_quarantined = self.quarantined();
        self.recent.push_back(ok);
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        if ok {
            self.succeeded += 1;
            self.consecutive_failures = 0;
            self.throttled_until = None;
            return;
        }
        self.failed += 1;
        self.consecutive_failures += 1;
        if self.consecutive_failures >= THROTTLE_AFTER {
            let exp = (self.consecutive_failures - THROTTLE_AFTER).min(8);
            let pause = Duration::from_secs(1 << exp).min(Duration::from_secs(300));
            self.throttled_until = Some(Instant::now() + pause);
            tracing::warn!(worker = %id, failures = self.consecutive_failures, pause_s = pause.as_secs(), "worker throttled after failures in a row");
        }
        if self.quarantined() && !was_quarantined {
            tracing::warn!(worker = %id, "worker quarantined: too many recent failures; an operator must re-activate it");
        }
    }

    pub(super) fn free(&self) -> hardware::Free<'_> {
        let used_cpus: u32 = self.alloc.values().map(|a| a.cpus).sum();
        let used_mem: u64 = self.alloc.values().map(|a| a.memory).sum();
        let busy: Vec<usize> = self
            .alloc
            .values()
            .flat_map(|a| a.gpus.iter().copied())
            .chain(self.service_gpus())
            .collect();
        hardware::Free {
            worker: "",
            profile: &self.info.profile,
            slots: self.info.slots.saturating_sub(used_cpus),
            memory: self.info.profile.memory_total.saturating_sub(used_mem),
            free_gpus: (0..self.info.profile.gpus.len())
                .filter(|g| !busy.contains(g))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> Worker {
        Worker::new(WorkerInfo {
            name: "w".into(),
            key: [0; 32],
            profile: Profile::default(),
            slots: 1,
        })
    }

    #[test]
    fn refreshed_free_gpu_memory_is_trusted_only_for_gpus_we_did_not_hold() {
        const GIB: u64 = 1 << 30;
        let gpu = |i: u32, free: u64| nexa_shared::hardware::Gpu {
            index: i,
            uuid: format!("GPU-{i}"),
            name: "g".into(),
            memory_total: 24 * GIB,
            memory_free: free * GIB,
            compute_capability: (8, 9),
            mig_enabled: false,
        };
        let reading = |a: u64, b: u64| Profile {
            gpus: vec![gpu(0, a), gpu(1, b)],
            ..Profile::default()
        };
        let mut w = worker();
        w.refresh_profile(reading(24, 24));
        // Our job holds GPU 0; the reading shows its memory in use, and GPU 1 held by
        // someone else.
        w.touched_gpus.insert(0);
        w.alloc.insert(
            "j".into(),
            Alloc {
                cpus: 1,
                memory: 0,
                gpus: vec![0],
            },
        );
        w.refresh_profile(reading(1, 3));
        let free = |w: &Worker| {
            w.info
                .profile
                .gpus
                .iter()
                .map(|g| g.memory_free / GIB)
                .collect::<Vec<_>>()
        };
        assert_eq!(free(&w), [24, 3]);
        // The job ended just before the next reading, which may still show its memory.
        w.alloc.clear();
        w.refresh_profile(reading(1, 3));
        assert_eq!(free(&w), [24, 3]);
        // From then on the reading is trusted for GPU 0 as well.
        w.refresh_profile(reading(5, 24));
        assert_eq!(free(&w), [5, 24]);
    }

    #[test]
    fn failing_workers_are_throttled_then_quarantined_and_recover_on_success() {
        let mut w = worker();
        let now = Instant::now();
        assert!(w.eligible(now));
        for _ in 0..THROTTLE_AFTER - 1 {
            w.record(false, "w");
        }
        assert!(
            w.eligible(Instant::now()),
            "a couple of failures do not throttle"
        );
        w.record(false, "w");
        assert!(!w.eligible(Instant::now()), "failures in a row throttle");
        assert_eq!(w.state(Instant::now()), WorkerState::Throttled);
        w.record(true, "w");
        assert!(w.eligible(Instant::now()), "a success lifts the throttle");
        for _ in 0..QUARANTINE_AFTER {
            w.record(false, "w");
        }
        w.throttled_until = None;
        assert!(w.quarantined());
        assert!(
            !w.eligible(Instant::now()),
            "quarantined workers get no work"
        );
        assert_eq!(w.state(Instant::now()), WorkerState::Quarantined);
        assert_eq!(
            (w.succeeded, w.failed),
            (1, u64::from(THROTTLE_AFTER) + QUARANTINE_AFTER as u64)
        );
    }

    #[test]
    fn drained_banned_and_lost_workers_get_no_work() {
        let now = Instant::now();
        for (admin, lost, name) in [
            (AdminState::Drain, false, WorkerState::Draining),
            (AdminState::Ban, false, WorkerState::Banned),
            (AdminState::Active, true, WorkerState::Lost),
        ] {
            let mut w = worker();
            w.admin = admin;
            w.lost = lost;
            assert!(!w.eligible(now));
            assert_eq!(w.state(now), name);
        }
    }
}
