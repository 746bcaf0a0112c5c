//! Placement: which queued job a worker gets. A pure function of the queue as it looks
//! to one worker, so that fair share is tested on its own (property tests below).
//!
//! Fair share: among the first job that fits of each run (looking at most `scan`
//! entries into the queue once something fits), the one whose run holds the fewest
//! leases now wins, then the one whose run was granted the fewest so far, then the
//! earliest in the queue. One big run cannot starve the others, and within a run the
//! queue order holds.

/// One entry of the queue as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The job's run; `None` for an entry whose job is no longer queued (stale).
    pub run: Option<&'a str>,
}

/// What [`pick`] chose.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pick {
    /// The queue position of the chosen job and the GPUs it gets.
    pub chosen: Option<(usize, Vec<usize>)>,
    /// Stale entries passed before the chosen one (they can go).
    pub stale: Vec<usize>,
}

/// Picks from `queue` (in order). `fits(pos)` says whether the job at `pos` fits the
/// worker (and with which GPUs); `leased(run)` and `granted(run)` are the run's leases
/// now and so far; `runs` is how many runs are active (once every one has a candidate,
/// looking further cannot change the choice).
pub fn pick<'a>(
    queue: impl IntoIterator<Item = Entry<'a>>,
    runs: usize,
    scan: usize,
    mut fits: impl FnMut(usize) -> Option<Vec<usize>>,
    leased: impl Fn(&str) -> usize,
    granted: impl Fn(&str) -> u64,
) -> Pick {
    let mut candidates: Vec<(usize, &str, Vec<usize>)> = Vec::new();
    let mut stale = Vec::new();
    for (pos, e) in queue.into_iter().enumerate() {
        if candidates.len() >= runs || (pos >= scan && !candidates.is_empty()) {
            break;
        }
        let Some(run) = e.run else {
            stale.push(pos);
            continue;
        };
        if candidates.iter().any(|(_, r, _)| *r == run) {
            continue;
        }
        if let Some(gpus) = fits(pos) {
            candidates.push((pos, run, gpus));
        }
    }
    let chosen = candidates
        .into_iter()
        .min_by_key(|(pos, run, _)| (leased(run), granted(run), *pos))
        .map(|(pos, _, gpus)| (pos, gpus));
    if let Some((pos, _)) = &chosen {
        stale.retain(|p| p < pos);
    } else {
        stale.clear();
    }
    Pick { chosen, stale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A queue of jobs over a few runs: (run index or stale, fits).
    fn arb_queue() -> impl Strategy<Value = Vec<(Option<u8>, bool)>> {
        prop::collection::vec((prop::option::weighted(0.9, 0u8..5), any::<bool>()), 0..60)
    }

    fn names(q: &[(Option<u8>, bool)]) -> Vec<Option<String>> {
        q.iter().map(|(r, _)| r.map(|r| format!("r{r}"))).collect()
    }

    proptest! {
        #[test]
        fn the_chosen_job_fits_and_wins_fair_share(
            q in arb_queue(),
            leased in prop::collection::vec(0usize..4, 5),
            granted in prop::collection::vec(0u64..4, 5),
            scan in 1usize..80,
        ) {
            let runs_named = names(&q);
            let entries: Vec<Entry> = runs_named.iter().map(|r| Entry { run: r.as_deref() }).collect();
            let idx = |run: &str| run[1..].parse::<usize>().unwrap_or(0);
            let active = 5;
            let p = pick(
                entries.iter().copied(),
                active,
                scan,
                |pos| q[pos].1.then(Vec::new),
                |r| leased[idx(r)],
                |r| granted[idx(r)],
            );
            // The window placement looks at: up to `scan`, or further until something fits.
            let first_fit = (0..q.len()).find(|&i| q[i].0.is_some() && q[i].1);
            match p.chosen {
                None => {
                    // Nothing fits anywhere it looked, and it looked until the end
                    // (nothing fitted before `scan`, so it went on).
                    prop_assert!(first_fit.is_none(), "{q:?} scan {scan}: {p:?}");
                }
                Some((pos, _)) => {
                    prop_assert!(q[pos].0.is_some() && q[pos].1, "chose a job that does not fit");
                    // The first fitting job of each run before the chosen one's scan end
                    // has a key no smaller than the chosen one's.
                    let key = |i: usize| {
                        let r = q[i].0.map(usize::from).unwrap_or(0);
                        (leased[r], granted[r], i)
                    };
                    let mut seen: HashMap<u8, usize> = HashMap::new();
                    for (i, e) in q.iter().enumerate().take(scan.max(pos + 1)) {
                        if let (Some(r), true) = *e {
                            seen.entry(r).or_insert(i);
                        }
                    }
                    for &i in seen.values() {
                        prop_assert!(key(pos) <= key(i), "{i} beats {pos}: {q:?}");
                    }
                    // Within its run, the chosen job is the first that fits.
                    let r = q[pos].0;
                    prop_assert!((0..pos).all(|i| !(q[i].0 == r && q[i].1)));
                    // Only stale entries before it are reported.
                    prop_assert!(p.stale.iter().all(|&s| s < pos && q[s].0.is_none()));
                }
            }
        }

        #[test]
        fn a_run_without_leases_is_never_starved_by_a_busy_one(
            big in 1usize..50,
            small_at in 0usize..50,
        ) {
            // A busy run fills the queue; a run with no leases has one job somewhere in
            // the scan window: that job is picked first.
            let mut q: Vec<Option<&str>> = vec![Some("busy"); big];
            let at = small_at.min(big);
            q.insert(at, Some("idle"));
            let p = pick(
                q.iter().map(|r| Entry { run: *r }),
                2,
                4096,
                |_| Some(Vec::new()),
                |r| if r == "busy" { 10 } else { 0 },
                |_| 0,
            );
            prop_assert_eq!(p.chosen.map(|c| c.0), Some(at));
        }
    }
}
