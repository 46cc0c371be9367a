//! The whole system with real clients and servers, in namespaces: clients
//! connect to VIPs through a router and an LB host running `xdplb run`;
//! backends decapsulate and answer directly. Each test prints its figures.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::xdplb,
    e2e::{
        backend_name, http_get, tally, udp_query, Conn, Load, System, CHECK_FALL, CHECK_INTERVAL,
    },
    require_root,
};

const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

/// `n` new connections to `vip`; replies per backend, and failures.
fn spread(sys: &System, vip: IpAddr, n: usize) -> (BTreeMap<String, usize>, usize) {
    sys.from_client(0, || tally(n, || http_get(vip))).unwrap()
}

#[test]
fn distribution_follows_weights_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let weights = [100, 200, 300];
    let sys = System::start("dist", 1, 3, vec![VIP4, VIP6], &weights).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let n = 1200;
    for vip in [VIP4, VIP6] {
        let (counts, failed) = spread(&sys, vip, n);
        assert_eq!(failed, 0, "{vip}: {failed} failed connections");
        let total: u32 = weights.iter().sum();
        print!("{vip}: {n} connections:");
        for (i, w) in weights.iter().enumerate() {
            let p = f64::from(*w) / f64::from(total);
            let got = counts.get(&backend_name(i)).copied().unwrap_or(0) as f64;
            let want = p * n as f64;
            // Binomial spread of n independent flows, 4 sigma, plus 1% of
            // Maglev's own imbalance.
            let tolerance = 4.0 * (n as f64 * p * (1.0 - p)).sqrt() + 0.01 * n as f64;
            print!(" b{i} {got} (want {want:.0} ± {tolerance:.0})");
            assert!(
                (got - want).abs() <= tolerance,
                "{vip} backend {i}: {got} vs {want:.0} ± {tolerance:.0}: {counts:?}"
            );
        }
        println!();
    }
}

#[test]
fn udp_queries_are_balanced_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let mut sys = System::start("udp", 1, 3, vec![VIP4, VIP6], &[]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    for vip in [VIP4, VIP6] {
        let (counts, failed) = sys
            .from_client(0, || tally(300, || udp_query(vip)))
            .unwrap();
        println!("udp {vip}: 300 queries from fresh ports: {counts:?}, {failed} unanswered");
        assert_eq!(failed, 0);
        assert_eq!(counts.len(), 3, "every backend answers some: {counts:?}");
        assert!(counts.values().all(|&n| n > 50), "{counts:?}");
    }
    // A dead backend's UDP service is detected by its UDP check too.
    sys.kill_backend(2);
    sys.wait_backend(0, 2, "down", Duration::from_secs(3))
        .unwrap();
    let (counts, failed) = sys
        .from_client(0, || tally(100, || udp_query(VIP4)))
        .unwrap();
    assert_eq!(failed, 0, "{counts:?}");
    assert!(!counts.contains_key("b2"));
}

