//! The scheduler's one seam to the world: everything it asks to happen outside its own
//! state (blocking work, store and mirror writes, sealing, an event at a later time)
//! goes through [`Effects`]. The loop itself never touches the disk.
//! The loop on the tokio runtime uses [`Spawned`]; the engine's unit tests use an
//! in-process synchronous implementation (`tests.rs`), so its decisions are tested in
//! milliseconds under paused time.

use super::Event;
use crate::sealing::group::{SealQueue, SealTask};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Work for off the loop (planning, assembly, a `core.registry.*` step, a failed job's
/// clean-up): it makes the event that reports its outcome, its panic included (see
/// `tasks::blocking`), or none when nobody waits on it.
pub(super) type Work = Box<dyn FnOnce() -> Option<Event> + Send>;

/// A store or mirror write, run in order with the others on the writer thread; the event
/// it returns (a failure to retry, a save to act on) goes back to the loop.
pub(super) type Write = Box<dyn FnOnce() -> Option<Event> + Send>;

/// What the scheduler asks the world to do; it never does it itself.
pub(super) trait Effects: Send {
    /// Runs `work` off the loop and delivers the event it makes.
    fn spawn(&self, work: Work);
    /// Delivers `event` after `delay` (backoff, grace periods).
    fn later(&self, delay: Duration, event: Event);
    /// Queues a write behind the ones already queued (the write-behind thread).
    fn persist(&self, write: Write);
    /// Waits until every queued write is done (at shutdown).
    fn drain(&self);
    /// Writes queued and not yet done: the write-behind rounds wait while it is
    /// [`WRITE_BACKLOG`] or more (back-pressure from a slow disk; what is dirty stays
    /// dirty, and a later round writes it).
    fn backlog(&self) -> usize;
    /// Queues a verified result for sealing; `Event::Sealed` reports it. False when
    /// sealing has stopped.
    fn seal(&self, task: SealTask) -> bool;
}

/// The production effects: the blocking pool and tokio timers (owned by the
/// coordinator's task supervisor), the group-sealing thread and the write-behind thread.
pub(super) struct Spawned {
    /// The owner of every task started here.
    pub(super) tasks: crate::tasks::Tasks,
    /// The loop's own queue.
    pub(super) tx: UnboundedSender<Event>,
    /// The group-sealing thread.
    pub(super) sealer: SealQueue,
    /// The write-behind thread.
    pub(super) writer: Writer,
}

/// How many writes may wait for the writer thread before the write-behind rounds hold
/// back (see [`Effects::backlog`]). Writes that acknowledge something (a submit, a
/// finished run, an operator's decision) are always queued: there are at most as many
/// as callers waiting.
pub(super) const WRITE_BACKLOG: usize = 64;

/// The write-behind thread: runs [`Write`]s one after the other, in the order queued.
pub(super) struct Writer {
    tx: mpsc::Sender<Write>,
    /// Writes queued and not yet done.
    queued: Arc<AtomicUsize>,
}

impl Writer {
    /// Starts the thread; the events its writes return go to `events`. It ends when the
    /// `Writer` is dropped. Like `std::thread::spawn`, panics only when the OS cannot
    /// start a thread.
    pub(super) fn start(events: UnboundedSender<Event>) -> Self {
        let (tx, rx) = mpsc::channel::<Write>();
        let queued = Arc::new(AtomicUsize::new(0));
        let done = queued.clone();
        let spawned = std::thread::Builder::new()
            .name("nexa-writer".into())
            .spawn(move || {
                while let Ok(write) = rx.recv() {
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(write));
                    done.fetch_sub(1, Ordering::AcqRel);
                    match outcome {
                        Ok(Some(ev)) => {
                            let _ = events.send(ev);
                        }
                        Ok(None) => {}
                        Err(_) => tracing::error!("a store write panicked"),
                    }
                }
            });
        if let Err(e) = spawned {
            panic!("starting the writer thread: {e}");
        }
        Self { tx, queued }
    }
}

impl Effects for Spawned {
    fn spawn(&self, work: Work) {
        let tx = self.tx.clone();
        self.tasks.spawn_blocking("scheduler work", move || {
            if let Some(ev) = work() {
                let _ = tx.send(ev);
            }
        });
    }

    fn later(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        self.tasks.spawn("scheduler timer", async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    fn seal(&self, task: SealTask) -> bool {
        self.sealer.push(task)
    }

    fn persist(&self, write: Write) {
        self.writer.queued.fetch_add(1, Ordering::AcqRel);
        if self.writer.tx.send(write).is_err() {
            self.writer.queued.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("the writer thread is gone; a store write was dropped");
        }
    }

    fn backlog(&self) -> usize {
        self.writer.queued.load(Ordering::Acquire)
    }

    fn drain(&self) {
        let (done, wait) = mpsc::channel();
        self.persist(Box::new(move || {
            let _ = done.send(());
            None
        }));
        let _ = wait.recv();
    }
}
