//! The balancer through BPF_PROG_TEST_RUN: a table of packets, each with the
//! action, output bytes and counter changes it must produce, then the
//! conntrack / ring / backend-state behaviours that need several packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use integration_tests::{
    check_all,
    lab::{self, *},
    packet::{self, L3},
    require_root, run, run_on, Case,
};
use xdp_common::{
    backend_state, reason::*, FlowKey, PROTO_TCP, PROTO_UDP, XDP_DROP, XDP_PASS, XDP_TX,
};

const VLAN_L3: usize = L3 + 4;

fn ip4(vip: &LabVip) -> Ipv4Addr {
    match vip.addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("not an IPv4 VIP"),
    }
}

fn ip6(vip: &LabVip) -> Ipv6Addr {
    match vip.addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => panic!("not an IPv6 VIP"),
    }
}

/// A packet of flow `key` to `vip`, sent by the LB to the backend its ring
/// predicts; `flow_reason` is how it was placed (FLOW_RING: the ring
/// alone, its slot unchanged).
fn forwarded(
    name: &str,
    vip: &LabVip,
    frame: Vec<u8>,
    l3: usize,
    key: FlowKey,
    flow_reason: u32,
) -> Case {
    let backend = predicted_backend(vip, &ring_of(vip.backends), &key);
    let output = expected_forward(vip, &frame, l3, &key, backend);
    let tx = if vip.mode == xdp_common::fwd::L2_DSR {
        TX_L2_DSR
    } else {
        TX_ENCAP
    };
    let mut counters = vec![(tx, 1), (flow_reason, 1)];
    if l3 != L3 {
        counters.push((VLAN, 1));
    }
    Case {
        name: name.into(),
        input: frame,
        action: XDP_TX,
        output,
        counters,
    }
}

fn passed(name: &str, frame: Vec<u8>, why: u32) -> Case {
    Case {
        name: name.into(),
        output: frame.clone(),
        input: frame,
        action: XDP_PASS,
        counters: vec![(why, 1)],
    }
}

fn client_tcp4(vip: &LabVip, sport: u16) -> (Vec<u8>, FlowKey) {
    let frame = packet::tcp4(
        CLIENT4,
        ip4(vip),
        sport,
        vip.port,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let key = flow(CLIENT4.into(), vip.addr, sport, vip.port, PROTO_TCP);
    (frame, key)
}

fn client_tcp6(vip: &LabVip, sport: u16) -> (Vec<u8>, FlowKey) {
    let frame = packet::tcp6(CLIENT6, ip6(vip), sport, vip.port, b"hello");
    let key = flow(CLIENT6.into(), vip.addr, sport, vip.port, PROTO_TCP);
    (frame, key)
}

/// Cut a frame to `len` bytes.
fn cut(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len].to_vec()
}

/// Set the IPv4 total length (and fix the checksum).
fn with_tot_len(frame: &[u8], tot_len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[L3 + 2..L3 + 4].copy_from_slice(&tot_len.to_be_bytes());
    packet::fix_ipv4_checksum(&mut f, L3);
    f
}

