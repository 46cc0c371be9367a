//! Decision events for `xdplb trace`: off unless the TRACE map's entry is
//! enabled, and then only for the packets its filter matches (a VIP, a
//! client prefix). While off, a packet pays one array lookup and a branch.
//! Events go out through aya-log; `xdplb trace` names the codes.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use xdp_common::{FlowKey, TraceFilter, TRACE_ANY_VIP};

use crate::maps::TRACE;

/// What became of a packet.
pub struct Decision {
    /// Its VIP's id; TRACE_ANY_VIP for a packet for no VIP.
    pub vip_id: u32,
    /// Its `xdp_common::reason` (the exclusive one counted).
    pub reason: u32,
    /// `reason::FLOW_HIT`, `FLOW_NEW`, `FLOW_RESELECTED` or
    /// `FLOW_UNTRACKED`; 0: no conntrack decision.
    pub conntrack: u32,
    /// The backend chosen; `xdp_common::NO_BACKEND`: none.
    pub backend_id: u32,
}

/// The 32-bit word `i` of an address, in network order.
#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]])
}

#[inline(always)]
fn client_matches(f: &TraceFilter, flow: &FlowKey) -> bool {
    if f.client_family == 0 {
        return true;
    }
    if f.client_family != u32::from(flow.family) {
        return false;
    }
    let mut i = 0;
    while i < 4 {
        let bits = f.client_len.saturating_sub(32 * i as u32).min(32);
        if bits != 0 {
            let mask = u32::MAX << (32 - bits);
            if (word(&flow.src, i) ^ word(&f.client, i)) & mask != 0 {
                return false;
            }
        }
        i += 1;
    }
    true
}

/// Send `flow`'s decision to `xdplb trace` if it asked for it.
#[inline(always)]
pub fn maybe(ctx: &XdpContext, flow: &FlowKey, action: u32, d: &Decision) {
    let Some(f) = TRACE.get(0) else {
        return;
    };
    if f.enabled == 0
        || (f.vip_id != TRACE_ANY_VIP && f.vip_id != d.vip_id)
        || !client_matches(f, flow)
    {
        return;
    }
    // One call site (each is a lot of code): addresses in their 16-byte
    // form, IPv4 in the first 4 bytes; `xdplb trace` reads them by family.
    info!(
        ctx,
        "session={} vip={} family={} src={:i} sport={} dst={:i} dport={} proto={} action={} reason={} conntrack={} backend={}",
        f.session,
        d.vip_id,
        flow.family,
        flow.src,
        u16::from_be(flow.sport),
        flow.dst,
        u16::from_be(flow.dport),
        flow.proto,
        action,
        d.reason,
        d.conntrack,
        d.backend_id
    );
}
