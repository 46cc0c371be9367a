//! Placement: the ring first, conntrack only where the ring changed.
//!
//! A slot whose owner never changed places every packet of its flows by
//! itself: consistent hashing gives the answer conntrack would, with one
//! array read and no per-flow state. Each such placement is recorded in
//! the SEEN filter (four bits per flow and backend, two epochs of the
//! daemon's idle bound), so the program can tell later whether a flow was
//! running on a backend.
//!
//! The daemon marks a slot ([`SLOT_CHANGED`]) when it gives it to another
//! backend that stays in the VIP, and keeps the old owner in the slot's
//! entry while the slot takes over. In a marked slot:
//! - a conntrack hit on a backend that still keeps the flow wins;
//! - a flow without state that SEEN says ran on the previous owner (which
//!   still keeps flows) goes there, and is tracked from then on;
//! - anything else follows the ring, like an unmarked slot; a TCP SYN
//!   first drops whatever an earlier connection on its ports left.
//!
//! Once no flow of the previous owner can be without state (two epochs
//! after the change) the daemon settles the slot; it clears the mark once
//! no tracked flow in it is on another backend.

use xdp_common::{
    backend_state, flow_fold, flow_hash, reason, ring_hash, seen_probe, Backend, Config, FlowKey,
    FlowState, VipMeta, NO_BACKEND, SEEN_WORDS, SLOT_CHANGED, VIP_F_TRACK_ALL,
};

use crate::{
    maps::{ring_size, BACKENDS, FLOWS, RATE_CONNTRACK, RINGS, SEEN, SEEN_EPOCH, VIP_SERIALS},
    parse::L4,
    stats::{count, within_rate},
};

/// The backend a packet goes to.
pub struct Choice {
    pub backend_id: u32,
    /// The backend's entry in BACKENDS (read in place, not copied: the
    /// 512-byte stack holds few copies).
    pub backend: &'static Backend,
    /// `flow_hash(flow, false)`.
    pub hash: u32,
    /// How it was placed: `reason::FLOW_RING`, `FLOW_HIT`, `FLOW_PREVIOUS`,
    /// `FLOW_RESELECTED` or `FLOW_UNTRACKED`.
    pub placed: u32,
    /// The packet opens a flow (a TCP SYN).
    pub new_flow: bool,
}

/// A backend that keeps the flows it already has: up or draining.
#[inline(always)]
pub fn keeps_flows(b: &Backend) -> bool {
    b.state == backend_state::UP || b.state == backend_state::DRAINING
}

/// Whether `b`, read from the slot a flow remembers, is still the backend
/// that placed it (same generation: the slot was not given to another
/// backend since), still keeps flows, and still serves the flow's VIP.
#[inline(always)]
pub fn still_placed(b: &Backend, generation: u32, vip_id: u32) -> bool {
    b.generation == generation && keeps_flows(b) && b.vip_id == vip_id
}

/// The program's clock for `FlowState::last_seen`: CLOCK_MONOTONIC seconds.
#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A flow's ring slot in the live half: its owner word and its previous
/// owner (`NO_BACKEND` unless taking over).
struct Slot {
    entry: u32,
    previous: u32,
}

#[inline(always)]
fn slot(flow: &FlowKey, vip: &VipMeta, full: u32) -> Option<Slot> {
    let size = ring_size();
    if size == 0 {
        return None;
    }
    let position = ring_hash(flow, vip.flags, full) % size;
    let half = vip.vip_id.wrapping_mul(2).wrapping_add(vip.active_ring & 1);
    let both = *RINGS.get(half.wrapping_mul(size).wrapping_add(position))?;
    let entry = both as u32;
    if entry == NO_BACKEND {
        return None;
    }
    Some(Slot {
        entry,
        previous: (both >> 32) as u32,
    })
}

/// The slot's owner, if it takes new flows (up) for this VIP.
#[inline(always)]
fn owner_of(slot: &Slot, vip: &VipMeta) -> Option<(u32, &'static Backend)> {
    let id = slot.entry & !SLOT_CHANGED;
    let b = BACKENDS.get(id)?;
    (b.state == backend_state::UP && b.vip_id == vip.vip_id).then_some((id, b))
}

/// The current SEEN epoch.
#[inline(always)]
fn epoch() -> u32 {
    SEEN_EPOCH.get(0).copied().unwrap_or(0) & 1
}