fn table() -> Vec<Case> {
    let mut cases = Vec::new();

    // Every VIP kind and forwarding mode, new flows.
    let (f, k) = client_tcp4(&WEB4, 40001);
    cases.push(forwarded(
        "ipv4 tcp vip, new flow: IPIP to the ring's backend",
        &WEB4,
        f.clone(),
        L3,
        k,
        FLOW_RING,
    ));
    cases.push(forwarded(
        "ipv4 tcp vip, same flow again: conntrack hit",
        &WEB4,
        f,
        L3,
        k,
        FLOW_RING,
    ));
    for sport in [40002, 40003, 40004, 40005] {
        let (f, k) = client_tcp4(&WEB4, sport);
        cases.push(forwarded(
            &format!("ipv4 tcp vip, client port {sport}"),
            &WEB4,
            f,
            L3,
            k,
            FLOW_RING,
        ));
    }
    for dport in [5353u16, 53] {
        let f = packet::udp4(CLIENT4, ip4(&DNS4), 41000, dport, b"query");
        let k = flow(CLIENT4.into(), DNS4.addr, 41000, dport, PROTO_UDP);
        cases.push(forwarded(
            &format!("ipv4 udp to a port-less vip, port {dport}"),
            &DNS4,
            f,
            L3,
            k,
            FLOW_RING,
        ));
    }
    let (f, k) = client_tcp6(&WEB6, 40001);
    cases.push(forwarded(
        "ipv6 tcp vip: IPv6-in-IPv6",
        &WEB6,
        f,
        L3,
        k,
        FLOW_RING,
    ));
    let f = packet::udp6(CLIENT6, ip6(&DNS6), 41000, 53, b"query");
    let k = flow(CLIENT6.into(), DNS6.addr, 41000, 53, PROTO_UDP);
    cases.push(forwarded(
        "ipv6 udp vip: IPv6-in-IPv6",
        &DNS6,
        f,
        L3,
        k,
        FLOW_RING,
    ));
    let (f, k) = client_tcp4(&MIXED, 40001);
    cases.push(forwarded(
        "ipv4 vip with ipv6 backends: IPv4-in-IPv6",
        &MIXED,
        f,
        L3,
        k,
        FLOW_RING,
    ));
    let (f, k) = client_tcp4(&DSR, 40001);
    cases.push(forwarded(
        "L2 DSR: only the MAC addresses change",
        &DSR,
        f,
        L3,
        k,
        FLOW_RING,
    ));
    for sport in [1000, 2000, 3000] {
        let (f, k) = client_tcp4(&STICKY, sport);
        cases.push(forwarded(
            &format!("source-hash vip, client port {sport}: the client's backend"),
            &STICKY,
            f,
            L3,
            k,
            FLOW_RING,
        ));
    }

    // Ethernet padding: a bare ACK is padded to the 60-byte minimum frame;
    // the outer length covers only the IP packet.
    let (f, k) = {
        let mut f = packet::tcp4(CLIENT4, ip4(&WEB4), 40010, 80, b"");
        f.resize(60, 0);
        (f, flow(CLIENT4.into(), WEB4.addr, 40010, 80, PROTO_TCP))
    };
    cases.push(forwarded(
        "ipv4 tcp ack with ethernet padding",
        &WEB4,
        f,
        L3,
        k,
        FLOW_RING,
    ));

    // VLAN tags and IPv4 options.
    let (f, k) = client_tcp4(&WEB4, 40020);
    cases.push(forwarded(
        "802.1Q tagged ipv4: encapsulated, tag kept",
        &WEB4,
        packet::with_vlan(&f, 0x8100, 100),
        VLAN_L3,
        k,
        FLOW_RING,
    ));
    let (f, k) = client_tcp6(&WEB6, 40020);
    cases.push(forwarded(
        "802.1ad tagged ipv6: encapsulated, tag kept",
        &WEB6,
        packet::with_vlan(&f, 0x88a8, 7),
        VLAN_L3,
        k,
        FLOW_RING,
    ));
    for words in [1, 3, 10] {
        let (f, k) = client_tcp4(&WEB4, 40030 + words as u16);
        cases.push(forwarded(
            &format!("ipv4 with {words} words of options: found the ports past them"),
            &WEB4,
            packet::with_ipv4_options(&f, words),
            L3,
            k,
            FLOW_RING,
        ));
    }

    // Fragments and headers the balancer does not handle.
    let (f, _) = client_tcp4(&WEB4, 40040);
    cases.push(passed(
        "ipv4 first fragment (MF) to a vip",
        packet::as_ipv4_fragment(&f, true, 0),
        FRAGMENT,
    ));
    cases.push(passed(
        "ipv4 last fragment (offset 100) to a vip",
        packet::as_ipv4_fragment(&f, false, 100),
        FRAGMENT,
    ));
    let (f6, _) = client_tcp6(&WEB6, 40040);
    cases.push(passed(
        "ipv6 fragment header to a vip",
        packet::with_ipv6_extension(&f6, 44),
        FRAGMENT,
    ));
    cases.push(passed(
        "ipv6 hop-by-hop header to a vip",
        packet::with_ipv6_extension(&f6, 0),
        PASS_UNSUPPORTED,
    ));
    cases.push(passed(
        "ipv6 routing header to a vip",
        packet::with_ipv6_extension(&f6, 43),
        PASS_UNSUPPORTED,
    ));
    // Counted pass_not_vip on efc012d.
    for (what, next) in [("ESP", 50), ("AH", 51), ("Mobility", 135), ("HIP", 139)] {
        cases.push(passed(
            &format!("ipv6 {what} header to a vip"),
            packet::with_ipv6_extension(&f6, next),
            PASS_UNSUPPORTED,
        ));
    }
    cases.push(passed(
        "two VLAN tags (QinQ)",
        packet::with_vlan(&packet::with_vlan(&f, 0x8100, 5), 0x88a8, 6),
        PASS_UNSUPPORTED,
    ));

    // ICMP errors quoting a VIP flow go to the flow's backend; conntrack
    // already has WEB4 port 40001 and WEB6 port 40001 from above.
    let router4 = Ipv4Addr::new(198, 18, 200, 1);
    let reply = packet::tcp4(ip4(&WEB4), CLIENT4, 80, 40001, b"HTTP/1.1 200 OK\r\n");
    let icmp = packet::icmp4_frag_needed(router4, ip4(&WEB4), &reply);
    let k = flow(CLIENT4.into(), WEB4.addr, 40001, 80, PROTO_TCP);
    let backend = predicted_backend(&WEB4, &ring_of(WEB4.backends), &k);
    cases.push(Case {
        name: "icmp frag-needed quoting a tracked ipv4 vip flow".into(),
        output: expected_forward(&WEB4, &icmp, L3, &k, backend),
        input: icmp,
        action: XDP_TX,
        counters: vec![(TX_ICMP, 1)],
    });
    let reply = packet::tcp4(ip4(&WEB4), CLIENT4, 80, 49999, b"HTTP/1.1 200 OK\r\n");
    let icmp = packet::icmp4_frag_needed(router4, ip4(&WEB4), &reply);
    let k = flow(CLIENT4.into(), WEB4.addr, 49999, 80, PROTO_TCP);
    let backend = predicted_backend(&WEB4, &ring_of(WEB4.backends), &k);
    cases.push(Case {
        name: "icmp frag-needed quoting an untracked flow: the ring's owner, no state".into(),
        output: expected_forward(&WEB4, &icmp, L3, &k, backend),
        input: icmp,
        action: XDP_TX,
        counters: vec![(TX_ICMP, 1)],
    });
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);
    let reply6 = packet::tcp6(ip6(&WEB6), CLIENT6, 443, 40001, b"reply");
    let icmp6 = packet::icmp6_too_big(router6, ip6(&WEB6), &reply6);
    let k = flow(CLIENT6.into(), WEB6.addr, 40001, 443, PROTO_TCP);
    let backend = predicted_backend(&WEB6, &ring_of(WEB6.backends), &k);
    cases.push(Case {
        name: "icmpv6 packet-too-big quoting an ipv6 vip flow".into(),
        output: expected_forward(&WEB6, &icmp6, L3, &k, backend),
        input: icmp6,
        action: XDP_TX,
        counters: vec![(TX_ICMP, 1)],
    });
    let other = packet::tcp4(Ipv4Addr::new(198, 18, 9, 9), CLIENT4, 80, 40001, b"x");
    cases.push(passed(
        "icmp frag-needed quoting a non-vip flow",
        packet::icmp4_frag_needed(router4, Ipv4Addr::new(198, 18, 9, 9), &other),
        PASS_NOT_VIP,
    ));
    cases.push(passed(
        "icmp echo to a vip address",
        packet::icmp4_echo(CLIENT4, ip4(&WEB4)),
        PASS_NOT_VIP,
    ));

    // Not for a VIP.
    cases.push(passed(
        "tcp to a non-vip address",
        packet::tcp4(CLIENT4, Ipv4Addr::new(198, 18, 0, 99), 40000, 80, b"x"),
        PASS_NOT_VIP,
    ));
    cases.push(passed(
        "tcp to a vip address, other port",
        packet::tcp4(CLIENT4, ip4(&WEB4), 40000, 8080, b"x"),
        PASS_NOT_VIP,
    ));
    cases.push(passed(
        "udp to a tcp vip's port",
        packet::udp4(CLIENT4, ip4(&WEB4), 40000, 80, b"x"),
        PASS_NOT_VIP,
    ));
    cases.push(passed(
        "tcp to a udp port-less vip",
        packet::tcp4(CLIENT4, ip4(&DNS4), 40000, 53, b"x"),
        PASS_NOT_VIP,
    ));
    cases.push(passed(
        "ipv6 tcp to a non-vip address",
        packet::tcp6(
            CLIENT6,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99),
            1,
            443,
            b"x",
        ),
        PASS_NOT_VIP,
    ));
    cases.push(passed("arp", packet::arp(), PASS_NOT_VIP));

    // No backend.
    let (f, _) = client_tcp4(&EMPTY, 40001);
    cases.push(Case {
        name: "vip with an empty ring: dropped".into(),
        output: f.clone(),
        input: f,
        action: XDP_DROP,
        counters: vec![(NO_BACKEND, 1)],
    });

    // Truncated or inconsistent headers, at every layer.
    let (f, _) = client_tcp4(&WEB4, 40050);
    let (f6, _) = client_tcp6(&WEB6, 40050);
    let udp = packet::udp4(CLIENT4, ip4(&DNS4), 41000, 53, b"query");
    let tagged = packet::with_vlan(&f, 0x8100, 100);
    let mut bad_version = f.clone();
    bad_version[L3] = 0x55;
    let mut ihl4 = f.clone();
    ihl4[L3] = 0x44;
    packet::fix_ipv4_checksum(&mut ihl4, L3);
    let mut ihl15 = f.clone();
    ihl15[L3] = 0x4f;
    let mut v6_bad_version = f6.clone();
    v6_bad_version[L3] = 0x45;
    let mut v6_long = f6.clone();
    v6_long[L3 + 4..L3 + 6].copy_from_slice(&2000u16.to_be_bytes());
    let reply = packet::tcp4(ip4(&WEB4), CLIENT4, 80, 40001, b"");
    let reply6 = packet::tcp6(ip6(&WEB6), CLIENT6, 443, 40001, b"");
    for (name, frame) in [
        ("vlan tag cut short", cut(&tagged, 16)),
        ("ipv4 header cut short", cut(&f, L3 + 10)),
        ("ipv4 version field is 5", bad_version),
        ("ipv4 IHL 4 (below the minimum)", ihl4),
        ("ipv4 IHL 15 beyond the packet's total length", ihl15),
        ("ipv4 total length beyond the frame", with_tot_len(&f, 1500)),
        (
            "ipv4 total length below the header length",
            with_tot_len(&f, 16),
        ),
        (
            "tcp header cut short inside the ip packet",
            with_tot_len(&cut(&f, L3 + 30), 30),
        ),
        (
            "udp header cut short inside the ip packet",
            with_tot_len(&cut(&udp, L3 + 24), 24),
        ),
        (
            "tcp header cut short with the ip length intact",
            cut(&f, L3 + 30),
        ),
        ("ipv6 header cut short", cut(&f6, L3 + 30)),
        ("ipv6 version field is 4", v6_bad_version),
        ("ipv6 payload length beyond the frame", v6_long),
        (
            "icmp frag-needed with its quote cut short",
            packet::icmp4_frag_needed(router4, ip4(&WEB4), &reply[..L3 + 10]),
        ),
        (
            "icmpv6 too-big with its quote cut short",
            packet::icmp6_too_big(router6, ip6(&WEB6), &reply6[..L3 + 30]),
        ),
        (
            "icmp frag-needed quoting only the ip header",
            packet::icmp4_frag_needed(router4, ip4(&WEB4), &reply[..L3 + 20]),
        ),
    ] {
        cases.push(passed(&format!("malformed: {name}"), frame, MALFORMED));
    }
    cases
}

