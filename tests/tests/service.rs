//! Running as a system service (issue: ship it as a system service): the
//! systemd unit's capabilities, readiness, watchdog, reload and stop
//! notifications, journald logging.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{wait_for, xdplb, Daemon, Launch, Server},
    ops::{ok, servers, status, topology, xdp_prog, Cfg, Files},
    require_root,
};

/// The value of `key=` in packaging/xdplb.service.
fn unit_setting(key: &str) -> String {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/xdplb.service"
    ))
    .unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit sets no {key}"))
        .to_owned()
}

fn unit_caps() -> Vec<String> {
    unit_setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

fn under_caps(caps: &[String]) -> Launch {
    let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    Launch {
        wrapper: Some(vec![
            "setpriv".into(),
            "--inh-caps=-all".into(),
            format!("--bounding-set=-all,{}", set.join(",")),
            "--".into(),
        ]),
        ..Launch::default()
    }
}

/// A config with announcing on, a namespace with two backends.
fn bed(tag: &str) -> (Files, integration_tests::netns::Netns, Vec<Server>) {
    let files = Files::new(tag);
    let mut cfg = Cfg::new(&files);
    cfg.extra = "\n[announce]\nenabled = true\n".into();
    cfg.write(&files.config);
    let ns = topology(tag);
    let backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    (files, ns, backends)
}

#[test]
fn the_units_capabilities_are_enough_and_each_is_needed() {
    if !require_root() {
        return;
    }
    let caps = unit_caps();
    assert!(!caps.contains(&"sys_admin".to_string()), "{caps:?}");

    // With exactly the unit's set: attached, in sync, checks pass with
    // half-open probes, the VIP announced.
    let (files, ns, _backends) = bed("caps");
    let d = Daemon::start_with(
        &ns,
        &files.config,
        &files.socket,
        files.log("d.log"),
        &under_caps(&caps),
    )
    .unwrap();
    let announced = wait_for(Duration::from_secs(5), || {
        let s = status(&files.socket);
        (s["attached"] == true && s["in_sync"] == true && !s["announce"]["announced"][0].is_null())
            .then_some(s)
    });
    assert!(announced.is_some(), "{}", status(&files.socket));
    assert!(d.log_text().contains("half_open=true"), "{}", d.log_text());
    d.stop().unwrap();
    drop((files, ns));

    // Without any one of them something an operator relies on is lost.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (files, ns, _backends) = bed("caps-less");
        let mut d =
            Daemon::spawn(&ns, &files.config, files.log("d.log"), &under_caps(&fewer)).unwrap();
        match missing.as_str() {
            // No dataplane at all: the daemon refuses to start.
            "bpf" | "perfmon" | "net_admin" => {
                let exit = d.wait_exit(Duration::from_secs(20));
                assert!(
                    exit.is_some_and(|s| !s.success()),
                    "ran without CAP_{}: {}",
                    missing.to_uppercase(),
                    d.log_text()
                );
            }
            // Health checks fall back to full connections (2.5x the CPU).
            "net_raw" => {
                let logged = wait_for(Duration::from_secs(10), || {
                    d.log_text().contains("half_open=false").then_some(())
                });
                assert!(logged.is_some(), "{}", d.log_text());
                d.stop().unwrap();
            }
            other => panic!("the unit grants CAP_{other}, which no test shows is needed"),
        }
    }
}

/// Datagrams on `sock` until one equals `want` (a whole line of one), or
/// `limit` passes; every message read.
fn until_line(sock: &UnixDatagram, want: &str, limit: Duration) -> (bool, Vec<String>) {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return (true, seen);
            }
        }
    }
    (false, seen)
}

