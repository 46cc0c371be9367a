//! Bounds-checked header access and L2/L3/L4 parsing.
//!
//! Every read of packet memory goes through [`ptr_at`]. Header sizes are read
//! from the packet (IPv4 IHL), never assumed. A packet whose headers are
//! truncated or contradict each other yields [`Malformed`]; the caller counts
//! it and applies the configured action.

use aya_ebpf::{helpers::bpf_xdp_get_buff_len, programs::XdpContext};
use xdp_common::{FAMILY_V4, FAMILY_V6};

/// Headers are truncated or inconsistent.
pub struct Malformed;

pub const ETH_HDR_LEN: usize = 14;
pub const VLAN_HDR_LEN: usize = 4;
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const TCP_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
pub const ICMP_HDR_LEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_MOBILITY: u8 = 135;
const IPPROTO_HIP: u8 = 139;
const IPPROTO_SHIM6: u8 = 140;
/// IANA's experimental extension header numbers (RFC 3692).
const IPPROTO_EXPERIMENT1: u8 = 253;
const IPPROTO_EXPERIMENT2: u8 = 254;

/// Pointer to a `T` at `offset` from the start of the packet, if the packet
/// holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Malformed> {
    Ok(ptr_at::<T>(ctx, offset)?.cast_mut())
}

/// Read a `T` (any alignment) at `offset`.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Malformed> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes are in the packet.
    Ok(unsafe { core::ptr::read_unaligned(ptr_at::<T>(ctx, offset)?) })
}

/// Bytes in the packet's first buffer (all of it unless it is a
/// multi-buffer frame: a jumbo frame on a frags-aware driver).
#[inline(always)]
pub fn packet_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Whether the packet holds `len` bytes, counting the fragments of a
/// multi-buffer frame (asked of the kernel only when the first buffer is
/// shorter).
#[inline(always)]
fn holds(ctx: &XdpContext, len: usize) -> bool {
    // SAFETY: reads the context's lengths only.
    len <= packet_len(ctx) || len as u64 <= unsafe { bpf_xdp_get_buff_len(ctx.ctx) }
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(read::<[u8; 2]>(ctx, offset)?))
}

/// What the Ethernet header says about the packet.
pub enum L2 {
    /// An IP packet whose L3 header starts at `l3_off` (14, or 18 with a tag).
    Ip { family: u8, l3_off: usize },
    /// Not IP: ARP, LLDP, ...
    Other,
    /// More than one VLAN tag.
    Unsupported,
}

/// Parse Ethernet with at most one 802.1Q / 802.1ad tag.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Result<L2, Malformed> {
    let mut l3_off = ETH_HDR_LEN;
    let mut proto = read_be16(ctx, 12)?;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = read_be16(ctx, ETH_HDR_LEN + 2)?;
        l3_off += VLAN_HDR_LEN;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            return Ok(L2::Unsupported);
        }
    }
    Ok(match proto {
        ETH_P_IP => L2::Ip {
            family: FAMILY_V4,
            l3_off,
        },
        ETH_P_IPV6 => L2::Ip {
            family: FAMILY_V6,
            l3_off,
        },
        _ => L2::Other,
    })
}

/// The parts of an IPv4 or IPv6 header the balancer uses.
#[derive(Clone, Copy)]
pub struct L3 {
    pub family: u8,
    /// Upper-layer protocol (IPv6: the first next-header).
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// `dst`'s words folded for `xdp_common::vip_filter_slot_of`, taken
    /// while the header is in registers.
    pub dst_fold: u32,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// Offset one past the IP packet's declared end.
    pub end_off: usize,
    /// Length of the IP packet as its header declares it.
    pub ip_len: usize,
    /// IPv4 TOS / IPv6 traffic class, copied to outer headers.
    pub tos: u8,
    /// IPv4 MF set or offset non-zero, or an IPv6 Fragment header.
    pub fragment: bool,
    /// IPv4 DF set; always for IPv6, which routers never fragment.
    pub dont_fragment: bool,
    /// IPv6 extension header other than Fragment (not balanced).
    pub extension: bool,
}

