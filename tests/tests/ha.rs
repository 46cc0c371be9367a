//! High availability across LB hosts (issue: HA with a real BGP router),
//! end to end with unmodified Debian daemons and the files of
//! `examples/ha/`: faults on LB hosts under continuous traffic, counted.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{run_in, xdplb},
    e2e::System,
    ha::{
        self, birdc, lb_addr, report, Broken, Ecmp, RouteWatch, Row, Speaker, Tally, Traffic, Vrrp,
        VIP,
    },
    ops::{ok, status},
    require_root,
};

fn without(j: usize, lbs: usize) -> BTreeSet<Ipv4Addr> {
    (0..lbs).filter(|k| *k != j).map(lb_addr).collect()
}

fn all(lbs: usize) -> BTreeSet<Ipv4Addr> {
    (0..lbs).map(lb_addr).collect()
}

/// Packets the VIP got on LB `j`.
fn vip_packets(sys: &System, j: usize) -> u64 {
    sys.status(j)
        .ok()
        .and_then(|s| s["vips"][0]["counters"]["packets"].as_u64())
        .unwrap_or(0)
}

/// Run `inject`, wait for the router to drop LB `j` (when `withdraws`),
/// hold, run `restore`, wait for the router to use every LB host again.
struct Phase<'a> {
    watch: &'a RouteWatch,
    traffic: &'a Traffic,
    lbs: usize,
}

impl Phase<'_> {
    fn run(
        &self,
        bed: &mut Ecmp,
        fault: &'static str,
        j: usize,
        withdraws: bool,
        inject: impl FnOnce(&mut Ecmp),
        restore: impl FnOnce(&mut Ecmp),
    ) -> Row {
        let (watch, lbs) = (self.watch, self.lbs);
        let before = self.traffic.snapshot();
        let t0 = Instant::now();
        inject(bed);
        let withdrawn_after = withdraws.then(|| {
            watch
                .wait(t0, Duration::from_secs(10), |h| *h == without(j, lbs))
                .unwrap_or_else(|e| panic!("{fault}: {e}"))
        });
        // Traffic runs on the remaining hosts for a while.
        std::thread::sleep(Duration::from_millis(1500));
        let t1 = Instant::now();
        restore(bed);
        let back_after = if withdraws {
            Some(
                watch
                    .wait(t1, Duration::from_secs(20), |h| *h == all(lbs))
                    .unwrap_or_else(|e| panic!("{fault}, restoring: {e}")),
            )
        } else {
            std::thread::sleep(Duration::from_millis(1500));
            let changes = watch.changes_since(t0);
            assert!(
                changes.is_empty(),
                "{fault}: the router's route changed: {changes:?}"
            );
            None
        };
        self.traffic
            .settle(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{fault}: {e}"));
        Row {
            fault,
            withdrawn_after,
            back_after,
            tally: self.traffic.since(&before),
        }
    }
}

/// LB hosts in the ECMP beds: two announce with BIRD, one with FRR.
const LBS: usize = 3;

/// The ECMP bed (with or without BFD), the router's route watched, and 24
/// long-lived connections plus new ones for at most `limit`.
fn ecmp_under_load(tag: &str, bfd: bool, limit: Duration) -> (Ecmp, RouteWatch, Traffic) {
    let bed =
        Ecmp::start(tag, &[Speaker::Bird, Speaker::Bird, Speaker::Frr], bfd).expect("ECMP bed");
    let watch = RouteWatch::start(&bed.sys.topo.router);
    let traffic = Traffic::start(&bed.sys, 24, limit).expect("traffic");
    (bed, watch, traffic)
}

/// Set the switch port of LB `j` up or down.
fn set_port(bed: &Ecmp, j: usize, state: &str) {
    bed.sys
        .topo
        .router
        .ip(&["link", "set", &bed.sys.topo.lbs[j].router_if, state])
        .expect("ip link set");
}

