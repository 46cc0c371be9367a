use super::*;

const GOOD: &str = r#"
interface = "eth0"

[forwarding]
gateway_mac = "02:00:00:00:00:fe"

[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
health = { kind = "http", path = "/healthz" }

[[vip.backend]]
address = "198.18.1.1"

[[vip.backend]]
address = "198.18.1.2"
weight = 50

[[vip]]
name = "dns6"
address = "2001:db8::53"
protocol = "udp"
forwarding = "ip6ip6"
health = { kind = "udp", port = 53, send = "ping", expect = "pong" }

[[vip.backend]]
address = "2001:db8:1::1"
"#;

fn problems_of(text: &str) -> Vec<String> {
    match Config::parse(text) {
        Ok(_) => vec![],
        Err(Invalid(p)) => p.iter().map(ToString::to_string).collect(),
    }
}

fn with(replace: &str, by: &str) -> String {
    assert!(GOOD.contains(replace), "{replace:?} not in the sample");
    GOOD.replacen(replace, by, 1)
}

fn assert_problem(text: &str, location: &str, reason: &str) {
    let problems = problems_of(text);
    assert!(
        problems
            .iter()
            .any(|p| p.contains(location) && p.contains(reason)),
        "expected a problem at {location:?} about {reason:?}, got {problems:#?}"
    );
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.tables.ring_size, 65537);
    assert_eq!(c.vips[0].backends[0].weight, 100);
    assert_eq!(c.vips[0].health.fall, 3);
    assert_eq!(c.vips[1].port, None);
    assert_eq!(c.api.metrics.to_string(), "127.0.0.1:9477");
}

#[test]
fn the_documented_example_is_valid() {
    let text = include_str!("../../../examples/xdplb.toml");
    let c = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vips.len(), 3);
    assert_eq!(c.vips[2].quic, Some(Quic::default()));
    assert_eq!(c.vips[2].backends[0].server_id, Some(1));
    // Every default the example states is the real default.
    assert_eq!(c.tables, Tables::default());
    assert_eq!(c.api, Api::default());
    assert_eq!(c.daemon, Daemon::default());
    assert_eq!(c.announce, Announce::default());
    assert_eq!(
        c.forwarding,
        Forwarding {
            gateway_mac: c.forwarding.gateway_mac.clone(),
            ..Forwarding::default()
        }
    );
    assert_eq!(
        c.vips[0].health.interval_ms,
        HealthCheck::default().interval_ms
    );
    let h = &c.vips[0].health;
    let d = HealthCheck::default();
    assert_eq!(
        (h.init_state, h.flap_limit, h.flap_window_ms, h.flap_hold_ms),
        (d.init_state, d.flap_limit, d.flap_window_ms, d.flap_hold_ms)
    );
}

#[test]
fn syntax_and_type_errors_have_line_and_column() {
    assert_problem(
        &with("port = 80", "port = \"eighty\""),
        "line 10",
        "invalid type",
    );
    assert_problem(
        &with("address = \"198.18.0.10\"", "address = \"198.18.0.300\""),
        "line 9",
        "invalid IP address",
    );
    assert_problem(
        &with("forwarding = \"ipip\"", "forwarding = \"gre\""),
        "line 12",
        "unknown variant",
    );
    assert_problem(
        &with("interface = \"eth0\"", "interface = \"eth0\"\nbogus = 1"),
        "line 3",
        "unknown field",
    );
    assert_problem("interface = ", "line 1", "");
}

