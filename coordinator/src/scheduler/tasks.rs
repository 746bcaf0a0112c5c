//! Blocking work the loop hands out (planning, assembly, registry steps), owned: what the
//! task returns comes back as an event, and so does its panic. A task that panicked
//! used to send nothing, and its run waited for it for ever.

use super::Event;
use super::effects::Effects;
use std::panic::AssertUnwindSafe;

/// Runs `work` through `fx`; `to_event` turns its result, or the reason it panicked,
/// into the event the loop gets.
pub(super) fn blocking<T: 'static>(
    fx: &dyn Effects,
    work: impl FnOnce() -> T + Send + 'static,
    to_event: impl FnOnce(Result<T, String>) -> Event + Send + 'static,
) {
    fx.spawn(Box::new(move || {
        let out = std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(|payload| {
            let why = format!(
                "panicked: {}",
                crate::tasks::panic_message(payload.as_ref())
            );
            tracing::error!(reason = %why, "a blocking task of the scheduler failed");
            why
        });
        Some(to_event(out))
    }));
}
