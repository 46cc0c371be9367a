//! The daemon tells the truth and survives faults, tried as a hostile
//! operator would: its dataplane detached or unpinned under it, a second
//! daemon, a socket path naming a file, a full backend table, a config file
//! with a symlink, comments, an odd mode and hand edits, malformed input,
//! a veth that silently drops XDP_TX, and starts that fail half-way.
//! One test per guarantee; each uses only the `xdplb` binary, so
//! `XDPLB_BIN=<older build>` shows which guarantees an older build lacks.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    daemon::{in_netns, run_in, wait_for, xdplb, Daemon},
    ops::{
        fails, http_get, mac_text, metric, ok, pinned_map_id, ring_of, servers, status, stderr,
        stdout, topology, topology_bare, veth, xdp_prog, Cfg, Files,
    },
    require_root, PinDir,
};
use serde_json::Value;

#[test]
fn a_lost_dataplane_is_reported_then_reattached() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-loss");
    Cfg::new(&files).write(&files.config);
    let ns = topology("truth-loss");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let prog = xdp_prog(&ns, "lb0").expect("attached");
    let flows_map = pinned_map_id(&files.pins.0.join("FLOWS")).unwrap();

    // `xdplb detach` under a running daemon is refused, naming it; nothing
    // changes.
    let out = xdplb(
        &files.socket,
        &["detach", "--pin-dir", files.pins.0.to_str().unwrap()],
    );
    fails(&out, "runs on");
    assert!(stderr(&out).contains("pid "), "{}", stderr(&out));
    assert_eq!(xdp_prog(&ns, "lb0"), Some(prog.clone()));
    assert!(files.pins.0.join("link").exists());

    // `rm -r` of the pin directory: reported, then re-pinned with the same
    // maps (conntrack kept) within a second.
    std::fs::remove_dir_all(&files.pins.0).unwrap();
    wait_for(Duration::from_secs(3), || {
        (files.pins.0.join("link").exists()
            && pinned_map_id(&files.pins.0.join("FLOWS")) == Some(flows_map))
        .then_some(())
    })
    .expect("pins restored within 3 s");
    assert_eq!(xdp_prog(&ns, "lb0"), Some(prog.clone()), "never detached");
    assert!(
        daemon.log_text().contains("self-check failed"),
        "{}",
        daemon.log_text()
    );
    assert!(
        !daemon.log_text().contains('\u{1b}'),
        "a log file carries no terminal colour codes"
    );
    assert!(metric(&ns, "xdplb_dataplane_losses_total").unwrap() >= 1.0);
    assert_eq!(metric(&ns, "xdplb_dataplane_attached"), Some(1.0));

    // The interface goes away: not healthy, CRITICAL, metric 0, for as long
    // as it lasts.
    ns.ip(&["link", "del", "lb0"]).unwrap();
    wait_for(Duration::from_secs(3), || {
        http_get(&ns, "127.0.0.1:9477", "/healthz")
            .0
            .contains("503")
            .then_some(())
    })
    .expect("/healthz 503 within 3 s of the loss");
    std::thread::sleep(Duration::from_millis(1200));
    let (line, body) = http_get(&ns, "127.0.0.1:9477", "/healthz");
    assert!(
        line.contains("503") && body.contains("lb0 is gone"),
        "{line} {body}"
    );
    assert_eq!(metric(&ns, "xdplb_dataplane_attached"), Some(0.0));
    let check = xdplb(&files.socket, &["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    assert!(stdout(&check).starts_with("XDPLB CRITICAL - dataplane not attached"));
    assert!(ok(&xdplb(&files.socket, &["status"])).contains("NOT ATTACHED"));

    // It comes back: re-attached on its own, healthy again.
    veth(&ns);
    integration_tests::ops::peer_xdp(&ns, "lb1");
    wait_for(Duration::from_secs(3), || xdp_prog(&ns, "lb0")).expect("re-attached within 3 s");
    wait_for(Duration::from_secs(3), || {
        http_get(&ns, "127.0.0.1:9477", "/healthz")
            .0
            .contains("200")
            .then_some(())
    })
    .expect("healthy again");
    assert!(ok(&xdplb(&files.socket, &["check"])).starts_with("XDPLB OK"));
    assert!(metric(&ns, "xdplb_dataplane_repairs_total").unwrap() >= 2.0);

    // On exit the dataplane stays, pinned: a restart adopts it.
    daemon.stop().unwrap();
    assert!(xdp_prog(&ns, "lb0").is_some(), "fail-static after exit");
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d2.log")).unwrap();
    assert_eq!(status(&files.socket)["adopted"], true);
    daemon.stop().unwrap();
}

#[test]
fn a_second_daemon_is_refused_and_the_first_keeps_working() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-second");
    Cfg::new(&files).write(&files.config);
    let ns = topology("truth-second");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let prog = xdp_prog(&ns, "lb0").expect("attached");
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket).len() == 2).then_some(())
    })
    .expect("both backends pass their first check");

    // Same pin directory, another socket and metrics port: refused, naming
    // the first daemon's pid.
    let other_socket = files.scratch.0.join("other.sock");
    let second = files.scratch.0.join("second.toml");
    Cfg {
        socket: &other_socket,
        metrics: "127.0.0.1:9478",
        ..Cfg::new(&files)
    }
    .write(&second);
    let args = |config: &Path| {
        vec![
            "run".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
        ]
    };
    let run = |config: &Path| {
        let a = args(config);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_in(&ns, &a, Duration::from_secs(10)).unwrap()
    };
    let out = run(&second);
    fails(&out, "another xdplb daemon (pid ");
    assert!(!other_socket.exists(), "the refused daemon left its socket");
    assert_eq!(xdp_prog(&ns, "lb0"), Some(prog.clone()));
    assert!(ok(&xdplb(&files.socket, &["check"])).starts_with("XDPLB OK"));

    // Another pin directory on the same interface: refused as well, and it
    // pins nothing.
    let other_pins = PinDir::new("truth-second-b");
    let third = files.scratch.0.join("third.toml");
    Cfg {
        socket: &other_socket,
        metrics: "127.0.0.1:9478",
        pins: &other_pins.0,
        ..Cfg::new(&files)
    }
    .write(&third);
    let out = run(&third);
    fails(&out, "interface lb0");
    assert!(stderr(&out).contains("pid "), "{}", stderr(&out));
    assert!(!other_pins.0.exists(), "the refused daemon left pins");
    assert_eq!(xdp_prog(&ns, "lb0"), Some(prog.clone()));

    // The same pin directory spelled otherwise, and the same interface by
    // an altname: the same instance, refused (efc012d started both, and
    // they took the first daemon's maps and link over: it reported NOT
    // ATTACHED, and stayed so once they exited).
    let pins = &files.pins.0;
    let respelled = PathBuf::from(format!(
        "{}//./{}",
        pins.parent().unwrap().display(),
        pins.file_name().unwrap().to_str().unwrap()
    ));
    ns.ip(&["link", "add", "lb2", "type", "veth", "peer", "name", "lb3"])
        .unwrap();
    ns.ip(&["link", "set", "lb2", "up"]).unwrap();
    let fourth = files.scratch.0.join("fourth.toml");
    Cfg {
        socket: &other_socket,
        metrics: "127.0.0.1:9478",
        pins: &respelled,
        interface: "lb2",
        ..Cfg::new(&files)
    }
    .write(&fourth);
    fails(&run(&fourth), "already runs on pin directory");
    ns.ip(&[
        "link", "property", "add", "dev", "lb0", "altname", "uplink-a",
    ])
    .unwrap();
    let fifth = files.scratch.0.join("fifth.toml");
    Cfg {
        socket: &other_socket,
        metrics: "127.0.0.1:9478",
        pins: &other_pins.0,
        interface: "uplink-a",
        ..Cfg::new(&files)
    }
    .write(&fifth);
    let out = run(&fifth);
    fails(&out, "already runs on interface uplink-a (index");
    assert!(!other_pins.0.exists(), "the refused daemon left pins");
    assert_eq!(xdp_prog(&ns, "lb0"), Some(prog));
    assert!(ok(&xdplb(&files.socket, &["check"])).starts_with("XDPLB OK"));
    daemon.stop().unwrap();

    // A foreign XDP program: never replaced without --replace.
    {
        let _detach = Command::new(integration_tests::daemon::xdplb_bin())
            .args(["detach", "--pin-dir", files.pins.0.to_str().unwrap()])
            .output()
            .unwrap();
    }
    assert_eq!(xdp_prog(&ns, "lb0"), None);
    let mut foreign = {
        let _inside = ns.enter().unwrap();
        let mut p =
            xdp_user::dataplane::AuxProgram::load(xdp_user::dataplane::PASS_PROGRAM).unwrap();
        p.attach("lb0", xdp_user::dataplane::AttachMode::Native)
            .unwrap();
        Some(p)
    };
    let foreign_id = xdp_prog(&ns, "lb0").expect("foreign program attached");
    let a = args(&files.config);
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run_in(&ns, &a, Duration::from_secs(10)).unwrap();
    fails(&out, "already runs an XDP program");
    assert_eq!(xdp_prog(&ns, "lb0"), Some(foreign_id.clone()));
    assert!(!files.pins.0.exists(), "the refused daemon left pins");
    a.push("--replace");
    let (mut cmd, netns) = in_netns(&ns).unwrap();
    let mut child = cmd
        .args(&a)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(files.log("replace.log")).unwrap())
        .spawn()
        .unwrap();
    drop(netns);
    let replaced = wait_for(Duration::from_secs(10), || {
        xdp_prog(&ns, "lb0").filter(|id| *id != foreign_id)
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(replaced.is_some(), "--replace took the interface over");
    foreign.take();
}

#[test]
fn the_admin_socket_never_replaces_a_file() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-socket");
    let ns = topology("truth-socket");
    // api.socket naming the config file itself.
    let cfg = Cfg {
        socket: &files.config,
        ..Cfg::new(&files)
    };
    cfg.write(&files.config);
    let before = std::fs::read(&files.config).unwrap();
    let a = ["run", "--config", files.config.to_str().unwrap()];
    let out = run_in(&ns, &a, Duration::from_secs(10)).unwrap();
    fails(&out, "not a socket");
    assert_eq!(
        std::fs::read(&files.config).unwrap(),
        before,
        "config intact"
    );
    assert!(!files.pins.0.exists());

    // Under umask 000 the socket's new directory is still 0700, the socket
    // 0600.
    Cfg::new(&files).write(&files.config);
    let (mut cmd, netns) = in_netns(&ns).unwrap();
    use std::os::unix::process::CommandExt as _;
    // SAFETY: umask(2) in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd
        .args(["run", "--config", files.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(files.log("d.log")).unwrap())
        .spawn()
        .unwrap();
    drop(netns);
    let up = wait_for(Duration::from_secs(10), || {
        xdplb(&files.socket, &["status"])
            .status
            .success()
            .then_some(())
    });
    let dir_mode =
        std::fs::metadata(files.socket.parent().unwrap()).map(|m| m.permissions().mode() & 0o777);
    let sock_mode =
        std::fs::symlink_metadata(&files.socket).map(|m| m.permissions().mode() & 0o777);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(up.is_some(), "daemon answered");
    assert_eq!(dir_mode.unwrap(), 0o700, "socket directory mode");
    assert_eq!(sock_mode.unwrap(), 0o600, "socket mode");
    assert!(!files.socket.exists(), "its own socket removed on exit");

    // With api.socket_group: the group may use it, nobody else.
    std::fs::remove_dir(files.socket.parent().unwrap()).unwrap();
    let grouped = Cfg::new(&files).text().replace(
        "metrics = \"127.0.0.1:9477\"",
        "socket_group = \"nogroup\"\nmetrics = \"127.0.0.1:9477\"",
    );
    std::fs::write(&files.config, grouped).unwrap();
    let daemon = integration_tests::daemon::Daemon::start(
        &ns,
        &files.config,
        &files.socket,
        files.log("g.log"),
    )
    .unwrap();
    let dir = std::fs::metadata(files.socket.parent().unwrap()).unwrap();
    let sock = std::fs::symlink_metadata(&files.socket).unwrap();
    assert_eq!(
        (dir.permissions().mode() & 0o777, dir.gid()),
        (0o750, 65534)
    );
    assert_eq!(
        (sock.permissions().mode() & 0o777, sock.gid()),
        (0o660, 65534)
    );
    daemon.stop().unwrap();
    Cfg::new(&files).write(&files.config);

    // A regular file where the socket goes: refused, kept.
    std::fs::write(&files.socket, "precious").unwrap();
    let out = run_in(&ns, &a, Duration::from_secs(10)).unwrap();
    fails(&out, "is a regular file, not a socket");
    assert_eq!(std::fs::read_to_string(&files.socket).unwrap(), "precious");
}

#[test]
fn reconcile_is_planned_whole_and_never_stuck() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-plan");
    let four = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"];
    let mut cfg = Cfg::new(&files);
    cfg.max_backends = 4;
    cfg.backends = four.to_vec();
    cfg.write(&files.config);
    let ns = topology("truth-plan");
    let mut backends = servers(
        &ns,
        &[
            "198.18.1.1",
            "198.18.1.2",
            "198.18.1.3",
            "198.18.1.4",
            "198.18.1.5",
        ],
    );
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket).len() == 4).then_some(())
    })
    .expect("four backends up");

    // The table is full; one backend replaced by another in the file.
    let mut swapped = Cfg::new(&files);
    swapped.max_backends = 4;
    swapped.backends = vec!["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.5"];
    swapped.write(&files.config);
    ok(&xdplb(&files.socket, &["reload"]));
    let s = status(&files.socket);
    assert_eq!(s["in_sync"], true, "{s}");
    // The new backend joins at its first passing check.
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket) == ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.5"])
            .then_some(())
    })
    .unwrap_or_else(|| panic!("new backend not in the ring: {}", status(&files.socket)));

    // A backend then dies: it leaves the ring.
    backends.remove(1); // 198.18.1.2
    wait_for(Duration::from_secs(5), || {
        (ring_of(&files.socket) == ["198.18.1.1", "198.18.1.3", "198.18.1.5"]).then_some(())
    })
    .unwrap_or_else(|| panic!("dead backend still in the ring: {}", status(&files.socket)));

    // A change the table cannot hold is refused with the exact reason, and
    // neither the file nor the running state changes.
    let saved = std::fs::read_to_string(&files.config).unwrap();
    let out = xdplb(&files.socket, &["backend", "add", "web", "198.18.1.6"]);
    fails(&out, "needs 5 backend slots, the table has 4");
    assert_eq!(std::fs::read_to_string(&files.config).unwrap(), saved);
    assert_eq!(status(&files.socket)["in_sync"], true);

    // The VIP's port changes with every slot in use: the old VIP's ids are
    // freed first, so it fits; and it survives a restart.
    let mut moved = swapped;
    moved.port = 8080;
    moved.write(&files.config);
    ok(&xdplb(&files.socket, &["reload"]));
    let s = status(&files.socket);
    assert_eq!(s["in_sync"], true, "{s}");
    assert_eq!(s["vips"][0]["endpoint"], "198.18.0.10:8080/tcp");
    daemon.stop().unwrap();
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d2.log")).unwrap();
    assert_eq!(status(&files.socket)["in_sync"], true);
    daemon.stop().unwrap();
}