#[test]
fn every_path_matches_the_table() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().expect("loading the lab");
    check_all(&lab, &table());
}

#[test]
fn fragment_and_malformed_actions_follow_config() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().expect("loading the lab");
    let (f, _) = client_tcp4(&WEB4, 40060);
    let fragment = packet::as_ipv4_fragment(&f, true, 0);
    let malformed = cut(&f, L3 + 10);
    let drop = |name: &str, frame: &Vec<u8>, why| Case {
        name: name.into(),
        input: frame.clone(),
        output: frame.clone(),
        action: XDP_DROP,
        counters: vec![(why, 1)],
    };
    let mut config = lab_config();
    config.fragment_action = XDP_DROP;
    lab.dp.set_config(&config).unwrap();
    check_all(
        &lab,
        &[
            drop("fragment, fragment_action=drop", &fragment, FRAGMENT),
            passed(
                "malformed, malformed_action=pass",
                malformed.clone(),
                MALFORMED,
            ),
        ],
    );
    config.fragment_action = XDP_PASS;
    config.malformed_action = XDP_DROP;
    lab.dp.set_config(&config).unwrap();
    check_all(
        &lab,
        &[
            passed("fragment, fragment_action=pass", fragment, FRAGMENT),
            drop("malformed, malformed_action=drop", &malformed, MALFORMED),
        ],
    );
    // An action outside pass/drop is never taken (TX of garbage, ABORTED).
    config.malformed_action = 77;
    lab.dp.set_config(&config).unwrap();
    check_all(
        &lab,
        &[passed(
            "malformed, nonsense action: pass",
            malformed,
            MALFORMED,
        )],
    );
}

