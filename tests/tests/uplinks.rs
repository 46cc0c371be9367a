//! Two uplinks (`[[uplink]]`): one LB host serves two interfaces over one
//! set of maps, each uplink to its own router with its own BGP session
//! and BFD, with the files of `examples/uplinks/`. The router spreads
//! flows over both (ECMP); when one uplink dies the other carries its
//! flows, into the same maps, and no established connection breaks.
//!
//! ```text
//!   client ── router ─┬─ rl0 ──────────────── eth0 (198.18.40.2) ─┐
//!                     └─ br-up ── rl0b ────── eth1 (198.18.48.2) ─┴─ LB ── backends
//!                        (a switch: cutting rl0b leaves br-up up; only BFD can tell)
//! ```

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::wait_for,
    e2e::{http_get, System},
    ha::{bird, birdc, next_hops, report, RouteWatch, Row, Service, Traffic, VIP},
    ops::status,
    require_root,
    topology::{in_ns, Spec},
};
use xdp_user::dataplane::{AttachMode, AuxProgram, PASS_PROGRAM};

const UPLINK0: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);
const UPLINK1: Ipv4Addr = Ipv4Addr::new(198, 18, 48, 2);

/// A file of `examples/uplinks/`.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("examples/uplinks")
        .join(name)
}

/// `examples/uplinks/xdplb.toml` with this host's pin directory and socket;
/// without `uplink`, with its `[[uplink]]` left out (eth1 not served).
fn config(pins: &Path, socket: &Path, uplink: bool) -> String {
    let text = std::fs::read_to_string(example("xdplb.toml")).expect("examples/uplinks/xdplb.toml");
    let text = if uplink {
        text
    } else {
        let (head, rest) = text.split_once("[[uplink]]").expect("an [[uplink]]");
        let (_, vips) = rest.split_once("[[vip]]").expect("VIPs after the uplink");
        format!("{head}[[vip]]{vips}")
    };
    format!(
        "{text}\n[daemon]\npin_dir = \"{}\"\n\n[api]\nsocket = \"{}\"\n",
        pins.display(),
        socket.display()
    )
}

/// The bed: routing daemons first (fields drop in order), then the program
/// the second uplink's router port needs for XDP_TX frames, then the rest.
struct Bed {
    birds: Vec<Service>,
    router_ctl: PathBuf,
    _pass: AuxProgram,
    sys: System,
}

fn hops(h: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    h.iter().copied().collect()
}

