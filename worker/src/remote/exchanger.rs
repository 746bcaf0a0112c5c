//! The worker's half of `Exchange`: one task per link sends the results its slots
//! finished together with the leases they want, in one call (BOINC's scheduler RPC
//! carries both), and long-polls for leases while no result is waiting to go.
//!
//! Slots hand a signed result (its files already uploaded) and, usually, their ask for
//! the next lease to the [`Pump`]; the pump's task sends what queued up while the last
//! call was in flight as one call, hands each slot its verdict, and each granted lease
//! to a slot that asked. A coordinator that does not know `Exchange` (an older one)
//! turns the link back to one `Lease` and one `Report` call per job, for good.

use super::GrpcLink;
use nexa_proto::convert;
use nexa_proto::retry::{OnError, on_error};
use nexa_proto::v1;
use nexa_shared::job::Lease;
use prost::Message;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{Notify, oneshot};
use tonic::{Code, Status};

/// The most results one call carries (the coordinator takes up to 1,024).
const MAX_RESULTS: usize = 512;

/// The most bytes of results one call carries: half of what the coordinator decodes
/// (8 MiB), so that batching never makes a call too large that alone would pass.
const MAX_RESULT_BYTES: usize = 4 << 20;

/// The most leases one call asks for (the coordinator grants up to 1,024): the answer
/// must fit what this link decodes (8 MiB); more slots are filled over more calls.
const MAX_WANT: usize = 64;

/// How long a long poll for leases may be held open by the coordinator.
const POLL_WAIT_MS: u64 = 15_000;

/// A result's delivery: `Ok` once the coordinator judged it (accepted or refused, with
/// why), the error that stopped it from getting there otherwise.
pub type Delivered = Result<Result<(), String>, Status>;

/// A result waiting to go out.
struct Outgoing {
    result: v1::JobResult,
    done: oneshot::Sender<Delivered>,
}

/// What the pump holds between calls.
#[derive(Default)]
struct State {
    outbox: Vec<Outgoing>,
    /// Slots waiting for a lease, oldest first.
    wanting: VecDeque<oneshot::Sender<Lease>>,
    /// Leases granted that no slot waits for (one stopped waiting): the next ask gets one.
    ready: VecDeque<Lease>,
    /// Leases the long poll in flight asked for (0: none in flight).
    polled: usize,
    /// Long polls that failed in a row (their backoff).
    poll_failures: u32,
    started: bool,
    closed: bool,
    /// The coordinator answered `Exchange` with UNIMPLEMENTED.
    unsupported: bool,
}

impl State {
    /// Hands ready leases to waiting slots.
    fn give_ready(&mut self) {
        while !self.ready.is_empty() && !self.wanting.is_empty() {
            let (Some(lease), Some(slot)) = (self.ready.pop_front(), self.wanting.pop_front())
            else {
                break;
            };
            if let Err(lease) = slot.send(lease) {
                self.ready.push_front(lease);
            }
        }
        self.wanting.retain(|s| !s.is_closed());
    }

    /// Gives `lease` to the oldest slot still waiting, or keeps it ready.
    fn give(&mut self, mut lease: Lease) {
        while let Some(slot) = self.wanting.pop_front() {
            match slot.send(lease) {
                Ok(()) => return,
                Err(back) => lease = back,
            }
        }
        self.ready.push_back(lease);
    }
}

/// One call's worth of work.
enum Work {
    Results(Vec<Outgoing>, usize),
    Poll(usize),
    Idle,
}

/// Batches one link's reports and lease asks into `Exchange` calls.
#[derive(Default)]
pub struct Pump {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pump {
    /// Whether the coordinator turned out not to know `Exchange`.
    pub fn unsupported(&self) -> bool {
        lock(&self.shared.state).unsupported
    }

    /// Queues `result` (and `ask`, the slot's ask for its next lease, in the same call);
    /// the receiver gets the verdict.
    pub fn report(
        &self,
        link: &GrpcLink,
        result: v1::JobResult,
        ask: Option<oneshot::Sender<Lease>>,
    ) -> oneshot::Receiver<Delivered> {
        let (done, rx) = oneshot::channel();
        {
            let mut s = lock(&self.shared.state);
            s.outbox.push(Outgoing { result, done });
            s.wanting.extend(ask);
        }
        self.wake(link);
        rx
    }

    /// Queues a slot's ask for a lease.
    pub fn ask(&self, link: &GrpcLink, ask: oneshot::Sender<Lease>) {
        lock(&self.shared.state).wanting.push_back(ask);
        self.wake(link);
    }

    /// Ends the pump's task; slots still waiting hear the link is gone.
    pub fn close(&self) {
        let mut s = lock(&self.shared.state);
        s.closed = true;
        s.wanting.clear();
        drop(s);
        self.shared.wake.notify_one();
    }

    fn wake(&self, link: &GrpcLink) {
        let start = {
            let mut s = lock(&self.shared.state);
            !std::mem::replace(&mut s.started, true)
        };
        if start {
            tokio::spawn(run(self.shared.clone(), link.weak()));
        }
        self.shared.wake.notify_one();
    }
}

/// How many of the queued results (of these encoded sizes) go in the next call: at most
/// `max` of them and `max_bytes` in all, and always at least one (one result too large
/// alone is refused as it would be by `Report`, not held back for ever).
fn batch_len(sizes: impl Iterator<Item = usize>, max: usize, max_bytes: usize) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for size in sizes.take(max) {
        total = total.saturating_add(size);
        if n > 0 && total > max_bytes {
            break;
        }
        n += 1;
    }
    n
}

