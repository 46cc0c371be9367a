//! Changed-slot marks, decided without I/O.
//!
//! The dataplane places a packet by its VIP's ring alone unless the ring
//! slot is marked ([`SLOT_CHANGED`]): the slot changed owner while flows
//! may still run on the previous one. A mark lives through three phases:
//! 1. taking over (the entry's high word is the previous owner): a
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

use xdp_common::{ring_entry, NO_BACKEND, SLOT_CHANGED};

/// The owner id of a marked slot whose ring has no backend (a VIP left
/// with draining backends only): never a valid backend id, and with the mark
/// not `NO_BACKEND` either.
pub const NO_OWNER: u32 = SLOT_CHANGED - 2;

/// Seconds a settled mark waits before a sweep may clear it: a packet that
/// read the taking-over entry just before it changed may still write a
/// conntrack entry; a sweep that starts later sees that entry.
pub const SETTLE_GRACE: u32 = 2;

/// The owner word of a RINGS entry.
pub fn word(entry: u64) -> u32 {
    entry as u32
}

/// The backend id a ring entry names (`None`: an empty slot).
pub fn owner(entry: u64) -> Option<u32> {
    match word(entry) {
        NO_BACKEND => None,
        e if e & !SLOT_CHANGED == NO_OWNER => None,
        e => Some(e & !SLOT_CHANGED),
    }
}

/// Whether a ring entry is marked.
pub fn is_marked(entry: u64) -> bool {
    word(entry) != NO_BACKEND && word(entry) & SLOT_CHANGED != 0
}

/// The previous owner a marked entry holds while taking over.
pub fn previous(entry: u64) -> Option<u32> {
    let p = (entry >> 32) as u32;
    (is_marked(entry) && p != NO_BACKEND).then_some(p)
}

/// What the daemon keeps of a marked slot (the entry itself holds the
/// previous owner): when it changed and when it settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The previous owner while taking over; `NO_BACKEND` once settled.
    pub previous: u32,
    /// When the slot changed owner (CLOCK_MONOTONIC seconds).
    pub since: u32,
    /// When taking over ended; 0 until then.
    pub settled: u32,
}

impl Record {
    /// The record of a marked entry found in the maps (a restarted daemon):
    /// taking over from now, or settled now.
    pub fn found(entry: u64, now: u32) -> Self {
        match previous(entry) {
            Some(p) => Self {
                previous: p,
                since: now,
                settled: 0,
            },
            None => Self {
                previous: NO_BACKEND,
                since: now,
                settled: now,
            },
        }
    }
}

/// A new ring for a VIP, marked against the live one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Marked {
    /// RINGS entries for the inactive half.
    pub entries: Vec<u64>,
    /// Records of the slots that start taking over, by ring position.
    pub records: Vec<(u32, Record)>,
}

/// Mark `ring` (backend ids, `NO_BACKEND` for none) against the `live`
/// half's entries. `stays(id)`: whether a backend is still in the VIP once
/// this change is applied, in any state (one down now may come back, and
/// its silent flows with it); one removed needs no mark: its flows are
/// placed again anyway.
pub fn mark(live: &[u64], ring: &[u32], stays: impl Fn(u32) -> bool, now: u32) -> Marked {
    let mut out = Marked {
        entries: Vec::with_capacity(ring.len()),
        records: Vec::new(),
    };
    for (position, (&old, &new)) in (0u32..).zip(live.iter().zip(ring)) {
        let new = (new != NO_BACKEND).then_some(new);
        let before = owner(old);
        let moved = before.is_some() && before != new;
        let fresh = before.filter(|&b| moved && stays(b));
        // Still taking over, a slot keeps its first previous owner: the
        // flows without state are that one's. Settled (or never marked), a
        // new previous owner, with flows of its own without state, takes
        // over.
        let previous = match (is_marked(old), previous(old), fresh) {
            (true, Some(p), _) => Some(p),
            (_, _, Some(b)) => {
                out.records.push((
                    position,
                    Record {
                        previous: b,
                        since: now,
                        settled: 0,
                    },
                ));
                Some(b)
            }
            _ => None,
        };
        let marked = is_marked(old) || fresh.is_some();
        let owner_word = match (new, marked) {
            (None, false) => NO_BACKEND,
            (None, true) => SLOT_CHANGED | NO_OWNER,
            (Some(id), false) => id,
            (Some(id), true) => SLOT_CHANGED | id,
        };
        out.entries
            .push(ring_entry(owner_word, previous.unwrap_or(NO_BACKEND)));
    }
    out
}

