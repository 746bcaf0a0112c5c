//! Blocking work the loop hands out (planning, assembly, registry steps), owned: what the
//! task returns comes back as an event, and so does its panic. A task that panicked
//! used to send nothing, and its run waited for it for ever.

use super::Event;
use tokio::sync::mpsc::UnboundedSender;

/// Runs `work` on the blocking pool; `to_event` turns its result, or the reason it
/// panicked, into the event the loop gets.
pub(super) fn blocking<T: Send + 'static>(
    tx: &UnboundedSender<Event>,
    work: impl FnOnce() -> T + Send + 'static,
    to_event: impl FnOnce(Result<T, String>) -> Event + Send + 'static,
) {
    let tx = tx.clone();
    let handle = tokio::task::spawn_blocking(work);
    tokio::spawn(async move {
        let out = handle.await.map_err(|e| {
            let why = reason(e);
            tracing::error!(reason = %why, "a blocking task of the scheduler failed");
            why
        });
        let _ = tx.send(to_event(out));
    });
}

/// What a failed task's join error says: its panic message when it panicked.
fn reason(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("the task was cancelled: {e}");
    }
    let payload = e.into_panic();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("panicked: {msg}")
}
