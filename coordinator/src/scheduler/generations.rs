//! Lease generations: the fencing token of each lease, which only ever grows, across
//! restarts too, so that a result or upload from an older lease can never pass for a
//! newer one's.
//!
//! A generation starts above both the boot time (seconds << 20) and a high-water mark
//! kept in the store. Generations are handed out from blocks reserved in the store
//! ([`BLOCK`] at a time, one small write per block), so a restart, even with a clock that
//! went backwards or a store whose mark could not be read back, starts above every
//! generation ever handed out that the store knew of.

use crate::Store;

/// The store key of the high-water mark, in the engine's meta tree.
pub(super) const KEY: &str = "generation";
/// Generations reserved per store write.
const BLOCK: u64 = 1 << 16;

/// The generations handed out, and the block reserved for them.
pub(super) struct Generations {
    next: u64,
    reserved: u64,
    /// A mark past the next block is being written (off the loop).
    pending: bool,
}

impl Generations {
    /// Starts above the boot time and above the stored mark, and reserves a block.
    pub(super) fn start(store: &dyn Store, tree: &str) -> Self {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() << 20)
            .unwrap_or(0);
        let mark = match store.get(tree, KEY) {
            Ok(Some(b)) => b
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or_else(|_| {
                    tracing::error!(
                        "the lease generation mark is unreadable; starting from the clock"
                    );
                    0
                }),
            Ok(None) => 0,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the lease generation mark; starting from the clock");
                0
            }
        };
        let next = boot.max(mark);
        let mut g = Self {
            next,
            reserved: next,
            pending: false,
        };
        g.reserve(store, tree);
        g
    }

    /// The mark to write ahead, off the loop, once half the reserved block is used and no
    /// such write is under way: the next block is then durable before it is needed.
    pub(super) fn ahead(&mut self) -> Option<u64> {
        if self.pending || self.reserved.saturating_sub(self.next) > BLOCK / 2 {
            return None;
        }
        self.pending = true;
        Some(self.reserved.saturating_add(BLOCK))
    }

    /// A mark written ahead is durable (`Some`) or could not be written (`None`: the
    /// next `ahead` tries again).
    pub(super) fn written_ahead(&mut self, mark: Option<u64>) {
        self.pending = false;
        if let Some(m) = mark {
            self.reserved = self.reserved.max(m);
        }
    }

    /// The next generation. Only when the block ran out before a write ahead landed
    /// does this write the mark itself, on the caller's thread.
    pub(super) fn take(&mut self, store: &dyn Store, tree: &str) -> u64 {
        if self.next >= self.reserved {
            self.reserve(store, tree);
        }
        let g = self.next;
        self.next += 1;
        g
    }

    /// Writes the mark past the next block and makes it durable. A failure is logged
    /// and retried with the next generation handed out.
    fn reserve(&mut self, store: &dyn Store, tree: &str) {
        let mark = self.next.saturating_add(BLOCK);
        match store
            .put(tree, KEY, &mark.to_be_bytes())
            .and_then(|()| store.flush())
        {
            Ok(()) => self.reserved = mark,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reserving lease generations");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    #[test]
    fn generations_start_above_the_stored_mark_and_every_block_is_reserved() {
        let store = MemStore::default();
        let far = u64::MAX / 4;
        store.put("meta", KEY, &far.to_be_bytes()).expect("put");
        let mut g = Generations::start(&store, "meta");
        let first = g.take(&store, "meta");
        assert!(first >= far, "{first} < {far}");
        for _ in 0..BLOCK + 3 {
            g.take(&store, "meta");
        }
        let last = g.take(&store, "meta");
        // A restart starts above everything handed out.
        let mut again = Generations::start(&store, "meta");
        assert!(again.take(&store, "meta") > last);
        // Written ahead: the block is extended before it runs out, so `take` never
        // writes on the loop.
        let mut g = Generations::start(&store, "meta");
        let start_mark = g.reserved;
        assert_eq!(g.ahead(), None, "a fresh block needs nothing yet");
        for _ in 0..BLOCK / 2 {
            g.take(&store, "meta");
        }
        let mark = g.ahead().expect("half the block is used");
        assert_eq!(mark, start_mark + BLOCK);
        assert_eq!(g.ahead(), None, "one write ahead at a time");
        g.written_ahead(Some(mark));
        for _ in 0..BLOCK {
            g.take(&store, "meta");
        }
        assert_eq!(g.reserved, mark, "no write of its own was needed");
        // An unreadable mark falls back to the clock, never to zero.
        store.put("meta", KEY, b"junk").expect("put");
        let mut clock = Generations::start(&store, "meta");
        assert!(clock.take(&store, "meta") > 1 << 40);
    }
}
