//! Health checks through the tunnel (`health.tunnel = true`): a backend
//! whose server works but whose decapsulation or VIP binding is broken
//! black-holes every real flow; checked through the tunnel it is down,
//! checked at its own address (the default) it stays up.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use integration_tests::{
    daemon::wait_for,
    e2e::{http_get, tally, System},
    require_root,
    topology::{Spec, Topology},
};

/// Checked through the tunnel: IPv4 (IPIP) and IPv6 (IPv6-in-IPv6).
const TUNNEL4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const TUNNEL6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
/// Checked at the backend's own address.
const DIRECT4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));

const TCP_CHECK: &str =
    "kind = \"tcp\", port = 80, interval_ms = 200, timeout_ms = 150, rise = 1, fall = 2";
const UDP_CHECK: &str =
    "kind = \"udp\", send = \"ping\", expect = \"pong\", interval_ms = 200, timeout_ms = 150, rise = 1, fall = 2";

/// LB 0's config: TCP VIPs on all three addresses (the first two checked
/// through the tunnel), and a UDP VIP on port 53 of TUNNEL4 checked through
/// the tunnel.
fn config(topo: &Topology, pins: &std::path::Path, socket: &std::path::Path) -> String {
    let full = topo.lb_config(0, pins, socket, "{ kind = \"none\" }", &[], false);
    let mut out = full
        .split("\n[[vip]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    let vip = |name: &str, addr: IpAddr, port: &str, proto: &str, health: String| {
        let (forwarding, v4) = match addr {
            IpAddr::V4(_) => ("ipip", true),
            IpAddr::V6(_) => ("ip6ip6", false),
        };
        let backends: String = topo
            .backends
            .iter()
            .map(|b| {
                let a: IpAddr = if v4 { b.v4.into() } else { b.v6.into() };
                format!("\n[[vip.backend]]\naddress = \"{a}\"\n")
            })
            .collect();
        format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\n{port}protocol = \"{proto}\"\nforwarding = \"{forwarding}\"\n\
             health = {{ {health} }}\n{backends}"
        )
    };
    out += &vip(
        "tunnel4",
        TUNNEL4,
        "",
        "tcp",
        format!("{TCP_CHECK}, tunnel = true"),
    );
    out += &vip(
        "tunnel6",
        TUNNEL6,
        "",
        "tcp",
        format!("{TCP_CHECK}, tunnel = true"),
    );
    out += &vip(
        "dns4",
        TUNNEL4,
        "port = 53\n",
        "udp",
        format!("{UDP_CHECK}, tunnel = true"),
    );
    out += &vip("direct4", DIRECT4, "", "tcp", TCP_CHECK.to_owned());
    out
}

/// Backend 1's dataplane state for each VIP, by name.
fn states(sys: &System) -> Vec<(String, String)> {
    let s = sys.status(0).unwrap();
    let b = &sys.topo.backends[1];
    let mut out = Vec::new();
    for vip in s["vips"].as_array().unwrap() {
        for be in vip["backends"].as_array().unwrap() {
            let addr: IpAddr = be["address"].as_str().unwrap().parse().unwrap();
            if addr == IpAddr::V4(b.v4) || addr == IpAddr::V6(b.v6) {
                let name = vip["name"].as_str().unwrap().to_owned();
                out.push((name, be["dataplane_state"].as_str().unwrap().to_owned()));
            }
        }
    }
    out.sort();
    out
}

/// Wait until backend 1 is `tunnel` for the VIPs checked through the
/// tunnel and `direct` for the one checked directly.
fn wait_states(sys: &System, tunnel: &str, direct: &str, what: &str) {
    let want: Vec<(String, String)> = [
        ("direct4", direct),
        ("dns4", tunnel),
        ("tunnel4", tunnel),
        ("tunnel6", tunnel),
    ]
    .iter()
    .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
    .collect();
    let got = wait_for(Duration::from_secs(10), || {
        let s = states(sys);
        (s == want).then_some(s)
    });
    assert!(
        got.is_some(),
        "{what}: backend 1 is {:?}, wanted {want:?}",
        states(sys)
    );
}

#[test]
fn a_backend_that_cannot_take_the_vips_traffic_is_down_only_when_checked_through_the_tunnel() {
    if !require_root() {
        return;
    }
    let spec = Spec {
        tag: "tunhc".into(),
        lbs: 1,
        backends: 2,
        clients: 1,
        vips: vec![TUNNEL4, TUNNEL6, DIRECT4],
        lb_segment: false,
    };
    let mut sys =
        System::start_spec(&spec, |topo, _, pins, socket| config(topo, pins, socket)).unwrap();
    wait_states(&sys, "up", "up", "at start");

    // No decapsulation on backend 1: its server still answers at its own
    // address, but every tunnelled packet is lost.
    sys.topo.set_decap_vips(1, &[]).unwrap();
    wait_states(&sys, "down", "up", "without decapsulation");
    // Real connections to the VIP checked through the tunnel all succeed:
    // backend 1 is out of its ring.
    let (answers, failed) = sys
        .from_client(0, || tally(20, || http_get(TUNNEL4)))
        .unwrap();
    assert_eq!(failed, 0, "{answers:?}");
    assert_eq!(answers.keys().collect::<Vec<_>>(), ["b0"]);
    sys.topo.set_decap_vips(1, &spec.vips).unwrap();
    wait_states(&sys, "up", "up", "decapsulating again");

    // The VIPs off backend 1's loopback: decapsulated, then not local.
    let ns = &sys.topo.backends[1].ns;
    for vip in &spec.vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        ns.ip(&["addr", "del", &format!("{vip}/{len}"), "dev", "lo"])
            .unwrap();
    }
    wait_states(&sys, "down", "up", "without the VIPs on its loopback");
    for vip in &spec.vips {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        ns.ip(&["addr", "add", &format!("{vip}/{len}"), "dev", "lo", "nodad"])
            .or_else(|_| ns.ip(&["addr", "add", &format!("{vip}/{len}"), "dev", "lo"]))
            .unwrap();
    }
    wait_states(&sys, "up", "up", "with the VIPs back");
}