#[test]
fn systemd_hears_ready_watchdog_reload_and_stop() {
    if !require_root() {
        return;
    }
    let (files, ns, _backends) = bed("notify");
    let path = files.scratch.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let launch = Launch {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        // systemd names the watched pid: the daemon's own, after exec.
        wrapper: Some(vec![
            "sh".into(),
            "-c".into(),
            r#"WATCHDOG_PID=$$ exec "$0" "$@""#.into(),
        ]),
        ..Launch::default()
    };

    // A daemon that cannot attach never says it is ready.
    let mut cfg = Cfg::new(&files);
    cfg.interface = "nope0";
    cfg.write(&files.config);
    let mut d = Daemon::spawn(&ns, &files.config, files.log("bad.log"), &launch).unwrap();
    assert!(d
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| !s.success()));
    let (ready, seen) = until_line(&sock, "READY=1", Duration::from_millis(300));
    assert!(!ready, "READY from a daemon that did not attach: {seen:?}");

    // Ready once attached and in sync, not before.
    let mut cfg = Cfg::new(&files);
    cfg.extra = "\n[announce]\nenabled = true\n".into();
    cfg.write(&files.config);
    let mut d = Daemon::spawn(&ns, &files.config, files.log("d.log"), &launch).unwrap();
    let (ready, seen) = until_line(&sock, "READY=1", Duration::from_secs(20));
    assert!(ready, "no READY=1: {seen:?}\n{}", d.log_text());
    assert!(
        xdp_prog(&ns, "lb0").is_some(),
        "READY before the program was attached"
    );
    assert_eq!(status(&files.socket)["in_sync"], true);

    // The watchdog is fed every half period (200 ms here).
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1100) {
        let (hit, _) = until_line(
            &sock,
            "WATCHDOG=1",
            Duration::from_millis(1100) - started.elapsed().min(Duration::from_millis(1100)),
        );
        pings += usize::from(hit);
    }
    assert!(pings >= 3, "{pings} watchdog pings in 1.1 s");

    // SIGHUP: RELOADING=1 (with the time), then READY=1 again.
    d.signal(libc::SIGHUP);
    let (reloading, seen) = until_line(&sock, "RELOADING=1", Duration::from_secs(5));
    assert!(reloading, "{seen:?}");
    assert!(seen.last().unwrap().contains("MONOTONIC_USEC="), "{seen:?}");
    let (ready, seen) = until_line(&sock, "READY=1", Duration::from_secs(5));
    assert!(ready, "{seen:?}");

    // SIGTERM: STOPPING=1, and the process is gone promptly, leaving the
    // dataplane forwarding.
    let asked = Instant::now();
    d.signal(libc::SIGTERM);
    let exit = d.wait_exit(Duration::from_secs(10));
    let took = asked.elapsed();
    let (stopping, seen) = until_line(&sock, "STOPPING=1", Duration::from_secs(1));
    assert!(stopping, "{seen:?}");
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    // Printed past the harness's capture: `cargo xtask test` shows it.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\nSIGTERM to exit: {took:?}\n").as_bytes(),
    );
    assert!(
        took < Duration::from_secs(1),
        "SIGTERM took {took:?} to end the daemon"
    );
    assert!(xdp_prog(&ns, "lb0").is_some());
}