#[test]
fn every_validation_error_kind() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "interface = \"eth0\"",
            "interface = \"\"",
            "interface",
            "network interface",
        ),
        (
            "interface = \"eth0\"",
            "interface = \"abcdefghijklmnopqrst\"",
            "interface",
            "20 bytes long; interface names have at most 15",
        ),
        (
            "interface = \"eth0\"",
            "interface = \"eth\\u0000x\"",
            "interface",
            "control characters",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_vips = 1\nring_size = 2147483647\n[forwarding]",
            "tables",
            "would take about 16.0 GiB of kernel memory",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_flows = 300000000\n[forwarding]",
            "tables",
            "the limit is 4 GiB",
        ),
        (
            "weight = 50",
            "weight = -1",
            "line 20",
            "weight -1 out of range 0..=65535",
        ),
        (
            "path = \"/healthz\"",
            "path = \"/x\\r\\nX-Evil: 1\"",
            "health",
            "path contains a line break",
        ),
        (
            "send = \"ping\"",
            "send = \"ping\\n\"",
            "health",
            "send contains a line break",
        ),
        (
            "[forwarding]",
            "[tables]\nring_size = 65536\n[forwarding]",
            "tables.ring_size",
            "not prime",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_flows = 0\n[forwarding]",
            "tables.max_flows",
            "at least 1",
        ),
        (
            "[forwarding]",
            "[forwarding]\ntunnel_mtu = 1000",
            "forwarding.tunnel_mtu",
            "1000 is out of range: 0 (no limit) or 1280..=65535",
        ),
        (
            "[forwarding]",
            "[forwarding]\nflow_idle_timeout = 0",
            "forwarding.flow_idle_timeout",
            "0 is out of range: 1..=86400 seconds",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_vips = 1\n[forwarding]",
            "vip",
            "needs 2 VIP slots, the table has 1",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_backends = 2\n[forwarding]",
            "vip.backend",
            "needs 3 backend slots, the table has 2",
        ),
        (
            "[forwarding]",
            "[tables]\nmax_vips = 40000\n[forwarding]",
            "tables",
            "exceeds 2^32",
        ),
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "gateway_mac = \"02:00:00:00:fe\"",
            "forwarding.gateway_mac",
            "not a MAC",
        ),
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "",
            "forwarding.gateway_mac",
            "required",
        ),
        (
            "[forwarding]",
            "[[uplink]]\ninterface = \"eth0\"\ngateway_mac = \"02:00:00:00:00:fd\"\n[forwarding]",
            "uplink[0].interface",
            "served already",
        ),
        (
            "[forwarding]",
            "[[uplink]]\ninterface = \"eth1\"\n[forwarding]",
            "uplink[0].gateway_mac",
            "required",
        ),
        (
            "[forwarding]",
            "[[uplink]]\ninterface = \"eth1\"\ngateway_mac = \"02:00\"\n[forwarding]",
            "uplink[0].gateway_mac",
            "not a MAC",
        ),
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "gateway_mac = \"02:00:00:00:00:fe\"\nsource_v6 = \"2001:db8::/64\"",
            "forwarding.source_v6",
            "too short",
        ),
        (
            "gateway_mac = \"02:00:00:00:00:fe\"",
            "gateway_mac = \"02:00:00:00:00:fe\"\nsource_v4 = \"2001:db8::/120\"",
            "forwarding.source_v4",
            "not an IPv4 prefix",
        ),
        (
            "name = \"dns6\"",
            "name = \"web\"",
            "vip[1]",
            "duplicate VIP name",
        ),
        (
            "address = \"2001:db8::53\"\nprotocol = \"udp\"",
            "address = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"",
            "vip[1]",
            "duplicate VIP: same address",
        ),
        ("port = 80", "port = 0", "vip[0]", "port 0"),
        (
            "forwarding = \"ip6ip6\"",
            "forwarding = \"ipip\"",
            "vip[1] dns6",
            "needs an IPv4 VIP",
        ),
        (
            "address = \"198.18.1.2\"",
            "address = \"198.18.1.1\"",
            "vip[0] web (198.18.0.10:80/tcp).backend[1]",
            "duplicate backend",
        ),
        (
            "weight = 50",
            "weight = 70000",
            "line 20",
            "weight 70000 out of range 0..=65535",
        ),
        (
            "address = \"2001:db8:1::1\"",
            "address = \"198.18.1.9\"",
            "vip[1] dns6 ([2001:db8::53]:*/udp).backend[0]",
            "IPv6 backend",
        ),
        (
            "forwarding = \"ipip\"",
            "forwarding = \"l2dsr\"",
            "backend[0]",
            "needs the backend's mac",
        ),
        (
            "weight = 50",
            "weight = 50\nmac = \"zz:00:00:00:00:01\"",
            "backend[1]",
            "not a MAC",
        ),
        (
            "kind = \"udp\", port = 53,",
            "kind = \"udp\",",
            "dns6 ([2001:db8::53]:*/udp).health",
            "port-less VIP needs health.port",
        ),
        (
            "path = \"/healthz\"",
            "path = \"healthz\"",
            "web (198.18.0.10:80/tcp).health",
            "must start with /",
        ),
        (
            "path = \"/healthz\"",
            "path = \"/\", expect_status = 700",
            "health",
            "not an HTTP status",
        ),
        (
            "path = \"/healthz\"",
            "path = \"/\", timeout_ms = 2000",
            "health",
            "timeout_ms 2000",
        ),
        (
            "path = \"/healthz\"",
            "path = \"/\", jitter_ms = 1000",
            "health",
            "jitter_ms 1000",
        ),
        (
            "path = \"/healthz\"",
            "path = \"/\", rise = 0",
            "health",
            "rise and fall",
        ),
        ("send = \"ping\", ", "", "health", "request payload"),
    ];
    for (replace, by, location, reason) in cases {
        assert_problem(&with(replace, by), location, reason);
    }
}

