//! The live-frames load generator through a real veth pair: generator ->
//! LB (xdp_swap, then xdp_lb) -> counting sink on the generator's side.

use std::{net::IpAddr, time::Duration};

use integration_tests::{
    daemon::run_in,
    netns::Netns,
    require_root,
    topology::{in_ns, veth_pair},
};
use xdp_common::{map_names, reason};
use xdp_user::{
    config::Protocol,
    dataplane::{addr_bytes, AttachMode, AuxProgram, Dataplane, Sizes, SINK_PROGRAM, SWAP_PROGRAM},
    loadgen::{interface_mac, Generator, LoadSpec},
};

fn pair() -> (Netns, Netns) {
    veth_pair("gen", "gen0", "genlb", "eth0").unwrap()
}

fn spec(gen_mac: [u8; 6], lb_mac: [u8; 6], count: u64, flows: u32) -> LoadSpec {
    LoadSpec {
        interface: "gen0".into(),
        src_mac: gen_mac,
        dst_mac: lb_mac,
        src: "198.18.50.1".parse().unwrap(),
        dst: "198.18.0.10".parse().unwrap(),
        dport: 53,
        protocol: Protocol::Udp,
        flows,
        size: 64,
        count,
        duration: Duration::from_secs(10),
        rate: None,
        batch: 64,
    }
}

#[test]
fn generated_frames_cross_the_lb_and_are_counted() {
    if !require_root() {
        return;
    }
    let (gen, lb) = pair();
    let gen_mac = in_ns(&gen, || interface_mac("gen0")).unwrap().unwrap();
    let lb_mac = in_ns(&lb, || interface_mac("eth0")).unwrap().unwrap();
    let sink = in_ns(&gen, || {
        let mut s = AuxProgram::load(SINK_PROGRAM)?;
        s.attach("gen0", AttachMode::Native)?;
        anyhow::Ok(s)
    })
    .unwrap()
    .unwrap();

    // MAC swap on the LB: every frame comes straight back.
    let swap = in_ns(&lb, || {
        let mut s = AuxProgram::load(SWAP_PROGRAM)?;
        s.attach("eth0", AttachMode::Native)?;
        anyhow::Ok(s)
    })
    .unwrap()
    .unwrap();
    let report = in_ns(&gen, || {
        Generator::new(&spec(gen_mac, lb_mac, 100_000, 1000))?.send(
            100_000,
            Duration::from_secs(10),
            None,
        )
    })
    .unwrap()
    .unwrap();
    let back = sink.counter(map_names::SINK_COUNTER).unwrap();
    println!(
        "swap: sent {} in {:?} ({:.2} Mpps), {back} back at the sink",
        report.sent,
        report.elapsed,
        report.mpps()
    );
    assert_eq!(report.sent, 100_000);
    assert_eq!(back, 100_000, "every frame crossed the LB and came back");
    drop(swap);

    // The balancer: a UDP VIP, encapsulated to backends behind the sink.
    let dp = in_ns(&lb, || {
        let sizes = Sizes {
            max_vips: 4,
            max_backends: 16,
            ring_size: 251,
            max_flows: 65536,
        };
        let mut dp = Dataplane::load(sizes)?;
        dp.set_config(&xdp_common::Config {
            gateway_mac: gen_mac,
            ..xdp_common::Config::default()
        })?;
        let (addr, family) = addr_bytes("198.18.99.1".parse::<IpAddr>()?);
        dp.set_backend(
            0,
            &xdp_common::Backend {
                addr,
                family: u32::from(family),
                state: xdp_common::backend_state::UP,
                ..Default::default()
            },
        )?;
        let (vaddr, vfamily) = addr_bytes("198.18.0.10".parse::<IpAddr>()?);
        let key = xdp_common::VipKey {
            addr: vaddr,
            port: 53u16.to_be(),
            proto: 17,
            family: vfamily,
        };
        dp.add_vip(&key, 0, 0, xdp_common::fwd::ENCAP)?;
        dp.write_ring(&key, &vec![0; 251])?;
        dp.attach("eth0", AttachMode::Native)?;
        anyhow::Ok(dp)
    })
    .unwrap()
    .unwrap();
    let before = sink.counter(map_names::SINK_COUNTER).unwrap();
    let report = in_ns(&gen, || {
        Generator::new(&spec(gen_mac, lb_mac, 50_000, 1000))?.send(
            50_000,
            Duration::from_secs(10),
            None,
        )
    })
    .unwrap()
    .unwrap();
    let back = sink.counter(map_names::SINK_COUNTER).unwrap() - before;
    let stats = dp.stats().unwrap();
    println!(
        "xdp_lb: sent {}, encapsulated {}, {back} at the sink",
        report.sent,
        stats[reason::TX_ENCAP as usize]
    );
    assert_eq!(stats[reason::TX_ENCAP as usize], 50_000);
    assert_eq!(
        stats[reason::FLOW_NEW as usize],
        1000,
        "1000 distinct flows"
    );
    assert_eq!(back, 50_000);

    // The CLI: bounded by count, reports its rate.
    let out = run_in(
        &gen,
        &[
            "loadgen",
            "--interface",
            "gen0",
            "--dst-mac",
            &format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                lb_mac[0], lb_mac[1], lb_mac[2], lb_mac[3], lb_mac[4], lb_mac[5]
            ),
            "--src",
            "198.18.50.1",
            "--dst",
            "198.18.0.10",
            "--dport",
            "53",
            "--flows",
            "10",
            "--count",
            "20000",
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("sent 20000 packets") && text.contains("Mpps"),
        "{text}"
    );
    assert_eq!(dp.stats().unwrap()[reason::TX_ENCAP as usize], 70_000);
    let bad = run_in(
        &gen,
        &[
            "loadgen",
            "--interface",
            "nope0",
            "--dst-mac",
            "02:00:00:00:00:01",
            "--src",
            "198.18.50.1",
            "--dst",
            "198.18.0.10",
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("nope0"));
}