/// Open `n` long-lived connections to `vip` from client 0.
fn conns(sys: &System, vip: IpAddr, n: usize) -> Vec<Conn> {
    sys.from_client(0, || {
        (0..n)
            .map(|_| Conn::open(vip))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap()
    .expect("opening long-lived connections")
}

fn by_backend(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in conns {
        *m.entry(c.backend.clone()).or_insert(0) += 1;
    }
    m
}

fn v4_of(sys: &System, i: usize) -> String {
    sys.topo.backends[i].v4.to_string()
}

#[test]
fn a_killed_backend_is_detected_and_nothing_else_breaks() {
    if !require_root() {
        return;
    }
    let mut sys = System::start("kill", 1, 3, vec![VIP4], &[]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let mut long = conns(&sys, VIP4, 30);
    let spread = by_backend(&long);
    assert_eq!(
        spread.len(),
        3,
        "long-lived connections on every backend: {spread:?}"
    );

    let load = Load::start(&sys, VIP4, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    sys.kill_backend(1);
    let limit = CHECK_INTERVAL * CHECK_FALL + Duration::from_secs(1);
    sys.wait_backend(0, 1, "down", limit).unwrap();
    let detected = killed.elapsed();
    // The moment the daemon reported it down (not kill + wait: stopping
    // the servers itself takes tens of milliseconds).
    let detected_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let requests = load.finish();

    let failed_before: Vec<_> = requests
        .iter()
        .filter(|(at, r)| *at < detected_at && r.is_err())
        .collect();
    let after: Vec<_> = requests
        .iter()
        .filter(|(at, _)| *at >= detected_at)
        .collect();
    let failed_after = after.iter().filter(|(_, r)| r.is_err()).count();
    println!(
        "kill: detected in {:?} (interval {:?} x fall {CHECK_FALL}); requests during detection: {} ({} lost); after: {} ({} lost)",
        detected,
        CHECK_INTERVAL,
        requests.len() - after.len(),
        failed_before.len(),
        after.len(),
        failed_after
    );
    assert!(after.len() > 10, "traffic kept flowing after detection");
    assert_eq!(
        failed_after,
        0,
        "every new connection after detection succeeds: {:?}",
        after
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(at, r)| (at.duration_since(detected_at), r))
            .collect::<Vec<_>>()
    );
    assert!(
        after.iter().all(|(_, r)| r.as_deref() != Ok("b1")),
        "nothing goes to the dead backend"
    );

    // Long-lived connections to the other backends never broke.
    let mut survived = 0;
    for c in long.iter_mut().filter(|c| c.backend != "b1") {
        let was = c.backend.clone();
        assert_eq!(
            c.ask()
                .expect("long-lived connection to a live backend still works"),
            was
        );
        survived += 1;
    }
    println!("kill: {survived} long-lived connections to live backends intact");

    // It comes back.
    sys.revive_backend(1).unwrap();
    let back = sys
        .wait_backend(0, 1, "up", Duration::from_secs(5))
        .unwrap();
    println!("kill: revived backend back in {back:?}");
}

#[test]
fn drain_keeps_existing_connections_and_sends_new_ones_elsewhere() {
    if !require_root() {
        return;
    }
    let sys = System::start("drain", 1, 3, vec![VIP4], &[]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let mut long = conns(&sys, VIP4, 30);
    let on_b1 = long.iter().filter(|c| c.backend == "b1").count();
    assert!(on_b1 > 0);
    let out = xdplb(
        &sys.sockets[0],
        &["backend", "drain", "web0", &v4_of(&sys, 1)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in long.iter_mut() {
        let was = c.backend.clone();
        assert_eq!(c.ask().expect("existing connection keeps working"), was);
    }
    let (counts, failed) = spread(&sys, VIP4, 200);
    println!("drain: {on_b1} connections kept on the draining backend; 200 new ones went to {counts:?}, {failed} failed");
    assert_eq!(failed, 0);
    assert!(
        !counts.contains_key("b1"),
        "no new connection on the draining backend"
    );
}

#[test]
fn adding_a_backend_keeps_every_established_connection() {
    if !require_root() {
        return;
    }
    // Three backends exist; the config serves two.
    let sys = System::start("add", 1, 3, vec![VIP4], &[100, 100]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let mut long = conns(&sys, VIP4, 40);
    let out = xdplb(
        &sys.sockets[0],
        &["backend", "add", "web0", &v4_of(&sys, 2)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sys.wait_backend(0, 2, "up", Duration::from_secs(5))
        .unwrap();
    let mut moved = 0;
    for c in long.iter_mut() {
        let was = c.backend.clone();
        match c.ask() {
            Ok(now) if now == was => {}
            _ => moved += 1,
        }
    }
    let (counts, failed) = spread(&sys, VIP4, 200);
    println!(
        "add: {} established connections, {moved} moved or broke; new connections: {counts:?}",
        long.len()
    );
    assert_eq!(
        moved, 0,
        "every established connection stays on its backend"
    );
    assert_eq!(failed, 0);
    assert!(
        counts.get("b2").copied().unwrap_or(0) > 20,
        "the new backend takes new connections: {counts:?}"
    );
}

#[test]
fn restarting_the_daemon_under_traffic_loses_nothing() {
    if !require_root() {
        return;
    }
    let mut sys = System::start("restart", 1, 3, vec![VIP4], &[]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let mut long = conns(&sys, VIP4, 10);
    let load = Load::start(&sys, VIP4, Duration::from_secs(60));
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        sys.stop_daemon(0).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        sys.start_daemon(0).unwrap();
        println!("restart {round}: daemon back in {:?}", started.elapsed());
        for c in long.iter_mut() {
            let was = c.backend.clone();
            assert_eq!(
                c.ask().expect("long-lived connection survives the restart"),
                was
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let requests = load.finish();
    let lost = requests.iter().filter(|(_, r)| r.is_err()).count();
    println!("restart: 3 daemon restarts under load: {} requests, {lost} lost; {} long-lived connections intact", requests.len(), long.len());
    assert!(requests.len() > 50);
    assert_eq!(lost, 0, "{:?}", requests.iter().find(|(_, r)| r.is_err()));
    assert_eq!(sys.status(0).unwrap()["adopted"], true);
}

#[test]
fn two_lb_hosts_send_a_flow_to_the_same_backend() {
    if !require_root() {
        return;
    }
    let sys = System::start("ha", 2, 3, vec![VIP4, VIP6], &[]).unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    for vip in [VIP4, VIP6] {
        sys.topo.route_vips_via(0).unwrap();
        let mut long = conns(&sys, vip, 20);
        let mut switches = 0;
        for k in 1..=6 {
            // The router moves the flows to the other LB host mid-connection.
            sys.topo.route_vips_via(k % 2).unwrap();
            switches += 1;
            for c in long.iter_mut() {
                let was = c.backend.clone();
                assert_eq!(
                    c.ask().expect("the flow survives the LB switch"),
                    was,
                    "{vip}"
                );
            }
        }
        println!("ha {vip}: {} connections kept their backend across {switches} switches between two LB hosts", long.len());
    }
    // Both hosts really carried traffic.
    for j in 0..2 {
        let s = sys.status(j).unwrap();
        assert!(
            s["reasons"]["tx_encap"].as_u64().unwrap() > 0,
            "LB {j} forwarded"
        );
    }
}

#[test]
fn a_path_narrower_than_the_tunnel_is_learned_by_the_client_from_the_lb() {
    if !require_root() {
        return;
    }
    // The router's link to the backend carries 1400 bytes, as the LB's
    // forwarding.tunnel_mtu says: a full-size client segment plus its outer
    // header does not fit. The router's own "fragmentation needed" goes to
    // the LB's outer source, which cannot act on it; the LB answers the
    // client itself, the client's TCP shrinks its segments, and a 200 KB
    // upload gets through. (The build before it forwarded the segments to
    // be dropped: the upload stalled.)
    let spec = integration_tests::topology::Spec {
        tag: "pmtu".into(),
        lbs: 1,
        backends: 1,
        clients: 1,
        vips: vec![VIP4, VIP6],
        lb_segment: false,
    };
    let sys = System::start_spec(&spec, |topo, j, pins, socket| {
        topo.lb_config(j, pins, socket, integration_tests::e2e::HEALTH, &[], false)
            .replacen("[forwarding]\n", "[forwarding]\ntunnel_mtu = 1400\n", 1)
    })
    .unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    sys.topo
        .router
        .ip(&["link", "set", "rb0", "mtu", "1400"])
        .unwrap();
    let upload = vec![b'u'; 200_000];
    for vip in [VIP4, VIP6] {
        let started = Instant::now();
        let answer = sys
            .from_client(0, || -> anyhow::Result<String> {
                let mut c = Conn::open(vip)?;
                c.send_within(&upload, Duration::from_secs(5))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("{vip}: the 200 KB upload did not get through: {e:#}"));
        assert_eq!(answer, backend_name(0));
        let route = sys.topo.clients[0]
            .ns
            .ip(&["route", "get", &vip.to_string()])
            .unwrap();
        let want = if vip.is_ipv4() {
            "mtu 1380"
        } else {
            "mtu 1360"
        };
        assert!(
            route.contains(want),
            "{vip}: the client learned the path MTU from the LB: {route}"
        );
        println!(
            "pmtu {vip}: 200 KB upload through a 1400-byte tunnel path in {:?}; client route: {}",
            started.elapsed(),
            route.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    let s = sys.status(0).unwrap();
    assert!(s["reasons"]["tx_too_big"].as_u64().unwrap() > 0);
}
