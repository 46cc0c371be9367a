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
    fleet,
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
        took.iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
    ));
    let revs: Vec<i64> = (0..LBS)
        .map(|j| fleet_status(&bed, j)["revision"].as_i64().unwrap_or(-1))
        .collect();
    assert!(revs.iter().all(|r| *r == revs[0] && *r > 0), "{revs:?}");

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
        let running: Vec<_> = (0..LBS)
            .map(|j| fleet_status(&bed, j)["revision"].as_i64())
            .collect();
        etcd.etcdctl(&["put", &key, &value]).expect("etcdctl put");
        for j in 0..LBS {
            let refused = wait_for(Duration::from_secs(10), || {
                fleet_status(&bed, j)["refused"]
                    .as_str()
                    .filter(|r| r.contains(&key))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("LB {j} did not refuse {key}: {}", fleet_status(&bed, j)));
            assert!(refused.contains(why), "{refused}");
            assert_eq!(fleet_status(&bed, j)["revision"].as_i64(), running[j]);
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
        let config = bed.sys.configs[0].to_string_lossy().into_owned();
        let o = run_in(
            &bed.sys.topo.lbs[0].ns,
            &["check-config", &config],
            Duration::from_secs(20),
        )
        .expect("check-config");
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
    let config = bed.sys.configs[0].to_string_lossy().into_owned();
    let o = run_in(
        &bed.sys.topo.lbs[0].ns,
        &["check-config", &config],
        Duration::from_secs(20),
    )
    .expect("check-config");
    assert!(o.status.success(), "{}", text(&o));
    let o = run_in(
        &bed.sys.topo.lbs[0].ns,
        &["fleet", "export", "--config", &config],
        Duration::from_secs(20),
    )
    .expect("export");
    assert!(
        o.status.success() && text(&o).contains("weight = 60"),
        "{}",
        text(&o)
    );

    traffic.settle(Duration::from_secs(15)).unwrap();
    let t = traffic.since(&before);
    assert!(t.broken.is_empty(), "{:?}", t.broken);
    assert!(t.new_ok > 0 && t.new_failed == 0, "{t:?}");
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
