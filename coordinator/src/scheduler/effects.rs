//! The scheduler's one seam to the world: everything it asks to happen outside its own
//! state (blocking work, sealing, an event at a later time) goes through [`Effects`].
//! The loop on the tokio runtime uses [`Spawned`]; the engine's unit tests use an
//! in-process synchronous implementation (`tests.rs`), so its decisions are tested in
//! milliseconds under paused time.

use super::Event;
use crate::sealing::group::{SealQueue, SealTask};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Work for off the loop (planning, assembly, a `core.registry.*` step): it makes the
/// event that reports its outcome, its panic included (see `tasks::blocking`).
pub(super) type Work = Box<dyn FnOnce() -> Event + Send>;

/// What the scheduler asks the world to do; it never does it itself.
pub(super) trait Effects: Send {
    /// Runs `work` off the loop and delivers the event it makes.
    fn spawn(&self, work: Work);
    /// Delivers `event` after `delay` (backoff, grace periods).
    fn later(&self, delay: Duration, event: Event);
    /// Queues a verified result for sealing; `Event::Sealed` reports it. False when
    /// sealing has stopped.
    fn seal(&self, task: SealTask) -> bool;
}

/// The production effects: the blocking pool, tokio timers and the group-sealing thread.
pub(super) struct Spawned {
    /// The loop's own queue.
    pub(super) tx: UnboundedSender<Event>,
    /// The group-sealing thread.
    pub(super) sealer: SealQueue,
}

impl Effects for Spawned {
    fn spawn(&self, work: Work) {
        let tx = self.tx.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let _ = tx.send(work());
        });
        // `work` reports its own panic; a task the runtime dropped (shutdown) is logged.
        tokio::spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "a blocking task of the scheduler did not finish");
            }
        });
    }

    fn later(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    fn seal(&self, task: SealTask) -> bool {
        self.sealer.push(task)
    }
}
