//! The `xdplb` daemon and CLI end to end, in a namespace of the test's own:
//! health checks against real HTTP and UDP servers drive the dataplane, every
//! CLI command works against the running daemon, changes are written back,
//! bad input changes nothing, and a restart keeps pins and flows.

use std::{
    io::{BufRead as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{run_in, wait_for, xdplb, Daemon, Server},
    netns::Netns,
    ops::http_get,
    packet, require_root, run, PinDir, Scratch,
};
use serde_json::Value;
use xdp_common::XDP_TX;
use xdp_user::{
    api::{self, Request},
    config::Config,
    controller::vip_key,
    dataplane::Dataplane,
};

const WEB: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
const DNS_BACKEND: &str = "2001:db8:1::1";

/// Where a test daemon keeps its config, socket, log and pins; all removed
/// on drop.
struct Files {
    scratch: Scratch,
    pins: PinDir,
    socket: std::path::PathBuf,
    config_path: std::path::PathBuf,
}

impl Files {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        Self {
            pins: PinDir::new(tag),
            socket: scratch.0.join("admin.sock"),
            config_path: scratch.0.join("xdplb.toml"),
            scratch,
        }
    }
}

fn config_text(pins: &Path, socket: &Path, health: &str) -> String {
    format!(
        r#"
interface = "lb0"
xdp_mode = "native"

[tables]
max_vips = 8
max_backends = 64
ring_size = 251
max_flows = 4096

[forwarding]
gateway_mac = "02:00:00:00:00:fe"

[api]
socket = "{socket}"
metrics = "127.0.0.1:9477"

[daemon]
pin_dir = "{pins}"

[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
health = {health}

[[vip.backend]]
address = "198.18.1.1"

[[vip.backend]]
address = "198.18.1.2"

[[vip.backend]]
address = "198.18.1.3"

[[vip]]
name = "dns"
address = "2001:db8::53"
port = 53
protocol = "udp"
forwarding = "ip6ip6"
health = {{ kind = "udp", send = "ping", expect = "pong", interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 2, fall = 2 }}

[[vip.backend]]
address = "{DNS_BACKEND}"
"#,
        socket = socket.display(),
        pins = pins.display(),
    )
}

const HTTP_CHECK: &str = r#"{ kind = "http", path = "/health", interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 2, fall = 2 }"#;

/// A namespace with the LB's veth and the backends' addresses on loopback.
fn topology(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    integration_tests::ops::peer_xdp(&ns, "lb1");
    for a in WEB {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
            .unwrap();
    }
    ns.ip(&[
        "addr",
        "add",
        &format!("{DNS_BACKEND}/128"),
        "dev",
        "lo",
        "nodad",
    ])
    .unwrap();
    ns
}

fn status(socket: &Path) -> Value {
    let r = api::call(socket, &Request::Status {}).expect("status");
    assert!(r.ok, "{:?}", r.error);
    r.data.expect("status data")
}

fn backend<'a>(status: &'a Value, vip: &str, addr: &str) -> Option<&'a Value> {
    status["vips"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vip)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr)
}

fn dp_state(socket: &Path, vip: &str, addr: &str) -> String {
    let s = status(socket);
    backend(&s, vip, addr).map_or("absent".into(), |b| {
        b["dataplane_state"].as_str().unwrap_or("?").to_owned()
    })
}

fn wait_state(socket: &Path, vip: &str, addr: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(limit, || {
        (dp_state(socket, vip, addr) == want).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{vip}/{addr} not {want} within {limit:?}: {}",
            dp_state(socket, vip, addr)
        )
    });
    started.elapsed()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &std::process::Output, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(message),
        "stderr {stderr:?} should mention {message:?}"
    );
}

/// Backend addresses the live ring of `vip` holds, read from the pinned maps.
fn ring_members(pins: &Path, config: &Config, vip: &str) -> std::collections::BTreeSet<IpAddr> {
    let dp = Dataplane::open(config.tables.sizes(), pins).unwrap();
    let v = config.vip(vip).unwrap();
    dp.ring(&vip_key(v))
        .unwrap()
        .into_iter()
        .filter(|&id| id != xdp_common::NO_BACKEND)
        .map(|id| {
            let b = dp.backend(id).unwrap();
            IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
        })
        .collect()
}