#[test]
fn under_systemd_logs_go_to_the_journal_with_native_fields() {
    use std::os::unix::fs::MetadataExt as _;
    if !require_root() {
        return;
    }
    let (files, ns, _backends) = bed("journal");
    // A journal of our own: a socket at journal/socket in a directory the
    // daemon sees as /run/systemd (a bind mount in its own mount namespace;
    // /sys/fs/bpf stays the host's).
    let fake = files.scratch.0.join("systemd");
    std::fs::create_dir_all(fake.join("journal")).unwrap();
    let journal = UnixDatagram::bind(fake.join("journal/socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // systemd tells the service its stderr is the journal by naming the
    // stream's device and inode.
    let log = files.log("stderr.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let launch = Launch {
        env: vec![
            (
                "JOURNAL_STREAM".into(),
                format!("{}:{}", meta.dev(), meta.ino()),
            ),
            ("FAKE_SYSTEMD".into(), fake.to_string_lossy().into_owned()),
        ],
        wrapper: Some(vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            r#"mount --bind "$FAKE_SYSTEMD" /run/systemd && exec "$0" "$@""#.into(),
        ]),
        ..Launch::default()
    };
    let d = Daemon::start_with(&ns, &files.config, &files.socket, log, &launch).unwrap();
    let mut entries: Vec<std::collections::BTreeMap<String, String>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    let is_start = |f: &std::collections::BTreeMap<String, String>| {
        f.get("MESSAGE")
            .is_some_and(|m| m.starts_with("running: 1 VIP, 2 health checks"))
    };
    while Instant::now() < deadline && !entries.iter().any(is_start) {
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    let running = entries
        .iter()
        .find(|f| is_start(f))
        .unwrap_or_else(|| panic!("no journal entry for the start: {entries:?}"));
    for (key, value) in [
        ("PRIORITY", "5"),
        ("SYSLOG_IDENTIFIER", "xdplb"),
        ("TARGET", "xdp_user::daemon"),
        ("F_VIPS", "1"),
    ] {
        assert_eq!(
            running.get(key).map(String::as_str),
            Some(value),
            "{running:?}"
        );
    }
    // Nothing doubled on stderr.
    assert!(!d.log_text().contains("running: "), "{}", d.log_text());
    d.stop().unwrap();
}

/// The fields of one entry in the journal's native protocol: `KEY=value`
/// lines, or `KEY`, a newline, a little-endian u64 length and the value.
fn journal_fields(mut entry: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    while let Some(nl) = entry.iter().position(|b| *b == b'\n') {
        let line = &entry[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            entry = &entry[nl + 1..];
            continue;
        }
        let rest = &entry[nl + 1..];
        let Some(len) = rest.get(..8) else { break };
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let Some(value) = rest.get(8..8 + len) else {
            break;
        };
        out.insert(
            String::from_utf8_lossy(line).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
        entry = rest.get(8 + len + 1..).unwrap_or_default();
    }
    out
}

/// What the unit's filesystem sandbox does, done with a mount namespace:
/// every mount read-only (`ProtectSystem=strict`), then the unit's
/// `ReadWritePaths` and `RuntimeDirectory` writable again, `/home` and
/// `/root` hidden (`ProtectHome=yes`), then `NoNewPrivileges=yes` and the
/// capability bounding set (setpriv). `/etc/xdplb` is the test's config
/// directory here. A probe write outside them must fail, or the emulation
/// proves nothing.
const SANDBOX: &str = r#"set -e
mkdir -p /run/xdplb
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
    mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for p in $XDPLB_RW; do
    mount --bind "$p" "$p"
    mount -o remount,bind,rw "$p"
done
for h in /home /root; do
    if [ -d "$h" ]; then mount -t tmpfs -o ro,mode=000 tmpfs "$h"; fi
done
if touch /var/tmp/xdplb-sandbox-probe 2>/dev/null; then
    echo "the sandbox left /var/tmp writable" >&2
    exit 99
fi
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="$XDPLB_CAPS" -- "$0" "$@""#;

#[test]
fn the_units_sandbox_leaves_the_daemon_working() {
    if !require_root() {
        return;
    }
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RuntimeDirectory", "xdplb"),
    ] {
        assert_eq!(unit_setting(key), value, "{key}");
    }
    let (files, ns, _backends) = bed("sandbox");
    let config_dir = files
        .config
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let rw: Vec<String> = unit_setting("ReadWritePaths")
        .split_whitespace()
        .map(|p| match p {
            "/etc/xdplb" => config_dir.clone(),
            other => other.to_owned(),
        })
        .chain(["/run/xdplb".to_owned()])
        .collect();
    let caps: Vec<String> = unit_caps().iter().map(|c| format!("+{c}")).collect();
    let launch = Launch {
        env: vec![
            ("XDPLB_RW".into(), rw.join(" ")),
            ("XDPLB_CAPS".into(), format!("-all,{}", caps.join(","))),
        ],
        wrapper: Some(vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            SANDBOX.into(),
        ]),
        ..Launch::default()
    };
    let d = Daemon::start_with(
        &ns,
        &files.config,
        &files.socket,
        files.log("d.log"),
        &launch,
    )
    .unwrap();
    // Attached and pinned, checks passing, announced (routes, /run/xdplb).
    let working = wait_for(Duration::from_secs(5), || {
        let s = status(&files.socket);
        (s["attached"] == true && s["in_sync"] == true && !s["announce"]["announced"][0].is_null())
            .then_some(())
    });
    assert!(
        working.is_some(),
        "{}\n{}",
        status(&files.socket),
        d.log_text()
    );
    assert!(files.pins.0.join("link").exists());
    // A change is written back to the config (ReadWritePaths).
    ok(&xdplb(
        &files.socket,
        &["backend", "weight", "web", "198.18.1.2", "50"],
    ));
    let text = std::fs::read_to_string(&files.config).unwrap();
    assert!(text.contains("weight = 50"), "{text}");
    // The operator's withdrawal is kept under /run/xdplb.
    ok(&xdplb(&files.socket, &["announce", "withdraw"]));
    ok(&xdplb(&files.socket, &["announce", "restore"]));
    d.stop().unwrap();
}
