//! Test packets. Base packets come from etherparse (valid checksums); the
//! odd ones (options, fragments, tags, truncation) are byte edits of those.
//! Expected encapsulated outputs are built here from etherparse headers, not
//! from the dataplane's code.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder};

/// The client-side router's MAC (source of packets arriving at the LB).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The LB interface's MAC (destination of arriving packets).
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Next hop towards the backends (destination of encapsulated packets).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

pub fn v4(a: Ipv4Addr) -> [u8; 4] {
    a.octets()
}

pub fn v6(a: Ipv6Addr) -> [u8; 16] {
    a.octets()
}

fn eth() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
}

pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(v4(src), v4(dst), 64)
        .tcp(sport, dport, 1000, 65535)
        .write(&mut out, payload)
        .expect("building a TCP/IPv4 packet");
    out
}

pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(v4(src), v4(dst), 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("building a UDP/IPv4 packet");
    out
}

pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv6(v6(src), v6(dst), 64)
        .tcp(sport, dport, 1000, 65535)
        .write(&mut out, payload)
        .expect("building a TCP/IPv6 packet");
    out
}

pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv6(v6(src), v6(dst), 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("building a UDP/IPv6 packet");
    out
}

/// Offset of the IP header in an untagged frame.
pub const L3: usize = 14;

