//! QUIC connection-ID routing for VIPs with `VIP_F_QUIC`.
//!
//! A QUIC client whose address or port changes (a NAT rebinding, a phone
//! moving networks) keeps its connection only if its packets still reach
//! the server that holds it: the 5-tuple hash would move them. Servers
//! write their server id into the connection IDs they issue, in the
//! plaintext encoding of the IETF QUIC-LB draft (`xdp_common::quic`), and
//! every packet that carries one of them goes to that server while it
//! keeps flows (up or draining).
//!
//! The client chooses the destination connection ID of its Initial and
//! 0-RTT packets itself, so those, and version negotiation, are placed by
//! the ring like any UDP packet; so is every packet whose server id is
//! unknown, not routable or cut short (each counted).

use xdp_common::{quic, reason, QuicServerKey, VipMeta};

use crate::{
    flow::{keeps_flows, Choice},
    maps::{BACKENDS, QUIC_SERVERS},
    parse::{read, L3},
    stats::count,
};

const UDP_HDR_LEN: usize = 8;
const LONG_HEADER: u8 = 0x80;
const FIXED_BIT: u8 = 0x40;
/// QUIC version 2 (RFC 9369), whose long-header types are numbered apart
/// from version 1's.
const VERSION_2: u32 = 0x6b33_43cf;
/// Long-header packet types as version 1 numbers them.
const INITIAL: u8 = 0;
const ZERO_RTT: u8 = 1;
/// Octets a long header is read in: first octet, version, DCID length,
/// the DCID's first octet and four of server id.
const LONG_READ: usize = 11;
/// Octets a short header is read in: first octet, the DCID's first octet
/// and four of server id.
const SHORT_READ: usize = 6;

/// What a packet's destination connection ID says.
enum Cid {
    /// A server id.
    Server(u32),
    /// The client chose it (or no QUIC version we know): the ring's.
    ClientChosen,
    /// Marked not routable by its config rotation bits.
    Unroutable,
    /// Too short, or not QUIC.
    Malformed,
}

/// The server id of the QUIC packet at `off` (its UDP payload), whose
/// VIP's server ids are `len` octets.
#[inline(always)]
fn cid(ctx: &aya_ebpf::programs::XdpContext, off: usize, end: usize, len: u32) -> Cid {
    let Ok(first) = read::<u8>(ctx, off) else {
        return Cid::Malformed;
    };
    if first & LONG_HEADER == 0 {
        if first & FIXED_BIT == 0 || off + SHORT_READ > end {
            return Cid::Malformed;
        }
        return match read::<[u8; SHORT_READ]>(ctx, off) {
            Ok(h) => decode(h[1], [h[2], h[3], h[4], h[5]], len),
            Err(_) => Cid::Malformed,
        };
    }
    if off + LONG_READ > end {
        return Cid::Malformed;
    }
    let Ok(h) = read::<[u8; LONG_READ]>(ctx, off) else {
        return Cid::Malformed;
    };
    let kind = (h[0] >> 4) & 3;
    let kind = match u32::from_be_bytes([h[1], h[2], h[3], h[4]]) {
        1 => kind,
        VERSION_2 => (kind + 3) & 3,
        // Version negotiation (0) and versions we do not know.
        _ => return Cid::ClientChosen,
    };
    if kind == INITIAL || kind == ZERO_RTT {
        return Cid::ClientChosen;
    }
    if u32::from(h[5]) < 1 + len {
        return Cid::Malformed;
    }
    decode(h[6], [h[7], h[8], h[9], h[10]], len)
}

/// The server id in a connection ID starting with `first` then `next`.
#[inline(always)]
fn decode(first: u8, next: [u8; 4], len: u32) -> Cid {
    if first >> 5 == quic::UNROUTABLE {
        return Cid::Unroutable;
    }
    if len == 0 || len > quic::MAX_SERVER_ID_LEN {
        return Cid::Malformed;
    }
    Cid::Server(u32::from_be_bytes(next) >> (8 * (quic::MAX_SERVER_ID_LEN - len)))
}

/// The backend a packet of a QUIC VIP goes to by its connection ID, if it
/// names one that keeps flows for `vip`; counts what it found. `hash` is
/// the flow's `flow_hash`.
#[inline(always)]
pub fn route(
    ctx: &aya_ebpf::programs::XdpContext,
    l3: &L3,
    vip: &VipMeta,
    hash: u32,
) -> Option<Choice> {
    let len = (vip.flags >> quic::SERVER_ID_LEN_SHIFT) & quic::SERVER_ID_LEN_MASK;
    let server_id = match cid(ctx, l3.l4_off + UDP_HDR_LEN, l3.end_off, len) {
        Cid::Server(id) => id,
        Cid::ClientChosen => return None,
        Cid::Unroutable => {
            count(reason::QUIC_UNKNOWN);
            return None;
        }
        Cid::Malformed => {
            count(reason::QUIC_MALFORMED);
            return None;
        }
    };
    let key = QuicServerKey {
        vip_id: vip.vip_id,
        server_id,
    };
    // SAFETY: the value is copied out at once.
    let found = unsafe { QUIC_SERVERS.get(key) }.copied().and_then(|id| {
        BACKENDS
            .get(id)
            .filter(|b| keeps_flows(b) && b.vip_id == vip.vip_id)
            .map(|b| (id, b))
    });
    let Some((backend_id, backend)) = found else {
        count(reason::QUIC_UNKNOWN);
        return None;
    };
    count(reason::QUIC_ROUTED);
    Some(Choice {
        backend_id,
        backend,
        hash,
        placed: reason::QUIC_ROUTED,
        new_flow: false,
    })
}
