use integration_tests::{require_root, run};
use xdp_common::XDP_PASS;
use xdp_user::dataplane::{Dataplane, Decap, Sizes};

#[test]
fn both_programs_pass_the_verifier() {
    if !require_root() {
        return;
    }
    let small = Sizes {
        max_vips: 4,
        max_backends: 16,
        ring_size: 13,
        max_flows: 1024,
    };
    Dataplane::load(small).expect("xdp_lb loads");
    Decap::load(4).expect("decap loads");
}

#[test]
fn non_vip_packet_passes_unchanged() {
    if !require_root() {
        return;
    }
    let dp = Dataplane::load(Sizes {
        max_vips: 4,
        max_backends: 16,
        ring_size: 13,
        max_flows: 1024,
    })
    .unwrap();
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .tcp(40000, 80, 1, 1000)
        .write(&mut pkt, b"hello")
        .unwrap();
    let r = run(dp.program().unwrap(), &pkt).unwrap();
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.output, pkt);
}