/// Record in SEEN that the flow of `hash` was placed on `backend_id`.
/// Bits are set with a plain read-modify-write: the word is written only
/// when a bit is missing, and two CPUs setting bits of one word at the
/// same instant can lose one flow's record (it is then placed as a flow
/// never seen).
#[inline(always)]
fn record(flow: &FlowKey, hash: u32, backend_id: u32, b: &Backend) {
    let (word, bits) = seen_probe(hash, flow_fold(flow), backend_id, b.generation);
    if let Some(w) = SEEN.get_ptr_mut(epoch() * SEEN_WORDS + word) {
        // SAFETY: an array value, valid for the program's run.
        unsafe {
            if *w & bits != bits {
                *w |= bits;
            }
        }
    }
}

/// Whether SEEN recorded the flow of `hash` on `backend_id` in this epoch
/// or the one before.
#[inline(always)]
fn was_seen(flow: &FlowKey, hash: u32, backend_id: u32, b: &Backend) -> bool {
    let (word, bits) = seen_probe(hash, flow_fold(flow), backend_id, b.generation);
    let now = epoch();
    let has = |e: u32| {
        SEEN.get(e * SEEN_WORDS + word)
            .is_some_and(|w| *w & bits == bits)
    };
    has(now) || has(now ^ 1)
}

/// A conntrack entry that no longer places its flow (its backend left).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// No entry.
    Missing,
    /// Written by this VIP or a later one: the flow's last placement.
    Newest,
    /// Written by an earlier VIP: placements the ring made since, which
    /// leave no entry, are newer.
    Older,
}

/// The serial of VIP `vip_id`.
#[inline(always)]
fn serial(vip_id: u32) -> u32 {
    VIP_SERIALS.get(vip_id).copied().unwrap_or(0)
}

/// The conntrack entry of `flow`, if the backend that placed it still
/// keeps it ([`still_placed`]).
#[inline(always)]
fn tracked(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, &'static Backend), Stale> {
    let Some(state) = FLOWS.get_ptr_mut(flow) else {
        return Err(Stale::Missing);
    };
    // SAFETY: a pointer into this entry, used at once; an LRU entry
    // recycled under us yields at worst a stale backend id, which is still
    // bounds-checked, and a stale `last_seen` write.
    let (id, generation, seen, placed_by) = unsafe {
        (
            (*state).backend_id,
            (*state).generation,
            (*state).last_seen,
            (*state).vip_serial,
        )
    };
    match BACKENDS.get(id) {
        Some(b) if still_placed(b, generation, vip.vip_id) => {
            let now = now_secs();
            if now != seen {
                // SAFETY: as above.
                unsafe { (*state).last_seen = now };
            }
            Ok((id, b))
        }
        _ if placed_by >= serial(vip.vip_id) => Err(Stale::Newest),
        _ => Err(Stale::Older),
    }
}

/// Whether the slot is taking over (`None`: settled, or never changed),
/// and its previous owner if that backend still keeps flows for this VIP.
#[inline(always)]
fn previous(slot: &Slot, vip: &VipMeta) -> Option<Option<(u32, &'static Backend)>> {
    if slot.entry & SLOT_CHANGED == 0 || slot.previous == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(slot.previous);
    Some(
        b.filter(|b| keeps_flows(b) && b.vip_id == vip.vip_id)
            .map(|b| (slot.previous, b)),
    )
}

/// Whether a flow placed in a changed slot gets a conntrack entry: not for
/// a TCP reset (it ends the flow), and not beyond `Config::conntrack_rate`
/// new entries per second on this CPU, so a flood cannot evict the
/// tracked flows.
#[inline(always)]
fn may_track(cfg: &Config, reset: bool) -> bool {
    !reset && (cfg.conntrack_rate == 0 || within_rate(RATE_CONNTRACK, cfg.conntrack_rate))
}

/// Track `flow` on `backend_id`; `placed` unless the entry is refused
/// (`opens`: a SYN already counted against the rate).
#[inline(always)]
fn track(
    flow: &FlowKey,
    cfg: &Config,
    l4: &L4,
    opens: bool,
    (backend_id, b): (u32, &Backend),
    vip: &VipMeta,
    placed: u32,
) -> u32 {
    if !opens && !may_track(cfg, l4.reset) {
        count(reason::FLOW_UNTRACKED);
        return reason::FLOW_UNTRACKED;
    }
    let state = FlowState {
        backend_id,
        generation: b.generation,
        last_seen: now_secs(),
        vip_serial: serial(vip.vip_id),
    };
    if FLOWS.insert(flow, state, 0).is_err() {
        count(reason::FLOW_INSERT_FAILED);
    }
    placed
}

/// Placed by the ring: the slot's owner, recorded in SEEN.
#[inline(always)]
fn by_ring(flow: &FlowKey, slot: &Slot, vip: &VipMeta, hash: u32, l4: &L4) -> Option<Choice> {
    let (backend_id, backend) = owner_of(slot, vip)?;
    record(flow, hash, backend_id, backend);
    count(reason::FLOW_RING);
    Some(Choice {
        backend_id,
        backend,
        hash,
        placed: reason::FLOW_RING,
        new_flow: l4.syn,
    })
}

