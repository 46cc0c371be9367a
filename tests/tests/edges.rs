//! The balancer at the edges of what a packet can be, through
//! BPF_PROG_TEST_RUN, each output byte for byte against a model built
//! from etherparse: packets too big for the tunnel (answered with ICMP),
//! jumbo frames in several buffers, the source MAC of frames sent, the
//! outer IPv4 identification, TCP resets and the conntrack rate limit.
//! Every test here fails on the build before them.

use std::net::IpAddr;

use integration_tests::{
    lab::*,
    packet::{self, L3, LB_MAC},
    pin_to_cpu0, require_root, run,
};
use xdp_common::{reason, Config, FlowKey, PROTO_TCP, TOO_BIG_PER_SEC, XDP_TX};

fn lab_with(config: Config) -> Lab {
    let mut lab = Lab::new().expect("loading the lab dataplane");
    lab.dp.set_config(&config).expect("writing CONFIG");
    lab
}

/// Counter changes between two snapshots, the non-zero ones by name.
fn moved(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    reason::NAMES
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(n, (b, a))| (*n, a - b))
        .collect()
}

/// A client's TCP segment of `len` payload bytes to `vip`.
fn big_tcp(vip: &LabVip, sport: u16, len: usize) -> (Vec<u8>, FlowKey) {
    let payload = vec![b'x'; len];
    let frame = match vip.addr {
        IpAddr::V4(a) => packet::tcp4(CLIENT4, a, sport, vip.port, &payload),
        IpAddr::V6(a) => packet::tcp6(CLIENT6, a, sport, vip.port, &payload),
    };
    let client = if vip.addr.is_ipv4() {
        IpAddr::V4(CLIENT4)
    } else {
        IpAddr::V6(CLIENT6)
    };
    (frame, flow(client, vip.addr, sport, vip.port, PROTO_TCP))
}

/// The IPv4 frame with DF cleared (checksum fixed).
fn fragmentable(mut frame: Vec<u8>, l3: usize) -> Vec<u8> {
    frame[l3 + 6] &= !0x40;
    packet::fix_ipv4_checksum(&mut frame, l3);
    frame
}

/// The identification of the IPv4 header at `l3`.
fn ip_id(frame: &[u8], l3: usize) -> u16 {
    u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]])
}

#[test]
fn a_packet_too_big_for_the_tunnel_is_answered_with_icmp() {
    if !require_root() {
        return;
    }
    const MTU: u32 = 1400;
    let lab = lab_with(Config {
        tunnel_mtu: MTU,
        ..lab_config()
    });
    let prog = lab.dp.program().expect("program");
    // (what, frame, IP offset, the MTU the answer must report)
    let (v4, _) = big_tcp(&WEB4, 40100, 1400);
    let (v6, _) = big_tcp(&WEB6, 40100, 1400);
    let (mixed, _) = big_tcp(&MIXED, 40100, 1400);
    let tagged = packet::with_vlan(&big_tcp(&WEB4, 40101, 1400).0, 0x8100, 7);
    // IPv6 routers never fragment and XDP cannot: DF or not, an IPv4
    // packet too big for an IPv6 tunnel is answered (efc012d sent it
    // oversize, to be dropped on the way).
    let mixed_fragmentable = fragmentable(big_tcp(&MIXED, 40104, 1400).0, L3);
    let cases: [(&str, Vec<u8>, usize, u32); 5] = [
        ("IPv4 in IPv4", v4, L3, MTU - 20),
        ("IPv6 in IPv6", v6, L3, MTU - 40),
        ("IPv4 in IPv6", mixed, L3, MTU - 40),
        ("IPv4 in IPv4, VLAN tagged", tagged, L3 + 4, MTU - 20),
        ("IPv4 in IPv6, DF clear", mixed_fragmentable, L3, MTU - 40),
    ];
    let mut ids = Vec::new();
    for (what, frame, l3, mtu) in cases {
        let before = lab.stats();
        let out = run(prog, &frame).expect("test run");
        let after = lab.stats();
        assert_eq!(out.action, XDP_TX, "{what}: too big must be answered");
        let id = if frame[l3] >> 4 == 4 {
            ip_id(&out.output, l3)
        } else {
            0
        };
        ids.push(id);
        let expected = packet::expected_too_big(&frame, l3, LB_MAC, id, mtu);
        assert_eq!(
            integration_tests::hex(&out.output),
            integration_tests::hex(&expected),
            "{what}: the answer differs from the model"
        );
        let mut want = vec![("flow_ring", 1), ("tx_too_big", 1)];
        if l3 != L3 {
            want.push(("vlan", 1));
        }
        want.sort();
        let mut got = moved(&before, &after);
        got.sort();
        assert_eq!(got, want, "{what}: counters");
    }
    assert_ne!(
        ids[0], ids[3],
        "each IPv4 answer gets its own identification"
    );

    // What still fits goes through: exactly at the MTU, a fragmentable
    // IPv4 packet (the path may fragment the outer packet), and L2 DSR
    // (no tunnel).
    let (fits, key) = big_tcp(&WEB4, 40102, MTU as usize - 20 - 40 - 20);
    let out = run(prog, &fits).expect("test run");
    let backend = predicted_backend(&WEB4, &ring_of(WEB4.backends), &key);
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        out.output,
        expected_forward(&WEB4, &fits, L3, &key, backend),
        "a packet that fits the tunnel exactly is encapsulated"
    );
    let (dsr, _) = big_tcp(&DSR, 40103, 1400);
    let out = run(prog, &dsr).expect("test run");
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        out.output[12..],
        dsr[12..],
        "L2 DSR adds no header: never too big"
    );
}