#[test]
fn write_back_keeps_the_operators_file() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-file");
    // The real file lives elsewhere; the daemon is given a symlink.
    let real_dir = files.scratch.0.join("etc");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("xdplb.toml");
    Cfg::new(&files).write(&real);
    std::os::unix::fs::symlink(&real, &files.config).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&real, Some(65534), Some(65534)).unwrap();
    // A temp file left by a writer that was killed.
    let stale = real_dir.join(".xdplb.toml.xdplb-tmp.999999999");
    std::fs::write(&stale, "half a config").unwrap();

    let ns = topology("truth-file");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();

    ok(&xdplb(
        &files.socket,
        &["backend", "weight", "web", "198.18.1.1", "42"],
    ));
    let link = std::fs::symlink_metadata(&files.config).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "the symlink is still a symlink"
    );
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(text.contains("weight = 42"), "{text}");
    for kept in [
        "# Edge LB, rack 7 (the operator's notes)",
        "interface = \"lb0\"   # uplink",
        "# The web tier.",
        "address = \"198.18.1.1\"   # backend 198.18.1.1",
    ] {
        assert!(text.contains(kept), "lost {kept:?}:\n{text}");
    }
    let meta = std::fs::metadata(&real).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "mode kept");
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "owner kept");
    assert!(!stale.exists(), "a killed writer's temp file is removed");
    assert_eq!(
        std::fs::read_dir(&real_dir).unwrap().count(),
        1,
        "no temp file left"
    );

    // A hand edit not yet reloaded is never overwritten.
    let edited = text.replace("# The web tier.", "# The web tier (edited by hand).");
    std::fs::write(&real, &edited).unwrap();
    let out = xdplb(&files.socket, &["backend", "drain", "web", "198.18.1.2"]);
    fails(&out, "run `xdplb reload` first");
    assert_eq!(std::fs::read_to_string(&real).unwrap(), edited);
    ok(&xdplb(&files.socket, &["reload"]));
    ok(&xdplb(
        &files.socket,
        &["backend", "drain", "web", "198.18.1.2"],
    ));
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(
        text.contains("(edited by hand)") && text.contains("state = \"drain\""),
        "{text}"
    );

    // A read-only file is not written.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = xdplb(&files.socket, &["backend", "undrain", "web", "198.18.1.2"]);
    fails(&out, "read-only");
    assert_eq!(std::fs::read_to_string(&real).unwrap(), text);
    assert_eq!(
        std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
        0o444
    );
    daemon.stop().unwrap();
}

