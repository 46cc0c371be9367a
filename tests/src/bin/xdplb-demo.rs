//! `cargo xtask demo`: the main job on a built-in network of namespaces.
//! Two VIPs (one IPv6), three backends each; real connections through the
//! XDP balancer; a backend killed, detected, its flows moving, and revived.
//! `--keep` leaves everything up until Ctrl-C.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::{
    daemon::xdplb_bin,
    e2e::{backend_name, http_get, tally, Conn, System, CHECK_FALL, CHECK_INTERVAL},
};

const VIPS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)),
];
const CONNECTIONS: usize = 300;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn distribution(sys: &System, vip: IpAddr) -> Result<(BTreeMap<String, usize>, usize)> {
    sys.from_client(0, || tally(CONNECTIONS, || http_get(vip)))
}

fn show(vip: IpAddr, counts: &BTreeMap<String, usize>, failed: usize) {
    let line: Vec<String> = (0..3)
        .map(|i| {
            let n = counts.get(&backend_name(i)).copied().unwrap_or(0);
            format!("{} {:>3} {}", backend_name(i), n, "#".repeat(n / 5))
        })
        .collect();
    println!("    {vip:<14} {} connections, {failed} failed", CONNECTIONS);
    for l in line {
        println!("      {l}");
    }
}

fn main() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads XDP programs: run it as root");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    step("building xdplb");
    let bin = xdplb_bin();
    println!("    {}", bin.display());

    step("building the network: a router, an LB host, 3 backends, a client (namespaces xdplb-demo-*)");
    let mut sys =
        System::start("demo", 1, 3, VIPS.to_vec(), &[]).context("starting the demo system")?;
    println!(
        "    VIPs {} and {} (all TCP ports), backends {}",
        VIPS[0],
        VIPS[1],
        sys.topo
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{}={}/{}", backend_name(i), b.v4, b.v6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("    xdplb run --config {}", sys.configs[0].display());
    sys.wait_checked(Duration::from_secs(10))?;
    println!("    every backend passed its HTTP health check");

    step(&format!(
        "{CONNECTIONS} new connections to each VIP, through the XDP balancer"
    ));
    let mut lost = 0;
    for vip in VIPS {
        let (counts, failed) = distribution(&sys, vip)?;
        show(vip, &counts, failed);
        lost += failed;
    }

    step("opening 30 long-lived connections, then killing backend b1");
    let mut long = sys.from_client(0, || {
        (0..30)
            .map(|_| Conn::open(VIPS[0]))
            .collect::<Result<Vec<_>>>()
    })??;
    let on_b1 = long.iter().filter(|c| c.backend == "b1").count();
    println!("    {on_b1} of them are on b1");
    sys.kill_backend(1);
    let detected = sys.wait_backend(
        0,
        1,
        "down",
        CHECK_INTERVAL * CHECK_FALL + Duration::from_secs(2),
    )?;
    println!(
        "    b1 marked down after {:.0} ms (checks every {} ms, down after {CHECK_FALL} failures)",
        detected.as_secs_f64() * 1e3,
        CHECK_INTERVAL.as_millis()
    );
    let mut intact = 0;
    let mut broken = 0;
    for c in long.iter_mut() {
        let was = c.backend.clone();
        match c.ask() {
            Ok(now) if now == was => intact += 1,
            _ => broken += 1,
        }
    }
    println!("    long-lived connections: {intact} to live backends intact, {broken} to b1 closed with it");
    for vip in VIPS {
        let (counts, failed) = distribution(&sys, vip)?;
        show(vip, &counts, failed);
        lost += failed;
    }

    step("reviving b1");
    sys.revive_backend(1)?;
    let back = sys.wait_backend(0, 1, "up", Duration::from_secs(5))?;
    println!(
        "    b1 back in the ring after {:.0} ms",
        back.as_secs_f64() * 1e3
    );
    for vip in VIPS {
        let (counts, failed) = distribution(&sys, vip)?;
        show(vip, &counts, failed);
        lost += failed;
    }

    let stats = sys.status(0)?;
    step("summary");
    println!(
        "    {} connections over 2 VIPs, {lost} failed; b1 down detected in {:.0} ms, back in {:.0} ms",
        CONNECTIONS * 6,
        detected.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3
    );
    println!(
        "    dataplane: {} packets encapsulated, {} flows tracked; done in {:.1} s",
        stats["reasons"]["tx_encap"],
        stats["flows"],
        started.elapsed().as_secs_f64()
    );
    if lost > 0 {
        bail!("{lost} connections failed outside the failure window");
    }
    if keep {
        println!(
            "\n    left running. In another terminal:\n      {} status --socket {}\n    Ctrl-C here tears it all down.",
            bin.display(),
            sys.sockets[0].display()
        );
        while !INTERRUPTED.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    step("cleaning up (namespaces, pins, daemon)");
    drop(sys);
    Ok(())
}
