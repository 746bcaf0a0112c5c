//! The coordinator's background tasks, owned. Every task the scheduler and the mesh
//! edge start (timers, the tick, blocking work, clean-ups, progress relays, the metrics
//! endpoint) is started through [`Tasks`]: one supervisor holds them all in a
//! `JoinSet`, learns when each one ends, logs and counts the ones that panicked (by
//! name), and aborts what is left when the last handle goes. No task is detached.
//!
//! Work whose outcome matters to a run (planning, assembly, registry steps) also turns
//! its panic into an event (`scheduler/tasks.rs`); the supervisor is the owner of last
//! resort, for the tasks nobody waits on.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Task {
    Async(&'static str, Boxed),
    Blocking(&'static str, Box<dyn FnOnce() + Send>),
}

/// What the supervisor has seen.
#[derive(Debug, Default)]
struct Counts {
    started: AtomicU64,
    ended: AtomicU64,
    panicked: AtomicU64,
}

/// A handle to the supervisor; cheap to clone. The supervisor ends, aborting the tasks
/// still running, when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Tasks {
    tx: mpsc::UnboundedSender<Task>,
    counts: Arc<Counts>,
}

impl Tasks {
    /// Starts the supervisor on the current tokio runtime.
    pub fn start() -> Tasks {
        let (tx, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        // The supervisor itself is the one task nobody holds: it ends with its handles.
        drop(tokio::spawn(supervise(rx, counts.clone())));
        Tasks { tx, counts }
    }

    /// Runs `task` on the runtime, owned by the supervisor.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.hand_over(name, Task::Async(name, Box::pin(task)));
    }

    /// Runs `work` on the blocking pool, owned by the supervisor.
    pub fn spawn_blocking(&self, name: &'static str, work: impl FnOnce() + Send + 'static) {
        self.hand_over(name, Task::Blocking(name, Box::new(work)));
    }

    fn hand_over(&self, name: &'static str, task: Task) {
        self.counts.started.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(task).is_err() {
            self.counts.ended.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                task = name,
                "the task supervisor is gone; a task was not started"
            );
        }
    }

    /// Tasks started and not yet seen to end (a moment's count: one that starts and
    /// ends between the two reads is not counted).
    pub fn running(&self) -> u64 {
        let started = self.counts.started.load(Ordering::Acquire);
        started.saturating_sub(self.counts.ended.load(Ordering::Acquire))
    }

    /// Tasks that panicked.
    pub fn panicked(&self) -> u64 {
        self.counts.panicked.load(Ordering::Relaxed)
    }
}

/// A panic's message, where it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

async fn supervise(mut rx: mpsc::UnboundedReceiver<Task>, counts: Arc<Counts>) {
    let mut set = JoinSet::new();
    let mut names: HashMap<tokio::task::Id, &'static str> = HashMap::new();
    loop {
        tokio::select! {
            task = rx.recv() => match task {
                Some(Task::Async(name, f)) => {
                    names.insert(set.spawn(f).id(), name);
                }
                Some(Task::Blocking(name, f)) => {
                    names.insert(set.spawn_blocking(f).id(), name);
                }
                None => break,
            },
            Some(ended) = set.join_next_with_id() => ended_one(ended, &mut names, &counts),
        }
    }
    // Every handle is gone: what still runs (timers, relays) is stopped; blocking work
    // cannot be, and is waited for.
    set.abort_all();
    while let Some(ended) = set.join_next_with_id().await {
        ended_one(ended, &mut names, &counts);
    }
}

fn ended_one(
    ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    names: &mut HashMap<tokio::task::Id, &'static str>,
    counts: &Counts,
) {
    counts.ended.fetch_add(1, Ordering::Relaxed);
    match ended {
        Ok((id, ())) => {
            names.remove(&id);
        }
        Err(e) => {
            let name = names.remove(&e.id()).unwrap_or("unnamed");
            if e.is_panic() {
                counts.panicked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(task = name, error = %e, "a background task panicked");
            } else {
                tracing::debug!(task = name, "a background task was stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle(tasks: &Tasks, running: u64) {
        for _ in 0..500 {
            if tasks.running() == running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} tasks still running, not {running}", tasks.running());
    }

    #[tokio::test]
    async fn the_owner_learns_of_every_end_and_counts_the_panics() {
        let tasks = Tasks::start();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn("finishes", async move {
            let _ = tx.send(());
        });
        tasks.spawn("panics", async { panic!("a bug in a relay") });
        tasks.spawn_blocking("panics too", || panic!("a bug in a clean-up"));
        tasks.spawn("waits", std::future::pending());
        rx.await.expect("ran");
        // Three ended (two of them panicking), one still runs.
        settle(&tasks, 1).await;
        assert_eq!(tasks.panicked(), 2);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_what_still_runs() {
        let tasks = Tasks::start();
        let probe = tasks.clone();
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let guard = Dropped(Some(tx));
        tasks.spawn("a timer", async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        settle(&probe, 1).await;
        drop(tasks);
        drop(probe);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the task was aborted")
            .expect("its guard was dropped");
    }
}
