//! A per-CPU, direct-mapped cache of established flows in front of the
//! VIPS lookup, the flow hash, the ring and conntrack. An entry is where a
//! flow's last packet went (placed by the ring alone, or by a conntrack
//! hit) on a backend that was live then; it is used only while its
//! generation matches the one userspace bumps on every change of VIPs,
//! backends, rings, marks or conntrack it makes, and while its backend
//! still keeps flows and still serves its VIP (checked live on every hit,
//! as a conntrack hit is).

use xdp_common::{Backend, FlowKey, VipMeta};

use crate::flow::Choice;

use crate::maps::{BACKENDS, FLOW_CACHE, FLOW_CACHE_GEN, FLOW_CACHE_WINDOW};

/// One cached flow (8-byte aligned: the key is read in words).
#[repr(C, align(8))]
pub struct Entry {
    pub key: FlowKey,
    /// `FLOW_CACHE_GEN` when written; 0: empty.
    pub generation: u32,
    pub vip_id: u32,
    /// The VIP's `fwd::*` mode.
    pub mode: u16,
    /// How the flow was placed (`reason::FLOW_RING` or `FLOW_HIT`).
    pub placed: u16,
    pub backend_id: u32,
    /// `flow_hash(key, false)`.
    pub hash: u32,
    /// The backend's generation when cached.
    pub backend_generation: u32,
}

/// A flow key on the stack at an 8-byte boundary, so [`set`] and
/// [`same`] read it in words the verifier accepts (it refuses misaligned
/// stack access).
#[repr(C, align(8))]
pub struct Aligned(pub FlowKey);

/// Slots per CPU (a power of two), in sets of two: a flow may sit in
/// either slot of its set, so two flows that meet in a set both stay.
pub const SLOTS: u32 = 4096;

/// The flow's set (its first slot) and which slot of it the flow evicts
/// when both hold others: its words folded and multiplied (not
/// `flow_hash`, which costs what the cache saves).
#[inline(always)]
fn set(flow: &Aligned) -> (u32, u32) {
    // SAFETY: FlowKey is 40 plain bytes, here 8-byte aligned.
    let w: [u32; 10] = unsafe { core::ptr::read((flow as *const Aligned).cast()) };
    let folded = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4].rotate_left(7) ^ w[8].rotate_left(13) ^ w[9];
    let slot = folded.wrapping_mul(0x9e37_79b1) >> (32 - SLOTS.trailing_zeros());
    (slot & !1, slot & 1)
}

/// Whether a cached key (at the start of an 8-byte aligned map value) is
/// `flow`.
#[inline(always)]
fn same(cached: &Entry, flow: &Aligned) -> bool {
    // SAFETY: both are 40 plain bytes at 8-byte aligned addresses.
    let (x, y): ([u64; 5], [u64; 5]) = unsafe {
        (
            core::ptr::read((cached as *const Entry).cast()),
            core::ptr::read((flow as *const Aligned).cast()),
        )
    };
    (x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) == 0
}

/// A CPU's recent use of its cache: consults and hits in the current
/// window, and whether it is bypassed.
#[repr(C)]
pub struct Window {
    pub packets: u32,
    pub consults: u32,
    pub hits: u32,
    /// The last window's hits were fewer than one consult in 16: the
    /// cache costs this CPU more than it saves (its flows do not fit).
    pub bypass: u32,
}

/// Consults per window.
const WINDOW: u32 = 4096;

/// Whether this packet consults (and fills) the cache: always while the
/// cache pays off on this CPU; while bypassed, one packet in 16, which
/// keeps measuring whether it would (and refills it if it would). Skipping
/// it is always safe: an entry is only ever a placement the maps would
/// give again under the same generation.
///
/// Returns the window to count a hit in ([`hit`]), `None` when the packet
/// does not consult the cache.
#[inline(always)]
pub fn admit() -> Option<*mut Window> {
    let w = FLOW_CACHE_WINDOW.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry, valid for the program's run.
    unsafe {
        if (*w).bypass != 0 {
            (*w).packets = (*w).packets.wrapping_add(1);
            if (*w).packets & 15 != 0 {
                return None;
            }
        }
        (*w).consults += 1;
        if (*w).consults >= WINDOW {
            (*w).bypass = u32::from((*w).hits.saturating_mul(16) < (*w).consults);
            (*w).consults = 0;
            (*w).hits = 0;
        }
    }
    Some(w)
}

/// Count a hit of this CPU's cache in the window [`admit`] gave.
#[inline(always)]
pub fn hit(window: *mut Window) {
    // SAFETY: this CPU's entry, valid for the program's run.
    unsafe { (*window).hits += 1 };
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
    pub placed: u32,
    pub backend_id: u32,
    pub backend: &'static Backend,
    pub hash: u32,
}

/// The placement of `flow` cached under `generation`, if its backend
/// still keeps flows and still serves the VIP.
#[inline(always)]
pub fn lookup(flow: &Aligned, generation: u32) -> Option<Hit> {
    if generation == 0 {
        return None;
    }
    let (first, _) = set(flow);
    let holds = |slot: u32| {
        let e = FLOW_CACHE.get_ptr(slot)?;
        // SAFETY: this CPU's slot, valid for the program's run.
        let e = unsafe { &*e };
        (e.generation == generation && same(e, flow)).then_some(e)
    };
    let e = holds(first).or_else(|| holds(first + 1))?;
    let backend = BACKENDS.get(e.backend_id)?;
    if !crate::flow::still_placed(backend, e.backend_generation, e.vip_id) {
        return None;
    }
    Some(Hit {
        vip_id: e.vip_id,
        mode: u32::from(e.mode),
        placed: u32::from(e.placed),
        backend_id: e.backend_id,
        backend,
        hash: e.hash,
    })
}

/// Remember that `flow` went to `choice`'s backend for `vip`, as read
/// under `generation`.
#[inline(always)]
pub fn remember(flow: &Aligned, generation: u32, vip: &VipMeta, choice: &Choice) {
    if generation == 0 {
        return;
    }
    let (first, victim) = set(flow);
    // The slot that holds this flow, or a retired one, else the victim.
    let free = |slot: u32| {
        let e = FLOW_CACHE.get_ptr_mut(slot)?;
        // SAFETY: this CPU's slot, valid for the program's run.
        let usable = unsafe { (*e).generation != generation || same(&*e, flow) };
        usable.then_some(e)
    };
    let Some(e) = free(first)
        .or_else(|| free(first + 1))
        .or_else(|| FLOW_CACHE.get_ptr_mut(first + victim))
    else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program's run.
    unsafe {
        (*e).key = flow.0;
        (*e).generation = generation;
        (*e).vip_id = vip.vip_id;
        (*e).mode = vip.mode as u16;
        (*e).placed = choice.placed as u16;
        (*e).backend_id = choice.backend_id;
        (*e).hash = choice.hash;
        (*e).backend_generation = choice.backend.generation;
    }
}

/// Forget `flow` if it is cached: it was placed in a way the next packet
/// may not repeat (a SYN, a new conntrack entry, or none it wanted).
#[inline(always)]
pub fn forget(flow: &Aligned) {
    let (first, _) = set(flow);
    for slot in [first, first + 1] {
        if let Some(e) = FLOW_CACHE.get_ptr_mut(slot) {
            // SAFETY: this CPU's slot, valid for the program's run.
            unsafe {
                if same(&*e, flow) {
                    (*e).generation = 0;
                }
            }
        }
    }
}