/// The backend a test run sent `frame` to, read from the conntrack table
/// (`None`: untracked, as every flow in a slot that never changed is).
fn tracked_backend(lab: &Lab, key: &FlowKey) -> Option<u32> {
    lab.dp
        .flow(key)
        .expect("reading FLOWS")
        .map(|s| s.backend_id)
}

fn send(lab: &Lab, frame: &[u8]) -> u32 {
    run(lab.dp.program().unwrap(), frame)
        .expect("test run")
        .action
}

/// The backend of `vip` a run of `frame` (flow `k`) was sent to, read from
/// the output bytes.
fn sent_to(lab: &Lab, vip: &LabVip, frame: &[u8], k: &FlowKey) -> u32 {
    let r = run(lab.dp.program().unwrap(), frame).expect("test run");
    assert_eq!(r.action, XDP_TX);
    vip.backends
        .iter()
        .copied()
        .find(|&b| r.output == expected_forward(vip, frame, L3, k, b))
        .expect("forwarded to one of the VIP's backends")
}

fn syn(frame: Vec<u8>) -> Vec<u8> {
    packet::with_tcp_flags(frame, packet::TCP_SYN)
}

/// A client port of WEB4 whose flow the standard ring sends to `backend`.
fn port_for(backend: u32, from: u16) -> u16 {
    (from..)
        .find(|&p| {
            let k = flow(CLIENT4.into(), WEB4.addr, p, 80, PROTO_TCP);
            predicted_backend(&WEB4, &ring_of(WEB4.backends), &k) == backend
        })
        .expect("some port maps to every backend")
}

#[test]
fn flows_keep_their_backend_across_a_ring_change_with_state_only_where_it_moved() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let key = WEB4.key();
    // Three flows, one per backend: placed by the ring alone, no state.
    let ports: Vec<u16> = (0..3)
        .map(|b| port_for(b, 30000 + b as u16 * 1000))
        .collect();
    let stats = lab.stats();
    for &p in &ports {
        let (f, k) = client_tcp4(&WEB4, p);
        assert_eq!(send(&lab, &f), XDP_TX);
        assert_eq!(tracked_backend(&lab, &k), None, "flow {p} untracked");
    }
    assert_eq!(
        lab.stats()[FLOW_RING as usize] - stats[FLOW_RING as usize],
        3
    );
    assert_eq!(lab.dp.flow_count().unwrap(), 0);
    let before = lab.dp.vip(&key).unwrap().unwrap().active_ring;
    // The new ring sends everything to backend 2; 0 and 1 stay up, so the
    // slots they gave away are marked.
    let new_ring = ring_of(&[2]);
    lab.dp.write_ring(&key, &new_ring).unwrap();
    assert_ne!(
        lab.dp.vip(&key).unwrap().unwrap().active_ring,
        before,
        "the write flipped the live half"
    );
    assert_eq!(lab.dp.ring(&key).unwrap(), new_ring);
    let marks = lab.dp.marks().unwrap();
    let moved = ring_of(WEB4.backends).iter().filter(|&&b| b != 2).count();
    assert_eq!(marks.len(), moved, "one mark per slot that changed owner");
    let stats = lab.stats();
    for (b, &p) in ports.iter().enumerate() {
        let (f, k) = client_tcp4(&WEB4, p);
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(r.action, XDP_TX);
        assert_eq!(
            r.output,
            expected_forward(&WEB4, &f, L3, &k, b as u32),
            "established flow {p} stays on backend {b}"
        );
    }
    // Backends 0 and 1: taken for flows from before the change, now
    // tracked; backend 2's slot never moved.
    assert_eq!(
        lab.stats()[FLOW_PREVIOUS as usize] - stats[FLOW_PREVIOUS as usize],
        2
    );
    for (b, &p) in ports.iter().enumerate().take(2) {
        let (_, k) = client_tcp4(&WEB4, p);
        assert_eq!(tracked_backend(&lab, &k), Some(b as u32));
    }
    assert_eq!(
        lab.stats()[FLOW_RING as usize] - stats[FLOW_RING as usize],
        1
    );
    // A new connection (SYN) in a moved slot follows the new ring, tracked.
    let (f, k) = client_tcp4(&WEB4, port_for(0, 50000));
    let f = syn(f);
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(r.output, expected_forward(&WEB4, &f, L3, &k, 2));
    assert_eq!(tracked_backend(&lab, &k), Some(2));
}

