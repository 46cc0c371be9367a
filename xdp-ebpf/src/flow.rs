//! Conntrack lookup/insert, ring selection and backend liveness.

use xdp_common::{
    backend_state, flow_hash, reason, Backend, Config, FlowKey, FlowState, VipMeta, NO_BACKEND,
    VIP_F_SOURCE_HASH,
};

use crate::{
    maps::{ring_size, BACKENDS, FLOWS, RATE_CONNTRACK, RINGS},
    parse::L4,
    stats::{count, within_rate},
};

/// The backend a packet goes to.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
    /// `flow_hash(flow, false)`.
    pub hash: u32,
    /// What conntrack did: `reason::FLOW_HIT`, `FLOW_NEW`,
    /// `FLOW_RESELECTED` or `FLOW_UNTRACKED`.
    pub conntrack: u32,
    /// Conntrack holds the flow on this backend now.
    pub tracked: bool,
}

impl Choice {
    /// The flow was (re)assigned by this packet: anything but a hit.
    #[inline(always)]
    pub fn new_flow(&self) -> bool {
        self.conntrack != reason::FLOW_HIT
    }
}

/// The flow's 5-tuple hash: the one kept in conntrack, else computed.
#[inline(always)]
fn full_hash(flow: &FlowKey, kept: u32) -> u32 {
    if kept != 0 {
        kept
    } else {
        flow_hash(flow, false)
    }
}

/// A backend that keeps the flows it already has: up or draining.
#[inline(always)]
pub fn keeps_flows(b: &Backend) -> bool {
    b.state == backend_state::UP || b.state == backend_state::DRAINING
}

/// The backend the VIP's live ring holds for `flow`, if it may take new
/// flows (up).
#[inline(always)]
fn from_ring(flow: &FlowKey, vip: &VipMeta, full: u32) -> Option<(u32, Backend)> {
    let size = ring_size();
    if size == 0 {
        return None;
    }
    let hash = if vip.flags & VIP_F_SOURCE_HASH != 0 {
        flow_hash(flow, true)
    } else {
        full
    };
    let half = vip.vip_id.wrapping_mul(2).wrapping_add(vip.active_ring & 1);
    let slot = half.wrapping_mul(size).wrapping_add(hash % size);
    let id = *RINGS.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.state != backend_state::UP {
        return None;
    }
    Some((id, backend))
}

/// Whether `b`, read from the slot a flow remembers, is still the backend
/// that placed it (same generation: the slot was not given to another
/// backend since), still keeps flows, and still serves the flow's VIP.
#[inline(always)]
pub fn still_placed(b: &Backend, generation: u32, vip_id: u32) -> bool {
    b.generation == generation && keeps_flows(b) && b.vip_id == vip_id
}

/// The conntrack entry of `flow`, if the backend that placed it still
/// keeps flows and still serves this VIP ([`still_placed`]).
#[inline(always)]
fn tracked(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend, u32), bool> {
    // SAFETY: the value is copied out at once; an LRU entry recycled under
    // us yields at worst a stale backend id, which is still bounds-checked.
    let Some(state) = (unsafe { FLOWS.get(flow) }).copied() else {
        return Err(false);
    };
    match BACKENDS.get(state.backend_id) {
        Some(b) if still_placed(b, state.generation, vip.vip_id) => {
            Ok((state.backend_id, *b, state.hash))
        }
        // Tracked, but its backend went down or was removed (its slot may
        // now hold another backend, of this VIP or another).
        _ => Err(true),
    }
}

/// Whether a flow the ring just placed gets a conntrack entry: not for a
/// TCP reset (it ends the flow), and not beyond `Config::conntrack_rate`
/// new entries per second on this CPU, so a SYN flood cannot evict the
/// established flows (the ring still places the flood's packets).
#[inline(always)]
fn may_track(cfg: &Config, reset: bool) -> bool {
    !reset && (cfg.conntrack_rate == 0 || within_rate(RATE_CONNTRACK, cfg.conntrack_rate))
}

/// Choose the backend for a packet of `flow` to `vip` and keep conntrack in
/// step: a hit on a live backend is followed; a miss, or a hit on a backend
/// that is down, goes through the ring and is (re)written when
/// [`may_track`] allows. A TCP SYN within the rate opens a connection, so
/// it skips the lookup (as Katran does): the ring places it and its entry
/// replaces whatever an earlier connection on the same ports left. Beyond
/// the rate a SYN is looked up like any packet, so it goes where the entry
/// it may not replace points.
#[inline(always)]
pub fn select(flow: &FlowKey, vip: &VipMeta, cfg: &Config, l4: &L4) -> Option<Choice> {
    let syn_tracked = l4.syn && may_track(cfg, false);
    let looked_up = if syn_tracked {
        Err(false)
    } else {
        tracked(flow, vip)
    };
    let was_tracked = match looked_up {
        Ok((backend_id, backend, kept)) => {
            count(reason::FLOW_HIT);
            return Some(Choice {
                backend_id,
                backend,
                hash: full_hash(flow, kept),
                conntrack: reason::FLOW_HIT,
                tracked: true,
            });
        }
        Err(was_tracked) => was_tracked,
    };
    let (backend_id, backend, hash) = placed_by_ring(flow, vip)?;
    let placed = if was_tracked {
        reason::FLOW_RESELECTED
    } else {
        reason::FLOW_NEW
    };
    count(placed);
    let mut conntrack = placed;
    let mut tracked = false;
    if !(syn_tracked || (!l4.syn && may_track(cfg, l4.reset))) {
        count(reason::FLOW_UNTRACKED);
        conntrack = reason::FLOW_UNTRACKED;
    } else if FLOWS
        .insert(
            flow,
            FlowState {
                backend_id,
                hash,
                generation: backend.generation,
            },
            0,
        )
        .is_err()
    {
        count(reason::FLOW_INSERT_FAILED);
    } else {
        tracked = true;
    }
    Some(Choice {
        backend_id,
        backend,
        hash,
        conntrack,
        tracked,
    })
}

/// The backend that owns `flow` without creating state: used for ICMP errors
/// quoting a flow, which must not open conntrack entries.
#[inline(always)]
pub fn owner(flow: &FlowKey, vip: &VipMeta) -> Option<(u32, Backend, u32)> {
    match tracked(flow, vip) {
        Ok((id, backend, kept)) => Some((id, backend, full_hash(flow, kept))),
        Err(_) => placed_by_ring(flow, vip),
    }
}

/// The ring's backend for `flow`, with the flow's 5-tuple hash.
#[inline(always)]
fn placed_by_ring(flow: &FlowKey, vip: &VipMeta) -> Option<(u32, Backend, u32)> {
    let hash = flow_hash(flow, false);
    let (id, backend) = from_ring(flow, vip, hash)?;
    Some((id, backend, hash))
}