/// The daemon's key of a ring slot: the same for both halves of a VIP's
/// ring, so a record survives a flip.
pub fn slot_key(vip_id: u32, ring_size: u32, position: u32) -> u32 {
    vip_id.wrapping_mul(ring_size).wrapping_add(position)
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
    r: &Record,
    owner: Option<u32>,
    now: u32,
    idle: u32,
    sweep: Option<&Sweep>,
) -> Option<Step> {
    if r.previous != NO_BACKEND {
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

    fn stays(id: u32) -> bool {
        id < 100
    }

    fn plain(ids: &[u32]) -> Vec<u64> {
        ids.iter().map(|&id| ring_entry(id, NO_BACKEND)).collect()
    }

    #[test]
    fn a_ring_that_does_not_move_marks_nothing() {
        let m = mark(&plain(&[1, 2, 1]), &[1, 2, 1], stays, NOW);
        assert_eq!(m.entries, plain(&[1, 2, 1]));
        assert!(m.records.is_empty());
    }

    #[test]
    fn a_slot_given_away_by_a_backend_that_stays_is_marked() {
        let m = mark(&plain(&[1, 2, NO_BACKEND]), &[3, 2, 3], stays, NOW);
        assert_eq!(
            m.entries,
            vec![
                ring_entry(SLOT_CHANGED | 3, 1),
                ring_entry(2, NO_BACKEND),
                ring_entry(3, NO_BACKEND)
            ]
        );
        assert_eq!(previous(m.entries[0]), Some(1));
        assert_eq!(owner(m.entries[0]), Some(3));
        assert_eq!(
            m.records,
            vec![(
                0,
                Record {
                    previous: 1,
                    since: NOW,
                    settled: 0
                }
            )]
        );
    }

    #[test]
    fn a_slot_of_a_removed_backend_is_not_marked() {
        // Backend 200 left the VIP: its flows are placed again anyway.
        let m = mark(&plain(&[200]), &[3], stays, NOW);
        assert_eq!(m.entries, plain(&[3]));
        assert!(m.records.is_empty());
    }

    #[test]
    fn a_vip_left_without_backends_keeps_its_marks() {
        let m = mark(
            &plain(&[1, NO_BACKEND]),
            &[NO_BACKEND, NO_BACKEND],
            stays,
            NOW,
        );
        assert_eq!(m.entries[0], ring_entry(SLOT_CHANGED | NO_OWNER, 1));
        assert_eq!(m.entries[1], u64::MAX, "empty and unmarked");
        assert_eq!(owner(m.entries[0]), None);
        assert!(is_marked(m.entries[0]));
        assert!(!is_marked(u64::MAX));
    }

    #[test]
    fn a_slot_still_taking_over_keeps_its_first_previous_owner() {
        let live = [ring_entry(SLOT_CHANGED | 2, 1)];
        let m = mark(&live, &[3], stays, NOW);
        assert_eq!(m.entries, vec![ring_entry(SLOT_CHANGED | 3, 1)]);
        assert!(m.records.is_empty(), "{:?}", m.records);
    }

    #[test]
    fn a_settled_slot_that_moves_takes_over_again() {
        let settled = [ring_entry(SLOT_CHANGED | 2, NO_BACKEND)];
        let m = mark(&settled, &[3], stays, NOW);
        assert_eq!(m.entries, vec![ring_entry(SLOT_CHANGED | 3, 2)]);
        assert_eq!(m.records[0].1.previous, 2);
        // Unmoved, it stays settled and marked.
        let m = mark(&settled, &[2], stays, NOW);
        assert_eq!(m.entries, settled.to_vec());
        assert!(m.records.is_empty());
    }

    fn settled_at(t: u32) -> Record {
        Record {
            previous: NO_BACKEND,
            since: t - 300,
            settled: t,
        }
    }

    #[test]
    fn taking_over_settles_after_two_idle_bounds_not_before() {
        let r = Record {
            previous: 1,
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