#[test]
fn fragmentable_ipv4_is_encapsulated_with_an_identification_per_packet() {
    if !require_root() {
        return;
    }
    let lab = lab_with(Config {
        tunnel_mtu: 1400,
        ..lab_config()
    });
    let prog = lab.dp.program().expect("program");
    let mut ids = Vec::new();
    for sport in 40200..40204u16 {
        let (frame, key) = big_tcp(&WEB4, sport, 1400);
        let frame = fragmentable(frame, L3);
        let out = run(prog, &frame).expect("test run");
        assert_eq!(out.action, XDP_TX);
        let id = ip_id(&out.output, L3);
        let backend = predicted_backend(&WEB4, &ring_of(WEB4.backends), &key);
        let mut expected = expected_forward(&WEB4, &frame, L3, &key, backend);
        expected[L3 + 4..L3 + 6].copy_from_slice(&id.to_be_bytes());
        packet::fix_ipv4_checksum(&mut expected, L3);
        assert_eq!(
            integration_tests::hex(&out.output),
            integration_tests::hex(&expected),
            "a fragmentable packet over the tunnel MTU goes out encapsulated, DF clear"
        );
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        4,
        "every fragmentable packet has its own ID: {ids:?}"
    );
    // A DF packet's outer header keeps ID 0 (RFC 6864: it is never
    // reassembled).
    let (frame, _) = big_tcp(&WEB4, 40210, 100);
    let out = run(prog, &frame).expect("test run");
    assert_eq!(ip_id(&out.output, L3), 0);
}

#[test]
fn too_big_answers_are_rate_limited_per_cpu() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    let lab = lab_with(Config {
        tunnel_mtu: 1400,
        ..lab_config()
    });
    let prog = lab.dp.program().expect("program");
    let (frame, _) = big_tcp(&WEB4, 40300, 1400);
    let before = lab.stats();
    let extra = 50;
    for _ in 0..TOO_BIG_PER_SEC + extra {
        run(prog, &frame).expect("test run");
    }
    let after = lab.stats();
    let n = |r: u32| after[r as usize] - before[r as usize];
    // All within one second of the first (a test run takes microseconds).
    assert_eq!(n(reason::TX_TOO_BIG), u64::from(TOO_BIG_PER_SEC));
    assert_eq!(n(reason::TOO_BIG_DROPPED), u64::from(extra));
}

#[test]
fn frames_leave_from_the_interfaces_mac_whatever_they_arrived_for() {
    if !require_root() {
        return;
    }
    const OWN: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x01];
    let mut lab = lab_with(lab_config());
    lab.dp.set_source_mac(OWN).expect("setting the source MAC");
    let prog = lab.dp.program().expect("program");
    for (vip, sport) in [(&WEB4, 40400u16), (&WEB6, 40401), (&DSR, 40402)] {
        let (mut frame, key) = big_tcp(vip, sport, 10);
        // Sent to the broadcast address: the old build used the arriving
        // destination as the source, an invalid one here.
        frame[..6].copy_from_slice(&[0xff; 6]);
        let out = run(prog, &frame).expect("test run");
        assert_eq!(out.action, XDP_TX);
        let backend = predicted_backend(vip, &ring_of(vip.backends), &key);
        let mut expected = expected_forward(vip, &frame, L3, &key, backend);
        expected[6..12].copy_from_slice(&OWN);
        assert_eq!(
            integration_tests::hex(&out.output),
            integration_tests::hex(&expected),
            "{}: source MAC",
            vip.addr
        );
    }
    let (frame, _) = big_tcp(&WEB4, 40403, 1400);
    lab.dp
        .set_config(&Config {
            tunnel_mtu: 1400,
            ..lab_config()
        })
        .expect("CONFIG");
    let out = run(lab.dp.program().expect("program"), &frame).expect("test run");
    assert_eq!(&out.output[6..12], &OWN, "the ICMP answer too");
    assert_eq!(
        lab.dp.config().expect("CONFIG").source_mac,
        OWN,
        "a policy change keeps the interface's MAC"
    );
}