#[test]
fn flows_of_a_down_backend_are_placed_again() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let p = port_for(1, 30000);
    let (f, k) = client_tcp4(&WEB4, p);
    assert_eq!(sent_to(&lab, &WEB4, &f, &k), 1);

    // Marked down but still in the ring: not forwarded to a dead backend.
    lab.dp.set_backend_state(1, backend_state::DOWN).unwrap();
    let stats = lab.stats();
    let drops = lab.dp.vip_drops(WEB4.vip_id).unwrap();
    assert_eq!(send(&lab, &f), XDP_DROP);
    assert_eq!(
        lab.stats()[NO_BACKEND as usize] - stats[NO_BACKEND as usize],
        1
    );
    // Counted for its VIP too, and for no other.
    assert_eq!(
        lab.dp.vip_drops(WEB4.vip_id).unwrap().no_backend - drops.no_backend,
        1
    );
    assert_eq!(lab.dp.vip_drops(DNS4.vip_id).unwrap().no_backend, 0);

    // Ring rebuilt without it: the flow is placed again by the ring, and
    // tracked there (its slot changed owner), so it stays when backend 1
    // comes back up.
    let ring = ring_of(&[0, 2]);
    lab.dp.write_ring(&WEB4.key(), &ring).unwrap();
    let expected = predicted_backend(&WEB4, &ring, &k);
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output, expected_forward(&WEB4, &f, L3, &k, expected));
    assert_eq!(tracked_backend(&lab, &k), Some(expected));
    lab.dp.set_backend_state(1, backend_state::UP).unwrap();
    assert_eq!(sent_to(&lab, &WEB4, &f, &k), expected, "it stays placed");
    lab.dp.set_backend_state(1, backend_state::DOWN).unwrap();

    // Removed outright: same.
    let p = port_for(0, 40000);
    let (f, k) = client_tcp4(&WEB4, p);
    lab.dp.set_backend_state(1, backend_state::UP).unwrap();
    lab.dp
        .write_ring(&WEB4.key(), &ring_of(WEB4.backends))
        .unwrap();
    assert_eq!(sent_to(&lab, &WEB4, &f, &k), 0);
    lab.dp.remove_backend(0).unwrap();
    lab.dp.write_ring(&WEB4.key(), &ring_of(&[1, 2])).unwrap();
    assert_ne!(
        sent_to(&lab, &WEB4, &f, &k),
        0,
        "a removed backend's flow moved"
    );
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_connections() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let p = port_for(1, 30000);
    let (f, k) = client_tcp4(&WEB4, p);
    assert_eq!(send(&lab, &f), XDP_TX);
    lab.dp
        .set_backend_state(1, backend_state::DRAINING)
        .unwrap();
    lab.dp.write_ring(&WEB4.key(), &ring_of(&[0, 2])).unwrap();
    for _ in 0..3 {
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(
            r.output,
            expected_forward(&WEB4, &f, L3, &k, 1),
            "existing flow stays on the draining backend"
        );
    }
    // A new connection the old ring would have given backend 1 goes
    // elsewhere.
    let p2 = port_for(1, p + 1);
    let (f2, k2) = client_tcp4(&WEB4, p2);
    assert_eq!(send(&lab, &syn(f2)), XDP_TX);
    let got = tracked_backend(&lab, &k2).unwrap();
    assert_ne!(got, 1);
    assert_eq!(got, predicted_backend(&WEB4, &ring_of(&[0, 2]), &k2));
}

#[test]
fn vip_and_backend_counters_add_up() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut bytes = 0u64;
    let mut per_backend = [0u64; 3];
    let flows = 20u16;
    for p in 0..flows {
        let (f, k) = client_tcp4(&WEB4, 20000 + p);
        let b = predicted_backend(&WEB4, &ring_of(WEB4.backends), &k);
        // A connection: its SYN counts the new flow.
        for frame in [syn(f.clone()), f.clone(), f] {
            assert_eq!(send(&lab, &frame), XDP_TX);
            bytes += frame.len() as u64;
            per_backend[b as usize] += 1;
        }
    }
    let vip = lab.dp.vip_stats(WEB4.vip_id).unwrap();
    assert_eq!(vip.packets, 3 * u64::from(flows));
    assert_eq!(vip.bytes, bytes);
    assert_eq!(vip.new_flows, u64::from(flows));
    for (b, &n) in per_backend.iter().enumerate() {
        assert_eq!(
            lab.dp.backend_stats(b as u32).unwrap().packets,
            n,
            "backend {b}"
        );
    }
    assert_eq!(lab.dp.vip_stats(DNS4.vip_id).unwrap().packets, 0);
}

#[test]
fn bad_dataplane_requests_are_refused_and_change_nothing() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let key = WEB4.key();
    let ring = lab.dp.ring(&key).unwrap();
    assert!(lab.dp.write_ring(&key, &ring[..5]).is_err(), "short ring");
    let mut bad = ring.clone();
    bad[3] = lab::SIZES.max_backends;
    assert!(
        lab.dp.write_ring(&key, &bad).is_err(),
        "ring naming an out-of-range backend"
    );
    assert_eq!(lab.dp.ring(&key).unwrap(), ring);
    assert!(
        lab.dp.add_vip(&key, lab::SIZES.max_vips, 0, 0).is_err(),
        "vip id out of range"
    );
    assert_eq!(lab.dp.vip(&key).unwrap().unwrap().vip_id, WEB4.vip_id);
    assert!(
        lab.dp.set_backend_state(15, backend_state::UP).is_err(),
        "unconfigured backend"
    );
    assert!(lab.dp.set_backend_state(0, 42).is_err(), "unknown state");
    assert_eq!(lab.dp.backend(0).unwrap().state, backend_state::UP);
    assert!(
        xdp_user::dataplane::Dataplane::load(xdp_user::dataplane::Sizes {
            ring_size: 0,
            ..lab::SIZES
        })
        .is_err()
    );
    assert!(
        xdp_user::dataplane::Dataplane::load(xdp_user::dataplane::Sizes {
            max_vips: 1 << 20,
            ring_size: 65537,
            ..lab::SIZES
        })
        .is_err(),
        "ring entries beyond 2^32"
    );
}

#[test]
fn source_hash_vip_pins_a_client_to_one_backend() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for p in 0..50 {
        let (f, k) = client_tcp4(&STICKY, 10000 + p);
        seen.insert(sent_to(&lab, &STICKY, &f, &k));
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    // Different clients do spread.
    let mut clients = std::collections::BTreeSet::new();
    for c in 1..=50u8 {
        let src = Ipv4Addr::new(198, 18, 101, c);
        let f = packet::tcp4(src, ip4(&STICKY), 5000, 80, b"x");
        let k = flow(src.into(), STICKY.addr, 5000, 80, PROTO_TCP);
        clients.insert(sent_to(&lab, &STICKY, &f, &k));
    }
    assert_eq!(clients.len(), 3, "50 clients reach all three backends");
}