#[test]
fn bad_input_is_bounded_and_refused() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-input");
    let cfg = Cfg::new(&files);
    let good = cfg.text();
    let check = |text: &str| {
        let path = files.scratch.0.join("candidate.toml");
        std::fs::write(&path, text).unwrap();
        xdplb(&files.socket, &["check-config", path.to_str().unwrap()])
    };
    // A FIFO and an endless device: refused at once, not read.
    let fifo = files.scratch.0.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path of our scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let mut child = Command::new(integration_tests::daemon::xdplb_bin())
            .args(["check-config", path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let done = wait_for(Duration::from_secs(5), || child.try_wait().unwrap());
        if done.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("check-config {} still running after 5 s", path.display());
        }
        let out = child.wait_with_output().unwrap();
        fails(&out, "not a regular file");
    }
    for (from, to, message) in [
        (
            "interface = \"lb0\"",
            "interface = \"eth\\u0000x\"",
            "control characters",
        ),
        (
            "interface = \"lb0\"",
            "interface = \"abcdefghijklmnopqrst\"",
            "at most 15",
        ),
        (
            "ring_size = 13",
            "ring_size = 2147483647",
            "GiB of kernel memory",
        ),
        (
            "max_flows = 4096",
            "max_flows = 300000000",
            "the limit is 4 GiB",
        ),
        (
            "address = \"198.18.1.1\"   # backend 198.18.1.1",
            "address = \"198.18.1.1\"\nweight = -1",
            "weight -1 out of range 0..=65535",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        fails(&check(&good.replacen(from, to, 1)), message);
    }

    // The API: unknown fields and request-splitting health fields refused.
    let ns = topology("truth-input");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    cfg.write(&files.config);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let raw = |line: &str| -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&files.socket).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut text = String::new();
        std::io::BufReader::new(s)
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(text.trim()).unwrap()
    };
    let r = raw(r#"{"cmd":"status","verbose":true}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("unknown field"),
        "{r}"
    );
    let out = xdplb(
        &files.socket,
        &[
            "vip",
            "add",
            "--name",
            "evil",
            "--address",
            "198.18.0.20",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--forwarding",
            "ipip",
            "--check",
            "http",
            "--check-path",
            "/x HTTP/1.0\r\nHost: evil\r\n\r\nGET /",
        ],
    );
    fails(&out, "path contains a line break");
    assert!(!std::fs::read_to_string(&files.config)
        .unwrap()
        .contains("evil"));

    // A closed pipe ends a client quietly: its reader is gone before it
    // writes a byte.
    let mut child = Command::new(integration_tests::daemon::xdplb_bin())
        .arg("status")
        .arg("--socket")
        .arg(&files.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !stderr(&out).contains("panicked") && out.status.code() != Some(101),
        "{} {}",
        out.status,
        stderr(&out)
    );
    daemon.stop().unwrap();
}