/// Recompute the IPv4 header checksum of the header at `l3`.
pub fn fix_ipv4_checksum(pkt: &mut [u8], l3: usize) {
    let ihl = usize::from(pkt[l3] & 0x0f) * 4;
    pkt[l3 + 10] = 0;
    pkt[l3 + 11] = 0;
    let mut sum: u32 = 0;
    for pair in pkt[l3..l3 + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    pkt[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Insert an 802.1Q tag with `vid` after the MAC addresses.
pub fn with_vlan(pkt: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = pkt[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&pkt[12..]);
    out
}

/// Give an untagged IPv4 packet `words` 32-bit words of IPv4 options (NOPs
/// ending in End-of-list), fixing IHL, total length and checksum.
pub fn with_ipv4_options(pkt: &[u8], words: usize) -> Vec<u8> {
    let ihl = usize::from(pkt[L3] & 0x0f) * 4;
    let mut out = pkt[..L3 + ihl].to_vec();
    let mut options = vec![1u8; words * 4];
    if let Some(last) = options.last_mut() {
        *last = 0;
    }
    out.extend_from_slice(&options);
    out.extend_from_slice(&pkt[L3 + ihl..]);
    out[L3] = 0x40 | ((ihl + words * 4) / 4) as u8;
    let tot = u16::from_be_bytes([out[L3 + 2], out[L3 + 3]]) + (words * 4) as u16;
    out[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut out, L3);
    out
}

/// Mark an untagged IPv4 packet as a fragment (MF set, offset `offset` units).
pub fn as_ipv4_fragment(pkt: &[u8], more: bool, offset: u16) -> Vec<u8> {
    let mut out = pkt.to_vec();
    let flags = if more { 0x2000 } else { 0 } | (offset & 0x1fff);
    out[L3 + 6..L3 + 8].copy_from_slice(&flags.to_be_bytes());
    fix_ipv4_checksum(&mut out, L3);
    out
}

/// Put an IPv6 extension header of type `next` (8 bytes) in front of the
/// upper-layer header of an untagged IPv6 packet.
pub fn with_ipv6_extension(pkt: &[u8], next: u8) -> Vec<u8> {
    let upper = pkt[L3 + 6];
    let mut out = pkt[..L3 + 40].to_vec();
    out[L3 + 6] = next;
    let mut ext = [0u8; 8];
    ext[0] = upper;
    if next == 44 {
        ext[3] = 1; // Fragment header: offset 0, M flag set
    }
    out.extend_from_slice(&ext);
    out.extend_from_slice(&pkt[L3 + 40..]);
    let plen = u16::from_be_bytes([out[L3 + 4], out[L3 + 5]]) + 8;
    out[L3 + 4..L3 + 6].copy_from_slice(&plen.to_be_bytes());
    out
}

/// An ICMP "fragmentation needed" from `router` to `vip`, quoting the start
/// of `quoted` (an IPv4 frame sent from the VIP by a backend).
pub fn icmp4_frag_needed(router: Ipv4Addr, vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[L3..quoted.len().min(L3 + 28)];
    let mut out = Vec::new();
    eth()
        .ipv4(v4(router), v4(vip), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut out, quote)
        .expect("building an ICMP packet");
    out
}

/// An ICMPv6 "packet too big" from `router` to `vip`, quoting `quoted`.
pub fn icmp6_too_big(router: Ipv6Addr, vip: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[L3..quoted.len().min(L3 + 48)];
    let mut out = Vec::new();
    eth()
        .ipv6(v6(router), v6(vip), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut out, quote)
        .expect("building an ICMPv6 packet");
    out
}

pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(v4(src), v4(dst), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")
        .expect("building an echo request");
    out
}

/// An ARP request (not IP).
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&[0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&[198, 18, 0, 1]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[198, 18, 0, 10]);
    out
}

/// The L2 header an encapsulated packet should leave with: to the gateway,
/// from the LB, keeping the inner frame's VLAN tag if any.
fn outer_l2(inner_frame: &[u8], l3: usize, ethertype: u16) -> Vec<u8> {
    let mut out = GATEWAY_MAC.to_vec();
    out.extend_from_slice(&inner_frame[..6]);
    out.extend_from_slice(&inner_frame[12..l3 - 2]);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out
}

fn inner_proto(inner_frame: &[u8], l3: usize) -> IpNumber {
    if inner_frame[l3] >> 4 == 4 {
        IpNumber::IPV4
    } else {
        IpNumber::IPV6
    }
}

/// Length of the inner IP packet as its header declares it (a frame may
/// carry Ethernet padding beyond it).
fn inner_ip_len(inner_frame: &[u8], l3: usize) -> u16 {
    if inner_frame[l3] >> 4 == 4 {
        u16::from_be_bytes([inner_frame[l3 + 2], inner_frame[l3 + 3]])
    } else {
        40 + u16::from_be_bytes([inner_frame[l3 + 4], inner_frame[l3 + 5]])
    }
}

fn inner_tos(inner_frame: &[u8], l3: usize) -> u8 {
    if inner_frame[l3] >> 4 == 4 {
        inner_frame[l3 + 1]
    } else {
        (inner_frame[l3] << 4) | (inner_frame[l3 + 1] >> 4)
    }
}

/// `inner_frame` (IP header at `l3`) as the LB should send it in IPv4 (any
/// Ethernet padding rides along after the declared length):
/// outer source `src`, outer destination the backend `dst`.
pub fn expected_encap4(inner_frame: &[u8], l3: usize, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let inner = &inner_frame[l3..];
    let mut hdr = Ipv4Header::new(
        inner_ip_len(inner_frame, l3),
        64,
        inner_proto(inner_frame, l3),
        v4(src),
        v4(dst),
    )
    .expect("outer IPv4 header");
    let tos = inner_tos(inner_frame, l3);
    hdr.dscp = etherparse::Ipv4Dscp::try_new(tos >> 2).expect("dscp");
    hdr.ecn = etherparse::Ipv4Ecn::try_new(tos & 3).expect("ecn");
    // DF follows the inner packet's (always set for IPv6 inner packets).
    hdr.dont_fragment = inner_frame[l3] >> 4 == 6 || inner_frame[l3 + 6] & 0x40 != 0;
    hdr.header_checksum = hdr.calc_header_checksum();
    let mut out = outer_l2(inner_frame, l3, 0x0800);
    out.extend_from_slice(&hdr.to_bytes());
    out.extend_from_slice(inner);
    out
}

/// `inner_frame` as the LB should send it in IPv6, with flow label `label`.
pub fn expected_encap6(
    inner_frame: &[u8],
    l3: usize,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    label: u32,
) -> Vec<u8> {
    let inner = &inner_frame[l3..];
    let hdr = Ipv6Header {
        traffic_class: inner_tos(inner_frame, l3),
        flow_label: Ipv6FlowLabel::try_new(label).expect("flow label"),
        payload_length: inner_ip_len(inner_frame, l3),
        next_header: inner_proto(inner_frame, l3),
        hop_limit: 64,
        source: v6(src),
        destination: v6(dst),
    };
    let mut out = outer_l2(inner_frame, l3, 0x86dd);
    out.extend_from_slice(&hdr.to_bytes());
    out.extend_from_slice(inner);
    out
}

/// `frame` as L2 DSR sends it: to the backend's MAC, from the LB.
pub fn expected_l2_dsr(frame: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&backend_mac);
    out[6..12].copy_from_slice(&frame[..6]);
    out
}

/// The balancer's "too big" answer to `frame` (IP header at `l3`, from a
/// client to a VIP): to the frame's source MAC from `lb_mac`, keeping any
/// VLAN tag, from the VIP back to the client, reporting `mtu`, quoting the
/// first `xdp_common::TOO_BIG_QUOTE` bytes of the IP packet. IPv4 answers
/// carry the identification `id` (the balancer's counter; the caller reads
/// it from the output) and no DF.
pub fn expected_too_big(frame: &[u8], l3: usize, lb_mac: [u8; 6], id: u16, mtu: u32) -> Vec<u8> {
    let quote = &frame[l3..l3 + xdp_common::TOO_BIG_QUOTE];
    let v4 = frame[l3] >> 4 == 4;
    let mut out = frame[6..12].to_vec();
    out.extend_from_slice(&lb_mac);
    out.extend_from_slice(&frame[12..l3 - 2]);
    if v4 {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let icmp = etherparse::Icmpv4Header::with_checksum(
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu as u16,
                },
            ),
            quote,
        );
        let src: [u8; 4] = frame[l3 + 16..l3 + 20].try_into().expect("4 bytes");
        let dst: [u8; 4] = frame[l3 + 12..l3 + 16].try_into().expect("4 bytes");
        let mut ip = Ipv4Header::new(
            (icmp.header_len() + quote.len()) as u16,
            64,
            IpNumber::ICMP,
            src,
            dst,
        )
        .expect("IPv4 header");
        ip.dont_fragment = false;
        ip.identification = id;
        ip.header_checksum = ip.calc_header_checksum();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
    } else {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        let src: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().expect("16 bytes");
        let dst: [u8; 16] = frame[l3 + 8..l3 + 24].try_into().expect("16 bytes");
        let icmp = etherparse::Icmpv6Header::with_checksum(
            etherparse::Icmpv6Type::PacketTooBig { mtu },
            src,
            dst,
            quote,
        )
        .expect("ICMPv6 header");
        let ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: (icmp.header_len() + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: src,
            destination: dst,
        };
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
    }
    out.extend_from_slice(quote);
    out
}

/// TCP flag bits, for [`with_tcp_flags`].
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `frame` (an untagged TCP/IPv4 or TCP/IPv6 frame without options) with
/// the TCP flags `flags`. The TCP checksum is left as it was: the balancer
/// does not read it.
pub fn with_tcp_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    let ip_len = if frame[L3] >> 4 == 4 { 20 } else { 40 };
    frame[L3 + ip_len + 13] = flags;
    frame
}
