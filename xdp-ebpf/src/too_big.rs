//! The balancer's answer to a VIP packet too big for the tunnel: the packet
//! is turned, in place, into ICMP "fragmentation needed" (IPv4) or ICMPv6
//! "packet too big" from the VIP to the client, quoting the packet's first
//! `TOO_BIG_QUOTE` bytes, and sent back out the interface it came in on.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use xdp_common::{Config, FAMILY_V4, TOO_BIG_QUOTE};

use crate::{
    forward::{ipv4_checksum, next_ip_id, source_mac, write_l2, L2Header},
    parse::{
        ptr_at, ptr_at_mut, Malformed, ETH_P_IP, ETH_P_IPV6, ICMP_HDR_LEN, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HDR_LEN, IPV6_HDR_LEN, L3,
    },
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMP header and quote: what the ICMP checksum covers.
const ICMP_LEN: usize = ICMP_HDR_LEN + TOO_BIG_QUOTE;

/// Fold a 32-bit one's-complement sum into a checksum.
#[inline(always)]
fn fold(sum: u64) -> u16 {
    let mut s = (sum & 0xffff_ffff) + (sum >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One's-complement sum of `N` packet bytes at `off` (N a multiple of 4).
#[inline(always)]
fn sum_at<const N: usize>(ctx: &XdpContext, off: usize) -> Result<u64, Malformed> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: the helper reads N bytes the bounds check covered.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
    if sum < 0 {
        return Err(Malformed);
    }
    Ok(sum as u64)
}

/// Answer the packet (IP header at `l3_off`, as parsed in `l3`) with "too
/// big", reporting `mtu` as the largest packet the path takes. The packet
/// must be at least `TOO_BIG_QUOTE` bytes of IP. Must be the last packet
/// access of the caller: it moves the packet's start and end.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    l3: &L3,
    mtu: u32,
) -> Result<(), Malformed> {
    let l2 = L2Header::read(ctx, l3_off)?;
    let v4 = l3.family == FAMILY_V4;
    let hdr_len = if v4 { IPV4_HDR_LEN } else { IPV6_HDR_LEN };
    // Room for the new IP and ICMP headers in front of the quote...
    let grow = (hdr_len + ICMP_HDR_LEN) as i32;
    // SAFETY: moves the packet start; later accesses are bounds-checked.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Malformed);
    }
    // ...and nothing after it.
    let keep = l2.len() + hdr_len + ICMP_LEN;
    // SAFETY: reads the context's lengths only.
    let have = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i64;
    // SAFETY: as adjust_head.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (keep as i64 - have) as i32) } != 0 {
        return Err(Malformed);
    }
    let src = source_mac(ctx, cfg, &l2.dst);
    let l3_off = l2.len();
    let icmp_off = l3_off + hdr_len;
    if v4 {
        write_l2(ctx, &l2, &l2.src, &src, ETH_P_IP)?;
        let tot_len = ((hdr_len + ICMP_LEN) as u16).to_be_bytes();
        let id = next_ip_id().to_be_bytes();
        let mut hdr = [0u8; IPV4_HDR_LEN];
        hdr[0] = 0x45;
        hdr[2] = tot_len[0];
        hdr[3] = tot_len[1];
        hdr[4] = id[0];
        hdr[5] = id[1];
        hdr[8] = 64;
        hdr[9] = IPPROTO_ICMP;
        // From the VIP the client sent to, back to the client.
        hdr[12..16].copy_from_slice(&l3.dst[..4]);
        hdr[16..20].copy_from_slice(&l3.src[..4]);
        let csum = ipv4_checksum(&hdr).to_be_bytes();
        hdr[10] = csum[0];
        hdr[11] = csum[1];
        let mtu = (mtu as u16).to_be_bytes();
        let icmp = [
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            mtu[0],
            mtu[1],
        ];
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            *ptr_at_mut::<[u8; IPV4_HDR_LEN]>(ctx, l3_off)? = hdr;
            *ptr_at_mut::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)? = icmp;
        }
        // The helper sums memory as it lies: the folded sum goes back the
        // same way.
        let csum = fold(sum_at::<ICMP_LEN>(ctx, icmp_off)?).to_ne_bytes();
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *ptr_at_mut::<[u8; 2]>(ctx, icmp_off + 2)? = csum };
    } else {
        write_l2(ctx, &l2, &l2.src, &src, ETH_P_IPV6)?;
        let payload_len = (ICMP_LEN as u16).to_be_bytes();
        let mut hdr = [0u8; IPV6_HDR_LEN];
        hdr[0] = 0x60;
        hdr[4] = payload_len[0];
        hdr[5] = payload_len[1];
        hdr[6] = IPPROTO_ICMPV6;
        hdr[7] = 64;
        hdr[8..24].copy_from_slice(&l3.dst);
        hdr[24..40].copy_from_slice(&l3.src);
        let mtu = mtu.to_be_bytes();
        let icmp = [ICMPV6_PKT_TOOBIG, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            *ptr_at_mut::<[u8; IPV6_HDR_LEN]>(ctx, l3_off)? = hdr;
            *ptr_at_mut::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)? = icmp;
        }
        // The pseudo-header: both addresses (contiguous with the ICMPv6
        // message in the packet), the length and the next header.
        // Each as a 32-bit network-order word, summed as memory lies.
        let word = |v: u32| u64::from(u32::from_ne_bytes(v.to_be_bytes()));
        let sum = sum_at::<{ 32 + ICMP_LEN }>(ctx, l3_off + 8)?
            + word(ICMP_LEN as u32)
            + word(u32::from(IPPROTO_ICMPV6));
        let csum = fold(sum).to_ne_bytes();
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe { *ptr_at_mut::<[u8; 2]>(ctx, icmp_off + 2)? = csum };
    }
    Ok(())
}