impl Bed {
    fn start() -> Bed {
        let spec = Spec {
            tag: "uplinks".into(),
            lbs: 1,
            backends: 3,
            clients: 1,
            vips: vec![IpAddr::V4(VIP)],
            lb_segment: false,
        };
        let sys = System::start_spec(&spec, |_, _, pins, socket| config(pins, socket, false))
            .expect("the namespaces and a daemon serving eth0 only");
        let (router, lb) = (&sys.topo.router, &sys.topo.lbs[0]);
        let sh = |ns: &integration_tests::netns::Netns, args: &[&str]| {
            ns.ip(args)
                .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name))
        };
        // The example's first router MAC on eth0's link.
        sh(
            router,
            &["link", "set", &lb.router_if, "address", "02:00:00:00:28:01"],
        );
        sh(&lb.ns, &["neigh", "flush", "dev", "eth0"]);
        // The second router: a switch (bridge) with the example's MAC, the
        // LB's eth1 on one port and another port up, so that cutting the
        // LB's port leaves the router's interface up.
        for args in [
            &[
                "link",
                "add",
                "br-up",
                "address",
                "02:00:00:00:30:01",
                "mtu",
                "1600",
                "type",
                "bridge",
            ][..],
            &["addr", "add", "198.18.48.1/24", "dev", "br-up"],
            &[
                "link",
                "add",
                "rl0b",
                "mtu",
                "1600",
                "type",
                "veth",
                "peer",
                "name",
                "eth1",
                "netns",
                &lb.ns.name,
                "mtu",
                "1600",
            ],
            &["link", "set", "rl0b", "master", "br-up", "up"],
            &[
                "link", "add", "rspare", "type", "veth", "peer", "name", "rspare1",
            ],
            &["link", "set", "rspare", "master", "br-up", "up"],
            &["link", "set", "rspare1", "up"],
            &["link", "set", "br-up", "up"],
            // The VIP's route comes from BGP now.
            &["route", "del", "198.18.0.10/32"],
        ] {
            sh(router, args);
        }
        sh(&lb.ns, &["addr", "add", "198.18.48.2/24", "dev", "eth1"]);
        sh(&lb.ns, &["link", "set", "eth1", "up"]);
        router
            .exec(&["sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=1"])
            .expect("sysctl");
        let pass = in_ns(router, || -> anyhow::Result<AuxProgram> {
            let mut p = AuxProgram::load(PASS_PROGRAM)?;
            p.attach("rl0b", AttachMode::Native)?;
            Ok(p)
        })
        .and_then(|p| p)
        .expect("xdp_pass on the second router's port");
        sys.wait_checked(Duration::from_secs(10))
            .expect("backends checked up");
        let dir = sys.scratch.0.clone();
        let (router_bird, router_ctl) =
            bird(router, &example("bird-router.conf"), &dir, "router").expect("router BIRD");
        let (lb_bird, _) = bird(&lb.ns, &example("bird-lb.conf"), &dir, "lb").expect("LB BIRD");
        let bed = Bed {
            birds: vec![lb_bird, router_bird],
            router_ctl,
            _pass: pass,
            sys,
        };
        let both = hops(&[UPLINK0, UPLINK1]);
        let converged = wait_for(Duration::from_secs(20), || {
            let _inside = bed.sys.topo.router.enter().ok()?;
            next_hops(VIP).ok().filter(|h| *h == both)
        });
        assert!(
            converged.is_some(),
            "the router never used both uplinks: {:?}\n{}",
            birdc(&bed.router_ctl, &["show", "protocols", "all"]),
            integration_tests::ha::logs(&bed.birds)
        );
        bed
    }

    /// `n` new connections, one after the other (each from a new source
    /// port, so ECMP spreads them): how many failed.
    fn failed_of(&self, n: usize) -> usize {
        self.sys
            .from_client(0, || {
                (0..n)
                    .filter(|_| http_get(IpAddr::V4(VIP)).is_err())
                    .count()
            })
            .expect("from the client")
    }

    /// Packets received by the LB's eth0 and eth1.
    fn received(&self) -> (u64, u64) {
        in_ns(&self.sys.topo.lbs[0].ns, || {
            let rx = |name| {
                xdp_user::iface::by_name(name)
                    .ok()
                    .flatten()
                    .map_or(0, |i| i.rx_packets)
            };
            (rx("eth0"), rx("eth1"))
        })
        .expect("in the LB's namespace")
    }

    fn set_port(&self, state: &str) {
        self.sys
            .topo
            .router
            .ip(&["link", "set", "rl0b", state])
            .expect("ip link set rl0b");
    }
}