/// Each accepted on efc012d.
#[test]
fn paths_names_and_rings_that_cannot_work_are_refused() {
    for (text, location, reason) in [
        (
            format!("{GOOD}\n[tables]\nring_size = 2\n"),
            "vip[0] web",
            "the smallest share (weight 50 of 150) needs a ring of at least 3 slots",
        ),
        (
            format!("{GOOD}\n[daemon]\npin_dir = \"/sys/fs/bpf/x\\u0000y\"\n"),
            "daemon.pin_dir",
            "NUL byte",
        ),
        (
            format!("{GOOD}\n[api]\nsocket = \"/run/a\\u0000.sock\"\n"),
            "api.socket",
            "NUL byte",
        ),
        (
            format!("{GOOD}\n[api]\nsocket = \"run/a.sock\"\n"),
            "api.socket",
            "not an absolute path",
        ),
        (
            with("name = \"web\"", "name = \"web\\nFORGED 1\""),
            "vip[0]",
            "line break or control character",
        ),
        (
            with("path = \"/healthz\"", "path = \"/a b\""),
            "health",
            "contains whitespace",
        ),
    ] {
        assert_problem(&text, location, reason);
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = with("port = 80", "port = 0").replace("weight = 50", "mac = \"zz\"");
    let problems = problems_of(&text);
    assert!(problems.len() >= 2, "{problems:#?}");
}

#[test]
fn every_type_error_is_listed_not_only_the_first() {
    let text = "interface = \"eth0\"\nxdp_mode = \"Native\"\n[tables]\nmax_vips = \"lots\"\n\
                [[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nprotocol = \"tcp\"\n\
                forwarding = \"gre\"\n[[vip.backend]]\naddress = \"198.18.1.1\"\nweight = 70000\n";
    let problems = Config::parse(text).expect_err("bad types").0;
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 4, "{shown:#?}");
    assert!(shown[0].starts_with("line 2, column 12: unknown variant `Native`"));
    assert!(shown[1].starts_with("line 4, column 12: invalid type"));
    assert!(shown[2].starts_with("line 9, column 14: unknown variant `gre`"));
    assert!(shown[3].contains("weight 70000 out of range"));
    // A required key that is wrong is listed, and what it leaves
    // missing is not a second problem.
    let text = "interface = 7\n";
    let shown: Vec<String> = Config::parse(text)
        .expect_err("bad type")
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown.len(), 1, "{shown:#?}");
}

#[test]
fn hash_choices_and_the_older_source_hash_key() {
    let hash_of = |text: &str| Config::parse(text).unwrap().vips[0].hash();
    assert_eq!(hash_of(GOOD), HashFields::FiveTuple);
    let sticky = with(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nsource_hash = true",
    );
    assert_eq!(hash_of(&sticky), HashFields::Source);
    for (text, fields) in [
        ("source_port", HashFields::SourcePort),
        ("no_source_port", HashFields::NoSourcePort),
        ("source", HashFields::Source),
    ] {
        let c = with(
            "forwarding = \"ipip\"",
            &format!("forwarding = \"ipip\"\nhash = \"{text}\""),
        );
        assert_eq!(hash_of(&c), fields);
        assert_eq!(fields.flag() == 0, fields == HashFields::FiveTuple);
    }
    // The older key agreeing with the new one is fine; contradicting it is
    // refused, naming both.
    let both = with(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nsource_hash = true\nhash = \"source\"",
    );
    assert_eq!(hash_of(&both), HashFields::Source);
    let contradicting = with(
        "forwarding = \"ipip\"",
        "forwarding = \"ipip\"\nsource_hash = true\nhash = \"five_tuple\"",
    );
    assert_problem(
        &contradicting,
        "vip[0] web",
        "source_hash = true contradicts hash = \"five_tuple\"",
    );
    assert_problem(
        &with(
            "forwarding = \"ipip\"",
            "forwarding = \"ipip\"\nhash = \"dst\"",
        ),
        "",
        "unknown variant `dst`",
    );
}

