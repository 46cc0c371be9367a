//! One fleet (issue: shared desired state and shared health across LB
//! hosts, through etcd): three LB hosts with BIRD and BFD behind the
//! router, a three-member etcd cluster with TLS, continuous traffic, and
//! the files of `examples/fleet/`. Each test prints what it measured.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{run_in, wait_for, xdplb},
    fleet::{self, Etcd},
    ha::{Ecmp, Traffic},
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
    let (bed, etcd) = fleet::bed("fl-chg").expect("fleet bed");
    let traffic = Traffic::start(&bed.sys, 24, Duration::from_secs(120)).expect("traffic");
    let before = traffic.snapshot();
    let t0 = Instant::now();
    let o = cli(&bed, 0, &["backend", "weight", "web", "198.18.66.2", "50"]);
    assert!(o.status.success(), "{}", text(&o));
    let took = wait_weight(&bed, "198.18.66.2", 50, t0);
    out(&format!(
        "\nA change made on LB 0 (`xdplb backend weight`), applied by: {:?}\n",
        took.iter().map(|d| format!("{} ms", d.as_millis())).collect::<Vec<_>>()
    ));
    let revs: Vec<i64> = (0..LBS)
        .map(|j| fleet_status(&bed, j)["revision"].as_i64().unwrap_or(-1))
        .collect();
    assert!(revs.iter().all(|r| *r == revs[0] && *r > 0), "{revs:?}");
    traffic.settle(Duration::from_secs(15)).unwrap();
    let t = traffic.since(&before);
    assert!(t.broken.is_empty(), "{:?}", t.broken);
    drop(etcd);
}
