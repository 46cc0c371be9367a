//! xdplb's XDP programs: `xdp_lb`, the balancer on the LB host's NIC,
//! `decap`, the tunnel terminator for backends without ipip/ip6tnl devices,
//! and, for tests and benchmarks, `xdp_pass` (empty), `xdp_gen` (live-frames
//! load generator), `xdp_sink` (counting sink), `xdp_swap` (MAC-swap
//! forwarder baseline), `xdp_synack` (a SYN-answering benchmark backend) and
//! `xdp_bench` / `xdp_bench_plain` (the per-path benchmark harness).
//!
//! Odd-packet policy, each counted under its `xdp_common::reason`:
//! - not IP, or not addressed to a VIP: `XDP_PASS`, untouched;
//! - a second VLAN tag or an IPv6 extension header other than Fragment:
//!   `XDP_PASS`, untouched (not balanced);
//! - an IPv4 or IPv6 fragment, whatever its destination:
//!   `Config::fragment_action` (pass by default);
//! - truncated or inconsistent headers: `Config::malformed_action` (pass by
//!   default, so the kernel's own checks see them);
//! - a VIP with no usable backend: `XDP_DROP`;
//! - no headroom to encapsulate: `XDP_DROP`.
//!
//! `XDP_ABORTED` is never returned.
#![no_std]
#![no_main]

mod flow;
mod flow_cache;
mod forward;
mod maps;
mod parse;
mod quic;
mod stats;
mod too_big;
mod trace;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use xdp_common::{
    decap_reason, fwd, reason, Config, DecapKey, FlowKey, VipKey, VipMeta, FAMILY_V4, FAMILY_V6,
    PROTO_TCP, PROTO_UDP, XDP_DROP, XDP_PASS, XDP_TX,
};

use crate::{
    forward::{Inner, L2Header},
    maps::{CONFIG, DECAP_VIPS, VIPS},
    parse::{Malformed, L2, L3},
    stats::{count, count_decap},
};

/// The balancer: [`lb`], then what it passes goes on to the program the
/// operator chained after it (`chain.pass_to`), if any; the kernel's stack
/// if the slot is empty (a tail call into it returns). Unchained, not even
/// the attempt is made. The tail call stays in the entry point: the
/// kernel refuses one in a subprogram whose caller's frames are 256 bytes
/// or more.
#[xdp(frags)]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    let action = lb(ctx.ctx);
    if action == XDP_PASS && CONFIG.get(0).is_some_and(|c| c.chained != 0) {
        // SAFETY: a tail call with the context this program was given.
        unsafe { maps::PASS_TO.tail_call(&ctx, 0) };
    }
    action
}

/// The balancer as one program of libxdp's multi-program dispatcher: it
/// replaces (`freplace`) one of the dispatcher's slots, `int progN(struct
/// xdp_md *ctx)`, whose signature its own must match. The dispatcher runs
/// the next program on what this one passes, so it never tail-calls
/// PASS_TO (an extension, loaded without the frags flag, may not use a
/// program array the frags-aware `xdp_lb` owns).
///
/// # Safety
/// Called by the kernel with a valid `xdp_md` context.
#[no_mangle]
#[link_section = "freplace/xdp_lb_libxdp"]
pub unsafe extern "C" fn xdp_lb_libxdp(ctx: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    lb(ctx)
}

/// The balancer's verdict on one frame, counted. One function both entry
/// points call, never inlined into them: inlined twice, the code it
/// inlines itself (aya-log's closure in `trace::maybe`) would be outlined
/// into a frame of its own, beyond the 512 bytes of stack the verifier
/// allows a call chain.
#[inline(never)]
fn lb(ctx: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let Some(cfg) = CONFIG.get(0) else {
        // Unreachable for an array map with one entry; pass rather than guess.
        return XDP_PASS;
    };
    match try_lb(&ctx, cfg) {
        Ok(action) => action,
        Err(Malformed) => {
            count(reason::MALFORMED);
            action_or_pass(cfg.malformed_action)
        }
    }
}

/// The configured action, if it is one the policy allows.
#[inline(always)]
fn action_or_pass(action: u32) -> u32 {
    if action == XDP_DROP {
        XDP_DROP
    } else {
        XDP_PASS
    }
}

#[inline(always)]
fn pass(why: u32) -> Result<u32, Malformed> {
    count(why);
    Ok(XDP_PASS)
}

