//! A changed ring slot keeps its previous owner exactly as long as flows
//! of that owner run in it: the daemon's conntrack sweep and its review of
//! the marks, driven here by hand with an idle bound of two seconds.
//!
//! A review that settled or cleared a mark at once (or a sweep that did
//! not count a running flow as holding its slot) would move the flow that
//! keeps sending; a review that never cleared would leave the slot on the
//! conntrack path for good. Both are asserted.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use integration_tests::{
    lab::{expected_forward, flow, predicted_backend, ring_of, Lab, CLIENT4, WEB4},
    packet::{self, L3},
    pin_to_cpu0, require_root, run,
};
use xdp_common::{backend_state, flow_hash, reason, FlowKey, PROTO_TCP, XDP_TX};

/// The idle bound (seconds): two, so a flow sending twice a second stays
/// well within it on a loaded machine.
const IDLE: u32 = 2;

fn frame(sport: u16) -> (Vec<u8>, FlowKey) {
    let IpAddr::V4(vip) = WEB4.addr else {
        unreachable!("WEB4 is IPv4")
    };
    (
        packet::tcp4(CLIENT4, vip, sport, WEB4.port, b"data"),
        flow(CLIENT4.into(), WEB4.addr, sport, WEB4.port, PROTO_TCP),
    )
}

/// The backend of WEB4 a packet went to.
fn sent_to(lab: &Lab, sport: u16) -> u32 {
    let (f, k) = frame(sport);
    let out = run(lab.dp.program().unwrap(), &f).unwrap();
    assert_eq!(out.action, XDP_TX);
    WEB4.backends
        .iter()
        .copied()
        .find(|&b| out.output == expected_forward(&WEB4, &f, L3, &k, b))
        .expect("one of WEB4's backends")
}

/// The PREVIOUS key of a flow's slot.
fn slot_of(lab: &Lab, k: &FlowKey) -> u32 {
    let size = lab.dp.sizes().ring_size;
    WEB4.vip_id * size + flow_hash(k, false) % size
}

fn marked(lab: &Lab, slot: u32) -> bool {
    lab.dp.marks().unwrap().iter().any(|(k, _)| *k == slot)
}

#[test]
fn a_previous_owner_is_forgotten_only_once_its_flows_are_idle() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    let mut lab = Lab::new().unwrap();
    let ring = ring_of(WEB4.backends);
    // Two flows the ring gives backend 1, in different slots: `active`
    // keeps sending, `quiet` stops.
    let mut ports = (30000u16..).filter(|&p| predicted_backend(&WEB4, &ring, &frame(p).1) == 1);
    let active = ports.next().unwrap();
    let quiet = ports
        .find(|&p| slot_of(&lab, &frame(p).1) != slot_of(&lab, &frame(active).1))
        .unwrap();
    let (active_slot, quiet_slot) = (
        slot_of(&lab, &frame(active).1),
        slot_of(&lab, &frame(quiet).1),
    );
    assert_eq!((sent_to(&lab, active), sent_to(&lab, quiet)), (1, 1));
    assert_eq!(
        lab.dp.flow_count().unwrap(),
        0,
        "no state while the ring is unchanged"
    );

    // Backend 1 drains: its slots go to 0 and 2, marked.
    lab.dp
        .set_backend_state(1, backend_state::DRAINING)
        .unwrap();
    lab.dp.write_ring(&WEB4.key(), &ring_of(&[0, 2])).unwrap();
    assert!(marked(&lab, active_slot) && marked(&lab, quiet_slot));
    let stats = lab.stats();
    assert_eq!((sent_to(&lab, active), sent_to(&lab, quiet)), (1, 1));
    assert_eq!(
        lab.stats()[reason::FLOW_PREVIOUS as usize] - stats[reason::FLOW_PREVIOUS as usize],
        2,
        "both taken for flows of the previous owner, and tracked"
    );

    let sweeper = lab.dp.flow_sweeper().unwrap();
    let review = |lab: &mut Lab| {
        let sweep = sweeper.sweep(IDLE, true).unwrap();
        lab.dp.review_marks(IDLE, Some(&sweep)).unwrap()
    };
    // Seven idle bounds: `active` sends twice a second and keeps backend 1
    // and its mark; `quiet`'s mark goes once it has been idle past the
    // bound (settled after two bounds, cleared by a later sweep).
    let (mut settled, mut cleared) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(14) {
        assert_eq!(
            sent_to(&lab, active),
            1,
            "the running flow kept its backend"
        );
        let (s, c) = review(&mut lab);
        (settled, cleared) = (settled + s, cleared + c);
        assert!(
            marked(&lab, active_slot),
            "the running flow's slot stays marked"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("after 14 s: {settled} marks settled, {cleared} cleared");
    assert!(settled > 0, "marks settle after two idle bounds");
    assert!(
        !marked(&lab, quiet_slot),
        "the quiet flow's mark was cleared"
    );
    let moved_to = predicted_backend(&WEB4, &ring_of(&[0, 2]), &frame(quiet).1);
    assert_eq!(
        sent_to(&lab, quiet),
        moved_to,
        "idle past the bound, it follows the ring"
    );

    // `active` stops: its mark goes too, and then it follows the ring.
    let start = Instant::now();
    while marked(&lab, active_slot) && start.elapsed() < Duration::from_secs(20) {
        review(&mut lab);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!marked(&lab, active_slot), "the mark outlived its flows");
    let moved_to = predicted_backend(&WEB4, &ring_of(&[0, 2]), &frame(active).1);
    assert_eq!(sent_to(&lab, active), moved_to);
}
