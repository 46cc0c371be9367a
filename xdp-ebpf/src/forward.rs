//! Sending a packet on to its backend: IPIP / IPv6-in-IPv6 / IPv4-in-IPv6
//! encapsulation with a rebuilt Ethernet header, or L2 direct server return.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use xdp_common::{Backend, Config, FAMILY_V4};

use crate::maps::UPLINKS;
use crate::parse::{
    ptr_at_mut, read, Malformed, ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6,
    IPV4_HDR_LEN, IPV6_HDR_LEN, VLAN_HDR_LEN,
};

/// Encapsulation could not be done (no headroom, or the outer packet would
/// exceed 64 KiB).
pub struct NoRoom;

/// One's-complement sum of an IPv4 header, folded: its checksum.
#[inline(always)]
pub fn ipv4_checksum(hdr: &[u8; IPV4_HDR_LEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_HDR_LEN {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// What is kept of the original L2 header across encapsulation.
#[derive(Clone, Copy)]
pub struct L2Header {
    /// Original destination: the receiving interface's MAC.
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// 802.1Q tag (TPID and TCI) if the packet carried one.
    pub vlan: Option<[u8; 4]>,
}

impl L2Header {
    #[inline(always)]
    pub fn read(ctx: &XdpContext, l3_off: usize) -> Result<Self, Malformed> {
        let vlan = if l3_off == ETH_HDR_LEN + VLAN_HDR_LEN {
            Some(read::<[u8; 4]>(ctx, 12)?)
        } else {
            None
        };
        Ok(Self {
            dst: read(ctx, 0)?,
            src: read(ctx, 6)?,
            vlan,
        })
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        if self.vlan.is_some() {
            ETH_HDR_LEN + VLAN_HDR_LEN
        } else {
            ETH_HDR_LEN
        }
    }
}

/// Write an Ethernet header (with the kept VLAN tag) at the packet start.
/// Encapsulated packets leave from the receiving interface's MAC.
#[inline(always)]
pub fn write_l2(
    ctx: &XdpContext,
    l2: &L2Header,
    dst: &[u8; 6],
    src: &[u8; 6],
    ethertype: u16,
) -> Result<(), Malformed> {
    // SAFETY: every pointer comes from ptr_at_mut, which checked the bounds.
    unsafe {
        *ptr_at_mut::<[u8; 6]>(ctx, 0)? = *dst;
        *ptr_at_mut::<[u8; 6]>(ctx, 6)? = *src;
        let type_off = match l2.vlan {
            Some(tag) => {
                *ptr_at_mut::<[u8; 4]>(ctx, 12)? = tag;
                ETH_HDR_LEN + VLAN_HDR_LEN - 2
            }
            None => ETH_HDR_LEN - 2,
        };
        *ptr_at_mut::<[u8; 2]>(ctx, type_off)? = ethertype.to_be_bytes();
    }
    Ok(())
}

/// The MACs of a frame the balancer sends back out of the interface it
/// arrived on: (next hop, source). An extra uplink (UPLINKS) has its own;
/// otherwise CONFIG's: the main interface's next hop, and its MAC (set at
/// attach), else the arriving frame's destination.
#[inline(always)]
pub fn macs(ctx: &XdpContext, cfg: &Config, arrived_to: &[u8; 6]) -> ([u8; 6], [u8; 6]) {
    if cfg.uplinks != 0 {
        // SAFETY: reads the context's ingress interface only.
        let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
        // SAFETY: a read-only lookup; the value is copied out at once.
        if let Some(u) = unsafe { UPLINKS.get(ifindex) } {
            // SAFETY: a plain read of the map value (see below).
            let u = unsafe { core::ptr::read_volatile(u) };
            let own = if u.source_mac == [0; 6] {
                *arrived_to
            } else {
                u.source_mac
            };
            return (u.gateway_mac, own);
        }
    }
    // Loaded out of the map value first: copied straight from it into the
    // packet, the compiler calls memmove (it cannot rule out overlap), a
    // subprogram that costs stack on older verifiers.
    // SAFETY: plain reads of the map value the caller holds.
    let (gateway, own) = unsafe {
        (
            core::ptr::read_volatile(&cfg.gateway_mac),
            core::ptr::read_volatile(&cfg.source_mac),
        )
    };
    (gateway, if own == [0; 6] { *arrived_to } else { own })
}

/// The source MAC of a frame the balancer sends (see [`macs`]).
#[inline(always)]
pub fn source_mac(ctx: &XdpContext, cfg: &Config, arrived_to: &[u8; 6]) -> [u8; 6] {
    macs(ctx, cfg, arrived_to).1
}

/// L2 direct server return: the packet goes out unchanged but for its MACs.
#[inline(always)]
pub fn l2_dsr(ctx: &XdpContext, backend: &Backend, cfg: &Config) -> Result<(), Malformed> {
    let src = source_mac(ctx, cfg, &read(ctx, 0)?);
    // SAFETY: a plain read of the caller's value (see `source_mac`).
    let dst = unsafe { core::ptr::read_volatile(&backend.mac) };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        *ptr_at_mut::<[u8; 6]>(ctx, 0)? = dst;
        *ptr_at_mut::<[u8; 6]>(ctx, 6)? = src;
    }
    Ok(())
}

/// An IPv4 identification for a packet that may be fragmented: a per-CPU
/// counter, offset per CPU so CPUs walk different sequences.
#[inline(always)]
pub fn next_ip_id() -> u16 {
    // SAFETY: reads the CPU number only.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() } as u16;
    let n = match crate::maps::IP_IDS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, valid for the program's run.
        Some(n) => unsafe {
            *n = (*n).wrapping_add(1);
            *n as u16
        },
        None => 0,
    };
    n.wrapping_add(cpu.wrapping_mul(0x9e37))
}

/// The inner packet being encapsulated.
pub struct Inner {
    pub family: u8,
    /// Declared length of the inner IP packet.
    pub ip_len: usize,
    pub tos: u8,
    /// Copied to the outer IPv4 header, so path-MTU discovery works through
    /// the tunnel.
    pub dont_fragment: bool,
    /// Flow hash: picks the outer source's host bits and the IPv6 flow label.
    pub hash: u32,
}

#[inline(always)]
fn inner_proto(inner: &Inner) -> u8 {
    if inner.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    }
}

