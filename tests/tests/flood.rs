//! A SYN flood against a 1M-entry conntrack table, through the benchmark
//! harness (each of a million test runs per call is a new source): 1,000
//! established flows are placed, 2M SYNs from new sources arrive with a
//! backend added to the VIP's ring half way, and the established flows are
//! sent again. None moves, with the flood guard (`Config::conntrack_rate`)
//! or without: the ring places the established flows without state, and
//! the SYNs are tracked only in the slots the new backend took. Before
//! ring-first placement (85c6d68) the flood without the guard evicted the
//! established flows' entries and the new ring moved 739 of 1,000.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use integration_tests::{
    lab::{backend_mac, lab_config, Lab, WEB4},
    packet, pin_to_cpu0, require_root, run,
};
use xdp_common::{backend_state, reason, Backend, Config, XDP_TX};
use xdp_user::{
    dataplane::{addr_bytes, AuxProgram, Sizes},
    maglev::{populate, RingBackend},
};

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

/// An established flow's packet, from sources the flood never uses (a SYN
/// on an established flow's ports opens a new connection, which the ring
/// places).
fn established_frame(i: u32) -> Vec<u8> {
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 150, 1)) + i / 50_000);
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

/// Established flows (of 1,000) that changed backend across the flood,
/// SYNs left untracked by the guard, and conntrack entries after it.
fn moved_by_flood(conntrack_rate: u32) -> (usize, u64, usize) {
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
    // Maglev rings, as the daemon writes them: adding a fourth backend
    // moves about a quarter of the slots.
    let maglev = |ids: &[u32]| {
        let members: Vec<RingBackend> = ids
            .iter()
            .map(|&id| RingBackend {
                identity: id.to_be_bytes().to_vec(),
                weight: 1,
                id,
            })
            .collect();
        populate(&members, SIZES.ring_size)
    };
    // On a fresh VIP: replacing the lab's round-robin ring would mark the
    // slots it moves.
    lab.dp.remove_vip(&WEB4.key()).expect("the lab's VIP");
    lab.dp
        .add_vip(&WEB4.key(), WEB4.vip_id, WEB4.flags, WEB4.mode)
        .expect("the VIP again");
    lab.dp
        .write_ring(&WEB4.key(), &maglev(WEB4.backends))
        .expect("the VIP's ring");
    assert!(lab.dp.marks().expect("PREVIOUS").is_empty());
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
        .write_ring(&WEB4.key(), &maglev(&with_added))
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
    (
        moved,
        untracked,
        lab.dp.flow_count().expect("counting FLOWS"),
    )
}

#[test]
fn a_syn_flood_moves_no_established_flow() {
    if !require_root() {
        return;
    }
    let (moved, untracked, entries) = moved_by_flood(xdplb_default_rate());
    eprintln!(
        "flood guard on: {moved} of {ESTABLISHED} established flows moved; {untracked} of {FLOOD} SYNs untracked; {entries} conntrack entries"
    );
    assert!(untracked > 0, "the guard held back part of the flood");
    assert_eq!(moved, 0, "established flows moved during the flood");
    let (moved, untracked, entries) = moved_by_flood(0);
    eprintln!(
        "flood guard off: {moved} of {ESTABLISHED} established flows moved; {untracked} of {FLOOD} SYNs untracked; {entries} conntrack entries"
    );
    assert_eq!(
        moved, 0,
        "established flows moved during an unguarded flood"
    );
    // Only the second half of the flood, and only in the slots the added
    // backend took (about a quarter), is tracked.
    assert!(
        entries < (FLOOD / 2 / 3) as usize,
        "{entries} entries: the flood was tracked outside the changed slots"
    );
}

fn xdplb_default_rate() -> u32 {
    xdp_user::config::DEFAULT_CONNTRACK_RATE
}
