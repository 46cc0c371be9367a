//! One fleet (issue: shared desired state and shared health across LB
//! hosts, through etcd): three LB hosts with BIRD and BFD behind the
//! router, a three-member etcd cluster with TLS, continuous traffic, and
//! the files of `examples/fleet/`. Each test prints what it measured.

use std::{
    collections::BTreeSet,
    io::Write as _,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{run_in, wait_for, xdplb},
    fleet,
    ha::{lb_addr, Broken, Ecmp, RouteWatch, Speaker, Tally, Traffic},
    prometheus::{dashboard, Prometheus},
    require_root,
};

const LBS: usize = 3;
const PREFIX: &str = "/xdplb/edge";

fn out(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// The fleet section of LB `j`'s status.
fn fleet_status(bed: &Ecmp, j: usize) -> serde_json::Value {
    bed.sys
        .status(j)
        .map(|s| s["fleet"].clone())
        .unwrap_or_default()
}

/// Weight of backend `addr` of VIP web on LB `j`.
fn weight(bed: &Ecmp, j: usize, addr: &str) -> Option<u64> {
    let s = bed.sys.status(j).ok()?;
    s["vips"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr)?["weight"]
        .as_u64()
}

/// Wait until every LB host runs weight `w` for `addr`; the time each took.
fn wait_weight(bed: &Ecmp, addr: &str, w: u64, since: Instant) -> Vec<Duration> {
    (0..LBS)
        .map(|j| {
            wait_for(Duration::from_secs(10), || {
                (weight(bed, j, addr) == Some(w)).then(|| since.elapsed())
            })
            .unwrap_or_else(|| {
                panic!(
                    "LB {j} did not apply weight {w} within 10 s: {}",
                    fleet_status(bed, j)
                )
            })
        })
        .collect()
}

fn cli(bed: &Ecmp, j: usize, args: &[&str]) -> std::process::Output {
    xdplb(&bed.sys.sockets[j], args)
}

/// Stands for LB `j`'s config file in [`on_host`]'s arguments.
const CONFIG: &str = "{config}";

/// `xdplb ARGS` in LB `j`'s namespace (commands that talk to the store).
fn on_host(bed: &Ecmp, j: usize, args: &[&str]) -> std::process::Output {
    let config = bed.sys.configs[j].to_string_lossy().into_owned();
    let args: Vec<&str> = args
        .iter()
        .map(|a| if *a == CONFIG { config.as_str() } else { a })
        .collect();
    run_in(&bed.sys.topo.lbs[j].ns, &args, Duration::from_secs(20))
        .expect("xdplb in LB's namespace")
}

/// The dashboard's fleet row, empty on a host without `[fleet]`, has data
/// from a fleet member (Debian's Prometheus scraping LB 1).
fn fleet_panels_have_data(bed: &Ecmp) {
    let scratch = integration_tests::Scratch::new("fleet-prometheus");
    let prom = Prometheus::start(&bed.sys.topo.lbs[1].ns, &scratch.0, "127.0.0.1:9477");
    let (_, panels) = dashboard();
    let fleet: Vec<_> = panels.iter().filter(|p| p.fleet_only).collect();
    assert!(fleet.len() >= 6, "the dashboard's fleet panels");
    let empty: Vec<_> = fleet
        .iter()
        .filter(|p| !prom.has_data(&p.expr))
        .map(|p| (&p.title, &p.expr))
        .collect();
    assert!(
        empty.is_empty(),
        "fleet panels without data on a fleet member: {empty:#?}"
    );
    let _ = std::fs::remove_dir_all(&scratch.0);
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_change_on_one_host_reaches_every_host() {
    if !require_root() {
        return;
    }
    let (mut bed, etcd) = fleet::bed("fl-chg").expect("fleet bed");
    let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(120)).expect("traffic");
    // First, while no ring changed since the flows began (a fresh host has
    // no conntrack: a flow kept on its backend by another host's entry
    // after a weight change would follow the new ring there).
    fresh_host_joins(&mut bed, &traffic);
    let before = traffic.snapshot();
    let t0 = Instant::now();
    let o = cli(&bed, 0, &["backend", "weight", "web", "198.18.66.2", "50"]);
    assert!(o.status.success(), "{}", text(&o));
    let took = wait_weight(&bed, "198.18.66.2", 50, t0);
    out(&format!(
        "\nA change made on LB 0 (`xdplb backend weight`), applied by: {:?}\n",
        took.iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
    ));
    let status = text(&cli(&bed, 1, &["status"]));
    assert!(
        status.contains("fleet /xdplb/edge as lb1 (health rule any)")
            && status.contains("store connected")
            && status.contains("hosts: lb0, lb1, lb2"),
        "{status}"
    );
    let revs: Vec<i64> = (0..LBS)
        .map(|j| fleet_status(&bed, j)["revision"].as_i64().unwrap_or(-1))
        .collect();
    assert!(revs.iter().all(|r| *r == revs[0] && *r > 0), "{revs:?}");
    fleet_panels_have_data(&bed);

    // A compare-and-swap conflict: a writer read revision R; someone else
    // changed the VIP since; the writer's transaction writes nothing.
    let config = xdp_user::config::Config::load(&bed.sys.configs[1]).expect("LB 1 config");
    let fleet_cfg = config.fleet.clone().expect("[fleet]");
    let conflict = integration_tests::topology::in_ns(&bed.sys.topo.lbs[1].ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use xdp_user::fleet::{keys, store};
            let mut client = store::connect(&fleet_cfg).await.expect("connect");
            let (rev, entries) = store::read_all(&mut client, PREFIX).await.expect("read");
            let base = keys::read_desired(PREFIX, rev, &entries).expect("desired");
            etcd.etcdctl(&[
                "put",
                &format!("{PREFIX}/vips/web"),
                &keys::vip_value(&with_weight(&base.vips[0], "198.18.66.2", 60)).unwrap(),
            ])
            .expect("a concurrent change");
            let mine = vec![with_weight(&base.vips[0], "198.18.66.2", 70)];
            store::write_vips(&mut client, PREFIX, &base, &mine)
                .await
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        })
    })
    .expect("in LB 1");
    let err = conflict.expect_err("a stale write must be refused");
    assert!(err.contains("changed since you read them"), "{err}");
    wait_weight(&bed, "198.18.66.2", 60, Instant::now());
    out(&format!("A write based on an old revision: {err}\n"));

    // Bad data: each refused on every host with the key named; the last
    // good state keeps running, and changes are refused until it is gone.
    let big: String = (0..300)
        .map(|i| {
            format!(
                "\n[[backend]]\naddress = \"198.19.{}.{}\"\n",
                i / 250,
                1 + i % 250
            )
        })
        .collect();
    for (key, value, why) in [
        ("vips/broken", "address = ".to_owned(), "not TOML"),
        (
            "notes",
            "written by hand".to_owned(),
            "not a key xdplb uses",
        ),
        (
            "vips/big",
            format!("address = \"198.18.0.11\"\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n{big}"),
            "max_backends",
        ),
    ] {
        let key = format!("{PREFIX}/{key}");
        etcd.etcdctl(&["put", &key, &value]).expect("etcdctl put");
        let written: serde_json::Value =
            serde_json::from_str(&etcd.etcdctl(&["get", &key, "-w", "json"]).unwrap()).unwrap();
        let bad_revision = written["kvs"][0]["mod_revision"].as_i64().unwrap();
        for j in 0..LBS {
            let refused = wait_for(Duration::from_secs(10), || {
                fleet_status(&bed, j)["refused"]
                    .as_str()
                    .filter(|r| r.contains(&key))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("LB {j} did not refuse {key}: {}", fleet_status(&bed, j)));
            assert!(refused.contains(why), "{refused}");
            // The state running is one from before the bad key.
            let running = fleet_status(&bed, j)["revision"].as_i64().unwrap();
            assert!(running < bad_revision, "{running} {bad_revision}");
            assert_eq!(
                bed.sys.status(j).unwrap()["vips"].as_array().map(Vec::len),
                Some(1)
            );
        }
        let o = cli(&bed, 2, &["backend", "drain", "web", "198.18.64.2"]);
        assert!(
            !o.status.success() && text(&o).contains(&key),
            "{}",
            text(&o)
        );
        let check = cli(&bed, 1, &["check"]);
        assert_eq!(check.status.code(), Some(1), "{}", text(&check));
        assert!(text(&check).contains("refused"), "{}", text(&check));
        let o = on_host(&bed, 0, &["check-config", CONFIG]);
        assert!(
            !o.status.success() && text(&o).contains(&key),
            "{}",
            text(&o)
        );
        out(&format!("Refused: {}\n", fleet_status(&bed, 0)["refused"]));
        etcd.etcdctl(&["del", &key]).expect("etcdctl del");
        for j in 0..LBS {
            wait_for(Duration::from_secs(10), || {
                fleet_status(&bed, j)["refused"].is_null().then_some(())
            })
            .unwrap_or_else(|| {
                panic!(
                    "LB {j} still refuses after {key} went: {}",
                    fleet_status(&bed, j)
                )
            });
        }
    }
    let o = on_host(&bed, 0, &["check-config", CONFIG]);
    assert!(o.status.success(), "{}", text(&o));
    let o = on_host(&bed, 0, &["fleet", "export", "--config", CONFIG]);
    assert!(
        o.status.success() && text(&o).contains("weight = 60"),
        "{}",
        text(&o)
    );

    traffic.settle(Duration::from_secs(15)).unwrap();
    let t = traffic.since(&before);
    assert!(t.broken.is_empty(), "{:?}", t.broken);
    assert!(t.new_ok > 0 && t.new_failed == 0, "{t:?}");
    // A reload re-reads the local file; the VIPs stay the store's.
    ok(&cli(&bed, 1, &["reload"]));
    assert_eq!(
        bed.sys.status(1).unwrap()["vips"].as_array().map(Vec::len),
        Some(1)
    );

    // A host restarted under another live host's name does not take its
    // verdicts over: it says why and runs as if the store were lost.
    let config = std::fs::read_to_string(&bed.sys.configs[2]).unwrap();
    std::fs::write(
        &bed.sys.configs[2],
        config.replace("host = \"lb2\"", "host = \"lb1\""),
    )
    .unwrap();
    bed.sys.stop_daemon(2).unwrap();
    bed.sys.start_daemon(2).unwrap();
    let why = wait_for(Duration::from_secs(15), || {
        fleet_status(&bed, 2)["lost_error"]
            .as_str()
            .filter(|e| e.contains("another live host publishes verdicts as \"lb1\""))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no duplicate name reported: {}", fleet_status(&bed, 2)));
    out(&format!("Two hosts named lb1: {why}\n"));
    assert_eq!(fleet_status(&bed, 1)["connected"], true);
    std::fs::write(&bed.sys.configs[2], &config).unwrap();
    bed.sys.stop_daemon(2).unwrap();
    bed.sys.start_daemon(2).unwrap();
    wait_for(Duration::from_secs(15), || {
        (fleet_status(&bed, 2)["connected"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("LB 2 did not reconnect as lb2: {}", fleet_status(&bed, 2)));

    // etcd auth: the members map the client certificate to user "client";
    // LB 2 logs in with `user` and `password_file` instead. A wrong
    // password is said as such.
    let pw = "xdplb-test-pw";
    for args in [
        vec!["user", "add", "root", "--new-user-password=root-test-pw"],
        vec!["role", "add", "fleet"],
        vec![
            "role",
            "grant-permission",
            "fleet",
            "--prefix=true",
            "readwrite",
            "/xdplb/edge/",
        ],
        vec![
            "user",
            "add",
            "client",
            "--new-user-password=unused-test-pw",
        ],
        vec!["user", "grant-role", "client", "fleet"],
        vec!["user", "add", "xdplb", &format!("--new-user-password={pw}")],
        vec!["user", "grant-role", "xdplb", "fleet"],
        vec!["auth", "enable"],
    ] {
        etcd.etcdctl(&args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e:#}"));
    }
    let password = bed.sys.scratch.0.join("etcd-password");
    let config_path = bed.sys.configs[2].clone();
    let with_user = |secret: &str| {
        std::fs::write(&password, format!("{secret}\n")).unwrap();
        std::fs::write(
            &config_path,
            config.replace(
                "host = \"lb2\"",
                &format!(
                    "host = \"lb2\"\nuser = \"xdplb\"\npassword_file = \"{}\"",
                    password.display()
                ),
            ),
        )
        .unwrap();
    };
    with_user("wrong");
    bed.sys.stop_daemon(2).unwrap();
    bed.sys.start_daemon(2).unwrap();
    let why = wait_for(Duration::from_secs(15), || {
        fleet_status(&bed, 2)["lost_error"]
            .as_str()
            .filter(|e| e.contains("authentication failed"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| {
        panic!(
            "no authentication failure reported: {}",
            fleet_status(&bed, 2)
        )
    });
    out(&format!("A wrong etcd password: {why}\n"));
    with_user(pw);
    bed.sys.stop_daemon(2).unwrap();
    bed.sys.start_daemon(2).unwrap();
    wait_for(Duration::from_secs(15), || {
        (fleet_status(&bed, 2)["connected"] == true).then_some(())
    })
    .unwrap_or_else(|| panic!("LB 2 did not log in: {}", fleet_status(&bed, 2)));
    let t0 = Instant::now();
    ok(&cli(
        &bed,
        2,
        &["backend", "weight", "web", "198.18.66.2", "80"],
    ));
    wait_weight(&bed, "198.18.66.2", 80, t0);
    traffic.settle(Duration::from_secs(15)).unwrap();
    let t = traffic.since(&before);
    assert!(t.broken.is_empty(), "{:?}", t.broken);
}

/// LB 2 starts fresh under ECMP traffic (no dataplane, no state kept)
/// while its own checks cannot reach b0: it adopts the fleet's verdicts
/// at once and announces with the fleet's ring.
fn fresh_host_joins(bed: &mut Ecmp, traffic: &Traffic) {
    let watch = RouteWatch::start(&bed.sys.topo.router);
    let all: BTreeSet<_> = (0..LBS).map(lb_addr).collect();
    bed.sys.stop_daemon(2).expect("stop LB 2");
    let config = bed.sys.configs[2].to_string_lossy().into_owned();
    let o = run_in(
        &bed.sys.topo.lbs[2].ns,
        &["detach", "--config", &config],
        Duration::from_secs(20),
    )
    .expect("detach");
    // The detach withdrew LB 2 and kept forwarding until the router had
    // stopped sending it VIP packets (here within milliseconds: BGP on one
    // segment); detached at once, what was in flight at the route change
    // met no balancer.
    ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    let drained = said
        .lines()
        .find_map(|l| l.strip_prefix("drained: "))
        .unwrap_or_else(|| panic!("detach did not wait for the router: {said}"));
    out(&format!("LB 2 detached under ECMP traffic: {drained}\n"));
    let _ = std::fs::remove_file(xdp_user::controller::fleet_state_file(&bed.sys.pins[2].0));
    watch
        .wait(Instant::now(), Duration::from_secs(10), |h| {
            *h == [lb_addr(0), lb_addr(1)].into()
        })
        .expect("LB 2 withdrawn");
    block_checks(bed, 0, 2, "-I");
    let before = traffic.snapshot();
    let t0 = Instant::now();
    bed.sys.start_daemon(2).expect("start LB 2");
    let announced = watch
        .wait(t0, Duration::from_secs(15), |h| *h == all)
        .expect("LB 2 announced again");
    assert_eq!(bed.sys.backend_states(2, 0).unwrap(), ["up"]);
    std::thread::sleep(Duration::from_millis(2000));
    let f = fleet_status(bed, 2);
    assert_eq!(f["disagreements"][0]["own"], false, "{f}");
    block_checks(bed, 0, 2, "-D");
    traffic.settle(Duration::from_secs(15)).unwrap();
    let t = traffic.since(&before);
    out(&format!(
        "A fresh LB 2 (its checks cannot reach b0) under ECMP traffic: announced {} ms after start with the fleet's ring; established broken {}, new ok {}, new failed {}\n",
        announced.as_millis(),
        t.broken.len(),
        t.new_ok,
        t.new_failed
    ));
    for (at, e) in &t.new_errors {
        out(&format!(
            "  failed {} ms after start: {e}\n",
            at.duration_since(t0).as_millis()
        ));
    }
    assert!(t.broken.is_empty(), "{:?}", t.broken);
}

/// `vip` with backend `addr` at weight `w`.
fn with_weight(vip: &xdp_user::config::Vip, addr: &str, w: u32) -> xdp_user::config::Vip {
    let mut vip = vip.clone();
    for b in &mut vip.backends {
        if b.address.to_string() == addr {
            b.weight = w;
        }
    }
    vip
}

/// Insert (`-I`) or delete (`-D`) the rule on backend `i` that drops the
/// health checks (port 7) of LB `j`.
fn block_checks(bed: &Ecmp, i: usize, j: usize, op: &str) {
    let from = lb_addr(j).to_string();
    bed.sys.topo.backends[i]
        .ns
        .exec(&[
            "iptables", op, "INPUT", "-s", &from, "-p", "tcp", "--dport", "7", "-j", "DROP",
        ])
        .expect("iptables");
}

/// Backend b0's health check port blocked from LB 1 and LB 2 (not LB 0):
/// they see it down, LB 0 sees it up; meanwhile LB 0 is withdrawn and
/// restored, so the router moves its flows to the others and back. What
/// broke, from the block to the end.
fn partial_partition(bed: &Ecmp, traffic: &Traffic, fleet: bool) -> Tally {
    let own_health = |j: usize| -> Option<String> {
        let s = bed.sys.status(j).ok()?;
        s["vips"][0]["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == "198.18.64.2")?["health"]
            .as_str()
            .map(str::to_owned)
    };
    let before = traffic.snapshot();
    block_checks(bed, 0, 1, "-I");
    block_checks(bed, 0, 2, "-I");
    for j in [1, 2] {
        wait_for(Duration::from_secs(10), || {
            (own_health(j).as_deref() == Some("down")).then_some(())
        })
        .unwrap_or_else(|| panic!("LB {j}'s checks do not see b0 down"));
    }
    std::thread::sleep(Duration::from_millis(1000));
    if fleet {
        // The fleet keeps b0: one host still sees it up.
        for j in 0..LBS {
            assert_eq!(bed.sys.backend_states(j, 0).unwrap(), ["up"], "LB {j}");
        }
        let f = fleet_status(bed, 1);
        assert_eq!(
            f["disagreements"][0]["backend"], "198.18.64.2",
            "LB 1 says it disagrees: {f}"
        );
        let check = cli(bed, 1, &["check"]);
        assert_eq!(check.status.code(), Some(1), "{}", text(&check));
        assert!(text(&check).contains("disagree"), "{}", text(&check));
    }
    ok(&cli(bed, 0, &["announce", "withdraw"]));
    std::thread::sleep(Duration::from_millis(1500));
    ok(&cli(bed, 0, &["announce", "restore"]));
    std::thread::sleep(Duration::from_millis(1000));
    block_checks(bed, 0, 1, "-D");
    block_checks(bed, 0, 2, "-D");
    for j in [1, 2] {
        wait_for(Duration::from_secs(10), || {
            (own_health(j).as_deref() == Some("up")).then_some(())
        })
        .unwrap_or_else(|| panic!("LB {j}'s checks do not see b0 up again"));
    }
    traffic.settle(Duration::from_secs(15)).unwrap();
    traffic.since(&before)
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", text(o));
}

#[test]
fn a_backend_judged_differently_by_hosts_breaks_nothing_with_shared_health() {
    if !require_root() {
        return;
    }
    // The same run twice: each host on its own checks (examples/ha/), then
    // the fleet (examples/fleet/).
    let local = {
        let bed = Ecmp::start("fl-own", &[Speaker::Bird; LBS], true).expect("ECMP bed");
        let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(120)).expect("traffic");
        partial_partition(&bed, &traffic, false)
    };
    let shared = {
        let (bed, _etcd) = fleet::bed("fl-shr").expect("fleet bed");
        let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(120)).expect("traffic");
        partial_partition(&bed, &traffic, true)
    };
    out(&format!(
        "\nb0's checks blocked from LB 1 and LB 2 of 3, LB 0 withdrawn and restored meanwhile (24 long-lived connections)\n\
         | health | established broken, by backend | new ok | new failed |\n\
         |---|---|---:|---:|\n\
         | each host its own (examples/ha) | {:?} | {} | {} |\n\
         | the fleet's verdict (examples/fleet, rule any) | {:?} | {} | {} |\n",
        by_backend(&local.broken),
        local.new_ok,
        local.new_failed,
        by_backend(&shared.broken),
        shared.new_ok,
        shared.new_failed,
    ));
    assert!(
        shared.broken.is_empty(),
        "with shared health: {:?}",
        shared.broken
    );
    assert!(shared.new_ok > 0);
}

fn by_backend(broken: &[Broken]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for b in broken {
        *out.entry(b.backend.clone()).or_insert(0) += 1;
    }
    out
}

/// What the hosts forward with: per host, each backend's dataplane state.
fn forwarding(bed: &Ecmp) -> Vec<Vec<String>> {
    (0..LBS)
        .map(|j| {
            (0..3)
                .flat_map(|i| bed.sys.backend_states(j, i).unwrap_or_default())
                .collect()
        })
        .collect()
}

/// A change through LB `j`, retried while the store is still electing or
/// the host reconnecting (at most 15 s); how long until it was accepted.
fn change_accepted(bed: &Ecmp, j: usize, weight: u32) -> Duration {
    let t0 = Instant::now();
    let w = weight.to_string();
    wait_for(Duration::from_secs(15), || {
        cli(bed, j, &["backend", "weight", "web", "198.18.65.2", &w])
            .status
            .success()
            .then(|| t0.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "LB {j}: a change was not accepted within 15 s: {}",
            text(&cli(
                bed,
                j,
                &["backend", "weight", "web", "198.18.65.2", &w]
            ))
        )
    })
}

/// Wait until every LB host's fleet status has `field == value`; how long
/// after `since` each did.
fn every_host_until(
    bed: &Ecmp,
    field: &str,
    value: bool,
    since: Instant,
    limit: Duration,
) -> Vec<Duration> {
    (0..LBS)
        .map(|j| {
            wait_for(limit, || {
                (fleet_status(bed, j)[field] == value).then(|| since.elapsed())
            })
            .unwrap_or_else(|| {
                panic!(
                    "LB {j}: fleet {field} not {value} within {limit:?}: {}",
                    fleet_status(bed, j)
                )
            })
        })
        .collect()
}

/// One fault of the store, printed as a table row.
struct Row {
    fault: &'static str,
    tally: Tally,
    note: String,
}

#[test]
fn losing_the_store_stops_nothing_and_catches_up() {
    if !require_root() {
        return;
    }
    let (mut bed, mut etcd) = fleet::bed("fl-store").expect("fleet bed");
    let watch = RouteWatch::start(&bed.sys.topo.router);
    let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(240)).expect("traffic");
    let all: BTreeSet<_> = (0..LBS).map(lb_addr).collect();
    watch
        .wait(Instant::now(), Duration::from_secs(10), |h| *h == all)
        .expect("every host announced");
    let mut rows = Vec::new();
    let mut weight = 100;

    // One member killed (not the leader), then the leader.
    for leader in [false, true] {
        let before = traffic.snapshot();
        let t0 = Instant::now();
        let lead = etcd.leader().expect("a leader");
        let k = if leader {
            lead
        } else {
            (lead + 1) % fleet::MEMBERS
        };
        let forwarding_before = forwarding(&bed);
        etcd.kill(k);
        weight += 10;
        let accepted = change_accepted(&bed, (k + 1) % LBS, weight);
        let applied = wait_weight(&bed, "198.18.65.2", u64::from(weight), t0);
        etcd.start_member(k).expect("restart member");
        etcd.wait_healthy(Duration::from_secs(30))
            .expect("healthy again");
        traffic.settle(Duration::from_secs(15)).unwrap();
        assert_eq!(forwarding(&bed), forwarding_before);
        assert!(
            watch.changes_since(t0).is_empty(),
            "{:?}",
            watch.changes_since(t0)
        );
        rows.push(Row {
            fault: if leader {
                "the leader killed"
            } else {
                "one member killed"
            },
            tally: traffic.since(&before),
            note: format!(
                "a change accepted {} ms after the kill, applied by every host after {} ms",
                accepted.as_millis(),
                applied.iter().max().unwrap().as_millis()
            ),
        });
    }

    // Two of three members killed: the one left has no quorum (no
    // leader), so the hosts lose the store though a member answers.
    let before = traffic.snapshot();
    let t0 = Instant::now();
    let forwarding_before = forwarding(&bed);
    let left = etcd.leader().expect("a leader");
    let gone: Vec<usize> = (0..fleet::MEMBERS).filter(|k| *k != left).collect();
    for k in &gone {
        etcd.kill(*k);
    }
    let noticed = every_host_until(&bed, "connected", false, t0, Duration::from_secs(20));
    let refused = cli(&bed, 1, &["backend", "weight", "web", "198.18.65.2", "7"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let t1 = Instant::now();
    for k in &gone {
        etcd.start_member(*k).expect("restart member");
    }
    etcd.wait_healthy(Duration::from_secs(30))
        .expect("quorum again");
    weight += 10;
    change_accepted(&bed, 1, weight);
    let accepted = t1.elapsed();
    wait_weight(&bed, "198.18.65.2", u64::from(weight), t1);
    traffic.settle(Duration::from_secs(15)).unwrap();
    assert!(
        watch.changes_since(t0).is_empty(),
        "{:?}",
        watch.changes_since(t0)
    );
    assert_eq!(forwarding(&bed), forwarding_before);
    rows.push(Row {
        fault: "two of three members killed (no quorum)",
        tally: traffic.since(&before),
        note: format!(
            "lost noticed after {} ms (the member left answers but has no leader), a change accepted {} ms after the two restarted",
            noticed.iter().map(|d| d.as_millis().to_string()).collect::<Vec<_>>().join("/"),
            accepted.as_millis()
        ),
    });

    // The whole cluster stopped, then started again.
    let before = traffic.snapshot();
    let t0 = Instant::now();
    let forwarding_before = forwarding(&bed);
    let running: Vec<_> = (0..LBS)
        .map(|j| fleet_status(&bed, j)["revision"].clone())
        .collect();
    for k in 0..fleet::MEMBERS {
        etcd.kill(k);
    }
    let noticed = every_host_until(&bed, "connected", false, t0, Duration::from_secs(10));
    let refused = cli(&bed, 0, &["backend", "weight", "web", "198.18.65.2", "7"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("etcd"), "{}", text(&refused));
    let check = cli(&bed, 1, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(text(&check).contains("unreachable"), "{}", text(&check));
    // Past the lease TTL the rings follow local checks; nothing moves.
    let local = every_host_until(&bed, "local_health", true, t0, Duration::from_secs(10));
    // A daemon restarted meanwhile runs the state it kept and adopts its
    // dataplane: nothing moves.
    bed.sys.stop_daemon(2).expect("stop LB 2");
    bed.sys
        .start_daemon(2)
        .expect("start LB 2 without its store");
    wait_for(Duration::from_secs(15), || {
        let f = fleet_status(&bed, 2);
        (f["connected"] == false && bed.sys.status(2).ok()?["in_sync"] == true).then_some(())
    })
    .expect("LB 2 runs again without its store");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(forwarding(&bed), forwarding_before);
    let (_, metrics) =
        integration_tests::ops::http_get(&bed.sys.topo.lbs[2].ns, "127.0.0.1:9477", "/metrics");
    assert!(
        metrics.contains("xdplb_fleet_store_connected 0"),
        "{metrics}"
    );
    let t1 = Instant::now();
    for k in 0..fleet::MEMBERS {
        etcd.start_member(k).expect("start member");
    }
    etcd.wait_healthy(Duration::from_secs(30))
        .expect("healthy again");
    let back = every_host_until(&bed, "connected", true, t1, Duration::from_secs(15));
    for (j, running) in running.iter().enumerate() {
        // Caught up: the store's revision moved on (the hosts' verdicts
        // under new leases), the desired state is the one that ran.
        assert!(
            fleet_status(&bed, j)["revision"].as_i64() > running.as_i64(),
            "LB {j}: {}",
            fleet_status(&bed, j)
        );
        assert_eq!(fleet_status(&bed, j)["local_health"], false, "LB {j}");
    }
    weight += 10;
    let accepted = change_accepted(&bed, 2, weight);
    wait_weight(&bed, "198.18.65.2", u64::from(weight), Instant::now());
    traffic.settle(Duration::from_secs(15)).unwrap();
    assert!(
        watch.changes_since(t0).is_empty(),
        "{:?}",
        watch.changes_since(t0)
    );
    let ms = |d: &[Duration]| {
        d.iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    rows.push(Row {
        fault: "the whole cluster stopped and started",
        tally: traffic.since(&before),
        note: format!(
            "lost noticed after {} ms, local health after {} ms, LB 2's daemon restarted meanwhile on the state it kept, reconnected {} ms after the cluster's restart, a change accepted {} ms later; a change while down: {:?}",
            ms(&noticed),
            ms(&local),
            ms(&back),
            accepted.as_millis(),
            text(&refused).trim()
        ),
    });

    // One host cut off from the store: it runs what it had; the others
    // take a change; it catches up by revision once it is back.
    let before = traffic.snapshot();
    let t0 = Instant::now();
    let cut = |op: &str| {
        bed.sys.topo.lbs[1]
            .ns
            .exec(&[
                "iptables",
                op,
                "OUTPUT",
                "-d",
                "198.18.80.0/22",
                "-j",
                "DROP",
            ])
            .expect("iptables");
    };
    cut("-I");
    wait_for(Duration::from_secs(10), || {
        (fleet_status(&bed, 1)["connected"] == false).then_some(())
    })
    .expect("LB 1 notices it is cut off");
    let refused_here = cli(&bed, 1, &["backend", "weight", "web", "198.18.65.2", "7"]);
    assert!(!refused_here.status.success(), "{}", text(&refused_here));
    let old = weight;
    weight += 10;
    change_accepted(&bed, 0, weight);
    for j in [0, 2] {
        wait_for(Duration::from_secs(10), || {
            (self::weight(&bed, j, "198.18.65.2") == Some(u64::from(weight))).then_some(())
        })
        .unwrap_or_else(|| panic!("LB {j} did not apply the change"));
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(self::weight(&bed, 1, "198.18.65.2"), Some(u64::from(old)));
    let t1 = Instant::now();
    cut("-D");
    let caught_up = wait_for(Duration::from_secs(15), || {
        (self::weight(&bed, 1, "198.18.65.2") == Some(u64::from(weight))).then(|| t1.elapsed())
    })
    .expect("LB 1 catches up");
    traffic.settle(Duration::from_secs(15)).unwrap();
    assert!(
        watch.changes_since(t0).is_empty(),
        "{:?}",
        watch.changes_since(t0)
    );
    rows.push(Row {
        fault: "one LB host cut off from the store",
        tally: traffic.since(&before),
        note: format!(
            "it ran its last state while the others took a change; caught up {} ms after the cut ended",
            caught_up.as_millis()
        ),
    });

    let mut table =
        "\nThe fleet's store failing under traffic (24 long-lived connections, 3 LB hosts)\n\
         | fault | established broken | new ok | new failed | route changes | what happened |\n\
         |---|---:|---:|---:|---:|---|\n"
            .to_owned();
    for r in &rows {
        table += &format!(
            "| {} | {} | {} | {} | 0 | {} |\n",
            r.fault,
            r.tally.broken.len(),
            r.tally.new_ok,
            r.tally.new_failed,
            r.note
        );
    }
    out(&table);
    for r in &rows {
        assert!(
            r.tally.broken.is_empty(),
            "{}: {:?}",
            r.fault,
            r.tally.broken
        );
        assert!(r.tally.new_ok > 0, "{}: no traffic", r.fault);
    }
}