#[test]
fn quic_routing_is_checked_where_it_cannot_work() {
    let dns = |extra: &str| {
        GOOD.replacen(
            "health = { kind = \"udp\", port = 53, send = \"ping\", expect = \"pong\" }",
            &format!("health = {{ kind = \"udp\", port = 53, send = \"ping\", expect = \"pong\" }}\n{extra}"),
            1,
        )
    };
    let c = Config::parse(&dns("quic = { server_id_bytes = 1 }")).unwrap();
    assert_eq!(c.vips[1].quic.map(|q| q.max_server_id()), Some(255));
    assert_eq!(
        c.vips[1].quic.map(|q| q.flags()),
        Some(xdp_common::VIP_F_QUIC | (1 << xdp_common::quic::SERVER_ID_LEN_SHIFT))
    );
    assert_problem(
        &with("forwarding = \"ipip\"", "forwarding = \"ipip\"\nquic = {}"),
        "vip[0] web",
        "[vip.quic] needs protocol = \"udp\", not \"tcp\"",
    );
    assert_problem(
        &dns("quic = { server_id_bytes = 5 }"),
        "quic.server_id_bytes",
        "5 is out of range: 1 to 4 octets",
    );
    let backend = "[[vip.backend]]\naddress = \"2001:db8:1::1\"";
    let ids = |a: u32, b: u32| {
        dns("quic = { server_id_bytes = 1 }").replacen(
            backend,
            &format!("{backend}\nserver_id = {a}\n\n[[vip.backend]]\naddress = \"2001:db8:1::2\"\nserver_id = {b}"),
            1,
        )
    };
    assert!(Config::parse(&ids(1, 255)).is_ok());
    assert_problem(
        &ids(1, 256),
        "backend 2001:db8:1::2",
        "server_id 256 does not fit in 1 octets",
    );
    assert_problem(
        &ids(7, 7),
        "backend 2001:db8:1::2",
        "server_id 7 is also backend 2001:db8:1::1's",
    );
    assert_problem(
        &GOOD.replacen(backend, &format!("{backend}\nserver_id = 3"), 1),
        "backend 2001:db8:1::1",
        "server_id is for QUIC VIPs",
    );
}

#[test]
fn checks_through_the_tunnel_are_syn_or_udp() {
    let tunnel = |health: &str| {
        with(
            "health = { kind = \"http\", path = \"/healthz\" }",
            &format!("health = {{ {health}, tunnel = true }}"),
        )
    };
    let c = Config::parse(&tunnel("kind = \"tcp\"")).unwrap();
    assert!(c.vips[0].health.tunnel);
    assert_problem(
        &tunnel("kind = \"http\", path = \"/healthz\""),
        "vip[0] web (198.18.0.10:80/tcp).health",
        "an HTTP check cannot go through the tunnel",
    );
    assert_problem(
        &tunnel("kind = \"tcp\", half_open = false"),
        ".health",
        "it needs half_open = true",
    );
}

#[test]
fn libxdp_sharing_parses_and_refuses_what_it_cannot_do() {
    let c = Config::parse(&with("[forwarding]", "[libxdp]\n[forwarding]")).unwrap();
    let l = c.libxdp.expect("[libxdp] present turns sharing on");
    assert_eq!(l.run_priority, 50, "libxdp's default priority");
    assert_eq!(l.dispatcher, None);
    assert!(Config::parse(GOOD).unwrap().libxdp.is_none());
    assert_problem(
        &with(
            "[forwarding]",
            "[libxdp]\n[chain]\npass_to = \"/sys/fs/bpf/f\"\n[forwarding]",
        ),
        "chain.pass_to",
        "with [libxdp]",
    );
    assert_problem(
        &with(
            "interface = \"eth0\"",
            "interface = \"eth0\"\nxdp_mode = \"offload\"\n[libxdp]",
        ),
        "libxdp",
        "offloaded",
    );
    assert_problem(
        &with(
            "[forwarding]",
            "[libxdp]\ndispatcher = \"relative.o\"\n[forwarding]",
        ),
        "libxdp.dispatcher",
        "",
    );
    assert_problem(
        &with("[forwarding]", "[libxdp]\npriority = 3\n[forwarding]"),
        "",
        "priority",
    );
}