/// Choose the backend for a packet of `flow` to `vip`: the ring's, unless
/// its slot changed owner ([`changed`]).
#[inline(always)]
pub fn select(flow: &FlowKey, vip: &VipMeta, cfg: &Config, l4: &L4) -> Option<Choice> {
    let hash = flow_hash(flow, false);
    let slot = slot(flow, vip, hash)?;
    if slot.entry & SLOT_CHANGED == 0 && vip.flags & VIP_F_TRACK_ALL == 0 {
        return by_ring(flow, &slot, vip, hash, l4);
    }
    changed(flow, vip, cfg, l4, hash, &slot)
}

/// [`select`] in a changed slot (see the module's rules), or in any slot
/// of a VIP that tracks every flow (`VIP_F_TRACK_ALL`: there every
/// placement is tracked, as in a slot taking over).
#[inline(always)]
fn changed(
    flow: &FlowKey,
    vip: &VipMeta,
    cfg: &Config,
    l4: &L4,
    hash: u32,
    slot: &Slot,
) -> Option<Choice> {
    // A SYN within the rate opens a connection on the ring's backend,
    // whatever an earlier one on the same ports left (as Katran does).
    // Beyond the rate it is looked up like any packet, so a flood cannot
    // drop tracked flows.
    let opens = l4.syn && may_track(cfg, false);
    let looked_up = if opens {
        Err(Stale::Missing)
    } else {
        tracked(flow, vip)
    };
    let stale = match looked_up {
        Ok((backend_id, backend)) => {
            count(reason::FLOW_HIT);
            return Some(Choice {
                backend_id,
                backend,
                hash,
                placed: reason::FLOW_HIT,
                new_flow: false,
            });
        }
        Err(stale) => stale,
    };
    // An entry the flow's last placement left: the ring places it again.
    let was_tracked = stale == Stale::Newest;
    let taking_over = previous(slot, vip);
    let track_all = vip.flags & VIP_F_TRACK_ALL != 0;
    // Without state, a flow SEEN on the previous owner is one of its flows
    // from before the change. An entry whose backend left is the flow's
    // last placement (newer than anything SEEN): the ring places it again.
    let from_before = match taking_over {
        Some(Some((id, b))) if !opens && !was_tracked && was_seen(flow, hash, id, b) => {
            Some((id, b))
        }
        _ => None,
    };
    let (backend_id, backend, placed) = match from_before {
        Some((id, b)) => (id, b, reason::FLOW_PREVIOUS),
        // Settled: a flow without state is the ring's, as anywhere; an
        // earlier connection's entry on these ports goes.
        None if taking_over.is_none() && stale == Stale::Missing && !track_all => {
            if opens {
                // Nothing to remove is fine.
                let _ = FLOWS.remove(flow);
            }
            return by_ring(flow, slot, vip, hash, l4);
        }
        None => {
            let (id, b) = owner_of(slot, vip)?;
            record(flow, hash, id, b);
            let how = if was_tracked {
                reason::FLOW_RESELECTED
            } else {
                reason::FLOW_NEW
            };
            (id, b, how)
        }
    };
    // Tracked: a flow placed again (else the previous owner could take it
    // back), one of the previous owner's, and, while the slot takes over,
    // every new one (the slot may move again before it settles, and only
    // its first previous owner is kept).
    count(placed);
    let placed = track(flow, cfg, l4, opens, (backend_id, backend), vip, placed);
    Some(Choice {
        backend_id,
        backend,
        hash,
        placed,
        new_flow: l4.syn,
    })
}

/// The backend that owns `flow` without creating state: used for ICMP errors
/// quoting a flow, which must not open conntrack entries.
#[inline(always)]
pub fn owner(flow: &FlowKey, vip: &VipMeta) -> Option<(u32, &'static Backend, u32)> {
    let hash = flow_hash(flow, false);
    let slot = slot(flow, vip, hash)?;
    let (id, backend) = if slot.entry & SLOT_CHANGED == 0 && vip.flags & VIP_F_TRACK_ALL == 0 {
        owner_of(&slot, vip)?
    } else {
        match tracked(flow, vip) {
            Ok(found) => found,
            Err(Stale::Newest) => owner_of(&slot, vip)?,
            Err(_) => match previous(&slot, vip) {
                Some(Some((id, b))) if was_seen(flow, hash, id, b) => (id, b),
                _ => owner_of(&slot, vip)?,
            },
        }
    };
    Some((id, backend, hash))
}