#[test]
fn driver_xdp_tx_drops_are_counted_and_warned_about() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-txerr");
    Cfg {
        extra: "\n[announce]\nenabled = true\n".into(),
        ..Cfg::new(&files)
    }
    .write(&files.config);
    let ns = topology_bare("truth-txerr");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    // lb1, lb0's peer, has no XDP program: every XDP_TX frame is lost,
    // and the daemon knows it. It does not claim to forward, and does not
    // announce (efc012d: "GRO on the peer" was said to suffice, the host
    // announced and `check` said OK).
    assert!(
        daemon
            .log_text()
            .contains("NOT forwarding: lb0 is a veth and its peer lb1 runs no XDP program"),
        "{}",
        daemon.log_text()
    );
    let check = xdplb(&files.socket, &["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    assert!(
        stdout(&check).starts_with("XDPLB CRITICAL - not forwarding"),
        "{}",
        stdout(&check)
    );
    let (line, body) = http_get(&ns, "127.0.0.1:9477", "/healthz");
    assert!(
        line.contains("503") && body.contains("not forwarding"),
        "{line} {body}"
    );
    let s = status(&files.socket);
    assert_eq!(s["forwarding"], false, "{s}");
    assert!(
        s["announce"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the transmit path drops every frame")),
        "{s}"
    );
    assert!(
        s["announce"]["announced"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{s}"
    );
    let mac = {
        let _inside = ns.enter().unwrap();
        xdp_user::loadgen::interface_mac("lb0").unwrap()
    };
    let mac = mac_text(mac);
    let out = run_in(
        &ns,
        &[
            "loadgen",
            "--interface",
            "lb1",
            "--dst-mac",
            &mac,
            "--src",
            "198.18.100.1",
            "--dst",
            "198.18.0.10",
            "--dport",
            "80",
            "--protocol",
            "tcp",
            "--flows",
            "16",
            "--count",
            "500",
            "--duration",
            "5",
        ],
        Duration::from_secs(20),
    )
    .unwrap();
    ok(&out);
    let lost = wait_for(Duration::from_secs(3), || {
        metric(&ns, "xdplb_driver_xdp_errors_total").filter(|v| *v > 0.0)
    })
    .expect("the driver's XDP TX errors are exported");
    println!("driver XDP errors after 500 frames: {lost}");
    let text = ok(&xdplb(&files.socket, &["status"]));
    assert!(text.contains("WARNING: the driver dropped"), "{text}");
    assert!(text.contains("NOT FORWARDING: lb0 is a veth"), "{text}");

    // An XDP program on the peer: forwarding, announced.
    integration_tests::ops::peer_xdp(&ns, "lb1");
    wait_for(Duration::from_secs(5), || {
        let s = status(&files.socket);
        (s["forwarding"] == true && s["announce"]["announced"][0] == "198.18.0.10").then_some(())
    })
    .unwrap_or_else(|| panic!("{}", status(&files.socket)));
    assert!(ok(&xdplb(&files.socket, &["check"])).starts_with("XDPLB OK"));
    daemon.stop().unwrap();
}

#[test]
fn a_refused_start_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let files = Files::new("truth-start");
    let ns = topology("truth-start");
    let run = || {
        run_in(
            &ns,
            &["run", "--config", files.config.to_str().unwrap()],
            Duration::from_secs(10),
        )
        .unwrap()
    };
    // The attach fails (veth cannot offload).
    Cfg {
        mode: "offload",
        ..Cfg::new(&files)
    }
    .write(&files.config);
    let out = run();
    fails(&out, "attaching xdp_lb to lb0 in offload mode failed");
    assert!(!files.pins.0.exists(), "pins left behind");
    assert!(!files.socket.exists(), "socket left behind");
    assert_eq!(xdp_prog(&ns, "lb0"), None);

    // The metrics port is taken.
    let blocker = {
        let _inside = ns.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.1:9477").unwrap()
    };
    Cfg::new(&files).write(&files.config);
    let out = run();
    fails(&out, "binding the metrics listener");
    assert!(!files.pins.0.exists(), "pins left behind");
    assert!(!files.socket.exists(), "socket left behind");
    // With the socket in directories the start creates: they go too
    // (efc012d left them).
    let made = files.scratch.0.join("made");
    let nested = made.join("for/admin.sock");
    Cfg {
        socket: &nested,
        ..Cfg::new(&files)
    }
    .write(&files.config);
    fails(&run(), "binding the metrics listener");
    assert!(!made.exists(), "the socket's directories left behind");
    Cfg::new(&files).write(&files.config);
    drop(blocker);

    // The next start works without `xdplb detach`.
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    let s = status(&files.socket);
    assert_eq!(s["adopted"], false, "a fresh start, nothing adopted: {s}");
    assert!(xdp_prog(&ns, "lb0").is_some());
    daemon.stop().unwrap();
}