/// Bytes the outer header to `backend` adds (its family picks IPv4 or IPv6).
#[inline(always)]
pub fn outer_len(backend: &Backend) -> usize {
    if backend.family == u32::from(FAMILY_V4) {
        IPV4_HDR_LEN
    } else {
        IPV6_HDR_LEN
    }
}

/// Prepend an outer IPv4 or IPv6 header addressed to `backend` (its family
/// picks which) and a fresh Ethernet header to the configured next hop.
///
/// Must be the last packet access of the caller: it moves the packet start.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    l2: &L2Header,
    inner: &Inner,
    backend: &Backend,
    cfg: &Config,
) -> Result<Result<(), NoRoom>, Malformed> {
    let outer_v4 = backend.family == u32::from(FAMILY_V4);
    let outer_len = outer_len(backend);
    if inner.ip_len + outer_len > usize::from(u16::MAX) {
        return Ok(Err(NoRoom));
    }
    // SAFETY: the helper only moves ctx's data pointer; every later access
    // is bounds-checked against the new start and end.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Ok(Err(NoRoom));
    }
    let l3_off = l2.len();
    let ttl = cfg.outer_ttl as u8;
    let (gateway, src_mac) = macs(ctx, cfg, &l2.dst);
    if outer_v4 {
        write_l2(ctx, l2, &gateway, &src_mac, ETH_P_IP)?;
        let tot_len = ((outer_len + inner.ip_len) as u16).to_be_bytes();
        let src = cfg.outer_source_v4(inner.hash);
        let mut hdr = [0u8; IPV4_HDR_LEN];
        hdr[0] = 0x45;
        hdr[1] = inner.tos;
        hdr[2] = tot_len[0];
        hdr[3] = tot_len[1];
        if inner.dont_fragment {
            hdr[6] = 0x40;
        } else {
            // The path may fragment it: reassembly needs an identification
            // (RFC 6864; ID 0 on every packet would mix fragments).
            let id = next_ip_id().to_be_bytes();
            hdr[4] = id[0];
            hdr[5] = id[1];
        }
        hdr[8] = ttl;
        hdr[9] = inner_proto(inner);
        hdr[12..16].copy_from_slice(&src);
        hdr[16..20].copy_from_slice(&backend.addr[..4]);
        let csum = ipv4_checksum(&hdr).to_be_bytes();
        hdr[10] = csum[0];
        hdr[11] = csum[1];
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *ptr_at_mut::<[u8; IPV4_HDR_LEN]>(ctx, l3_off)? = hdr };
    } else {
        write_l2(ctx, l2, &gateway, &src_mac, ETH_P_IPV6)?;
        let payload_len = (inner.ip_len as u16).to_be_bytes();
        let first = (6u32 << 28) | (u32::from(inner.tos) << 20) | (inner.hash & 0x000f_ffff);
        let mut hdr = [0u8; IPV6_HDR_LEN];
        hdr[..4].copy_from_slice(&first.to_be_bytes());
        hdr[4] = payload_len[0];
        hdr[5] = payload_len[1];
        hdr[6] = inner_proto(inner);
        hdr[7] = ttl;
        hdr[8..24].copy_from_slice(&cfg.outer_source_v6(inner.hash));
        hdr[24..40].copy_from_slice(&backend.addr);
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *ptr_at_mut::<[u8; IPV6_HDR_LEN]>(ctx, l3_off)? = hdr };
    }
    Ok(Ok(()))
}

/// Strip an outer header of `outer_len` bytes behind the L2 header `l2`,
/// keeping its addresses and tag, with the inner packet's ethertype.
#[inline(always)]
pub fn decapsulate(
    ctx: &XdpContext,
    l2: &L2Header,
    outer_len: usize,
    inner_ethertype: u16,
) -> Result<Result<(), NoRoom>, Malformed> {
    // SAFETY: as in `encapsulate`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Ok(Err(NoRoom));
    }
    write_l2(ctx, l2, &l2.dst, &l2.src, inner_ethertype)?;
    Ok(Ok(()))
}