#[test]
fn each_hash_choice_places_by_its_fields() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let ring = ring_of(STICKY.backends);
    for (flags, ports_share, clients_share) in [
        (xdp_common::VIP_F_HASH_SOURCE_PORT, false, false),
        (xdp_common::VIP_F_HASH_NO_SOURCE_PORT, true, false),
        (xdp_common::VIP_F_SOURCE_HASH, true, false),
    ] {
        let vip = LabVip { flags, ..STICKY };
        lab.dp
            .add_vip(&vip.key(), vip.vip_id, flags, vip.mode)
            .unwrap();
        // One client from 50 ports, then 50 clients from one port: every
        // packet lands where the hash over the chosen fields says.
        let mut ports = std::collections::BTreeSet::new();
        let mut clients = std::collections::BTreeSet::new();
        for i in 0..50u16 {
            let (f, k) = client_tcp4(&vip, 10000 + i);
            let b = sent_to(&lab, &vip, &f, &k);
            assert_eq!(b, predicted_backend(&vip, &ring, &k), "flags {flags}");
            ports.insert(b);
            let src = Ipv4Addr::new(198, 18, 101, i as u8 + 1);
            let f = packet::tcp4(src, ip4(&vip), 5000, 80, b"x");
            let k = flow(src.into(), vip.addr, 5000, 80, PROTO_TCP);
            let b = sent_to(&lab, &vip, &f, &k);
            assert_eq!(b, predicted_backend(&vip, &ring, &k), "flags {flags}");
            clients.insert(b);
        }
        assert_eq!(ports.len() == 1, ports_share, "flags {flags}: {ports:?}");
        assert_eq!(
            clients.len() == 1,
            clients_share,
            "flags {flags}: {clients:?}"
        );
    }
}

/// A QUIC packet with a short header whose connection ID starts with
/// `first`, then `id` (two octets).
fn quic_short(first: u8, id: u16) -> Vec<u8> {
    let mut p = vec![0x40 | 0x01, first];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0xab; 5]);
    p.extend_from_slice(&[0x5a; 24]);
    p
}

/// A QUIC version 1 long-header packet of `kind` (0 Initial .. 3 Retry)
/// whose destination connection ID starts with `first`, then `id`.
fn quic_long(kind: u8, first: u8, id: u16, dcid_len: u8) -> Vec<u8> {
    let mut p = vec![0xc0 | (kind << 4)];
    p.extend_from_slice(&1u32.to_be_bytes());
    p.push(dcid_len);
    p.push(first);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0xab; 5]);
    p.extend_from_slice(&[0x5a; 40]);
    p
}

#[test]
fn quic_packets_follow_the_server_id_in_their_connection_id() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let flags = xdp_common::VIP_F_QUIC | (2 << xdp_common::quic::SERVER_ID_LEN_SHIFT);
    let vip = LabVip { flags, ..DNS4 };
    let ring = ring_of(vip.backends);
    lab.dp
        .add_vip(&vip.key(), vip.vip_id, flags, vip.mode)
        .unwrap();
    let server = |id: u32| xdp_common::QuicServerKey {
        vip_id: vip.vip_id,
        server_id: id,
    };
    // Server id 0x0102 is backend 8's; 0x0a0b is 9's.
    let servers = [(server(0x0102), 8), (server(0x0a0b), 9)].into();
    lab.dp.sync_quic_servers(&servers, false).unwrap();
    let send = |lab: &Lab, sport: u16, payload: &[u8]| {
        let src = Ipv4Addr::new(198, 18, 101, (sport % 200) as u8 + 1);
        let f = packet::udp4(src, ip4(&vip), sport, 443, payload);
        let k = flow(src.into(), vip.addr, sport, 443, PROTO_UDP);
        (
            sent_to(lab, &vip, &f, &k),
            predicted_backend(&vip, &ring, &k),
        )
    };
    let counted = |lab: &Lab, before: &[u64], r: u32| lab.stats()[r as usize] - before[r as usize];

    // A client that moves (another address and port each packet) stays on
    // its server, for short headers and Handshake packets alike.
    let before = lab.stats();
    for port in 0..40 {
        assert_eq!(send(&lab, 30000 + port * 7, &quic_short(0x1f, 0x0102)).0, 8);
        assert_eq!(
            send(&lab, 30001 + port * 7, &quic_long(2, 0x00, 0x0a0b, 8)).0,
            9
        );
    }
    assert_eq!(counted(&lab, &before, QUIC_ROUTED), 80);

    // Initial and 0-RTT packets carry the client's own CID: the hash
    // places them, and nothing is counted.
    let before = lab.stats();
    for (i, kind) in [0u8, 1].into_iter().enumerate() {
        for port in 0..20 {
            let (to, hashed) = send(
                &lab,
                40000 + port + 100 * i as u16,
                &quic_long(kind, 0, 0x0102, 8),
            );
            assert_eq!(to, hashed, "kind {kind}");
        }
    }
    assert_eq!(counted(&lab, &before, QUIC_ROUTED), 0);
    assert_eq!(counted(&lab, &before, QUIC_UNKNOWN), 0);

    // Unknown ids, CIDs marked not routable (config rotation 0b111), and
    // payloads that are not QUIC or are cut short go by the hash, counted.
    let before = lab.stats();
    for port in 0..10 {
        let (to, hashed) = send(&lab, 50000 + port, &quic_short(0x00, 0x0999));
        assert_eq!(to, hashed);
        let (to, hashed) = send(&lab, 50100 + port, &quic_short(0xe0, 0x0102));
        assert_eq!(to, hashed);
        let (to, hashed) = send(&lab, 50200 + port, &[0x00, 0x01, 0x02]);
        assert_eq!(to, hashed);
        let (to, hashed) = send(&lab, 50300 + port, &quic_long(2, 0x00, 0x0102, 2));
        assert_eq!(to, hashed, "a DCID too short for the server id");
        let (to, hashed) = send(&lab, 50400 + port, &[0x41, 0x00]);
        assert_eq!(to, hashed);
    }
    assert_eq!(counted(&lab, &before, QUIC_UNKNOWN), 20);
    assert_eq!(counted(&lab, &before, QUIC_MALFORMED), 30);
    assert_eq!(counted(&lab, &before, QUIC_ROUTED), 0);

    // A draining server keeps its connections; a down one loses them to
    // the hash, as does a server whose id is taken away.
    lab.dp
        .set_backend_state(8, backend_state::DRAINING)
        .unwrap();
    assert_eq!(send(&lab, 60000, &quic_short(0, 0x0102)).0, 8);
    lab.dp.set_backend_state(8, backend_state::DOWN).unwrap();
    // (A port the hash gives another backend: the lab's ring still holds 8.)
    let port = (60001..)
        .find(|&p| {
            let src = Ipv4Addr::new(198, 18, 101, (p % 200) as u8 + 1);
            let k = flow(src.into(), vip.addr, p, 443, PROTO_UDP);
            predicted_backend(&vip, &ring, &k) != 8
        })
        .unwrap();
    let (to, hashed) = send(&lab, port, &quic_short(0, 0x0102));
    assert_eq!((to, hashed == 8), (hashed, false));
    lab.dp.set_backend_state(8, backend_state::UP).unwrap();
    lab.dp
        .sync_quic_servers(&[(server(0x0a0b), 9)].into(), false)
        .unwrap();
    let before = lab.stats();
    let (to, hashed) = send(&lab, 60002, &quic_short(0, 0x0102));
    assert_eq!(to, hashed);
    assert_eq!(counted(&lab, &before, QUIC_UNKNOWN), 1);
    assert_eq!(lab.dp.quic_servers().unwrap().len(), 1);

    // The same packets to a UDP VIP without QUIC routing go by the hash.
    lab.dp
        .add_vip(&DNS4.key(), DNS4.vip_id, 0, DNS4.mode)
        .unwrap();
    for port in 0..20 {
        let (to, hashed) = send(&lab, 61000 + port, &quic_short(0, 0x0a0b));
        assert_eq!(to, hashed);
    }
}

