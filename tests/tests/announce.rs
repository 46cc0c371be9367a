//! Announcements tied to health (issue: HA across LB hosts): the daemon
//! keeps a route per usable VIP address in its own table while its
//! dataplane forwards, and only then; restarts withdraw nothing.

use std::time::Duration;

use integration_tests::{
    daemon::{run_in, wait_for, xdplb, Daemon},
    netns::Netns,
    ops::{fails, metric, ok, servers, status, stdout, topology, Cfg, Files},
    require_root,
};

/// An IPv6 VIP without health checks (always usable), then announcing on.
const ANNOUNCE: &str = r#"
[[vip]]
name = "dns6"
address = "2001:db8::53"
port = 53
protocol = "udp"
forwarding = "ip6ip6"
health = { kind = "none" }

[[vip.backend]]
address = "2001:db8:1::1"

[announce]
enabled = true
hold_down_ms = 500
"#;

/// The announcement routes in `table` (as `ip route` prints them).
fn routes(ns: &Netns, table: &str) -> String {
    ns.ip(&["route", "show", "table", table, "proto", "250"])
        .unwrap_or_default()
}

fn wait_routes(ns: &Netns, table: &str, present: bool, what: &str) {
    wait_for(Duration::from_secs(5), || {
        (routes(ns, table).contains("blackhole 198.18.0.10") == present).then_some(())
    })
    .unwrap_or_else(|| panic!("{what}: table {table} holds {:?}", routes(ns, table)));
}

/// `xdplb announce check --address 198.18.0.10` inside the namespace: its
/// exit code.
fn check(ns: &Netns, config: &str) -> Option<i32> {
    run_in(
        ns,
        &[
            "announce",
            "check",
            "--config",
            config,
            "--address",
            "198.18.0.10",
        ],
        Duration::from_secs(5),
    )
    .unwrap()
    .status
    .code()
}