#[inline(always)]
fn try_lb(ctx: &XdpContext, cfg: &Config) -> Result<u32, Malformed> {
    let (family, l3_off) = match parse::ethernet(ctx)? {
        L2::Ip { family, l3_off } => (family, l3_off),
        L2::Other => return pass(reason::PASS_NOT_VIP),
        L2::Unsupported => return pass(reason::PASS_UNSUPPORTED),
    };
    let l3 = parse::ip(ctx, family, l3_off)?;
    if l3.fragment {
        count(reason::FRAGMENT);
        return Ok(action_or_pass(cfg.fragment_action));
    }
    if l3.extension {
        return pass(reason::PASS_UNSUPPORTED);
    }
    if l3_off != parse::ETH_HDR_LEN {
        count(reason::VLAN);
    }
    match l3.proto {
        PROTO_TCP | PROTO_UDP => balance(ctx, cfg, l3_off, &l3),
        parse::IPPROTO_ICMP if family == FAMILY_V4 => icmp_error(ctx, cfg, l3_off, &l3),
        parse::IPPROTO_ICMPV6 if family != FAMILY_V4 => icmp_error(ctx, cfg, l3_off, &l3),
        _ => pass(reason::PASS_NOT_VIP),
    }
}

/// The VIP for (address, port, protocol), falling back to a port-less VIP.
/// The address filter says which of the two lookups can hit: an address
/// of no VIP needs neither, one of port-less VIPs only the second.
#[inline(always)]
fn vip_lookup(addr: [u8; 16], fold: u32, port: u16, proto: u8, family: u8) -> Option<VipMeta> {
    vip_lookup_of(vip_kinds(fold), addr, port, proto, family)
}

/// Which VIPS lookups an address (folded) can hit: `VIP_FILTER_*` bits.
#[inline(always)]
fn vip_kinds(fold: u32) -> u32 {
    maps::VIP_FILTER
        .get(xdp_common::vip_filter_slot_of(fold))
        .copied()
        .unwrap_or(xdp_common::VIP_FILTER_PORTS | xdp_common::VIP_FILTER_PORTLESS)
}

/// [`vip_lookup`] for an address of `kinds`.
#[inline(always)]
fn vip_lookup_of(kinds: u32, addr: [u8; 16], port: u16, proto: u8, family: u8) -> Option<VipMeta> {
    let mut key = VipKey {
        addr,
        port,
        proto,
        family,
    };
    if kinds & xdp_common::VIP_FILTER_PORTS != 0 {
        // SAFETY: copied out at once; VIPS is only replaced whole by userspace.
        if let Some(meta) = unsafe { VIPS.get(key) } {
            return Some(*meta);
        }
    }
    if kinds & xdp_common::VIP_FILTER_PORTLESS == 0 {
        return None;
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(key) }.copied()
}

/// A TCP or UDP packet: balance it if it is for a VIP, and tell
/// `xdplb trace` what became of it if it asked.
#[inline(always)]
fn balance(ctx: &XdpContext, cfg: &Config, l3_off: usize, l3: &L3) -> Result<u32, Malformed> {
    let l4 = parse::l4(ctx, l3.proto, l3.l4_off, l3.end_off)?;
    let flow = flow_cache::Aligned(FlowKey {
        src: l3.src,
        dst: l3.dst,
        sport: l4.sport,
        dport: l4.dport,
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    });
    let mut decision = trace::Decision {
        vip_id: xdp_common::TRACE_ANY_VIP,
        reason: reason::PASS_NOT_VIP,
        conntrack: 0,
        backend_id: xdp_common::NO_BACKEND,
    };
    let action = decide(ctx, cfg, l3_off, l3, &l4, &flow, &mut decision)?;
    trace::maybe(ctx, &flow.0, action, &decision);
    Ok(action)
}

