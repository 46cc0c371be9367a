//! Changed-slot marks, decided without I/O.
//!
//! The dataplane places a packet by its VIP's ring alone unless the ring
//! slot is marked ([`SLOT_CHANGED`]): the slot changed owner while flows
//! may still run on the previous one. A mark lives through three phases:
//! 1. taking over (`SlotPrevious::backend_id` is the previous owner): a
//!    packet without conntrack state of a flow the SEEN filter saw on the
//!    previous owner goes there while it keeps flows (up or draining), and
//!    is tracked from then on; any other follows the ring;
//! 2. settling, two idle bounds after the change (the SEEN epochs that saw
//!    flows before it are cleared by then): packets without state follow
//!    the ring; tracked flows still keep their backend;
//! 3. cleared, once a sweep of conntrack that began after settling finds
//!    no live entry of the slot on a backend other than its owner.
//!
//! So a flow of the previous owner keeps it if it sends a packet at least
//! once per idle bound; one idle longer may be placed again by the ring.

use std::collections::HashMap;

use xdp_common::{SlotPrevious, NO_BACKEND, SLOT_CHANGED};

/// The owner id of a marked slot whose ring has no backend (a VIP left
/// with draining backends only): never a valid backend id.
pub const NO_OWNER: u32 = SLOT_CHANGED - 2;

/// Seconds a settled mark waits before a sweep may clear it: a packet that
/// read the taking-over record just before it changed may still write an
/// entry; a sweep that starts later sees that entry.
pub const SETTLE_GRACE: u32 = 2;

/// The backend id a ring entry names (`None`: an empty slot).
pub fn owner(entry: u32) -> Option<u32> {
    match entry {
        NO_BACKEND => None,
        e if e & !SLOT_CHANGED == NO_OWNER => None,
        e => Some(e & !SLOT_CHANGED),
    }
}

/// Whether a ring entry is marked.
pub fn is_marked(entry: u32) -> bool {
    entry != NO_BACKEND && entry & SLOT_CHANGED != 0
}

/// A new ring for a VIP, marked against the live one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Marked {
    /// RINGS entries for the inactive half, `SLOT_CHANGED` set where marked.
    pub entries: Vec<u32>,
    /// PREVIOUS records to write before the flip, by ring position.
    pub records: Vec<(u32, SlotPrevious)>,
}

/// Mark `ring` (backend ids, `NO_BACKEND` for none) against the `live`
/// half's entries. `record(position)` is the PREVIOUS record of a marked
/// live slot (asked only for marked slots that move); `stays(id)` the generation of a backend still in the VIP once
/// this change is applied, in any state (one down now may come back, and
/// its silent flows with it), `None` for one removed: its flows are placed
/// again anyway, so giving its slots away needs no mark.
pub fn mark(
    live: &[u32],
    ring: &[u32],
    record: impl Fn(u32) -> Option<SlotPrevious>,
    stays: impl Fn(u32) -> Option<u32>,
    now: u32,
) -> Marked {
    let mut out = Marked {
        entries: Vec::with_capacity(ring.len()),
        records: Vec::new(),
    };
    let taking_over = |previous: u32, generation: u32| SlotPrevious {
        backend_id: previous,
        generation,
        since: now,
        settled: 0,
    };
    for (position, (&old, &new)) in (0u32..).zip(live.iter().zip(ring)) {
        let new = (new != NO_BACKEND).then_some(new);
        let (before, was_marked) = (owner(old), is_marked(old));
        let moved = before.is_some() && before != new;
        let fresh = if !moved {
            None
        } else {
            before.and_then(|b| stays(b).map(|g| taking_over(b, g)))
        };
        let marked = if was_marked {
            // Still taking over: the flows without state are the first
            // previous owner's; they keep it. Settled (or without a record,
            // which the program reads as settled): a new previous owner,
            // with flows of its own without state, takes over again.
            if let Some(r) = fresh {
                let still_taking_over =
                    record(position).is_some_and(|r| r.backend_id != NO_BACKEND);
                if !still_taking_over {
                    out.records.push((position, r));
                }
            }
            true
        } else if let Some(r) = fresh {
            out.records.push((position, r));
            true
        } else {
            false
        };
        out.entries.push(match (new, marked) {
            (None, false) => NO_BACKEND,
            (None, true) => SLOT_CHANGED | NO_OWNER,
            (Some(id), false) => id,
            (Some(id), true) => SLOT_CHANGED | id,
        });
    }
    out
}

/// What a sweep of conntrack found, for [`review`].
#[derive(Debug, Default, Clone)]
pub struct Sweep {
    /// When the sweep began (CLOCK_MONOTONIC seconds).
    pub started: u32,
    /// Backends with a live (not idle) entry, by PREVIOUS key of the slot.
    pub held: HashMap<u32, Vec<u32>>,
}

/// What to do with one mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The idle bound passed: packets without state follow the ring.
    Settle,
    /// No flow can still belong to another backend: unmark the slot.
    Clear,
}