/// Parse an IPv4 header at `off`, honouring IHL. The declared total length
/// must cover the header and fit in the packet.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, off: usize) -> Result<L3, Malformed> {
    // The fixed part is read in one bounds-checked copy: the verifier only
    // trusts checks it sees, not ones the compiler proved redundant.
    let hdr: [u8; IPV4_HDR_LEN] = read(ctx, off)?;
    if hdr[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let hdr_len = usize::from(hdr[0] & 0x0f) * 4;
    if hdr_len < IPV4_HDR_LEN {
        return Err(Malformed);
    }
    // The whole header, options included, must be present. (Checked as two
    // bytes: a one-byte check compiles to a form the verifier reads as
    // zero bytes of range.)
    ptr_at::<[u8; 2]>(ctx, off + hdr_len - 2)?;
    let tot_len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if tot_len < hdr_len || !holds(ctx, off + tot_len) {
        return Err(Malformed);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let src = v4_addr([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let dst = v4_addr([hdr[16], hdr[17], hdr[18], hdr[19]]);
    Ok(L3 {
        family: FAMILY_V4,
        proto: hdr[9],
        src,
        dst,
        dst_fold: u32::from_le_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]),
        l4_off: off + hdr_len,
        end_off: off + tot_len,
        ip_len: tot_len,
        tos: hdr[1],
        // MF flag or a non-zero fragment offset.
        fragment: frag & 0x3fff != 0,
        dont_fragment: frag & 0x4000 != 0,
        extension: false,
    })
}

/// An IPv4 address in the 16-byte form the maps use (the rest zero), built
/// from one integer: zeroing the tail of a byte array compiles to a call of
/// `memset`, a BPF subprogram, and kernels before 6.8 count 32 bytes of
/// stack for any subprogram call, which pushed `xdp_lb` past the verifier's
/// 512-byte limit on Debian 12's 6.1 (`cargo xtask vmtest` found it).
#[inline(always)]
pub fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

/// Parse an IPv6 header at `off`. The declared payload must fit in the packet.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, off: usize) -> Result<L3, Malformed> {
    let hdr: [u8; IPV6_HDR_LEN] = read(ctx, off)?;
    if hdr[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let ip_len = IPV6_HDR_LEN + usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    if !holds(ctx, off + ip_len) {
        return Err(Malformed);
    }
    let proto = hdr[6];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    dst.copy_from_slice(&hdr[24..40]);
    Ok(L3 {
        family: FAMILY_V6,
        proto,
        src,
        dst_fold: xdp_common::vip_filter_fold(&dst),
        dst,
        l4_off: off + IPV6_HDR_LEN,
        end_off: off + ip_len,
        ip_len,
        tos: (hdr[0] << 4) | (hdr[1] >> 4),
        fragment: proto == IPPROTO_FRAGMENT,
        dont_fragment: true,
        // Every IPv6 extension header IANA lists, but Fragment.
        extension: matches!(
            proto,
            IPPROTO_HOPOPTS
                | IPPROTO_ROUTING
                | IPPROTO_DSTOPTS
                | IPPROTO_ESP
                | IPPROTO_AH
                | IPPROTO_MOBILITY
                | IPPROTO_HIP
                | IPPROTO_SHIM6
                | IPPROTO_EXPERIMENT1
                | IPPROTO_EXPERIMENT2
        ),
    })
}

/// Parse the IP header of `family` at `off`.
#[inline(always)]
pub fn ip(ctx: &XdpContext, family: u8, off: usize) -> Result<L3, Malformed> {
    if family == FAMILY_V4 {
        ipv4(ctx, off)
    } else {
        ipv6(ctx, off)
    }
}

/// The parts of a TCP or UDP header the balancer uses.
pub struct L4 {
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    /// A TCP segment with RST set.
    pub reset: bool,
    /// A TCP SYN without ACK: a connection's first segment.
    pub syn: bool,
}

const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Ports (and for TCP the RST flag) of a TCP or UDP header at `off`. The
/// whole minimal header must lie within the IP packet.
#[inline(always)]
pub fn l4(ctx: &XdpContext, proto: u8, off: usize, end_off: usize) -> Result<L4, Malformed> {
    if proto == xdp_common::PROTO_TCP {
        if off + TCP_HDR_LEN > end_off {
            return Err(Malformed);
        }
        let hdr: [u8; 14] = read(ctx, off)?;
        return Ok(L4 {
            sport: u16::from_ne_bytes([hdr[0], hdr[1]]),
            dport: u16::from_ne_bytes([hdr[2], hdr[3]]),
            reset: hdr[13] & TCP_RST != 0,
            syn: hdr[13] & (TCP_SYN | TCP_ACK) == TCP_SYN,
        });
    }
    if off + UDP_HDR_LEN > end_off {
        return Err(Malformed);
    }
    let ports: [u16; 2] = read(ctx, off)?;
    Ok(L4 {
        sport: ports[0],
        dport: ports[1],
        reset: false,
        syn: false,
    })
}

/// The flow an ICMP error quotes, already turned around into the
/// client-to-VIP direction: (client, VIP, client port, VIP port, protocol).
pub struct Quoted {
    pub client: [u8; 16],
    pub vip: [u8; 16],
    pub client_port: u16,
    pub vip_port: u16,
    pub proto: u8,
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// If the ICMP(v6) message at `l3.l4_off` is "fragmentation needed" /
/// "packet too big", the flow it quotes. The quoted packet was sent by a
/// backend from the VIP, so its source is the VIP.
#[inline(always)]
pub fn icmp_quoted(ctx: &XdpContext, l3: &L3) -> Result<Option<Quoted>, Malformed> {
    let off = l3.l4_off;
    let hdr: [u8; 2] = read(ctx, off)?;
    let inner_off = off + ICMP_HDR_LEN;
    let (inner, inner_l4) = if l3.family == FAMILY_V4 {
        if hdr != [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED] {
            return Ok(None);
        }
        let ip: [u8; IPV4_HDR_LEN] = read(ctx, inner_off)?;
        let hdr_len = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || hdr_len < IPV4_HDR_LEN {
            return Err(Malformed);
        }
        let src = v4_addr([ip[12], ip[13], ip[14], ip[15]]);
        let dst = v4_addr([ip[16], ip[17], ip[18], ip[19]]);
        ((src, dst, ip[9]), inner_off + hdr_len)
    } else {
        if hdr[0] != ICMPV6_PKT_TOOBIG {
            return Ok(None);
        }
        let ip: [u8; IPV6_HDR_LEN] = read(ctx, inner_off)?;
        if ip[0] >> 4 != 6 {
            return Err(Malformed);
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        ((src, dst, ip[6]), inner_off + IPV6_HDR_LEN)
    };
    let (src, dst, proto) = inner;
    if proto != xdp_common::PROTO_TCP && proto != xdp_common::PROTO_UDP {
        return Ok(None);
    }
    // An ICMP error quotes at least the first 8 bytes of the L4 header.
    if inner_l4 + 4 > l3.end_off {
        return Err(Malformed);
    }
    let ports: [u16; 2] = read(ctx, inner_l4)?;
    Ok(Some(Quoted {
        client: dst,
        vip: src,
        client_port: ports[1],
        vip_port: ports[0],
        proto,
    }))
}
