//! The daemon's own control surfaces under hostile load: the metrics port
//! held by an unprivileged user, the admin socket flooded with large
//! partial requests, slow and oversized HTTP requests, a flap storm on one
//! VIP, checks that cannot run for local reasons, new and flapping
//! backends. None of it may cost a VIP a backend.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{wait_for, xdplb, Daemon, Server},
    netns::Netns,
    ops::{fails, http_get, metric, ok, ring_of, servers, status, topology, Cfg, Files},
    require_root,
};
use serde_json::Value;

/// Sum of every sample of a metric family in the exposition.
fn metric_sum(ns: &Netns, name: &str) -> f64 {
    let (_, body) = http_get(ns, "127.0.0.1:9477", "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn transitions(socket: &std::path::Path) -> u64 {
    status(socket)["vips"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["backends"].as_array().unwrap().iter())
        .map(|b| b["transitions"].as_u64().unwrap_or(0))
        .sum()
}

fn backend_state(socket: &std::path::Path, vip: &str, addr: &str) -> String {
    let s = status(socket);
    s["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vip)
        .and_then(|v| {
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["address"] == addr)
        })
        .map_or("absent".into(), |b| {
            b["dataplane_state"].as_str().unwrap_or("?").to_owned()
        })
}

#[test]
fn the_metrics_port_held_by_an_unprivileged_user_starves_nothing() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-fds");
    Cfg::new(&files).write(&files.config);
    let ns = topology("load-fds");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    // systemd's default soft limit, 1024 (the daemon raises it to the
    // hard limit, which stays as it is here).
    // SAFETY: getrlimit into a struct we own.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let daemon = Daemon::start_with_nofile(
        &ns,
        &files.config,
        &files.socket,
        files.log("d.log"),
        Some((1024, lim.rlim_max)),
    )
    .unwrap();
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket).len() == 2).then_some(())
    })
    .expect("both backends up");
    let before = transitions(&files.socket);

    // A user without privileges opens 3000 connections and holds them.
    let hold = Arc::new(AtomicBool::new(true));
    let (flag, ns_name) = (hold.clone(), ns.name.clone());
    let holder = std::thread::spawn(move || {
        let _inside = integration_tests::netns::enter(&ns_name).unwrap();
        // SAFETY: the soft limit raised to the hard one for this process
        // (the test needs the fds), then a raw setresuid: on Linux
        // credentials are per thread, so only this thread becomes `nobody`
        // (glibc's setuid would change them all).
        unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        // Non-blocking connects: all 3000 are under way at once, whether the
        // daemon accepts them or they wait in its backlog.
        let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..3000 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            held.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
        // Established: the peer address is known.
        let n = held.iter().filter(|s| s.peer_addr().is_ok()).count();
        while flag.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    });
    std::thread::sleep(Duration::from_secs(3));
    let cpu0 = daemon.cpu_time();
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    // The monitor that fails the host over keeps its answer (efc012d:
    // 8 of 10 probes timed out behind the held connections).
    let mut healthz_ok = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        ok(&xdplb(&files.socket, &["status", "--json"]));
        slowest = slowest.max(started.elapsed());
        let (r, _) = raw_http(
            &ns,
            b"GET /healthz HTTP/1.0\r\n\r\n",
            Duration::from_secs(1),
        );
        healthz_ok += usize::from(r.starts_with("HTTP/1.0 200"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = (daemon.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    let fds = daemon.open_fds();
    hold.store(false, Ordering::Relaxed);
    let opened = holder.join().unwrap();
    println!(
        "3000 connections opened by uid 65534 ({opened} established): daemon at {fds} fds, {cpu:.0}% CPU, slowest admin answer {slowest:?}, {healthz_ok} /healthz probes answered within 1 s"
    );
    assert!(
        opened >= 64,
        "the attack connected ({opened} of 3000 established)"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "admin API took {slowest:?}"
    );
    assert!(
        healthz_ok >= 8,
        "/healthz answered {healthz_ok} probes within 1 s during the attack"
    );
    assert_eq!(
        transitions(&files.socket),
        before,
        "a health transition happened"
    );
    assert_eq!(ring_of(&files.socket).len(), 2);
    assert_eq!(metric_sum(&ns, "xdplb_health_check_errors_total"), 0.0);
    assert!(fds < 1024, "the daemon holds {fds} descriptors");
    // The port serves again once they are gone.
    wait_for(Duration::from_secs(10), || {
        http_get(&ns, "127.0.0.1:9477", "/healthz")
            .0
            .contains("200")
            .then_some(())
    })
    .expect("healthz answers again");
    daemon.stop().unwrap();
}

#[test]
fn the_admin_socket_stays_small_under_300_partial_megabyte_requests() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-admin");
    Cfg::new(&files).write(&files.config);
    let ns = topology("load-admin");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let rss = || daemon.proc_status("VmRSS").unwrap_or(0);
    let before = rss();
    static PAYLOAD: [u8; (1 << 20) - 1] = [b'a'; (1 << 20) - 1];
    let writers: Vec<_> = (0..300)
        .map(|_| {
            let socket = files.socket.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    return None;
                };
                s.set_write_timeout(Some(Duration::from_secs(3))).ok();
                s.set_read_timeout(Some(Duration::from_secs(8))).ok();
                let _ = s.write_all(&PAYLOAD);
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                Some(reply)
            })
        })
        .collect();
    let mut during = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        during = during.max(rss());
    }
    let replies: Vec<String> = writers
        .into_iter()
        .filter_map(|w| w.join().unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let after = rss();
    println!(
        "RSS before {} MiB, peak during {} MiB, after {} MiB ({} replies)",
        before >> 10,
        during >> 10,
        after >> 10,
        replies.len()
    );
    assert!(
        during.saturating_sub(before) < 48 << 10,
        "RSS grew by {} MiB",
        (during - before) >> 10
    );
    assert!(
        replies
            .iter()
            .any(|r| r.contains("busy") || r.contains("newline") || r.contains("timed out")),
        "{:?}",
        replies.iter().take(3).collect::<Vec<_>>()
    );
    // The API still works, and says what its limit is.
    ok(&xdplb(&files.socket, &["status"]));
    let mut s = UnixStream::connect(&files.socket).unwrap();
    let big = vec![b'a'; (1 << 20) + 10];
    let _ = s.write_all(&big);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.contains("request longer than 1048576 bytes"),
        "{reply}"
    );
    daemon.stop().unwrap();
}