/// [`balance`]'s decision, noted in `d`.
#[inline(always)]
fn decide(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    l3: &L3,
    l4: &parse::L4,
    flow: &flow_cache::Aligned,
    d: &mut trace::Decision,
) -> Result<u32, Malformed> {
    let kinds = vip_kinds(l3.dst_fold);
    if kinds == 0 {
        return pass(reason::PASS_NOT_VIP);
    }
    // The cache's window and generation, when this packet consults it (a
    // SYN never does); the generation is read before the lookups whose
    // result is cached.
    let consult = if l4.syn {
        None
    } else {
        flow_cache::admit().map(|w| (w, flow_cache::generation()))
    };
    let cached = match consult {
        Some((w, generation)) => {
            flow_cache::lookup(flow, generation).inspect(|_| flow_cache::hit(w))
        }
        None => None,
    };
    let (vip, choice) = if let Some(hit) = cached {
        count(hit.placed);
        let vip = VipMeta {
            vip_id: hit.vip_id,
            flags: 0,
            mode: hit.mode,
            active_ring: 0,
        };
        let choice = flow::Choice {
            backend_id: hit.backend_id,
            backend: hit.backend,
            hash: hit.hash,
            placed: hit.placed,
            new_flow: false,
        };
        (vip, choice)
    } else {
        let Some(vip) = vip_lookup_of(kinds, l3.dst, l4.dport, l3.proto, l3.family) else {
            return pass(reason::PASS_NOT_VIP);
        };
        let vip = maps::routed(vip, l3.src, l3.family);
        d.vip_id = vip.vip_id;
        let routed = if vip.flags & xdp_common::VIP_F_QUIC != 0 {
            quic::route(ctx, l3, &vip, xdp_common::flow_hash(&flow.0, false))
        } else {
            None
        };
        let Some(choice) = routed.or_else(|| flow::select(&flow.0, &vip, cfg, l4)) else {
            stats::count_vip_drop(vip.vip_id, reason::NO_BACKEND);
            d.reason = reason::NO_BACKEND;
            return Ok(XDP_DROP);
        };
        // Where an established flow went, so its next packets skip the
        // VIP lookup, the hash and the ring. A new flow is cached from its
        // second packet on, so a SYN flood does not churn the cache; a
        // placement the next packet may not repeat (a new conntrack entry,
        // or none it wanted) must not leave an older one cached.
        // Not consulted (the cache does not pay off on this CPU now): a
        // repeatable placement needs no remembering, and any entry the
        // flow has says the same under this generation. A QUIC VIP's
        // packets are placed by their connection ID, which the 5-tuple
        // does not tell.
        if !l4.syn
            && vip.flags & xdp_common::VIP_F_QUIC == 0
            && (choice.placed == reason::FLOW_RING || choice.placed == reason::FLOW_HIT)
        {
            if let Some((_, generation)) = consult {
                flow_cache::remember(flow, generation, &vip, &choice);
            }
        } else {
            flow_cache::forget(flow);
        }
        (vip, choice)
    };
    d.vip_id = vip.vip_id;
    d.conntrack = choice.placed;
    d.backend_id = choice.backend_id;
    // IPv6 routers never fragment, and XDP cannot: an IPv4 packet too big
    // for an IPv6 tunnel is answered whatever its DF bit (its sender
    // lowers its path MTU; TCP its segment size).
    let may_fragment = !l3.dont_fragment && choice.backend.family != u32::from(FAMILY_V6);
    if !may_fragment && vip.mode != fwd::L2_DSR && cfg.tunnel_mtu != 0 {
        let outer = forward::outer_len(choice.backend);
        if l3.ip_len + outer > cfg.tunnel_mtu as usize {
            let action = answer_too_big(ctx, cfg, l3_off, l3, cfg.tunnel_mtu - outer as u32)?;
            d.reason = if action == XDP_TX {
                reason::TX_TOO_BIG
            } else {
                reason::TOO_BIG_DROPPED
            };
            return Ok(action);
        }
    }
    // The frame's bytes; a multi-buffer (jumbo) frame's first buffer holds
    // only part of its IP packet.
    let bytes = parse::packet_len(ctx).max(l3_off + l3.ip_len) as u64;
    let action = transmit(ctx, cfg, l3_off, l3, choice.hash, &vip, choice.backend)?;
    d.reason = reason::ENCAP_FAILED;
    if action == XDP_TX {
        stats::count_forwarded(vip.vip_id, choice.backend_id, bytes, choice.new_flow);
        d.reason = if vip.mode == fwd::L2_DSR {
            reason::TX_L2_DSR
        } else {
            reason::TX_ENCAP
        };
        count(d.reason);
    }
    Ok(action)
}

/// A VIP packet that would exceed the tunnel MTU once encapsulated and may
/// not be fragmented: answered with "too big" reporting `mtu`, within this
/// CPU's rate of such answers, else dropped.
#[inline(always)]
fn answer_too_big(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    l3: &L3,
    mtu: u32,
) -> Result<u32, Malformed> {
    if !stats::within_rate(maps::RATE_TOO_BIG, xdp_common::TOO_BIG_PER_SEC) {
        count(reason::TOO_BIG_DROPPED);
        return Ok(XDP_DROP);
    }
    too_big::answer(ctx, cfg, l3_off, l3, mtu)?;
    count(reason::TX_TOO_BIG);
    Ok(XDP_TX)
}