/// The pump's task: one results call at a time, a long poll beside it.
async fn run(shared: Arc<Shared>, link: Weak<GrpcLink>) {
    loop {
        let work = {
            let mut s = lock(&shared.state);
            if s.closed {
                return;
            }
            s.give_ready();
            if !s.outbox.is_empty() {
                let n = batch_len(
                    s.outbox.iter().map(|o| o.result.encoded_len()),
                    MAX_RESULTS,
                    MAX_RESULT_BYTES,
                );
                let batch: Vec<Outgoing> = s.outbox.drain(..n).collect();
                let want = s.wanting.len().saturating_sub(s.polled).min(MAX_WANT);
                Work::Results(batch, want)
            } else if s.polled == 0 && !s.wanting.is_empty() {
                s.polled = s.wanting.len().min(MAX_WANT);
                Work::Poll(s.polled)
            } else {
                Work::Idle
            }
        };
        let Some(l) = link.upgrade() else { return };
        match work {
            Work::Idle => {
                drop(l);
                shared.wake.notified().await;
            }
            Work::Results(batch, want) => send_results(&shared, &l, batch, want).await,
            Work::Poll(want) => {
                let shared = shared.clone();
                tokio::spawn(async move { poll(&shared, &l, want).await });
            }
        }
    }
}

/// Sends `batch` with an ask for `want` leases, retrying as a report is retried.
async fn send_results(shared: &Shared, link: &GrpcLink, batch: Vec<Outgoing>, want: usize) {
    let results: Vec<v1::JobResult> = batch.iter().map(|o| o.result.clone()).collect();
    let sent = link
        .retrying(8, || {
            link.exchange(v1::ExchangeRequest {
                results: results.clone(),
                want: want as u32,
                wait_ms: 0,
            })
        })
        .await;
    match sent {
        Ok(resp) => {
            let mut verdicts = resp.verdicts.into_iter();
            for o in batch {
                let v = match verdicts.next() {
                    Some(v) if v.accepted => Ok(()),
                    Some(v) => Err(v.reason),
                    None => Err("the coordinator gave no verdict".to_string()),
                };
                let _ = o.done.send(Ok(v));
            }
            grant(shared, resp.leases);
        }
        Err(s) if s.code() == Code::Unimplemented => {
            tracing::info!(
                "the coordinator does not know Exchange: one call per lease and per report"
            );
            fall_back(shared, link);
            for o in batch {
                let v = link.report_alone(&o.result).await;
                let _ = o.done.send(v);
            }
        }
        Err(s) => {
            for o in batch {
                let _ = o.done.send(Err(s.clone()));
            }
        }
    }
}

/// Long-polls for `want` leases once; the pump decides what follows.
async fn poll(shared: &Shared, link: &GrpcLink, want: usize) {
    let asked = link
        .exchange(v1::ExchangeRequest {
            results: Vec::new(),
            want: want as u32,
            wait_ms: POLL_WAIT_MS,
        })
        .await;
    let failures = match asked {
        Ok(resp) => {
            grant(shared, resp.leases);
            0
        }
        Err(s) if s.code() == Code::Unimplemented => {
            fall_back(shared, link);
            0
        }
        Err(s) => {
            let failures = lock(&shared.state).poll_failures + 1;
            if on_error(s.code()) == OnError::Reenrol {
                if let Err(e) = link.enrol().await {
                    tracing::warn!(error = %e.message(), "re-enrolment failed");
                    tokio::time::sleep(super::backoff(failures)).await;
                }
            } else {
                tracing::debug!(error = %s.message(), "lease call failed; retrying");
                tokio::time::sleep(super::backoff(failures)).await;
            }
            failures
        }
    };
    {
        let mut s = lock(&shared.state);
        s.polled = 0;
        s.poll_failures = failures;
    }
    shared.wake.notify_one();
}

/// Hands granted leases to waiting slots.
fn grant(shared: &Shared, leases: Vec<v1::LeaseResponse>) {
    let mut s = lock(&shared.state);
    for r in leases {
        let Some(wire) = r.lease else { continue };
        match convert::lease_from_wire(wire, r.gpu_uuids) {
            Ok(l) => s.give(l),
            Err(e) => {
                tracing::error!(error = %e, "the coordinator sent a lease this worker cannot read");
            }
        }
    }
    drop(s);
    shared.wake.notify_one();
}

/// Turns the link to single calls: every slot waiting gets its lease from `Lease`.
fn fall_back(shared: &Shared, link: &GrpcLink) {
    let waiting: Vec<oneshot::Sender<Lease>> = {
        let mut s = lock(&shared.state);
        if !std::mem::replace(&mut s.unsupported, true) {
            tracing::info!(
                "the coordinator does not know Exchange: one call per lease and per report"
            );
        }
        s.wanting.drain(..).collect()
    };
    for slot in waiting {
        let Some(link) = link.weak().upgrade() else {
            return;
        };
        tokio::spawn(async move {
            if let Some(lease) = link.lease_alone().await {
                let _ = slot.send(lease);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::batch_len;

    #[test]
    fn a_batch_is_bounded_by_count_and_bytes_and_never_empty() {
        assert_eq!(batch_len([10; 5].into_iter(), 3, 100), 3, "by count");
        assert_eq!(batch_len([40; 5].into_iter(), 10, 100), 2, "by bytes");
        assert_eq!(
            batch_len([500, 1].into_iter(), 10, 100),
            1,
            "one too large goes alone"
        );
        assert_eq!(batch_len(std::iter::empty(), 10, 100), 0);
    }
}