/// Send `request` raw to the metrics port; what comes back within `limit`
/// (None: nothing, the connection still open).
fn raw_http(ns: &Netns, request: &[u8], limit: Duration) -> (String, Duration) {
    let _inside = ns.enter().unwrap();
    let started = Instant::now();
    let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return (String::new(), started.elapsed());
    };
    s.set_read_timeout(Some(limit)).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn slow_odd_and_oversized_http_requests_are_answered_or_closed() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-http");
    Cfg::new(&files).write(&files.config);
    let ns = topology("load-http");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let limit = Duration::from_secs(12);
    let (r, _) = raw_http(&ns, b"GET /healthz HTTP/1.0\n\n", limit);
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.0 503"),
        "LF only: {r:?}"
    );
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend_from_slice(b"\r\n\r\n");
    let (r, _) = raw_http(&ns, &big, limit);
    assert!(r.starts_with("HTTP/1.1 431"), "100 KB header: {r:?}");
    let (r, took) = raw_http(&ns, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ", limit);
    assert!(
        took < Duration::from_secs(11),
        "a slow header was held {took:?}: {r:?}"
    );
    println!("a request head that never ends is closed after {took:?}");
    let (r, _) = raw_http(
        &ns,
        b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
        limit,
    );
    assert!(r.starts_with("HTTP/1.0 405"), "{r:?}");
    let (r, _) = raw_http(&ns, b"GET /nope HTTP/1.0\r\n\r\n", limit);
    assert!(r.starts_with("HTTP/1.0 404"), "{r:?}");
    // Content negotiation: OpenMetrics when asked, Prometheus text otherwise.
    let (r, _) = raw_http(
        &ns,
        b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        limit,
    );
    assert!(
        r.contains("content-type: application/openmetrics-text"),
        "{r}"
    );
    assert!(
        r.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let (r, _) = raw_http(&ns, b"GET /metrics HTTP/1.0\r\n\r\n", limit);
    assert!(r.contains("content-type: text/plain; version=0.0.4"), "{r}");
    daemon.stop().unwrap();
}

/// Every family's samples in one block, each HELP/TYPE once, and every
/// state of the state gauge for each backend.
#[test]
fn the_exposition_is_valid_and_complete() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-expo");
    Cfg::new(&files).write(&files.config);
    let ns = topology("load-expo");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket).len() == 2).then_some(())
    })
    .expect("both up");
    let (_, body) = http_get(&ns, "127.0.0.1:9477", "/metrics");
    let mut declared: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut closed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap().to_owned();
            assert!(!declared.contains(&name), "{name} declared twice");
            if let Some(c) = current.replace(name.clone()) {
                closed.insert(c);
            }
            declared.push(name);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap();
        let family = declared
            .iter()
            .filter(|f| {
                sample == f.as_str()
                    || sample
                        .strip_prefix(f.as_str())
                        .is_some_and(|r| r == "_total")
            })
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample {sample} before its TYPE"));
        assert_eq!(
            Some(family),
            current.as_ref(),
            "{sample} is not in its family's block"
        );
        assert!(!closed.contains(family), "{family} interleaved");
    }
    for family in [
        "xdplb_build_info",
        "xdplb_vip_dropped_total",
        "xdplb_backend_weight",
        "xdplb_vip_usable_backends",
        "xdplb_config_last_reload_successful",
        "xdplb_config_last_reload_success_timestamp_seconds",
        "xdplb_driver_xdp_errors_total",
        "xdplb_health_check_errors_total",
        "xdplb_ring_rebuilds_total",
        "xdplb_backend_flap_damped",
        "xdplb_dataplane_attached",
    ] {
        assert!(
            declared.iter().any(|d| d == family),
            "no {family} in:\n{body}"
        );
    }
    for state in ["up", "down", "draining", "absent"] {
        let needle =
            format!("xdplb_backend_state{{vip=\"web\",backend=\"198.18.1.1\",state=\"{state}\"}}");
        let found = body.lines().any(|l| {
            let l: String = l.split_whitespace().next().unwrap_or("").to_owned();
            l.starts_with("xdplb_backend_state{")
                && l.contains("backend=\"198.18.1.1\"")
                && l.contains(&format!("state=\"{state}\""))
        });
        assert!(found, "no {needle}");
    }
    assert_eq!(metric(&ns, "xdplb_vip_usable_backends"), Some(2.0));
    assert_eq!(
        metric(&ns, "xdplb_config_last_reload_successful"),
        Some(1.0)
    );
    // A refused reload shows.
    std::fs::write(&files.config, "interface = ").unwrap();
    fails(&xdplb(&files.socket, &["reload"]), "line 1");
    assert_eq!(
        metric(&ns, "xdplb_config_last_reload_successful"),
        Some(0.0)
    );
    daemon.stop().unwrap();
}