/// ICMP "fragmentation needed" / ICMPv6 "packet too big" quoting a VIP flow
/// goes to the backend that owns the flow, so its path MTU follows.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, cfg: &Config, l3_off: usize, l3: &L3) -> Result<u32, Malformed> {
    let Some(quoted) = parse::icmp_quoted(ctx, l3)? else {
        return pass(reason::PASS_NOT_VIP);
    };
    let fold = xdp_common::vip_filter_fold(&quoted.vip);
    let Some(vip) = vip_lookup(quoted.vip, fold, quoted.vip_port, quoted.proto, l3.family) else {
        return pass(reason::PASS_NOT_VIP);
    };
    let vip = maps::routed(vip, quoted.client, l3.family);
    let flow = flow_cache::Aligned(FlowKey {
        src: quoted.client,
        dst: quoted.vip,
        sport: quoted.client_port,
        dport: quoted.vip_port,
        proto: quoted.proto,
        family: l3.family,
        _pad: [0; 2],
    });
    // Where the flow's own packets go: the cache first, as for them.
    let owner = match flow_cache::lookup(&flow, flow_cache::generation()) {
        Some(hit) if hit.vip_id == vip.vip_id => Some((hit.backend_id, hit.backend, hit.hash)),
        _ => flow::owner(&flow.0, &vip),
    };
    let Some((backend_id, backend, hash)) = owner else {
        stats::count_vip_drop(vip.vip_id, reason::NO_BACKEND);
        return Ok(XDP_DROP);
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let action = transmit(ctx, cfg, l3_off, l3, hash, &vip, backend)?;
    if action == XDP_TX {
        stats::count_forwarded(vip.vip_id, backend_id, bytes, false);
        count(reason::TX_ICMP);
    }
    Ok(action)
}

/// Send the packet to `backend` in the VIP's forwarding mode.
#[inline(always)]
fn transmit(
    ctx: &XdpContext,
    cfg: &Config,
    l3_off: usize,
    l3: &L3,
    hash: u32,
    vip: &VipMeta,
    backend: &xdp_common::Backend,
) -> Result<u32, Malformed> {
    if vip.mode == fwd::L2_DSR {
        forward::l2_dsr(ctx, backend, cfg)?;
        return Ok(XDP_TX);
    }
    let l2 = L2Header::read(ctx, l3_off)?;
    let inner = Inner {
        family: l3.family,
        ip_len: l3.ip_len,
        tos: l3.tos,
        dont_fragment: l3.dont_fragment,
        hash,
    };
    match forward::encapsulate(ctx, &l2, &inner, backend, cfg)? {
        Ok(()) => Ok(XDP_TX),
        Err(forward::NoRoom) => {
            stats::count_vip_drop(vip.vip_id, reason::ENCAP_FAILED);
            Ok(XDP_DROP)
        }
    }
}

/// The backend-side decapsulator: IPv4-in-IPv4, IPv6-in-IPv6 and
/// IPv4-in-IPv6 packets whose inner destination is a configured VIP lose
/// their outer header and go to the stack; everything else passes untouched.
#[xdp(frags)]
pub fn decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(reason) => count_decap(reason),
        Err(Malformed) => count_decap(decap_reason::MALFORMED),
    }
    XDP_PASS
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, Malformed> {
    let L2::Ip { family, l3_off } = parse::ethernet(ctx)? else {
        return Ok(decap_reason::PASS);
    };
    let outer = parse::ip(ctx, family, l3_off)?;
    if outer.fragment {
        return Ok(decap_reason::PASS);
    }
    let (inner_family, ethertype, dst_off) = match outer.proto {
        parse::IPPROTO_IPIP => (FAMILY_V4, parse::ETH_P_IP, 16),
        parse::IPPROTO_IPV6 => (xdp_common::FAMILY_V6, parse::ETH_P_IPV6, 24),
        _ => return Ok(decap_reason::PASS),
    };
    let mut key = DecapKey {
        family: u32::from(inner_family),
        ..DecapKey::default()
    };
    if inner_family == FAMILY_V4 {
        key.addr[..4].copy_from_slice(&parse::read::<[u8; 4]>(ctx, outer.l4_off + dst_off)?);
    } else {
        key.addr = parse::read(ctx, outer.l4_off + dst_off)?;
    }
    // SAFETY: only presence is tested.
    if unsafe { DECAP_VIPS.get(key) }.is_none() {
        return Ok(decap_reason::PASS);
    }
    let l2 = L2Header::read(ctx, l3_off)?;
    match forward::decapsulate(ctx, &l2, outer.l4_off - l3_off, ethertype)? {
        Ok(()) => Ok(decap_reason::DECAPSULATED),
        Err(forward::NoRoom) => Err(Malformed),
    }
}

