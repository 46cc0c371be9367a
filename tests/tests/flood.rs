//! A SYN flood against a 1M-entry conntrack table, through the benchmark
//! harness (each of a million test runs per call is a new source): 1,000
//! established flows are placed, 2M SYNs from new sources arrive with a
//! backend added to the VIP's ring half way, and the established flows are
//! sent again. With the flood guard (`Config::conntrack_rate`) none moves;
//! without it the flood evicts them and the new ring moves most, which is
//! what the guard is for (the old build had no guard).

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use integration_tests::{
    lab::{backend_mac, lab_config, ring_of_size, Lab, CLIENT4, WEB4},
    packet, pin_to_cpu0, require_root, run,
};
use xdp_common::{backend_state, reason, Backend, Config, XDP_TX};
use xdp_user::dataplane::{addr_bytes, AuxProgram, Sizes};

const SIZES: Sizes = Sizes {
    max_vips: 8,
    max_backends: 16,
    ring_size: 65537,
    max_flows: 1 << 20,
};
const ESTABLISHED: u32 = 1000;
const FLOOD: u32 = 2_000_000;
/// The backend added half way through the flood.
const ADDED: u32 = 15;

fn established_frame(i: u32) -> Vec<u8> {
    let src = Ipv4Addr::from(u32::from(CLIENT4) + i / 50_000);
    let IpAddr::V4(vip) = WEB4.addr else {
        unreachable!("WEB4 is IPv4")
    };
    packet::with_tcp_flags(
        packet::tcp4(src, vip, 1024 + (i % 50_000) as u16, WEB4.port, b"data"),
        packet::TCP_ACK,
    )
}

/// The outer destination (the backend) of an encapsulated IPv4 frame.
fn backend_of(out: &[u8]) -> [u8; 4] {
    out[packet::L3 + 16..packet::L3 + 20]
        .try_into()
        .expect("4 bytes")
}

/// Established flows (of 1,000) that changed backend across the flood.
fn moved_by_flood(conntrack_rate: u32) -> (usize, u64) {
    // Conntrack's LRU lists and the rate limit are per CPU: the flood and
    // the established flows share one, as a NIC spreading a real flood over
    // every CPU would make them.
    pin_to_cpu0();
    let mut lab = Lab::with_sizes(SIZES).expect("lab dataplane");
    lab.dp
        .set_config(&Config {
            conntrack_rate,
            ..lab_config()
        })
        .expect("CONFIG");
    let (addr, family) = addr_bytes(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 99)));
    lab.dp
        .set_backend(
            ADDED,
            &Backend {
                addr,
                mac: backend_mac(ADDED),
                _pad: [0; 2],
                family: u32::from(family),
                state: backend_state::UP,
                vip_id: WEB4.vip_id,
                generation: 0,
            },
        )
        .expect("the backend to add");
    let prog = lab.dp.program().expect("program");
    let before: Vec<[u8; 4]> = (0..ESTABLISHED)
        .map(|i| {
            let out = run(prog, &established_frame(i)).expect("test run");
            assert_eq!(out.action, XDP_TX);
            backend_of(&out.output)
        })
        .collect();
    let IpAddr::V4(vip) = WEB4.addr else {
        unreachable!("WEB4 is IPv4")
    };
    let syn = packet::with_tcp_flags(
        packet::tcp4(Ipv4Addr::new(198, 18, 200, 0), vip, 1, WEB4.port, &[0; 40]),
        packet::TCP_SYN,
    );
    let bench = AuxProgram::bench(u32::MAX, &syn, prog).expect("harness");
    let flood = |runs: u32| {
        let mut out = vec![0u8; syn.len() + 256];
        bench
            .program()
            .expect("harness program")
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                data_out: Some(&mut out),
                repeat: runs,
                ..TestRunOptions::default()
            })
            .expect("flood");
    };
    let stats = lab.stats();
    flood(FLOOD / 2);
    let mut with_added: Vec<u32> = WEB4.backends.to_vec();
    with_added.push(ADDED);
    lab.dp
        .write_ring(&WEB4.key(), &ring_of_size(&with_added, SIZES.ring_size))
        .expect("adding a backend mid-flood");
    flood(FLOOD / 2);
    let untracked =
        lab.stats()[reason::FLOW_UNTRACKED as usize] - stats[reason::FLOW_UNTRACKED as usize];
    let prog = lab.dp.program().expect("program");
    let moved = (0..ESTABLISHED)
        .filter(|&i| {
            let out = run(prog, &established_frame(i)).expect("test run");
            backend_of(&out.output) != before[i as usize]
        })
        .count();
    (moved, untracked)
}

#[test]
fn a_syn_flood_moves_no_established_flow() {
    if !require_root() {
        return;
    }
    let (moved, untracked) = moved_by_flood(xdplb_default_rate());
    eprintln!(
        "flood guard on: {moved} of {ESTABLISHED} established flows moved; {untracked} of {FLOOD} SYNs untracked"
    );
    assert!(untracked > 0, "the guard held back part of the flood");
    assert_eq!(moved, 0, "established flows moved during the flood");
    let (moved, untracked) = moved_by_flood(0);
    eprintln!(
        "flood guard off: {moved} of {ESTABLISHED} established flows moved; {untracked} of {FLOOD} SYNs untracked"
    );
    assert!(
        moved > 0,
        "without the guard the flood should evict established flows, or this test proves nothing"
    );
}

fn xdplb_default_rate() -> u32 {
    xdp_user::config::DEFAULT_CONNTRACK_RATE
}
