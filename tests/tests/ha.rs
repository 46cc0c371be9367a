//! High availability across LB hosts (issue: HA with a real BGP router),
//! end to end with unmodified Debian daemons and the files of
//! `examples/ha/`: faults on LB hosts under continuous traffic, counted.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::xdplb,
    e2e::System,
    ha::{self, birdc, detach_link, lb_addr, Ecmp, RouteWatch, Tally, Traffic, VIP},
    ops::{ok, status},
    require_root,
};

/// One fault's outcome, printed as a table row.
struct Row {
    fault: &'static str,
    withdrawn_after: Option<Duration>,
    back_after: Option<Duration>,
    tally: Tally,
}

fn print_rows(title: &str, rows: &[Row]) {
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    println!("\n{title}");
    println!(
        "| fault | fault -> withdrawn | restore -> back | established broken | new ok | new failed | longest stall |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} ms |",
            r.fault,
            ms(r.withdrawn_after),
            ms(r.back_after),
            r.tally.broken.len(),
            r.tally.new_ok,
            r.tally.new_failed,
            r.tally.longest_stall.as_millis()
        );
    }
}

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
        // Connections that moved settle on their host.
        std::thread::sleep(Duration::from_millis(500));
        Row {
            fault,
            withdrawn_after,
            back_after,
            tally: self.traffic.since(&before),
        }
    }
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
    const LBS: usize = 3;
    let mut bed = Ecmp::start("ha-ecmp", LBS).expect("ECMP bed");
    let watch = RouteWatch::start(&bed.sys.topo.router);
    let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(240)).expect("traffic");
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
        |bed| detach_link(&bed.sys.pins[1].0).expect("detach"),
        |_| {},
    ));

    // 3. The LB host's link is cut at the switch: only BFD can tell.
    rows.push(phase.run(
        &mut bed,
        "link cut at the switch (BFD)",
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
        |bed| bed.birds[0].0.stop_with(libc::SIGTERM),
        |bed| {
            bed.birds[0] = ha::bird(
                &bed.sys.topo.lbs[0].ns,
                &ha::example("bird-lb.conf"),
                &bed.sys.scratch.0,
                "lb0-again",
            )
            .expect("BIRD restarts");
        },
    ));

    // 5. Maintenance: the operator withdraws an LB host, then restores it.
    rows.push(phase.run(
        &mut bed,
        "`xdplb announce withdraw`, `restore`",
        1,
        true,
        |bed| {
            ok(&xdplb(&bed.sys.sockets[1], &["announce", "withdraw"]));
        },
        |bed| {
            ok(&xdplb(&bed.sys.sockets[1], &["announce", "restore"]));
        },
    ));

    print_rows(
        "LB-host faults under load (24 long-lived connections, a new one every 5 ms)",
        &rows,
    );
    for r in &rows {
        assert!(
            r.tally.broken.is_empty(),
            "{}: established connections broke: {:?}",
            r.fault,
            r.tally.broken
        );
        assert!(
            r.tally.new_ok > 0 && r.tally.answered > 0,
            "{}: no traffic",
            r.fault
        );
    }
    let log = bed.sys.daemons[1]
        .as_ref()
        .map(|d| d.log_text())
        .unwrap_or_default();
    assert!(log.contains("withdrawn"), "{log}");
    drop(traffic);
    let _ = birdc(&bed.router_bird.1, &["show", "protocols"]);
}