/// Passes every packet untouched. The baseline that benchmarks measure
/// beside `xdp_lb`, and what a veth needs attached for XDP_TX frames from
/// its peer to arrive (the test networks' router).
#[xdp(frags)]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Load generator, run with BPF_PROG_TEST_RUN live frames: each frame gets
/// the template's headers back (GEN_TEMPLATE), then the source
/// port, and past 60,000 flows the low source-address bits, of flow
/// `n % GEN_FLOWS`, then leaves through the interface (XDP_TX). L4 checksums
/// are not updated: the balancer under test does not read them.
#[xdp]
pub fn xdp_gen(ctx: XdpContext) -> u32 {
    match stamp_next_flow(&ctx) {
        Ok(()) => XDP_TX,
        Err(Malformed) => XDP_DROP,
    }
}

/// Stamp the frame with the next of GEN_FLOWS flows (this CPU's count).
#[inline(always)]
fn stamp_next_flow(ctx: &XdpContext) -> Result<(), Malformed> {
    let counter = maps::GEN_COUNTER.get_ptr_mut(0).ok_or(Malformed)?;
    // SAFETY: per-CPU slot.
    let n = unsafe {
        *counter += 1;
        *counter
    };
    let flows = maps::gen_flows().max(1);
    stamp_flow(ctx, (n % u64::from(flows)) as u32)
}

/// Benchmark harness, run with BPF_PROG_TEST_RUN and a large `repeat`
/// (which does not reset the packet between runs): each run first undoes
/// what the previous one did (the packet start moved back to
/// BENCH_FRAME_LEN bytes, the template's first bytes restored, the flow
/// stamped as `xdp_gen` does, so GEN_FLOWS = 1 repeats one flow and a large
/// GEN_FLOWS makes every run a new one), then tail-calls the program under
/// test in BENCH_TARGET. Its own cost is measured with `xdp_pass` there.
#[xdp(frags)]
pub fn xdp_bench(ctx: XdpContext) -> u32 {
    bench_run(&ctx)
}

/// [`xdp_bench`] for programs under test that are not `xdp.frags` (a
/// program array takes only programs of its first one's kind): another
/// balancer measured side by side.
#[xdp]
pub fn xdp_bench_plain(ctx: XdpContext) -> u32 {
    bench_run(&ctx)
}

#[inline(always)]
fn bench_run(ctx: &XdpContext) -> u32 {
    if restore_frame(ctx).is_err() {
        return XDP_DROP;
    }
    // SAFETY: the context is the program's own; on success this does not
    // return.
    unsafe { maps::BENCH_TARGET.tail_call(ctx, 0) };
    // No program under test.
    XDP_DROP
}

#[inline(always)]
fn restore_frame(ctx: &XdpContext) -> Result<(), Malformed> {
    // SAFETY: reads the context's lengths only.
    let len = unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    let grown = len - maps::bench_frame_len() as i32;
    // SAFETY: moves the packet start within the buffer the previous run
    // used; later accesses are bounds-checked.
    if grown != 0 && unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, grown) } != 0 {
        return Err(Malformed);
    }
    stamp_next_flow(ctx)
}

#[inline(always)]
fn stamp_flow(ctx: &XdpContext, flow: u32) -> Result<(), Malformed> {
    let template = maps::GEN_TEMPLATE.get(0).ok_or(Malformed)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *parse::ptr_at_mut::<[u8; xdp_common::GEN_HEADER_LEN]>(ctx, 0)? = *template };
    let L2::Ip { family, l3_off } = parse::ethernet(ctx)? else {
        return Err(Malformed);
    };
    let l3 = parse::ip(ctx, family, l3_off)?;
    let sport = (1024 + flow % 60_000) as u16;
    let high = (flow / 60_000) as u16;
    // Source address: the last 16 bits of IPv4 (offset 12 + 2) or IPv6
    // (offset 8 + 14).
    let addr_low = if family == FAMILY_V4 {
        l3_off + 14
    } else {
        l3_off + 22
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        *parse::ptr_at_mut::<[u8; 2]>(ctx, l3.l4_off)? = sport.to_be_bytes();
        if high != 0 {
            *parse::ptr_at_mut::<[u8; 2]>(ctx, addr_low)? = high.to_be_bytes();
        }
    }
    Ok(())
}

