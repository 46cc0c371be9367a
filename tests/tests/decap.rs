//! The backend-side `decap` program restores the exact inner packet the
//! balancer encapsulated, and leaves everything else alone.

use std::net::{IpAddr, Ipv4Addr};

use integration_tests::{
    lab::{Lab, CLIENT4, CLIENT6, DNS4, MIXED, WEB4, WEB6},
    packet::{self, L3},
    require_root, run,
};
use xdp_common::{decap_reason, XDP_PASS, XDP_TX};
use xdp_user::dataplane::Decap;

fn ip4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("not IPv4"),
    }
}

/// What the balancer sends for `frame`.
fn encapsulated(lab: &Lab, frame: &[u8]) -> Vec<u8> {
    let r = run(lab.dp.program().unwrap(), frame).unwrap();
    assert_eq!(r.action, XDP_TX, "the balancer forwards the test packet");
    r.output
}

fn decap_stats(d: &Decap) -> [u64; decap_reason::COUNT as usize] {
    d.stats().unwrap()
}

#[test]
fn decap_restores_the_inner_packet() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut decap = Decap::load(8).expect("decap loads");
    decap.set_vips(&[WEB4.addr, WEB6.addr, MIXED.addr]).unwrap();
    let web4 = ip4(WEB4.addr);
    let web6 = match WEB6.addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!(),
    };
    let mut padded = packet::tcp4(CLIENT4, web4, 40100, 80, b"");
    padded.resize(60, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IPIP", packet::tcp4(CLIENT4, web4, 40100, 80, b"GET /")),
        (
            "IPv6-in-IPv6",
            packet::tcp6(CLIENT6, web6, 40100, 443, b"hello"),
        ),
        (
            "IPv4-in-IPv6",
            packet::tcp4(CLIENT4, ip4(MIXED.addr), 40100, 80, b"GET /"),
        ),
        (
            "IPIP, 802.1Q tagged",
            packet::with_vlan(&packet::tcp4(CLIENT4, web4, 40101, 80, b"x"), 0x8100, 100),
        ),
        (
            "IPIP, inner IPv4 options",
            packet::with_ipv4_options(&packet::tcp4(CLIENT4, web4, 40102, 80, b"x"), 2),
        ),
        ("IPIP, padded frame", padded),
    ];
    for (name, original) in cases {
        let enc = encapsulated(&lab, &original);
        let before = decap_stats(&decap);
        let r = run(decap.program().unwrap(), &enc).unwrap();
        assert_eq!(r.action, XDP_PASS, "{name}");
        // The frame keeps the tunnel's MAC addresses; everything after them
        // is the original frame, byte for byte.
        let mut expected = enc[..12].to_vec();
        expected.extend_from_slice(&original[12..]);
        assert_eq!(r.output, expected, "{name}: decapsulated frame");
        let after = decap_stats(&decap);
        assert_eq!(
            after[decap_reason::DECAPSULATED as usize],
            before[decap_reason::DECAPSULATED as usize] + 1,
            "{name}"
        );
    }

    // An outer IPv4 header with options is stripped whole.
    let original = packet::tcp4(CLIENT4, web4, 40103, 80, b"opts");
    let enc = packet::with_ipv4_options(&encapsulated(&lab, &original), 3);
    let r = run(decap.program().unwrap(), &enc).unwrap();
    let mut expected = enc[..12].to_vec();
    expected.extend_from_slice(&original[12..]);
    assert_eq!(r.output, expected, "outer header with options");
}

#[test]
fn decap_leaves_other_traffic_alone() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut decap = Decap::load(8).unwrap();
    decap.set_vips(&[WEB4.addr]).unwrap();
    let not_configured = encapsulated(
        &lab,
        &packet::udp4(CLIENT4, ip4(DNS4.addr), 41000, 53, b"q"),
    );
    let plain = packet::tcp4(CLIENT4, ip4(WEB4.addr), 40000, 80, b"x");
    let truncated = encapsulated(&lab, &plain)[..L3 + 20 + 10].to_vec();
    for (name, frame, why) in [
        (
            "tunnel packet for a VIP this backend does not serve",
            not_configured,
            decap_reason::PASS,
        ),
        ("plain TCP", plain, decap_reason::PASS),
        ("ARP", packet::arp(), decap_reason::PASS),
        (
            "tunnel packet cut inside the inner header",
            truncated,
            decap_reason::MALFORMED,
        ),
    ] {
        let before = decap_stats(&decap);
        let r = run(decap.program().unwrap(), &frame).unwrap();
        assert_eq!(r.action, XDP_PASS, "{name}");
        assert_eq!(r.output, frame, "{name}: untouched");
        let after = decap_stats(&decap);
        assert_eq!(
            after[why as usize],
            before[why as usize] + 1,
            "{name}: counted"
        );
    }
}