#[test]
fn two_uplinks_each_with_its_bgp_session_lose_one_and_break_no_connection() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::start();

    // Before: both uplinks announced, only eth0 served (what one daemon
    // per interface, or none on the second, does): flows the router puts
    // on eth1 are lost.
    let tries = 12;
    let failed_before = bed.failed_of(tries);
    eprintln!("eth1 announced but not served: {failed_before} of {tries} new connections failed");
    assert!(
        failed_before > 0 && failed_before < tries,
        "ECMP should put some of {tries} connections on each uplink; {failed_before} failed"
    );

    // The example as it is: eth1 is an uplink of the same daemon.
    let (pins, socket) = (bed.sys.pins[0].0.clone(), bed.sys.sockets[0].clone());
    std::fs::write(&bed.sys.configs[0], config(&pins, &socket, true)).expect("config");
    if let Some(d) = bed.sys.daemons[0].take() {
        d.signal(libc::SIGTERM);
    }
    bed.sys.start_daemon(0).expect("restart with the uplink");
    let serving = wait_for(Duration::from_secs(10), || {
        let s = status(&socket);
        (s["uplinks"] == serde_json::json!(["eth1"]) && s["attached"] == true).then_some(s)
    });
    assert!(serving.is_some(), "eth1 not served: {}", status(&socket));
    let failed = bed.failed_of(tries);
    assert_eq!(failed, 0, "with eth1 an uplink, {failed} of {tries} failed");

    let watch = RouteWatch::start(&bed.sys.topo.router);
    let traffic =
        Traffic::start(&bed.sys, 16, Duration::from_secs(120)).expect("long-lived connections");
    let before = bed.received();
    std::thread::sleep(Duration::from_millis(1000));
    let after = bed.received();
    assert!(
        after.0 > before.0 + 50 && after.1 > before.1 + 50,
        "both uplinks carry the VIP's traffic: eth0 {} -> {}, eth1 {} -> {}",
        before.0,
        after.0,
        before.1,
        after.1
    );

    let mut rows = Vec::new();
    // 1. The second uplink's switch port dies: only BFD can tell.
    let snapshot = traffic.snapshot();
    let t0 = Instant::now();
    bed.set_port("down");
    let withdrawn = watch
        .wait(t0, Duration::from_secs(10), |h| *h == hops(&[UPLINK0]))
        .expect("the router drops the dead uplink");
    std::thread::sleep(Duration::from_millis(1500));
    let t1 = Instant::now();
    bed.set_port("up");
    let back = watch
        .wait(t1, Duration::from_secs(20), |h| {
            *h == hops(&[UPLINK0, UPLINK1])
        })
        .expect("the router uses the uplink again");
    traffic.settle(Duration::from_secs(15)).expect("settled");
    rows.push(Row {
        fault: "eth1's switch port down (BFD), then up",
        withdrawn_after: Some(withdrawn),
        back_after: Some(back),
        tally: traffic.since(&snapshot),
    });

    // 2. The uplink's link is detached under the daemon: its self-check
    // finds it and attaches again.
    let snapshot = traffic.snapshot();
    xdp_user::dataplane::detach_pinned_uplink(&pins, "eth1").expect("detach eth1's link");
    let log = || {
        bed.sys.daemons[0]
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    };
    let repaired = wait_for(Duration::from_secs(10), || {
        log().contains("re-attached to eth1").then_some(())
    });
    assert!(repaired.is_some(), "not repaired: {}", log());
    let t1 = Instant::now();
    watch
        .wait(t1, Duration::from_secs(20), |h| {
            *h == hops(&[UPLINK0, UPLINK1])
        })
        .expect("both uplinks announced again");
    traffic.settle(Duration::from_secs(15)).expect("settled");
    rows.push(Row {
        fault: "eth1's link detached (bpf link detach), repaired",
        withdrawn_after: None,
        back_after: None,
        tally: traffic.since(&snapshot),
    });

    // 3. The daemon restarts: both links are adopted, the routes stay.
    let snapshot = traffic.snapshot();
    let t0 = Instant::now();
    if let Some(d) = bed.sys.daemons[0].take() {
        d.signal(libc::SIGKILL);
    }
    bed.sys.start_daemon(0).expect("restart");
    std::thread::sleep(Duration::from_millis(1500));
    traffic.settle(Duration::from_secs(15)).expect("settled");
    let changes = watch.changes_since(t0);
    assert!(changes.is_empty(), "the routes changed: {changes:?}");
    let s = status(&socket);
    assert_eq!(s["adopted"], true, "{s}");
    assert_eq!(s["uplinks"], serde_json::json!(["eth1"]), "{s}");
    rows.push(Row {
        fault: "daemon killed (SIGKILL), restarted",
        withdrawn_after: None,
        back_after: None,
        tally: traffic.since(&snapshot),
    });

    report(
        "Two uplinks, each with its BGP session (16 long-lived connections, a new one every 5 ms)",
        &rows,
    );
    drop(traffic);
    let log = bed.birds[1].log_text();
    assert!(
        !log.contains("Hold timer expired"),
        "BFD, not the hold timer: {log}"
    );
}