#[test]
fn a_default_size_ring_round_trips() {
    if !require_root() {
        return;
    }
    let sizes = xdp_user::dataplane::Sizes {
        max_vips: 2,
        ..xdp_user::dataplane::Sizes::default()
    };
    let mut dp = xdp_user::dataplane::Dataplane::load(sizes).unwrap();
    let key = WEB4.key();
    dp.add_vip(&key, 1, 0, xdp_common::fwd::ENCAP).unwrap();
    for round in 0..3u32 {
        let ring: Vec<u32> = (0..sizes.ring_size)
            .map(|i| (i * 7 + round) % 1000)
            .collect();
        let started = std::time::Instant::now();
        dp.write_ring(&key, &ring).unwrap();
        let took = started.elapsed();
        assert_eq!(dp.ring(&key).unwrap(), ring, "round {round}");
        println!("ring of {} slots written in {took:?}", sizes.ring_size);
    }
}

#[test]
fn a_reused_backend_id_never_carries_another_vips_flows() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let p = port_for(1, 30000);
    let (f, k) = client_tcp4(&WEB4, p);
    assert_eq!(sent_to(&lab, &WEB4, &f, &k), 1);
    // Backend 1 leaves WEB4 and its id is handed to another VIP's backend,
    // up and healthy, while WEB4's ring moves on without it.
    lab.dp.write_ring(&WEB4.key(), &ring_of(&[0, 2])).unwrap();
    let mut other = lab.dp.backend(1).unwrap();
    other.vip_id = DNS4.vip_id;
    lab.dp.set_backend(1, &other).unwrap();
    let stats = lab.stats();
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    let moved_to = predicted_backend(&WEB4, &ring_of(&[0, 2]), &k);
    assert_eq!(
        r.output,
        expected_forward(&WEB4, &f, L3, &k, moved_to),
        "re-selected within WEB4"
    );
    assert_eq!(tracked_backend(&lab, &k), Some(moved_to));
    // Not taken for the slot's previous owner: that one is gone.
    assert_eq!(
        lab.stats()[FLOW_PREVIOUS as usize] - stats[FLOW_PREVIOUS as usize],
        0
    );
    assert_eq!(lab.stats()[FLOW_NEW as usize] - stats[FLOW_NEW as usize], 1);
}

/// The per-CPU flow cache in front of VIPS and FLOWS never outlives what
/// the controller changes: a VIP's new mode, its removal, a backend going
/// down and coming back. Each step sends the same established flow again
/// on the CPU that cached it.
#[test]
fn a_cached_flow_follows_every_change_the_controller_makes() {
    if !require_root() {
        return;
    }
    integration_tests::pin_to_cpu0();
    let mut lab = Lab::new().unwrap();
    let p = port_for(1, 30000);
    let (f, k) = client_tcp4(&WEB4, p);
    for _ in 0..3 {
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(r.output, expected_forward(&WEB4, &f, L3, &k, 1));
    }

    // The backend goes down, the ring moves on, it comes back: conntrack
    // re-placed the flow while it was down, and the flow stays re-placed.
    lab.dp.set_backend_state(1, backend_state::DOWN).unwrap();
    let ring = ring_of(&[0, 2]);
    lab.dp.write_ring(&WEB4.key(), &ring).unwrap();
    let moved = predicted_backend(&WEB4, &ring, &k);
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(r.output, expected_forward(&WEB4, &f, L3, &k, moved));
    lab.dp.set_backend_state(1, backend_state::UP).unwrap();
    for _ in 0..2 {
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(
            r.output,
            expected_forward(&WEB4, &f, L3, &k, moved),
            "the flow stays where conntrack put it"
        );
    }

    // The VIP changes mode: the next packet leaves in the new one.
    let key = WEB4.key();
    lab.dp
        .add_vip(&key, WEB4.vip_id, WEB4.flags, xdp_common::fwd::L2_DSR)
        .unwrap();
    let stats = lab.stats();
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.output.len(), f.len(), "L2 DSR adds no header");
    assert_eq!(
        lab.stats()[TX_L2_DSR as usize] - stats[TX_L2_DSR as usize],
        1
    );

    // The VIP goes (its backends still up) while another port of its
    // address stays a VIP: its packets pass untouched.
    let neighbour = xdp_common::VipKey {
        port: 81u16.to_be(),
        ..key
    };
    // (The lab's VIPS is full: STICKY makes room.)
    lab.dp.remove_vip(&STICKY.key()).unwrap();
    lab.dp
        .add_vip(&neighbour, STICKY.vip_id, 0, xdp_common::fwd::ENCAP)
        .unwrap();
    assert_eq!(send(&lab, &f), XDP_TX, "cached again");
    lab.dp.remove_vip(&key).unwrap();
    let stats = lab.stats();
    let r = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.output, f);
    assert_eq!(
        lab.stats()[PASS_NOT_VIP as usize] - stats[PASS_NOT_VIP as usize],
        1
    );
}

