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

/// The number after `prefix` in loadgen's output.
fn figure(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
}

/// `xdplb loadgen` from `gen0` to the VIP, 20,000 frames over 10 flows.
fn cli_loadgen(gen: &Netns, lb_mac: [u8; 6], extra: &[&str]) -> std::process::Output {
    let mac = integration_tests::ops::mac_text(lb_mac);
    let mut args = vec![
        "loadgen",
        "--interface",
        "gen0",
        "--dst-mac",
        &mac,
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
    ];
    args.extend_from_slice(extra);
    run_in(gen, &args, Duration::from_secs(30)).unwrap()
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
        // Tracking every flow, so conntrack counts the distinct ones.
        dp.add_vip(&key, 0, xdp_common::VIP_F_TRACK_ALL, xdp_common::fwd::ENCAP)?;
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

    // The CLI: bounded by count; reports what left the NIC and, asked to,
    // what arrived (here: back at the generator's sink).
    let out = cli_loadgen(&gen, lb_mac, &["--count-at", "rx:gen0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At full speed the LB's veth ring may overflow: whatever the figures,
    // they must agree with what the LB processed.
    assert!(
        text.contains("generated 20000 frames (10 flows, 64 bytes)"),
        "{text}"
    );
    let left = figure(&text, "left gen0: ");
    let arrived = figure(&text, "arrived at rx:gen0: ");
    let encapsulated = dp.stats().unwrap()[reason::TX_ENCAP as usize] - 50_000;
    assert!(left > 0 && left <= 20_000, "{text}");
    assert_eq!(encapsulated, left, "the LB processed what left: {text}");
    assert!(arrived <= left, "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.contains("frames left gen0"),
        left < 20_000,
        "a shortfall is warned about, and only then: {err}"
    );
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

#[test]
fn frames_a_driver_drops_silently_are_not_reported_as_sent() {
    if !require_root() {
        return;
    }
    // The LB side runs no XDP program and has GRO off: veth drops every
    // XDP frame from gen0 and counts nothing. The generator's program still
    // runs 20,000 times; before, that was printed as the rate.
    let (gen, lb) = pair();
    let lb_mac = in_ns(&lb, || interface_mac("eth0")).unwrap().unwrap();
    let out = cli_loadgen(&gen, lb_mac, &["--count-at", "rx:gen0"]);
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert!(text.contains("left gen0: 0 (0.0 %): 0.000 Mpps"), "{text}");
    assert!(
        err.contains("warning: only 0 of 20000 frames left gen0: the driver dropped the rest"),
        "{err}"
    );
    assert!(err.contains("veth"), "{err}");
}

#[test]
fn arrivals_are_counted_at_a_running_balancers_socket() {
    use integration_tests::{
        daemon::Daemon,
        ops::{servers, topology_bare, Cfg, Files},
    };
    if !require_root() {
        return;
    }
    let files = Files::new("loadgen-socket");
    Cfg::new(&files).write(&files.config);
    let ns = topology_bare("loadgen-socket");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let lb_mac = in_ns(&ns, || interface_mac("lb0")).unwrap().unwrap();
    let mac = integration_tests::ops::mac_text(lb_mac);
    let count_at = format!("socket:{}", files.socket.display());
    let out = run_in(
        &ns,
        &[
            "loadgen",
            "--interface",
            "lb1",
            "--dst-mac",
            &mac,
            "--src",
            "198.18.50.1",
            "--dst",
            "198.18.0.10",
            "--dport",
            "80",
            "--protocol",
            "tcp",
            "--flows",
            "100",
            "--count",
            "20000",
            "--count-at",
            &count_at,
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
    // Every frame that left lb1 is counted by the balancer on lb0.
    let left = figure(&text, "left lb1: ");
    assert!(left > 0 && left <= 20_000, "{text}");
    assert_eq!(
        figure(&text, &format!("arrived at {count_at}: ")),
        left,
        "{text}"
    );
    daemon.stop().unwrap();
}