#[test]
fn resets_and_floods_beyond_the_rate_are_balanced_but_not_tracked() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    const RATE: u32 = 10;
    let mut lab = lab_with(Config {
        conntrack_rate: RATE,
        ..lab_config()
    });
    // The guard limits entries where flows are tracked: in changed slots,
    // and everywhere in a VIP that tracks every flow, as this one does.
    track_every_flow(&mut lab);
    let prog = lab.dp.program().expect("program");
    let ring = ring_of(WEB4.backends);
    // A reset of an unknown flow: forwarded, never tracked.
    let (rst, key) = big_tcp(&WEB4, 40500, 0);
    let rst = packet::with_tcp_flags(rst, packet::TCP_RST);
    let before = lab.stats();
    let out = run(prog, &rst).expect("test run");
    assert_eq!(out.action, XDP_TX);
    assert_eq!(
        out.output,
        expected_forward(&WEB4, &rst, L3, &key, predicted_backend(&WEB4, &ring, &key))
    );
    assert_eq!(
        lab.dp.flow(&key).expect("FLOWS"),
        None,
        "a reset opens no entry"
    );
    let after = lab.stats();
    assert_eq!(
        after[reason::FLOW_UNTRACKED as usize] - before[reason::FLOW_UNTRACKED as usize],
        1
    );
    // New flows beyond RATE per second: all forwarded where the ring says,
    // the first RATE tracked.
    let mut tracked = 0;
    for sport in 40510..40510 + 2 * RATE as u16 {
        let (syn, key) = big_tcp(&WEB4, sport, 0);
        let syn = packet::with_tcp_flags(syn, packet::TCP_SYN);
        let out = run(prog, &syn).expect("test run");
        let backend = predicted_backend(&WEB4, &ring, &key);
        assert_eq!(out.output, expected_forward(&WEB4, &syn, L3, &key, backend));
        tracked += usize::from(lab.dp.flow(&key).expect("FLOWS").is_some());
    }
    assert_eq!(tracked, RATE as usize, "only {RATE} new entries per second");
    let end = lab.stats();
    assert_eq!(
        end[reason::FLOW_UNTRACKED as usize] - after[reason::FLOW_UNTRACKED as usize],
        u64::from(RATE)
    );
}

#[test]
fn jumbo_frames_in_several_buffers_are_balanced() {
    if !require_root() {
        return;
    }
    let lab = lab_with(lab_config());
    let prog = lab.dp.program().expect("program");
    // 3600 bytes and up: more than a page, so the test run hands the
    // program a multi-buffer frame, as a jumbo-MTU NIC does.
    for (vip, len) in [(&WEB4, 3600usize), (&WEB4, 8900), (&WEB6, 8900)] {
        let (frame, key) = big_tcp(vip, 40600 + len as u16 % 7, len);
        let out = run(prog, &frame).expect("test run");
        assert_eq!(out.action, XDP_TX, "{} bytes to {}", frame.len(), vip.addr);
        let backend = predicted_backend(vip, &ring_of(vip.backends), &key);
        assert_eq!(
            out.output,
            expected_forward(vip, &frame, L3, &key, backend),
            "{} bytes to {}: encapsulated whole",
            frame.len(),
            vip.addr
        );
    }
}

/// Make WEB4 track every flow in every slot (`VIP_F_TRACK_ALL`), so the
/// conntrack rules apply wherever its flows land.
fn track_every_flow(lab: &mut Lab) {
    lab.dp
        .add_vip(
            &WEB4.key(),
            WEB4.vip_id,
            xdp_common::VIP_F_TRACK_ALL,
            WEB4.mode,
        )
        .expect("tracking every flow");
}