/// A client reusing a 5-tuple opens a new connection with a SYN, which the
/// ring places afresh; the packets after it go where the SYN went, not
/// where the flow cache last saw the old connection.
#[test]
fn a_reused_5_tuple_follows_its_new_syn_not_the_cache() {
    if !require_root() {
        return;
    }
    integration_tests::pin_to_cpu0();
    let mut lab = Lab::new().unwrap();
    let p = port_for(1, 30000);
    let (f, k) = client_tcp4(&WEB4, p);
    assert_eq!(send(&lab, &f), XDP_TX);
    // The ring moves on; backend 1 stays up and keeps the old connection,
    // which is cached there again.
    let ring = ring_of(&[0, 2]);
    lab.dp.write_ring(&WEB4.key(), &ring).unwrap();
    for _ in 0..2 {
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(r.output, expected_forward(&WEB4, &f, L3, &k, 1));
    }
    // The new connection's SYN goes where the ring says, and so does the
    // rest of it.
    let placed = predicted_backend(&WEB4, &ring, &k);
    assert_ne!(placed, 1);
    let syn = packet::with_tcp_flags(f.clone(), packet::TCP_SYN);
    let r = run(lab.dp.program().unwrap(), &syn).unwrap();
    assert_eq!(r.output, expected_forward(&WEB4, &syn, L3, &k, placed));
    for _ in 0..2 {
        let r = run(lab.dp.program().unwrap(), &f).unwrap();
        assert_eq!(
            r.output,
            expected_forward(&WEB4, &f, L3, &k, placed),
            "the new connection's packets follow its SYN"
        );
    }
    assert_eq!(tracked_backend(&lab, &k), Some(placed));
}

/// Two LB hosts of an ECMP group with the same rings: a flow whose SYN one
/// host saw and whose middle the other gets goes to the same backend, with
/// no state on either (its slot never changed); once backend 1 drains on
/// both, a flow both had carried keeps it on either.
#[test]
fn a_flow_that_changes_lb_host_keeps_its_backend() {
    if !require_root() {
        return;
    }
    let mut hosts = [Lab::new().unwrap(), Lab::new().unwrap()];
    for p in 30000..30040u16 {
        let (f, k) = client_tcp4(&WEB4, p);
        let on_a = sent_to(&hosts[0], &WEB4, &syn(f.clone()), &k);
        assert_eq!(sent_to(&hosts[0], &WEB4, &f, &k), on_a);
        assert_eq!(
            sent_to(&hosts[1], &WEB4, &f, &k),
            on_a,
            "flow {p} on the other host"
        );
    }
    assert_eq!(
        hosts[1].dp.flow_count().unwrap(),
        0,
        "no state on the host that got the middle"
    );
    let p = port_for(1, 31000);
    let (f, k) = client_tcp4(&WEB4, p);
    for h in &hosts {
        assert_eq!(sent_to(h, &WEB4, &f, &k), 1);
    }
    for h in &mut hosts {
        h.dp.set_backend_state(1, backend_state::DRAINING).unwrap();
        h.dp.write_ring(&WEB4.key(), &ring_of(&[0, 2])).unwrap();
    }
    for (i, h) in hosts.iter().enumerate().rev() {
        assert_eq!(sent_to(h, &WEB4, &f, &k), 1, "host {i} after the drain");
    }
}

#[test]
fn frames_that_arrive_on_an_extra_uplink_leave_to_its_router() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (frame, key) = client_tcp4(&WEB4, 40000);
    let b = predicted_backend(&WEB4, &ring_of(WEB4.backends), &key);
    let main = expected_forward(&WEB4, &frame, L3, &key, b);
    // Two interfaces of a namespace of the test's own: u0 the main one,
    // u1 the extra uplink.
    let ns = integration_tests::netns::Netns::new("uplink-frames").unwrap();
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])
        .unwrap();
    let router: [u8; 6] = [2, 0, 0, 0, 0x30, 1];
    integration_tests::topology::in_ns(&ns, || {
        let index = |name| xdp_user::iface::require(name).unwrap();
        let (u0, u1) = (index("u0").index, index("u1"));
        let on =
            |lab: &Lab, ingress: u32| run_on(lab.dp.program().unwrap(), &frame, ingress).unwrap();
        // One interface: CONFIG's next hop, whatever the frame arrived on.
        let r = on(&lab, u1.index);
        assert_eq!((r.action, &r.output), (XDP_TX, &main));

        lab.dp.set_uplinks(&[("u1".to_owned(), router)]).unwrap();
        assert_eq!(lab.dp.config().unwrap().uplinks, 1);
        let r = on(&lab, u1.index);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(&r.output[..6], &router, "to the uplink's router");
        assert_eq!(
            &r.output[6..12],
            &u1.mac.unwrap(),
            "from the uplink's own MAC"
        );
        assert_eq!(&r.output[12..], &main[12..], "the rest as through u0");
        // Arriving on the main interface: CONFIG's next hop.
        let r = on(&lab, u0);
        assert_eq!((r.action, &r.output), (XDP_TX, &main));

        lab.dp.set_uplinks(&[]).unwrap();
        assert_eq!(lab.dp.config().unwrap().uplinks, 0);
        let r = on(&lab, u1.index);
        assert_eq!((r.action, &r.output), (XDP_TX, &main), "the uplink removed");
    })
    .unwrap();
}