#[test]
fn lb_host_faults_under_load_break_no_connection() {
    if !require_root() {
        return;
    }
    let (mut bed, watch, traffic) = ecmp_under_load("ha-ecmp", true, Duration::from_secs(240));
    std::thread::sleep(Duration::from_millis(1000));
    // ECMP spreads the flows: every LB host forwards some.
    for j in 0..LBS {
        assert!(
            vip_packets(&bed.sys, j) > 0,
            "LB {j} forwarded nothing; the router's next hops: {:?}; packets per LB: {:?}; LB {j}: {}",
            watch.current(),
            (0..LBS).map(|k| vip_packets(&bed.sys, k)).collect::<Vec<_>>(),
            bed.sys.status(j).unwrap()
        );
    }
    let phase = Phase {
        watch: &watch,
        traffic: &traffic,
        lbs: LBS,
    };
    let mut rows = Vec::new();

    // 1. The daemon dies and restarts: the pinned dataplane keeps
    // forwarding and the route stays.
    rows.push(phase.run(
        &mut bed,
        "daemon killed (SIGKILL), restarted",
        0,
        false,
        |bed| {
            if let Some(d) = bed.sys.daemons[0].take() {
                d.signal(libc::SIGKILL);
            }
        },
        |bed| bed.sys.start_daemon(0).expect("restart"),
    ));
    let s = status(&bed.sys.sockets[0]);
    assert_eq!(s["adopted"], true);
    assert_eq!(s["announce"]["announced"][0], VIP.to_string(), "{s}");

    // 2. The dataplane is detached under the daemon: withdrawn, repaired,
    // announced again after the hold-down.
    rows.push(phase.run(
        &mut bed,
        "dataplane detached (bpf link detach)",
        1,
        true,
        |bed| xdp_user::dataplane::detach_pinned_link(&bed.sys.pins[1].0).expect("detach"),
        |_| {},
    ));

    // 3. The LB host's link is cut at the switch: only BFD can tell.
    rows.push(phase.run(
        &mut bed,
        "link cut at the switch (FRR host, BFD)",
        2,
        true,
        |bed| set_port(bed, 2, "down"),
        |bed| set_port(bed, 2, "up"),
    ));

    // 4. BIRD stops on an LB host, then starts again.
    rows.push(phase.run(
        &mut bed,
        "BIRD stopped (SIGTERM), started",
        0,
        true,
        |bed| {
            if let Some((bird, _)) = bed.birds[0].as_mut() {
                bird.stop_with(libc::SIGTERM);
            }
        },
        |bed| {
            bed.birds[0] = Some(
                ha::bird(
                    &bed.sys.topo.lbs[0].ns,
                    &ha::example("bird-lb.conf"),
                    &bed.sys.scratch.0,
                    "lb0-again",
                )
                .expect("BIRD restarts"),
            );
        },
    ));

    // 5. Maintenance: the operator withdraws an LB host, then restores it.
    rows.push(phase.run(
        &mut bed,
        "`xdplb announce withdraw`, `restore` (BIRD host)",
        1,
        true,
        |bed| {
            ok(&xdplb(&bed.sys.sockets[1], &["announce", "withdraw"]));
        },
        |bed| {
            ok(&xdplb(&bed.sys.sockets[1], &["announce", "restore"]));
        },
    ));

    // 6. The same on the host that announces with FRR.
    rows.push(phase.run(
        &mut bed,
        "`xdplb announce withdraw`, `restore` (FRR host)",
        2,
        true,
        |bed| {
            ok(&xdplb(&bed.sys.sockets[2], &["announce", "withdraw"]));
        },
        |bed| {
            ok(&xdplb(&bed.sys.sockets[2], &["announce", "restore"]));
        },
    ));

    // (Before the fresh starts replace the daemon.)
    let log = bed.sys.daemons[1]
        .as_ref()
        .map(|d| d.log_text())
        .unwrap_or_default();
    assert!(log.contains("withdrawn"), "{log}");

    // 7. Fresh starts (what a reboot does once the BGP speaker is up
    // again before xdplb): the daemon dies, its routes and dataplane are
    // gone (the router drops the host), and it starts with nothing
    // adopted while BGP is established. It must announce only once its
    // ring is the other hosts' (every backend's first check done): before,
    // it announced at the first backend's first check, and flows the
    // router moved onto it went to other backends (1, 3, 5 and 0 broken
    // in four starts).
    for (j, fault) in [
        (0, "fresh start (pins, program and routes gone), BIRD host"),
        (2, "fresh start, FRR host"),
        (1, "fresh start, BIRD host again"),
        (0, "fresh start, first host again"),
    ] {
        rows.push(phase.run(
            &mut bed,
            fault,
            j,
            true,
            |bed| {
                if let Some(d) = bed.sys.daemons[j].take() {
                    d.signal(libc::SIGKILL);
                }
                bed.sys.topo.lbs[j]
                    .ns
                    .ip(&["route", "flush", "table", "100", "proto", "250"])
                    .expect("flush the announced routes");
                xdp_user::dataplane::detach(&bed.sys.pins[j].0).expect("detach");
            },
            |bed| bed.sys.start_daemon(j).expect("fresh start"),
        ));
        let s = status(&bed.sys.sockets[j]);
        assert_eq!(s["adopted"], false, "a fresh start: {s}");
    }

    report(
        "LB-host faults under load (24 long-lived connections, a new one every 5 ms)",
        &rows,
    );
    // BFD, not the hold timer, noticed the cut link.
    let log = bed.router_bird.0.log_text();
    assert!(!log.contains("Hold timer expired"), "{log}");
    drop(traffic);
    let _ = birdc(&bed.router_bird.1, &["show", "protocols"]);
}