#[test]
fn a_syn_opens_its_connection_where_the_ring_says_unless_the_guard_holds_it_back() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    let mut lab = lab_with(Config {
        conntrack_rate: 1,
        ..lab_config()
    });
    let ring = ring_of(WEB4.backends);
    // Conntrack is consulted where the ring changed, and everywhere in a
    // VIP that tracks every flow: this one, so every slot behaves so.
    track_every_flow(&mut lab);
    let syn = |sport: u16| {
        let (f, key) = big_tcp(&WEB4, sport, 0);
        (packet::with_tcp_flags(f, packet::TCP_SYN), key)
    };
    // Entries an earlier connection on the same ports left, each pointing
    // at a backend the ring would not pick now.
    let (first, k1) = syn(40700);
    let (second, k2) = syn(40701);
    let other = |k: &FlowKey| {
        let ringed = predicted_backend(&WEB4, &ring, k);
        *WEB4
            .backends
            .iter()
            .find(|&&b| b != ringed)
            .expect("another backend")
    };
    let (old1, old2) = (other(&k1), other(&k2));
    lab.dp
        .set_flows(
            &[k1, k2],
            &[
                xdp_common::FlowState {
                    backend_id: old1,
                    generation: lab.dp.backend(old1).expect("BACKENDS").generation,
                    ..Default::default()
                },
                xdp_common::FlowState {
                    backend_id: old2,
                    generation: lab.dp.backend(old2).expect("BACKENDS").generation,
                    ..Default::default()
                },
            ],
        )
        .expect("seeding FLOWS");
    let prog = lab.dp.program().expect("program");
    // Within the rate: the ring places the new connection, and its entry
    // replaces the old one.
    let out = run(prog, &first).expect("test run");
    let ringed = predicted_backend(&WEB4, &ring, &k1);
    assert_eq!(out.output, expected_forward(&WEB4, &first, L3, &k1, ringed));
    assert_eq!(
        lab.dp.flow(&k1).expect("FLOWS").map(|s| s.backend_id),
        Some(ringed)
    );
    // Beyond it (1 per second): the entry cannot be replaced, so the SYN
    // follows it, as the rest of the connection will.
    let out = run(prog, &second).expect("test run");
    assert_eq!(out.output, expected_forward(&WEB4, &second, L3, &k2, old2));
    assert_eq!(
        lab.dp.flow(&k2).expect("FLOWS").map(|s| s.backend_id),
        Some(old2)
    );
}

#[test]
fn a_vip_address_filter_slot_is_cleared_only_when_no_vip_shares_it() {
    if !require_root() {
        return;
    }
    let mut lab = lab_with(lab_config());
    let IpAddr::V4(web) = WEB4.addr else {
        unreachable!("WEB4 is IPv4")
    };
    // An address in WEB4's filter slot, served by a VIP of its own (in
    // place of the lab's VIP without backends).
    let slot = xdp_common::vip_filter_slot(&xdp_user::dataplane::addr_bytes(WEB4.addr).0);
    let shared = (1..=u32::MAX)
        .map(|i| std::net::Ipv4Addr::from(u32::from(web) + i))
        .find(|a| {
            xdp_common::vip_filter_slot(&xdp_user::dataplane::addr_bytes(IpAddr::V4(*a)).0) == slot
        })
        .expect("an address sharing the slot");
    let other = xdp_common::VipKey {
        addr: xdp_user::dataplane::addr_bytes(IpAddr::V4(shared)).0,
        ..EMPTY.key()
    };
    lab.dp.remove_vip(&EMPTY.key()).unwrap();
    lab.dp.add_vip(&other, EMPTY.vip_id, 0, EMPTY.mode).unwrap();
    let to = |addr| packet::tcp4(CLIENT4, addr, 40800, 80, b"x");
    let action = |lab: &Lab, addr| run(lab.dp.program().unwrap(), &to(addr)).unwrap().action;
    assert_eq!(action(&lab, web), XDP_TX);
    assert_eq!(
        action(&lab, shared),
        xdp_common::XDP_DROP,
        "its VIP, no backend"
    );
    // WEB4 goes: its address passes, the other VIP in the slot still matches.
    lab.dp.remove_vip(&WEB4.key()).unwrap();
    assert_eq!(action(&lab, web), xdp_common::XDP_PASS);
    assert_eq!(action(&lab, shared), xdp_common::XDP_DROP);
    lab.dp.remove_vip(&other).unwrap();
    assert_eq!(action(&lab, shared), xdp_common::XDP_PASS);
}
