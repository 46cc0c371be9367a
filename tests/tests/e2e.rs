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
    e2e::{backend_name, http_get, Conn, System, CHECK_FALL, CHECK_INTERVAL},
    require_root,
};

const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

/// `n` new connections to `vip`; replies per backend, and failures.
fn spread(sys: &System, vip: IpAddr, n: usize) -> (BTreeMap<String, usize>, usize) {
    sys.from_client(0, || {
        let mut counts = BTreeMap::new();
        let mut failed = 0;
        let mut in_a_row = 0;
        for _ in 0..n {
            match http_get(vip) {
                Ok(b) => {
                    *counts.entry(b).or_insert(0) += 1;
                    in_a_row = 0;
                }
                Err(_) => {
                    failed += 1;
                    in_a_row += 1;
                    // Bounded: a broken path fails fast, not n timeouts.
                    if in_a_row == 10 {
                        break;
                    }
                }
            }
        }
        (counts, failed)
    })
    .unwrap()
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
#[ignore = "manual: keeps a system up for 120 s for poking"]
fn keep_system_up() {
    let sys = System::start("keep", 1, 2, vec![VIP4, VIP6], &[]).unwrap();
    println!("up");
    std::thread::sleep(Duration::from_secs(120));
    drop(sys);
}
