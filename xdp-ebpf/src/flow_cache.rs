//! A per-CPU, direct-mapped cache of established flows in front of the
//! VIPS and FLOWS hash lookups. An entry is a flow conntrack placed on a
//! backend that was live when the entry was written; it is used only
//! while its generation matches the one userspace bumps on every change
//! of VIPs, backends or conntrack it makes, and while its backend still
//! keeps flows and still serves its VIP (checked live on every hit, as a
//! conntrack hit is).

use xdp_common::{Backend, FlowKey};

use crate::maps::{BACKENDS, FLOW_CACHE, FLOW_CACHE_GEN};

/// One cached flow.
#[repr(C)]
pub struct Entry {
    pub key: FlowKey,
    /// `FLOW_CACHE_GEN` when written; 0: empty.
    pub generation: u32,
    pub vip_id: u32,
    /// The VIP's `fwd::*` mode.
    pub mode: u32,
    pub backend_id: u32,
    /// `flow_hash(key, false)`.
    pub hash: u32,
    pub _pad: u32,
}

/// Slots per CPU (a power of two).
pub const SLOTS: u32 = 4096;

/// The flow's slot: its words folded and multiplied (not `flow_hash`,
/// which costs what the cache saves).
#[inline(always)]
fn slot(flow: &FlowKey) -> u32 {
    // SAFETY: FlowKey is 40 plain bytes; unaligned reads.
    let w: [u32; 10] = unsafe { core::ptr::read_unaligned((flow as *const FlowKey).cast()) };
    let folded = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4].rotate_left(7) ^ w[8].rotate_left(13) ^ w[9];
    folded.wrapping_mul(0x9e37_79b1) >> (32 - SLOTS.trailing_zeros())
}

#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    // SAFETY: as in `slot`.
    let (x, y): ([u64; 5], [u64; 5]) = unsafe {
        (
            core::ptr::read_unaligned((a as *const FlowKey).cast()),
            core::ptr::read_unaligned((b as *const FlowKey).cast()),
        )
    };
    (x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) == 0
}

/// The current generation; 0: the cache is off. Read before the lookups
/// whose result is cached, so an entry never carries a generation newer
/// than what it was computed from.
#[inline(always)]
pub fn generation() -> u32 {
    FLOW_CACHE_GEN.get(0).copied().unwrap_or(0)
}

/// A cached flow whose backend may still have it.
pub struct Hit {
    pub vip_id: u32,
    pub mode: u32,
    pub backend_id: u32,
    pub backend: Backend,
    pub hash: u32,
}

/// The placement of `flow` cached under `generation`, if its backend
/// still keeps flows and still serves the VIP.
#[inline(always)]
pub fn lookup(flow: &FlowKey, generation: u32) -> Option<Hit> {
    if generation == 0 {
        return None;
    }
    let e = FLOW_CACHE.get_ptr(slot(flow))?;
    // SAFETY: this CPU's slot, valid for the program's run.
    let e = unsafe { &*e };
    if e.generation != generation || !same(&e.key, flow) {
        return None;
    }
    let backend = *BACKENDS.get(e.backend_id)?;
    if !crate::flow::keeps_flows(&backend) || backend.vip_id != e.vip_id {
        return None;
    }
    Some(Hit {
        vip_id: e.vip_id,
        mode: e.mode,
        backend_id: e.backend_id,
        backend,
        hash: e.hash,
    })
}

/// Remember that conntrack holds `flow` on `backend_id`, as read under
/// `generation`.
#[inline(always)]
pub fn remember(
    flow: &FlowKey,
    generation: u32,
    vip_id: u32,
    mode: u32,
    backend_id: u32,
    hash: u32,
) {
    if generation == 0 {
        return;
    }
    let Some(e) = FLOW_CACHE.get_ptr_mut(slot(flow)) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program's run.
    unsafe {
        (*e).key = *flow;
        (*e).generation = generation;
        (*e).vip_id = vip_id;
        (*e).mode = mode;
        (*e).backend_id = backend_id;
        (*e).hash = hash;
    }
}

/// Forget `flow` if it is cached: conntrack no longer holds what the cache
/// says (the flow was placed again but not tracked).
#[inline(always)]
pub fn forget(flow: &FlowKey) {
    let Some(e) = FLOW_CACHE.get_ptr_mut(slot(flow)) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program's run.
    unsafe {
        if same(&(*e).key, flow) {
            (*e).generation = 0;
        }
    }
}