#[test]
fn daemon_follows_health_and_serves_every_cli_command() {
    if !require_root() {
        return;
    }
    let Files {
        scratch,
        pins,
        socket,
        config_path,
    } = Files::new("daemon");
    std::fs::write(&config_path, config_text(&pins.0, &socket, HTTP_CHECK)).unwrap();
    let config = Config::load(&config_path).unwrap();
    let ns = topology("daemon");
    let inside = ns.enter().unwrap();
    let mut web: Vec<Option<Server>> = WEB
        .iter()
        .map(|a| Some(Server::http(SocketAddr::new(a.parse().unwrap(), 80)).unwrap()))
        .collect();
    let _dns = Server::udp(SocketAddr::new(DNS_BACKEND.parse().unwrap(), 53)).unwrap();

    let daemon = Daemon::start(&ns, &config_path, &socket, scratch.0.join("daemon.log")).unwrap();
    // Backends start up; wait until every one has passed a real check.
    let checked = |s: &Value, vip: &str, a: &str| {
        backend(s, vip, a).is_some_and(|b| b["last_check_ms"].as_f64().is_some())
    };
    wait_for(Duration::from_secs(5), || {
        let s = status(&socket);
        (WEB.iter().all(|a| checked(&s, "web", a)) && checked(&s, "dns", DNS_BACKEND)).then_some(())
    })
    .expect("every backend checked within 5 s");
    let s = status(&socket);
    assert_eq!(backend(&s, "dns", DNS_BACKEND).unwrap()["health"], "up");
    assert!(
        backend(&s, "web", WEB[0]).unwrap()["last_check_ms"]
            .as_f64()
            .is_some(),
        "checks ran"
    );
    assert_eq!(ring_members(&pins.0, &config, "web").len(), 3);

    // A backend dies: detected within interval x fall (+ slack), out of the ring.
    web[1] = None;
    let took = wait_state(&socket, "web", WEB[1], "down", Duration::from_secs(5));
    println!("backend failure detected in {took:?} (interval 100 ms x fall 2 + timeout 80 ms)");
    let members = ring_members(&pins.0, &config, "web");
    assert!(
        !members.contains(&WEB[1].parse().unwrap()),
        "down backend left the ring: {members:?}"
    );
    assert_eq!(members.len(), 2);
    // It comes back.
    web[1] = Some(Server::http(SocketAddr::new(WEB[1].parse().unwrap(), 80)).unwrap());
    let took = wait_state(&socket, "web", WEB[1], "up", Duration::from_secs(5));
    println!("backend recovery detected in {took:?} (rise 2)");
    assert_eq!(ring_members(&pins.0, &config, "web").len(), 3);

    // Metrics and health endpoints (inside the namespace).
    let (line, body) = http_get(&ns, "127.0.0.1:9477", "/metrics");
    assert!(line.contains("200"), "{line}");
    for needle in [
        "xdplb_backend_up{vip=\"web\",backend=\"198.18.1.1\"} 1",
        // In at its first passing check, out when it died, back in.
        "xdplb_health_transitions_total{vip=\"web\",backend=\"198.18.1.2\"} 3",
        "xdplb_packets_total{reason=\"pass_not_vip\"}",
        "xdplb_dataplane_in_sync 1",
        "xdplb_flows_max 4096",
    ] {
        assert!(body.contains(needle), "metrics lack {needle:?}:\n{body}");
    }
    assert!(http_get(&ns, "127.0.0.1:9477", "/healthz")
        .0
        .contains("200"));
    assert!(http_get(&ns, "127.0.0.1:9477", "/nope").0.contains("404"));
    drop(inside);

    // Every CLI command.
    let out = ok(&xdplb(&socket, &["status"]));
    assert!(
        out.contains("VIP web 198.18.0.10:80/tcp ipip check http") && out.contains("198.18.1.3"),
        "the config's spelling: {out}"
    );
    // Without --socket: $XDPLB_SOCKET.
    let env_status = std::process::Command::new(integration_tests::daemon::xdplb_bin())
        .arg("status")
        .env("XDPLB_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(ok(&env_status).contains("VIP web"));
    assert!(ok(&xdplb(&socket, &["status", "--json"])).contains("\"in_sync\": true"));
    assert!(ok(&xdplb(&socket, &["stats"])).contains("tx_encap"));
    assert!(ok(&xdplb(
        &socket,
        &["stats", "--watch", "--interval", "0.2", "--count", "1"]
    ))
    .contains("rates over"));
    let out = ok(&xdplb(&socket, &["vip", "list"]));
    assert!(
        out.contains("web 198.18.0.10:80/tcp") && out.contains("dns [2001:db8::53]:53/udp"),
        "{out}"
    );
    assert!(ok(&xdplb(&socket, &["check"])).starts_with("XDPLB OK"));

    ok(&xdplb(
        &socket,
        &["backend", "weight", "web", "198.18.1.1", "50"],
    ));
    assert_eq!(
        Config::load(&config_path).unwrap().vips[0].backends[0].weight,
        50,
        "written back"
    );
    assert_eq!(
        backend(&status(&socket), "web", "198.18.1.1").unwrap()["weight"],
        50
    );

    ok(&xdplb(&socket, &["backend", "drain", "web", "198.18.1.3"]));
    assert_eq!(dp_state(&socket, "web", "198.18.1.3"), "draining");
    assert!(!ring_members(&pins.0, &config, "web").contains(&"198.18.1.3".parse().unwrap()));
    ok(&xdplb(
        &socket,
        &["backend", "undrain", "web", "198.18.1.3"],
    ));
    assert_eq!(dp_state(&socket, "web", "198.18.1.3"), "up");

    // A backend with nothing listening: added, then found down.
    ok(&xdplb(
        &socket,
        &["backend", "add", "web", "198.18.1.4", "--weight", "10"],
    ));
    wait_state(&socket, "web", "198.18.1.4", "down", Duration::from_secs(5));
    let out = xdplb(&socket, &["check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("XDPLB WARNING"));
    ok(&xdplb(&socket, &["backend", "del", "web", "198.18.1.4"]));
    assert_eq!(dp_state(&socket, "web", "198.18.1.4"), "absent");
    assert_eq!(xdplb(&socket, &["check"]).status.code(), Some(0));

    ok(&xdplb(
        &socket,
        &[
            "vip",
            "add",
            "--name",
            "extra",
            "--address",
            "198.18.0.20",
            "--port",
            "8080",
            "--protocol",
            "tcp",
            "--forwarding",
            "ipip",
            "--check",
            "none",
        ],
    ));
    assert!(ok(&xdplb(&socket, &["vip", "list"])).contains("extra 198.18.0.20:8080/tcp"));
    assert!(Config::load(&config_path).unwrap().vip("extra").is_some());
    // A VIP without backends: `check` is critical.
    assert_eq!(xdplb(&socket, &["check"]).status.code(), Some(2));
    ok(&xdplb(&socket, &["vip", "del", "extra"]));
    assert!(!ok(&xdplb(&socket, &["vip", "list"])).contains("extra"));

    // Bad requests: precise errors, nothing changes.
    let saved = std::fs::read_to_string(&config_path).unwrap();
    fails(
        &xdplb(
            &socket,
            &["backend", "weight", "web", "198.18.1.1", "70000"],
        ),
        "out of range",
    );
    fails(
        &xdplb(&socket, &["backend", "drain", "web", "198.18.9.9"]),
        "has no backend 198.18.9.9",
    );
    fails(
        &xdplb(&socket, &["vip", "del", "nope"]),
        "no VIP named \"nope\"",
    );
    fails(
        &xdplb(&socket, &["backend", "add", "web", "2001:db8::1"]),
        "needs an IPv4 backend",
    );
    fails(
        &xdplb(
            &socket,
            &[
                "vip",
                "add",
                "--name",
                "web",
                "--address",
                "198.18.0.30",
                "--protocol",
                "tcp",
                "--forwarding",
                "ipip",
            ],
        ),
        "already exists",
    );
    fails(
        &xdplb(
            &socket,
            &[
                "vip",
                "add",
                "--name",
                "x",
                "--address",
                "198.18.0.30",
                "--protocol",
                "tcp",
                "--forwarding",
                "gre",
            ],
        ),
        "invalid value 'gre' for '--forwarding <FORWARDING>'\n  [possible values: ipip, ip6ip6, ip4ip6, l2dsr]",
    );
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        saved,
        "config file untouched"
    );
    for raw in [
        "this is not json",
        r#"{"cmd":"vip_del"}"#,
        r#"{"cmd":"explode"}"#,
        "",
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        writeln!(s, "{raw}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["ok"], false, "{raw:?} -> {line}");
        assert!(
            r["error"].as_str().unwrap().contains("bad request"),
            "{raw:?} -> {line}"
        );
    }
    assert_eq!(
        backend(&status(&socket), "web", "198.18.1.1").unwrap()["weight"],
        50
    );

    // Reload: a good file is applied, a broken one refused with its location.
    std::fs::write(&config_path, saved.replace("weight = 50", "weight = 75")).unwrap();
    ok(&xdplb(&socket, &["reload"]));
    assert_eq!(
        backend(&status(&socket), "web", "198.18.1.1").unwrap()["weight"],
        75
    );
    std::fs::write(
        &config_path,
        saved.replace("port = 80", "port = \"eighty\""),
    )
    .unwrap();
    fails(&xdplb(&socket, &["reload"]), "line");
    assert_eq!(
        backend(&status(&socket), "web", "198.18.1.1").unwrap()["weight"],
        75
    );
    assert_eq!(status(&socket)["in_sync"], true);
    // SIGHUP re-reads the file too.
    std::fs::write(&config_path, saved.replace("weight = 50", "weight = 80")).unwrap();
    daemon.signal(libc::SIGHUP);
    wait_for(Duration::from_secs(5), || {
        (backend(&status(&socket), "web", "198.18.1.1").unwrap()["weight"] == 80).then_some(())
    })
    .expect("SIGHUP applied the new weight");

    // check-config lists every problem of a bad file.
    let bad = scratch.0.join("bad.toml");
    std::fs::write(
        &bad,
        config_text(&pins.0, &socket, HTTP_CHECK)
            .replace("ring_size = 251", "ring_size = 250")
            .replace("\"ipip\"", "\"l2dsr\""),
    )
    .unwrap();
    let out = xdplb(&socket, &["check-config", bad.to_str().unwrap()]);
    fails(&out, "not prime");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the backend's mac"));
    assert!(ok(&xdplb(
        &socket,
        &["check-config", config_path.to_str().unwrap()]
    ))
    .contains("ok"));

    daemon.stop().unwrap();
}

#[test]
fn daemon_restart_keeps_pins_state_and_flows() {
    if !require_root() {
        return;
    }
    let Files {
        scratch,
        pins,
        socket,
        config_path,
    } = Files::new("restart");
    std::fs::write(&config_path, config_text(&pins.0, &socket, r#"{ kind = "none" }"#).replace(
        "health = { kind = \"udp\", send = \"ping\", expect = \"pong\", interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 2, fall = 2 }",
        "health = { kind = \"none\" }",
    ).replace(&format!("pin_dir = \"{}\"", pins.0.display()), &format!("pin_dir = \"{}\"\nlog_format = \"json\"", pins.0.display())))
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    assert_eq!(config.daemon.log_format, xdp_user::config::LogFormat::Json);
    let ns = topology("restart");
    let prog_id = || integration_tests::ops::xdp_prog(&ns, "lb0");

    let daemon = Daemon::start(&ns, &config_path, &socket, scratch.0.join("daemon1.log")).unwrap();
    let first_prog = prog_id().expect("attached");
    // A flow through the pinned maps (a program instance of our own shares
    // them) on 198.18.1.2, which then drains: the flow stays, and from then
    // on conntrack holds it (its ring slot changed owner).
    let frame_from = |sport: u16| {
        packet::tcp4(
            "198.18.100.1".parse().unwrap(),
            "198.18.0.10".parse().unwrap(),
            sport,
            80,
            b"GET /",
        )
    };
    let outer_dst = |out: &[u8]| -> [u8; 4] { out[30..34].try_into().unwrap() };
    let (sport, frame) = {
        let dp = Dataplane::open(config.tables.sizes(), &pins.0).unwrap();
        (40000..41000)
            .map(|p| (p, frame_from(p)))
            .find(|(_, f)| {
                let out = run(dp.program().unwrap(), f).unwrap();
                out.action == XDP_TX && outer_dst(&out.output) == [198, 18, 1, 2]
            })
            .expect("a client port the ring gives 198.18.1.2")
    };
    ok(&xdplb(&socket, &["backend", "drain", "web", "198.18.1.2"]));
    let flow = xdp_common::FlowKey {
        src: {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&[198, 18, 100, 1]);
            a
        },
        dst: {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&[198, 18, 0, 10]);
            a
        },
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    };
    let tracked = {
        let dp = Dataplane::open(config.tables.sizes(), &pins.0).unwrap();
        let out = run(dp.program().unwrap(), &frame).unwrap();
        assert_eq!(
            out.action,
            XDP_TX,
            "stats {:?} status {}",
            dp.stats().unwrap(),
            status(&socket)
        );
        assert_eq!(
            outer_dst(&out.output),
            [198, 18, 1, 2],
            "kept by the draining backend"
        );
        dp.flow(&flow).unwrap().expect("flow tracked").backend_id
    };
    let ids_before: Vec<Value> = status(&socket)["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();

    // A second daemon on the same socket refuses to start, touching nothing.
    let second = run_in(
        &ns,
        &["run", "--config", config_path.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .unwrap();
    fails(&second, "another xdplb daemon (pid ");
    assert_eq!(prog_id().as_deref(), Some(first_prog.as_str()));

    daemon.stop().unwrap();
    assert_eq!(
        prog_id().as_deref(),
        Some(first_prog.as_str()),
        "the dataplane keeps forwarding without the daemon"
    );
    assert!(!socket.exists(), "socket removed on exit");

    let daemon = Daemon::start(&ns, &config_path, &socket, scratch.0.join("daemon3.log")).unwrap();
    let s = status(&socket);
    assert_eq!(s["adopted"], true);
    assert_eq!(s["in_sync"], true);
    let second_prog = prog_id().expect("still attached");
    assert_ne!(
        second_prog, first_prog,
        "the new program was swapped into the pinned link"
    );
    let ids_after: Vec<Value> = s["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(ids_after, ids_before, "backend ids kept");
    assert_eq!(
        backend(&s, "web", "198.18.1.2").unwrap()["dataplane_state"],
        "draining",
        "state kept"
    );
    {
        let dp = Dataplane::open(config.tables.sizes(), &pins.0).unwrap();
        assert_eq!(
            dp.flow(&flow).unwrap().map(|f| f.backend_id),
            Some(tracked),
            "conntrack kept"
        );
        let out = run(dp.program().unwrap(), &frame).unwrap();
        assert_eq!(
            outer_dst(&out.output),
            [198, 18, 1, 2],
            "the flow kept its backend"
        );
    }
    // JSON logs: every line is an object; the adoption is reported.
    let log = daemon.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["adopted_link"] == true),
        "{log}"
    );
    daemon.stop().unwrap();

    let out = ok(&xdplb(
        &socket,
        &["detach", "--pin-dir", pins.0.to_str().unwrap()],
    ));
    assert!(out.contains("detached"), "{out}");
    assert_eq!(prog_id(), None, "detach removed the program");
    assert!(!pins.0.exists());
    assert!(ok(&xdplb(
        &socket,
        &["detach", "--pin-dir", pins.0.to_str().unwrap()]
    ))
    .contains("nothing pinned"));
}

/// The daemon takes changed ring slots through their phases: a drain marks
/// the slots the backend gives away, they settle after two idle bounds,
/// and the conntrack sweep lets them clear when no flow holds them (here
/// none: no traffic), with a one-second bound.
#[test]
fn the_daemon_settles_and_clears_changed_ring_slots() {
    if !require_root() {
        return;
    }
    let Files {
        scratch,
        pins,
        socket,
        config_path,
    } = Files::new("marks");
    std::fs::write(
        &config_path,
        config_text(&pins.0, &socket, r#"{ kind = "none" }"#)
            .replace("[forwarding]", "[forwarding]\nflow_idle_timeout = 1"),
    )
    .unwrap();
    let ns = topology("marks");
    let daemon = Daemon::start(&ns, &config_path, &socket, scratch.0.join("daemon.log")).unwrap();
    let changed = || -> (u64, u64) {
        let s = status(&socket);
        (
            s["changed_slots"][0].as_u64().unwrap(),
            s["changed_slots"][1].as_u64().unwrap(),
        )
    };
    assert_eq!(changed(), (0, 0), "a fresh start has no changed slot");
    ok(&xdplb(&socket, &["backend", "drain", "web", "198.18.1.2"]));
    let (taking_over, _) = changed();
    assert!(taking_over > 0, "the drained backend's slots are marked");
    let (_, metrics) = http_get(&ns, "127.0.0.1:9477", "/metrics");
    assert!(
        metrics.contains(&format!(
            "xdplb_ring_slots_changed{{phase=\"taking_over\"}} {taking_over}"
        )),
        "{metrics}"
    );
    let started = Instant::now();
    let cleared = wait_for(Duration::from_secs(30), || {
        (changed() == (0, 0)).then(|| started.elapsed())
    });
    println!("changed slots: {taking_over} marked, all cleared after {cleared:?}");
    assert!(
        cleared.is_some(),
        "the marks never cleared: {:?}",
        changed()
    );
    daemon.stop().unwrap();
}