/// Wait until `check` holds; how long after `since` that was seen.
fn until(since: Instant, limit: Duration, what: &str, check: impl Fn() -> bool) -> Duration {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    since.elapsed()
}

#[test]
fn keepalived_standby_takes_over_and_flows_continue() {
    if !require_root() {
        return;
    }
    let mut bed = Vrrp::start("ha-vrrp").expect("VRRP bed");
    let traffic = Traffic::start(&bed.sys, 16, Duration::from_secs(120)).expect("traffic");
    let master = bed.holder().expect("a master");
    let standby = 1 - master;
    let mut rows = Vec::new();

    // 1. The master's daemon dies and restarts: its routes stay, so
    // keepalived's check keeps passing and nothing moves.
    let before = traffic.snapshot();
    if let Some(d) = bed.sys.daemons[master].take() {
        d.signal(libc::SIGKILL);
    }
    // Longer than the check's interval x fall.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(bed.holds(master) && !bed.holds(standby), "the VIP moved");
    bed.sys.start_daemon(master).expect("restart");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(bed.holds(master) && !bed.holds(standby), "the VIP moved");
    traffic.settle(Duration::from_secs(15)).unwrap();
    rows.push(Row {
        fault: "master's daemon killed (SIGKILL), restarted",
        withdrawn_after: None,
        back_after: None,
        tally: traffic.since(&before),
    });

    // 2. The master's dataplane is detached: its announcement goes, its
    // check fails, the standby takes over; the old master's check passes
    // again after the hold-down.
    let before = traffic.snapshot();
    let t0 = Instant::now();
    xdp_user::dataplane::detach_pinned_link(&bed.sys.pins[master].0).expect("detach");
    let took_over = until(t0, Duration::from_secs(10), "takeover", || {
        bed.holds(standby) && !bed.holds(master)
    });
    let config = bed.sys.configs[master].to_string_lossy().into_owned();
    let ready = until(t0, Duration::from_secs(10), "old master ready", || {
        run_in(
            &bed.sys.topo.lbs[master].ns,
            &["announce", "check", "--config", &config],
            Duration::from_secs(5),
        )
        .is_ok_and(|out| out.status.success())
    });
    traffic.settle(Duration::from_secs(15)).unwrap();
    rows.push(Row {
        fault: "master's dataplane detached",
        withdrawn_after: Some(took_over),
        back_after: Some(ready.saturating_sub(took_over)),
        tally: traffic.since(&before),
    });

    // 3. The new master's link is cut at the switch: its adverts stop and
    // the other host takes over; after the link is back one master remains.
    let (master, standby) = (standby, master);
    let port = bed.sys.topo.lbs[master].router_if.clone();
    let before = traffic.snapshot();
    let t0 = Instant::now();
    bed.sys
        .topo
        .router
        .ip(&["link", "set", &port, "down"])
        .unwrap();
    let took_over = until(t0, Duration::from_secs(10), "takeover", || {
        bed.holds(standby)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let t1 = Instant::now();
    bed.sys
        .topo
        .router
        .ip(&["link", "set", &port, "up"])
        .unwrap();
    let one_master = until(t1, Duration::from_secs(10), "one master again", || {
        bed.holds(0) != bed.holds(1)
    });
    traffic.settle(Duration::from_secs(15)).unwrap();
    rows.push(Row {
        fault: "master's link cut at the switch, restored",
        withdrawn_after: Some(took_over),
        back_after: Some(one_master),
        tally: traffic.since(&before),
    });

    report(
        "Active-standby with keepalived (16 long-lived connections, a new one every 5 ms); \
         'withdrawn' = the standby holds the VIP, 'back' = the old master is ready again / one master",
        &rows,
    );
}

#[test]
fn without_bfd_a_cut_link_waits_for_the_bgp_hold_time() {
    if !require_root() {
        return;
    }
    let (mut bed, watch, traffic) = ecmp_under_load("ha-nobfd", false, Duration::from_secs(120));
    let phase = Phase {
        watch: &watch,
        traffic: &traffic,
        lbs: LBS,
    };
    let row = phase.run(
        &mut bed,
        "link cut at the switch (FRR host, no BFD: BGP hold time 3 s)",
        2,
        true,
        |bed| set_port(bed, 2, "down"),
        |bed| set_port(bed, 2, "up"),
    );
    report("The same fault without BFD", std::slice::from_ref(&row));
    // Only the hold timer can notice a silent peer.
    let log = bed.router_bird.0.log_text();
    assert!(log.contains("Hold timer expired"), "{log}");
}

/// Broken connections by the backend they were on.
fn by_backend(broken: &[Broken]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for b in broken {
        *out.entry(b.backend.clone()).or_insert(0) += 1;
    }
    out
}

#[test]
fn hosts_disagreeing_about_a_backend_break_only_its_moved_flows() {
    use std::io::Write as _;
    if !require_root() {
        return;
    }
    let bed = Ecmp::start("ha-views", &[Speaker::Bird; LBS], true).expect("ECMP bed");
    let traffic = Traffic::start(&bed.sys, 30, Duration::from_secs(120)).expect("traffic");
    let on_b1 = || {
        traffic
            .backends
            .lock()
            .unwrap()
            .iter()
            .filter(|b| *b == "b1")
            .count()
    };
    let b1_before = on_b1();
    // LB 0 alone stops reaching backend 1's check port: it marks it down,
    // the other hosts keep it up.
    let b1 = &bed.sys.topo.backends[1].ns;
    let rule = [
        "INPUT",
        "-s",
        &lb_addr(0).to_string(),
        "-p",
        "tcp",
        "--dport",
        "7",
        "-j",
        "DROP",
    ];
    let iptables = |op: &str| {
        let mut argv = vec!["iptables", op];
        argv.extend_from_slice(&rule);
        b1.exec(&argv).expect("iptables");
    };

    // A. The views differ; routes stay.
    let disagreeing = Instant::now();
    let before = traffic.snapshot();
    iptables("-I");
    bed.sys
        .wait_backend(0, 1, "down", Duration::from_secs(5))
        .expect("LB 0 sees backend 1 down");
    assert_eq!(bed.sys.backend_states(1, 1).unwrap(), ["up"]);
    std::thread::sleep(Duration::from_millis(1500));
    traffic.settle(Duration::from_secs(15)).unwrap();
    let a = traffic.since(&before);

    // B. While they differ, LB 1 is withdrawn: its flows move to LB 0 and
    // LB 2.
    let before = traffic.snapshot();
    ok(&xdplb(&bed.sys.sockets[1], &["announce", "withdraw"]));
    std::thread::sleep(Duration::from_millis(1500));
    ok(&xdplb(&bed.sys.sockets[1], &["announce", "restore"]));
    std::thread::sleep(Duration::from_millis(1000));
    traffic.settle(Duration::from_secs(15)).unwrap();
    let b = traffic.since(&before);

    // C. The views agree again; then LB 0 is withdrawn: flows it placed
    // while it disagreed move to hosts whose ring names backend 1.
    let before = traffic.snapshot();
    iptables("-D");
    bed.sys
        .wait_backend(0, 1, "up", Duration::from_secs(5))
        .expect("LB 0 sees backend 1 up again");
    ok(&xdplb(&bed.sys.sockets[0], &["announce", "withdraw"]));
    std::thread::sleep(Duration::from_millis(1500));
    ok(&xdplb(&bed.sys.sockets[0], &["announce", "restore"]));
    std::thread::sleep(Duration::from_millis(1000));
    traffic.settle(Duration::from_secs(15)).unwrap();
    let c = traffic.since(&before);

    let late = |t: &Tally| t.broken.iter().filter(|x| x.opened > disagreeing).count();
    let _ = writeln!(
        std::io::stderr(),
        "\nDifferent views of one backend (30 long-lived connections, {b1_before} on b1 at the start)\n\
         | phase | established broken, by backend | of them opened while the hosts disagreed | new ok | new failed |\n\
         |---|---|---:|---:|---:|\n\
         | A: LB 0 alone sees b1 down | {:?} | {} | {} | {} |\n\
         | B: meanwhile LB 1 withdrawn and restored | {:?} | {} | {} | {} |\n\
         | C: views agree again, LB 0 withdrawn and restored | {:?} | {} | {} | {} |",
        by_backend(&a.broken),
        late(&a),
        a.new_ok,
        a.new_failed,
        by_backend(&b.broken),
        late(&b),
        b.new_ok,
        b.new_failed,
        by_backend(&c.broken),
        late(&c),
        c.new_ok,
        c.new_failed,
    );
    // While hosts disagree about b1, the flows that break are b1's and
    // those LB 0 placed while it disagreed (on another backend than the
    // other hosts' rings name); flows of agreed backends that were open
    // before keep going wherever the router sends them.
    for (phase, t) in [("A", &a), ("B", &b)] {
        assert!(
            t.broken
                .iter()
                .all(|x| x.backend == "b1" || x.opened > disagreeing),
            "{phase}: a flow on a backend every host agrees on broke: {:?}",
            t.broken
        );
        assert!(t.new_ok > 0, "{phase}: no new connection succeeded");
    }
}
