//! Per-CPU counters. Each CPU writes only its own slot, so increments are
//! plain adds: no atomics, no contention.

use xdp_common::Counters;

use crate::maps::{BACKEND_STATS, DECAP_STATS, STATS, VIP_DROPS, VIP_STATS};

/// Count one event under a global reason (`xdp_common::reason`).
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *c += 1 };
    }
}

/// Count a packet of VIP `vip_id` dropped for `reason` (`NO_BACKEND` or
/// `ENCAP_FAILED`), globally and for the VIP.
#[inline(always)]
pub fn count_vip_drop(vip_id: u32, reason: u32) {
    count(reason);
    if let Some(d) = VIP_DROPS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe {
            if reason == xdp_common::reason::NO_BACKEND {
                (*d).no_backend += 1;
            } else {
                (*d).encap_failed += 1;
            }
        }
    }
}

/// Count one event of the decap program (`xdp_common::decap_reason`).
#[inline(always)]
pub fn count_decap(reason: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Count a forwarded packet for its VIP and its backend.
#[inline(always)]
pub fn count_forwarded(vip_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(VIP_STATS.get_ptr_mut(vip_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}

/// Whether one more event fits in this CPU's current one-second window of
/// RATES slot `which`, allowing `per_sec`; counts it if so.
#[inline(always)]
pub fn within_rate(which: u32, per_sec: u32) -> bool {
    let Some(w) = crate::maps::RATES.get_ptr_mut(which) else {
        return true;
    };
    // SAFETY: reads the clock only.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, valid for the program's run.
    unsafe {
        if now.wrapping_sub((*w).start_ns) >= 1_000_000_000 {
            (*w).start_ns = now;
            (*w).events = 0;
        }
        if (*w).events >= u64::from(per_sec) {
            return false;
        }
        (*w).events += 1;
    }
    true
}