#[test]
fn a_flap_storm_does_not_starve_a_calm_vip() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-storm");
    let storm: Vec<String> = (1..=250).map(|i| format!("198.18.2.{i}")).collect();
    let mut cfg = Cfg::new(&files);
    cfg.max_backends = 512;
    cfg.ring_size = 65537;
    cfg.backends = storm.iter().map(String::as_str).collect();
    cfg.health = "{ kind = \"tcp\", port = 80, interval_ms = 200, timeout_ms = 100, jitter_ms = 20, rise = 1, fall = 1, init_state = \"up\" }".into();
    cfg.extra = r#"
[[vip]]
name = "calm"
address = "198.18.0.20"
port = 8080
protocol = "tcp"
forwarding = "ipip"
health = { kind = "tcp", interval_ms = 200, timeout_ms = 100, jitter_ms = 20, rise = 1, fall = 2 }

[[vip.backend]]
address = "198.18.1.1"

[[vip.backend]]
address = "198.18.1.2"
"#
    .into();
    cfg.write(&files.config);
    let ns = topology("load-storm");
    ns.ip(&["addr", "add", "198.18.2.254/24", "dev", "lo"])
        .unwrap();
    let mut calm: Vec<Option<Server>> = {
        let _inside = ns.enter().unwrap();
        ["198.18.1.1", "198.18.1.2"]
            .iter()
            .map(|a| Some(Server::http(SocketAddr::new(a.parse().unwrap(), 8080)).unwrap()))
            .collect()
    };
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    wait_for(Duration::from_secs(5), || {
        (backend_state(&files.socket, "calm", "198.18.1.1") == "up"
            && backend_state(&files.socket, "calm", "198.18.1.2") == "up")
            .then_some(())
    })
    .expect("calm VIP up");

    // The storm: every storm backend's port opens and closes every 200 ms.
    let run = Arc::new(AtomicBool::new(true));
    let (flag, ns_name) = (run.clone(), ns.name.clone());
    let flapper = std::thread::spawn(move || {
        let _inside = integration_tests::netns::enter(&ns_name).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let l = TcpListener::bind("0.0.0.0:80").ok();
            std::thread::sleep(Duration::from_millis(200));
            drop(l);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let rebuilds0 = metric_sum(&ns, "xdplb_ring_rebuilds_total");
    let transitions0 = transitions(&files.socket);
    let cpu0 = daemon.cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    // A calm backend dies in the middle of it.
    calm[0] = None;
    let killed = Instant::now();
    let detected = wait_for(Duration::from_secs(15), || {
        (backend_state(&files.socket, "calm", "198.18.1.1") == "down").then(|| killed.elapsed())
    });
    let secs = t0.elapsed().as_secs_f64();
    let rebuilds = (metric_sum(&ns, "xdplb_ring_rebuilds_total") - rebuilds0) / secs;
    let flaps = (transitions(&files.socket) - transitions0) as f64 / secs;
    let cpu = (daemon.cpu_time() - cpu0).as_secs_f64() / secs * 100.0;
    run.store(false, Ordering::Relaxed);
    flapper.join().unwrap();
    println!(
        "flap storm: {flaps:.0} transitions/s, {rebuilds:.1} ring rebuilds/s, daemon {cpu:.0}% CPU; \
         calm backend death detected in {detected:?} (bound: 200 ms x fall 2 + 200 ms = 600 ms)"
    );
    let detected = detected.expect("the calm VIP's dead backend was never detected");
    assert!(flaps > 50.0, "the storm flapped ({flaps:.0}/s)");
    assert!(
        detected < Duration::from_millis(1500),
        "detection on the calm VIP took {detected:?}"
    );
    assert!(
        rebuilds < 2.0 * 1000.0 / 50.0 + 2.0,
        "{rebuilds} ring rebuilds/s: not coalesced"
    );
    daemon.stop().unwrap();
}

/// Before: a router's "network unreachable" (ICMP) was taken for a local
/// error (ENETUNREACH), so a backend behind a dead path stayed up and
/// `xdplb check` said OK; and a backend whose checks never ran here stayed
/// up with nothing said but a log line (efc012d: 198.19.6.6 "up", no
/// `checks_blocked`, check exit 0).
#[test]
fn a_check_that_cannot_run_here_is_not_the_backends_fault() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-local");
    let mut cfg = Cfg::new(&files);
    // 198.19.5.5 has no route in the namespace: connect fails ENETUNREACH
    // here. 198.19.6.6 is routed to a router that has no route for it and
    // answers ICMP "network unreachable": connect fails ENETUNREACH too,
    // but the answer came from the path.
    cfg.backends = vec!["198.18.1.1", "198.19.5.5", "198.19.6.6"];
    cfg.health = "{ kind = \"tcp\", port = 80, interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 1, fall = 1, init_state = \"up\", half_open = false }".into();
    cfg.write(&files.config);
    let ns = topology("load-local");
    let router = Netns::new("load-local-rt").unwrap();
    ns.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "rt0",
        "netns",
        &router.name,
    ])
    .unwrap();
    ns.ip(&["addr", "add", "198.18.99.1/30", "dev", "up0"])
        .unwrap();
    ns.ip(&["link", "set", "up0", "up"]).unwrap();
    ns.ip(&["route", "add", "198.19.6.0/24", "via", "198.18.99.2"])
        .unwrap();
    router
        .ip(&["addr", "add", "198.18.99.2/30", "dev", "rt0"])
        .unwrap();
    router.ip(&["link", "set", "rt0", "up"]).unwrap();
    router
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    router
        .exec(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"])
        .unwrap();
    let _backends = servers(&ns, &["198.18.1.1"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let errors = wait_for(Duration::from_secs(5), || {
        Some(metric_sum(&ns, "xdplb_health_check_errors_total")).filter(|n| *n >= 5.0)
    })
    .expect("local errors counted");
    assert!(
        http_get(&ns, "127.0.0.1:9477", "/metrics")
            .1
            .lines()
            .any(|l| l.starts_with("xdplb_health_check_errors_total{vip=")
                && l.contains("backend=\"198.19.5.5\",kind=\"no_route\"}")),
        "kind no_route, by VIP and backend"
    );
    // The router's answer is the backend's failure.
    let down = wait_for(Duration::from_secs(5), || {
        (backend_state(&files.socket, "web", "198.19.6.6") == "down").then_some(())
    });
    let s: Value = status(&files.socket);
    assert!(
        down.is_some(),
        "behind an unreachable network, still up: {s}"
    );
    let routed = &s["vips"][0]["backends"][2];
    assert!(
        routed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("answered by the path")),
        "{routed}"
    );
    // Not routed here: not the backend's fault, but not silent either.
    assert_eq!(backend_state(&files.socket, "web", "198.19.5.5"), "up");
    let b = &s["vips"][0]["backends"][1];
    assert_eq!(b["transitions"], 0, "{b}");
    assert!(
        b["checks_blocked"]
            .as_str()
            .is_some_and(|e| e.contains("no route from this host")),
        "{b}"
    );
    let metrics = http_get(&ns, "127.0.0.1:9477", "/metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("xdplb_backend_checks_blocked{")
                && l.contains("198.19.5.5")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let check = xdplb(&files.socket, &["check"]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("not checked for a local reason: 198.19.5.5 of web"),
        "{check:?}"
    );
    let log = daemon.log_text();
    assert!(log.contains("could not run for a local reason"), "{log}");
    assert!(
        log.contains("health of backend 198.19.5.5 of VIP web unknown"),
        "{log}"
    );
    println!("{errors} local check errors, backend still up and reported; the router's answer took its backend down");
    daemon.stop().unwrap();
}

#[test]
fn a_new_backend_joins_the_ring_only_after_its_first_check() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-init");
    Cfg::new(&files).write(&files.config);
    let ns = topology("load-init");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket).len() == 2).then_some(())
    })
    .expect("both up");
    // Added with nothing listening: never in the ring.
    ok(&xdplb(
        &files.socket,
        &["backend", "add", "web", "198.18.1.3"],
    ));
    let added = Instant::now();
    while added.elapsed() < Duration::from_millis(800) {
        assert!(
            !ring_of(&files.socket).contains(&"198.18.1.3".to_owned()),
            "an unchecked backend is in the ring after {:?}",
            added.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once it answers, it joins.
    let _late = servers(&ns, &["198.18.1.3"]);
    wait_for(Duration::from_secs(5), || {
        ring_of(&files.socket)
            .contains(&"198.18.1.3".to_owned())
            .then_some(())
    })
    .expect("joined after passing a check");
    daemon.stop().unwrap();
}

#[test]
fn a_flapping_backend_is_held_down() {
    if !require_root() {
        return;
    }
    let files = Files::new("load-damp");
    let mut cfg = Cfg::new(&files);
    cfg.health = "{ kind = \"tcp\", port = 80, interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 1, fall = 1, flap_limit = 3, flap_window_ms = 10000, flap_hold_ms = 2000 }".into();
    cfg.write(&files.config);
    let ns = topology("load-damp");
    let _stable = servers(&ns, &["198.18.1.1"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    // 198.18.1.2 comes and goes: up, down, up, down (four changes > 3).
    for _ in 0..2 {
        let s = servers(&ns, &["198.18.1.2"]);
        wait_for(Duration::from_secs(3), || {
            (backend_state(&files.socket, "web", "198.18.1.2") == "up").then_some(())
        })
        .expect("up");
        drop(s);
        wait_for(Duration::from_secs(3), || {
            (backend_state(&files.socket, "web", "198.18.1.2") == "down").then_some(())
        })
        .expect("down");
    }
    // Now healthy again, but damped: held down.
    let _back = servers(&ns, &["198.18.1.2"]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(backend_state(&files.socket, "web", "198.18.1.2"), "down");
    let (_, body) = http_get(&ns, "127.0.0.1:9477", "/metrics");
    assert!(
        body.contains("xdplb_backend_flap_damped{vip=\"web\",backend=\"198.18.1.2\"} 1")
            || body.contains("xdplb_backend_flap_damped{backend=\"198.18.1.2\",vip=\"web\"} 1"),
        "{body}"
    );
    assert!(
        daemon.log_text().contains("is flapping") && daemon.log_text().contains("by flap damping")
    );
    // The hold ends: back in.
    wait_for(Duration::from_secs(5), || {
        (backend_state(&files.socket, "web", "198.18.1.2") == "up").then_some(())
    })
    .expect("back after the hold");
    daemon.stop().unwrap();
}

#[test]
fn half_open_probes_tell_open_closed_and_silent_ports_apart() {
    use xdp_user::health::probe::{source_for, Prober};
    if !require_root() {
        return;
    }
    let ns = topology("load-probe");
    // A neighbour that never answers: an address on the veth's far side
    // with a static neighbour entry, so packets leave and nothing returns.
    ns.ip(&["addr", "add", "198.18.9.1/24", "dev", "lb0"])
        .unwrap();
    ns.ip(&[
        "neigh",
        "add",
        "198.18.9.2",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "lb0",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "2001:db8:1::1/128", "dev", "lo", "nodad"])
        .unwrap();
    let _open = servers(&ns, &["198.18.1.1", "2001:db8:1::1"]);
    let _inside = ns.enter().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let prober = Prober::open().expect("root may open raw sockets");
        let probe = |addr: &str| {
            let target: SocketAddr = addr.parse().unwrap();
            let source = source_for(target).unwrap();
            let prober = prober.clone();
            async move {
                let t = Instant::now();
                let r = prober
                    .probe(source, target, Duration::from_millis(300))
                    .await;
                (r, t.elapsed())
            }
        };
        let (open, _) = probe("198.18.1.1:80").await;
        assert!(open.is_ok(), "{open:?}");
        let (closed, took) = probe("198.18.1.1:81").await;
        let e = closed.expect_err("nothing listens on 81");
        assert!(e.reason.contains("reset"), "{e}");
        assert!(
            took < Duration::from_millis(300),
            "a reset is immediate ({took:?})"
        );
        // IPv6: the kernel computes the checksum, replies carry no header.
        let (open6, _) = probe("[2001:db8:1::1]:80").await;
        assert!(open6.is_ok(), "{open6:?}");
        let (closed6, _) = probe("[2001:db8:1::1]:81").await;
        assert!(closed6.expect_err("closed").reason.contains("reset"));
        let (silent, took) = probe("198.18.9.2:80").await;
        let e = silent.expect_err("no host answers");
        assert!(e.reason.contains("timed out"), "{e}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        // Many at once, to one port: each gets its own answer.
        let all = futures_join((0..20).map(|_| probe("198.18.1.1:80")).collect::<Vec<_>>()).await;
        assert!(all.iter().all(|(r, _)| r.is_ok()), "{all:?}");
    });
}

/// Await every future (no extra crate for one join).
async fn futures_join<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let handles: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await);
    }
    out
}