/// The next step for the mark of slot `key` (record `r`, owner `owner`),
/// `idle` seconds being the bound, given the last `sweep`, if any.
pub fn review(
    key: u32,
    r: &SlotPrevious,
    owner: Option<u32>,
    now: u32,
    idle: u32,
    sweep: Option<&Sweep>,
) -> Option<Step> {
    if r.backend_id != NO_BACKEND {
        let after = idle.saturating_mul(2).saturating_add(SETTLE_GRACE);
        return (now.wrapping_sub(r.since) >= after).then_some(Step::Settle);
    }
    let sweep = sweep?;
    // The sweep must have begun after the slot settled (and the grace).
    if sweep.started.wrapping_sub(r.settled) > u32::MAX / 2
        || sweep.started - r.settled < SETTLE_GRACE
    {
        return None;
    }
    let holds_others = sweep
        .held
        .get(&key)
        .is_some_and(|ids| ids.iter().any(|&id| Some(id) != owner));
    (!holds_others).then_some(Step::Clear)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1000;

    fn up(id: u32) -> Option<u32> {
        (id < 100).then_some(7)
    }

    #[test]
    fn a_ring_that_does_not_move_marks_nothing() {
        let m = mark(&[1, 2, 1], &[1, 2, 1], |_| None, up, NOW);
        assert_eq!(m.entries, vec![1, 2, 1]);
        assert!(m.records.is_empty());
    }

    #[test]
    fn a_slot_given_away_by_a_backend_that_keeps_flows_is_marked() {
        let m = mark(&[1, 2, NO_BACKEND], &[3, 2, 3], |_| None, up, NOW);
        assert_eq!(m.entries, vec![SLOT_CHANGED | 3, 2, 3]);
        assert_eq!(
            m.records,
            vec![(
                0,
                SlotPrevious {
                    backend_id: 1,
                    generation: 7,
                    since: NOW,
                    settled: 0
                }
            )]
        );
    }

    #[test]
    fn a_slot_of_a_removed_backend_is_not_marked() {
        // Backend 200 left the VIP: its flows are placed again anyway.
        let m = mark(&[200], &[3], |_| None, up, NOW);
        assert_eq!(m.entries, vec![3]);
        assert!(m.records.is_empty());
    }

    #[test]
    fn a_vip_left_without_backends_keeps_its_marks() {
        let m = mark(
            &[1, NO_BACKEND],
            &[NO_BACKEND, NO_BACKEND],
            |_| None,
            up,
            NOW,
        );
        assert_eq!(m.entries, vec![SLOT_CHANGED | NO_OWNER, NO_BACKEND]);
        assert_eq!(owner(m.entries[0]), None);
        assert!(is_marked(m.entries[0]));
        assert!(!is_marked(NO_BACKEND));
    }

    #[test]
    fn a_slot_still_taking_over_keeps_its_first_previous_owner() {
        let first = SlotPrevious {
            backend_id: 1,
            generation: 7,
            since: NOW - 5,
            settled: 0,
        };
        let m = mark(&[SLOT_CHANGED | 2], &[3], |_| Some(first), up, NOW);
        assert_eq!(m.entries, vec![SLOT_CHANGED | 3]);
        assert!(m.records.is_empty(), "{:?}", m.records);
    }

    #[test]
    fn a_settled_slot_that_moves_takes_over_again() {
        let settled = SlotPrevious {
            backend_id: NO_BACKEND,
            generation: 0,
            since: NOW - 500,
            settled: NOW - 200,
        };
        let m = mark(&[SLOT_CHANGED | 2], &[3], |_| Some(settled), up, NOW);
        assert_eq!(m.entries, vec![SLOT_CHANGED | 3]);
        assert_eq!(m.records[0].1.backend_id, 2);
        // Unmoved, it stays settled and marked.
        let m = mark(&[SLOT_CHANGED | 2], &[2], |_| Some(settled), up, NOW);
        assert_eq!(m.entries, vec![SLOT_CHANGED | 2]);
        assert!(m.records.is_empty());
    }

    fn settled_at(t: u32) -> SlotPrevious {
        SlotPrevious {
            backend_id: NO_BACKEND,
            generation: 0,
            since: t - 300,
            settled: t,
        }
    }

    #[test]
    fn taking_over_settles_after_the_idle_bound_not_before() {
        let r = SlotPrevious {
            backend_id: 1,
            generation: 7,
            since: NOW,
            settled: 0,
        };
        // Two epochs of the SEEN filter, and the grace.
        assert_eq!(review(0, &r, Some(3), NOW + 601, 300, None), None);
        assert_eq!(
            review(0, &r, Some(3), NOW + 602, 300, None),
            Some(Step::Settle)
        );
    }

    #[test]
    fn a_mark_clears_only_after_a_later_sweep_finds_no_other_backend() {
        let r = settled_at(NOW);
        let sweep = |started: u32, held: &[u32]| Sweep {
            started,
            held: HashMap::from([(9, held.to_vec())]),
        };
        // No sweep yet, or one from before the slot settled: keep.
        assert_eq!(review(9, &r, Some(3), NOW + 50, 300, None), None);
        assert_eq!(
            review(9, &r, Some(3), NOW + 50, 300, Some(&sweep(NOW - 10, &[]))),
            None
        );
        assert_eq!(
            review(9, &r, Some(3), NOW + 50, 300, Some(&sweep(NOW + 1, &[]))),
            None
        );
        // A flow still on the previous owner holds the mark.
        assert_eq!(
            review(
                9,
                &r,
                Some(3),
                NOW + 50,
                300,
                Some(&sweep(NOW + 10, &[1, 3]))
            ),
            None
        );
        // Only the owner's own flows: clear.
        assert_eq!(
            review(9, &r, Some(3), NOW + 50, 300, Some(&sweep(NOW + 10, &[3]))),
            Some(Step::Clear)
        );
    }
}