/// Packet sink for load tests: counts and drops.
#[xdp]
pub fn xdp_sink(_ctx: XdpContext) -> u32 {
    sink()
}

/// [`xdp_sink`] for multi-buffer frames: what a test chains after
/// `xdp_lb` (`chain.pass_to`), whose flag it must share.
#[xdp(frags)]
pub fn xdp_sink_frags(_ctx: XdpContext) -> u32 {
    sink()
}

#[inline(always)]
fn sink() -> u32 {
    if let Some(c) = maps::SINK_COUNTER.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    XDP_DROP
}

/// Load-test baseline: swap the MAC addresses and send the frame back out.
/// The least any XDP forwarder does.
#[xdp]
pub fn xdp_swap(ctx: XdpContext) -> u32 {
    match swap_macs(&ctx) {
        Ok(()) => XDP_TX,
        Err(Malformed) => XDP_PASS,
    }
}

/// Benchmark backend: answers every IPv4 TCP SYN with a SYN-ACK, as a
/// remote host's kernel would, and a FIN with a reset (so a closing client
/// is done at once, as after a server's FIN-ACK); drops other TCP segments
/// (the handshake's ACK, resets) and passes the rest (ARP). Health-check
/// benchmarks use it so the checker is charged only for its own side.
#[xdp]
pub fn xdp_synack(ctx: XdpContext) -> u32 {
    match synack(&ctx) {
        Ok(action) => action,
        Err(Malformed) => XDP_PASS,
    }
}

/// RFC 1624: a checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn synack(ctx: &XdpContext) -> Result<u32, Malformed> {
    const TCP: usize = 14 + 20;
    let head: [u8; 24] = parse::read(ctx, 12)?;
    // IPv4 without options, TCP.
    if head[0..2] != [0x08, 0x00] || head[2] != 0x45 || head[11] != 6 {
        return Ok(XDP_PASS);
    }
    let tcp: [u8; 18] = parse::read(ctx, TCP)?;
    let syn = tcp[13] & 0x12 == 0x02;
    let fin = tcp[13] & 0x05 == 0x01;
    if !syn && !fin {
        return Ok(XDP_DROP);
    }
    swap_macs(ctx)?;
    let addrs: [u8; 8] = parse::read(ctx, 26)?;
    let mut swapped = [0u8; 8];
    swapped[..4].copy_from_slice(&addrs[4..]);
    swapped[4..].copy_from_slice(&addrs[..4]);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *parse::ptr_at_mut::<[u8; 8]>(ctx, 26)? = swapped };
    // Ports swap, seq/ack/flags change; swapping addresses or ports leaves
    // the checksum as it was (a sum does not care about order).
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let old_ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let old_flags = u16::from_be_bytes([tcp[12], tcp[13]]);
    // SYN -> SYN-ACK acknowledging it; FIN -> RST at the sequence it expects.
    let (new_seq, new_ack, flags) = if syn {
        (seq ^ 0x5eed_5eed, seq.wrapping_add(1), 0x12)
    } else {
        (old_ack, 0, 0x04)
    };
    let new_flags = (old_flags & 0xff00) | flags;
    let mut csum = u16::from_be_bytes([tcp[16], tcp[17]]);
    for (old, new) in [
        ((seq >> 16) as u16, (new_seq >> 16) as u16),
        (seq as u16, new_seq as u16),
        ((old_ack >> 16) as u16, (new_ack >> 16) as u16),
        (old_ack as u16, new_ack as u16),
        (old_flags, new_flags),
    ] {
        csum = csum_replace(csum, old, new);
    }
    let mut out = tcp;
    out[0..2].copy_from_slice(&tcp[2..4]);
    out[2..4].copy_from_slice(&tcp[0..2]);
    out[4..8].copy_from_slice(&new_seq.to_be_bytes());
    out[8..12].copy_from_slice(&new_ack.to_be_bytes());
    out[12..14].copy_from_slice(&new_flags.to_be_bytes());
    out[16..18].copy_from_slice(&csum.to_be_bytes());
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *parse::ptr_at_mut::<[u8; 18]>(ctx, TCP)? = out };
    Ok(XDP_TX)
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), Malformed> {
    let macs: [u8; 12] = parse::read(ctx, 0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { *parse::ptr_at_mut::<[u8; 12]>(ctx, 0)? = swapped };
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this loop, so a
    // panic path that survives optimisation fails at load, not at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