#[test]
fn announcements_follow_health_and_survive_restarts() {
    if !require_root() {
        return;
    }
    let files = Files::new("announce");
    let mut cfg = Cfg::new(&files);
    cfg.extra = ANNOUNCE.into();
    cfg.write(&files.config);
    let config = files.config.to_str().unwrap();
    let ns = topology("announce");
    let backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d1.log")).unwrap();

    // Announced once a backend is usable; IPv6 too.
    wait_routes(&ns, "100", true, "first announcement");
    let v6 = ns
        .ip(&["-6", "route", "show", "table", "100", "proto", "250"])
        .unwrap();
    assert!(v6.contains("blackhole 2001:db8::53"), "{v6}");
    assert_eq!(check(&ns, config), Some(0));
    assert_eq!(
        metric(&ns, "xdplb_vip_address_announced{address=\"198.18.0.10\"}"),
        Some(1.0)
    );

    // No usable backend: withdrawn, with the reason; back when one is.
    drop(backends);
    wait_routes(&ns, "100", false, "no usable backend");
    assert_eq!(check(&ns, config), Some(1));
    // The other address is still announced: `check` without --address
    // passes while any is.
    let any = run_in(
        &ns,
        &["announce", "check", "--config", config],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(any.status.success(), "{}", stdout(&any));
    let reason = status(&files.socket)["announce"]["reason"].to_string();
    assert!(
        reason.contains("no usable backend for 198.18.0.10"),
        "{reason}"
    );
    let backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    wait_routes(&ns, "100", true, "a backend is back");

    // The operator's withdrawal is immediate and outlives a restart.
    ok(&xdplb(&files.socket, &["announce", "withdraw"]));
    assert!(
        !routes(&ns, "100").contains("198.18.0.10"),
        "still announced"
    );
    daemon.stop().unwrap();
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d2.log")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!routes(&ns, "100").contains("198.18.0.10"), "re-announced");
    assert_eq!(
        status(&files.socket)["announce"]["withdrawn_by_operator"],
        true
    );
    assert_eq!(metric(&ns, "xdplb_announce_withdrawn"), Some(1.0));
    let nagios = xdplb(&files.socket, &["check"]);
    assert_eq!(nagios.status.code(), Some(1), "{}", stdout(&nagios));
    assert!(
        stdout(&nagios).contains("not announcing every VIP address: withdrawn by the operator"),
        "{}",
        stdout(&nagios)
    );
    ok(&xdplb(&files.socket, &["announce", "restore"]));
    wait_routes(&ns, "100", true, "restored");

    // A stopped daemon leaves the route with the forwarding dataplane.
    daemon.stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(routes(&ns, "100").contains("blackhole 198.18.0.10"));

    // Without a daemon, `withdraw` removes the routes itself and the next
    // daemon keeps them withdrawn.
    let out = run_in(
        &ns,
        &["announce", "withdraw", "--config", config],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(ok(&out).contains("no daemon runs"), "{}", stdout(&out));
    assert!(!routes(&ns, "100").contains("198.18.0.10"));
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d3.log")).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!routes(&ns, "100").contains("198.18.0.10"), "re-announced");
    ok(&xdplb(&files.socket, &["announce", "restore"]));
    wait_routes(&ns, "100", true, "restored after an offline withdrawal");

    // A reload that moves the table withdraws from the old one.
    cfg.extra = format!("{ANNOUNCE}table = 101\n");
    cfg.write(&files.config);
    ok(&xdplb(&files.socket, &["reload"]));
    wait_routes(&ns, "101", true, "announced in the new table");
    assert!(!routes(&ns, "100").contains("198.18.0.10"), "left behind");

    // `detach` removes the announcements with the dataplane.
    daemon.stop().unwrap();
    ok(&run_in(
        &ns,
        &["detach", "--config", config],
        Duration::from_secs(10),
    )
    .unwrap());
    assert!(!routes(&ns, "101").contains("198.18.0.10"), "left behind");

    // Tables and protocols that would steer the host's own traffic are
    // refused, naming the key.
    for (extra, problem) in [
        ("table = 254\n", "announce.table: 254 is the main table"),
        ("protocol = 3\n", "announce.protocol: 3 is reserved"),
    ] {
        cfg.extra = format!("{ANNOUNCE}{extra}");
        cfg.write(&files.config);
        fails(&xdplb(&files.socket, &["check-config", config]), problem);
    }
    drop(backends);
}

#[test]
fn two_daemons_never_share_an_announcement_table() {
    if !require_root() {
        return;
    }
    let files = Files::new("announce-two");
    let mut cfg = Cfg::new(&files);
    cfg.extra = ANNOUNCE.into();
    cfg.write(&files.config);
    let ns = topology("announce-two");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let first = Daemon::start(&ns, &files.config, &files.socket, files.log("d1.log")).unwrap();
    wait_routes(&ns, "100", true, "first daemon");

    // A second daemon on another interface, same table and protocol: it
    // would withdraw the first one's routes. Refused, naming the holder.
    ns.ip(&["link", "add", "lb2", "type", "veth", "peer", "name", "lb3"])
        .unwrap();
    ns.ip(&["link", "set", "lb2", "up"]).unwrap();
    ns.ip(&["link", "set", "lb3", "up"]).unwrap();
    integration_tests::ops::peer_xdp(&ns, "lb3");
    let other = Files::new("announce-two-b");
    let mut second = Cfg::new(&other);
    second.interface = "lb2";
    second.metrics = "127.0.0.1:9478";
    second.extra = ANNOUNCE.into();
    second.write(&other.config);
    let config = other.config.to_str().unwrap();
    let out = run_in(&ns, &["run", "--config", config], Duration::from_secs(10)).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("announcement table 100 proto 250") && err.contains("pid "),
        "{err}"
    );
    assert!(routes(&ns, "100").contains("blackhole 198.18.0.10"));

    // With a table of its own it runs beside the first.
    second.extra = format!("{ANNOUNCE}table = 102\n");
    second.write(&other.config);
    let d2 = Daemon::start(&ns, &other.config, &other.socket, other.log("d2.log")).unwrap();
    wait_routes(&ns, "102", true, "second daemon, own table");
    assert!(routes(&ns, "100").contains("blackhole 198.18.0.10"));
    d2.stop().unwrap();
    first.stop().unwrap();
}

/// Before: a foreign `unreachable 198.18.0.11 proto bgp` in the table was
/// replaced by xdplb's blackhole and gone after a withdraw, and a foreign
/// /32 carrying xdplb's protocol number was deleted (efc012d). Now only
/// routes this instance added are touched; a conflict is reported.
#[test]
fn routes_xdplb_did_not_add_are_never_taken() {
    if !require_root() {
        return;
    }
    let files = Files::new("announce-foreign");
    let mut cfg = Cfg::new(&files);
    cfg.extra = ANNOUNCE.into();
    cfg.write(&files.config);
    let ns = topology("announce-foreign");
    ns.ip(&[
        "route",
        "add",
        "unreachable",
        "198.18.0.10",
        "table",
        "100",
        "proto",
        "bgp",
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "add",
        "198.18.0.99/32",
        "dev",
        "lo",
        "table",
        "100",
        "proto",
        "250",
    ])
    .unwrap();
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let all = || {
        ns.ip(&["route", "show", "table", "100"])
            .unwrap_or_default()
    };
    let v6 = || {
        ns.ip(&["-6", "route", "show", "table", "100"])
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(5), || {
        v6().contains("blackhole 2001:db8::53").then_some(())
    })
    .unwrap_or_else(|| panic!("the free address is announced: {}", v6()));
    let s = status(&files.socket);
    assert!(
        s["announce"]["conflicts"]["198.18.0.10"]
            .as_str()
            .is_some_and(|w| w.contains("unreachable")),
        "{s}"
    );
    assert!(
        s["announce"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("a route xdplb did not add holds 198.18.0.10")),
        "{s}"
    );
    assert_eq!(
        metric(
            &ns,
            "xdplb_vip_address_announce_conflict{address=\"198.18.0.10\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&ns, "xdplb_vip_address_announced{address=\"198.18.0.10\"}"),
        Some(0.0)
    );
    let routes = all();
    assert!(
        routes.contains("unreachable 198.18.0.10 proto bgp"),
        "{routes}"
    );
    assert!(routes.contains("198.18.0.99 dev lo proto 250"), "{routes}");
    assert!(
        daemon.log_text().contains("not announcing 198.18.0.10"),
        "{}",
        daemon.log_text()
    );

    // The operator removes the foreign route: the address is announced.
    ns.ip(&[
        "route",
        "del",
        "unreachable",
        "198.18.0.10",
        "table",
        "100",
        "proto",
        "bgp",
    ])
    .unwrap();
    wait_routes(&ns, "100", true, "the conflict ended");
    assert_eq!(
        metric(
            &ns,
            "xdplb_vip_address_announce_conflict{address=\"198.18.0.10\"}"
        ),
        Some(0.0)
    );

    // A withdrawal removes ours and only ours.
    ok(&xdplb(&files.socket, &["announce", "withdraw"]));
    let routes = all();
    assert!(!routes.contains("198.18.0.10"), "{routes}");
    assert!(routes.contains("198.18.0.99 dev lo proto 250"), "{routes}");
    assert!(!v6().contains("2001:db8::53"), "{}", v6());
    ok(&xdplb(&files.socket, &["announce", "restore"]));
    daemon.stop().unwrap();
}

/// A fresh start announces only once every checked backend has a first
/// verdict, or, for one that never gets one (its checks cannot run here),
/// after two intervals and a timeout, with that backend counted down
/// (efc012d announced at the first backend's first check, and kept the
/// unanswered one in its ring: `init_state = "up"`).
#[test]
fn a_fresh_start_announces_with_every_backend_judged() {
    if !require_root() {
        return;
    }
    let files = Files::new("announce-fresh");
    let mut cfg = Cfg::new(&files);
    // 198.19.5.5 has no route here: its checks never give a verdict.
    cfg.backends = vec!["198.18.1.1", "198.19.5.5"];
    cfg.health = "{ kind = \"tcp\", port = 80, interval_ms = 1000, timeout_ms = 500, jitter_ms = 10, rise = 1, fall = 1, init_state = \"up\" }".into();
    cfg.extra = "\n[announce]\nenabled = true\nhold_down_ms = 500\n".into();
    cfg.write(&files.config);
    let ns = topology("announce-fresh");
    let _backends = servers(&ns, &["198.18.1.1"]);
    let started = std::time::Instant::now();
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let s = status(&files.socket);
    let waited = started.elapsed();
    assert!(
        s["announce"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("a fresh start waits for the first check of")),
        "{waited:?}: {s}"
    );
    assert!(!routes(&ns, "100").contains("198.18.0.10"));
    // The bound: 2 x 1000 ms + 500 ms.
    wait_routes(&ns, "100", true, "announced after the bound");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2000),
        "announced after {took:?}"
    );
    let s = status(&files.socket);
    let unjudged = &s["vips"][0]["backends"][1];
    assert_eq!(
        unjudged["dataplane_state"], "down",
        "counted down: {unjudged}"
    );
    assert_eq!(s["vips"][0]["backends"][0]["dataplane_state"], "up", "{s}");
    assert!(
        daemon.log_text().contains("has no verdict"),
        "{}",
        daemon.log_text()
    );
    println!("a fresh start announced {took:?} after it began, the unjudged backend counted down");
    daemon.stop().unwrap();
}
