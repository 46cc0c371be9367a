//! Validation: every problem of a config, each at its location.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::Path,
};

use super::*;
use crate::maglev::is_prime;

impl Config {
    /// Whether some VIP's packets are encapsulated (sent to a next hop).
    fn encapsulates(&self) -> bool {
        self.vips
            .iter()
            .any(|v| v.forwarding != ForwardingMode::L2dsr)
    }

    /// What is wrong with a next hop's MAC, if anything: not a MAC, or
    /// missing while some VIP encapsulates (`what_for`: why it is needed).
    pub(super) fn next_hop_problem(&self, mac: Option<&str>, what_for: &str) -> Option<String> {
        match mac {
            Some(mac) if parse_mac(mac).is_none() => {
                Some(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
            }
            None if self.encapsulates() => Some(format!("required: {what_for}")),
            _ => None,
        }
    }

    /// Every problem, each with its location.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |location: String, reason: String| out.push(Problem { location, reason });

        if let Some(why) = crate::iface::invalid_name(&self.interface) {
            problem("interface".into(), why);
        }
        let t = &self.tables;
        let bytes = t.memory_bytes();
        if bytes > MAX_TABLE_BYTES {
            problem(
                "tables".into(),
                format!(
                    "the tables would take about {:.1} GiB of kernel memory (ring_size {} x max_vips {} x 2 rings, \
                     max_flows {}); the limit is {} GiB",
                    bytes as f64 / f64::from(1u32 << 30),
                    t.ring_size,
                    t.max_vips,
                    t.max_flows,
                    MAX_TABLE_BYTES >> 30
                ),
            );
        }
        for (name, v) in [
            ("max_vips", t.max_vips),
            ("max_backends", t.max_backends),
            ("ring_size", t.ring_size),
            ("max_flows", t.max_flows),
        ] {
            if v == 0 {
                problem(format!("tables.{name}"), "must be at least 1".into());
            }
        }
        for (location, path) in [
            ("daemon.pin_dir", &self.daemon.pin_dir),
            ("api.socket", &self.api.socket),
        ]
        .into_iter()
        .chain(self.chain.pass_to.iter().map(|p| ("chain.pass_to", p)))
        .chain(
            self.libxdp
                .iter()
                .flat_map(|l| l.dispatcher.as_ref())
                .map(|p| ("libxdp.dispatcher", p)),
        ) {
            if let Some(why) = path_problem(path) {
                problem(location.into(), why);
            }
        }
        let a = &self.announce;
        // 253 default, 254 main, 255 local: routes there would steer this
        // host's own traffic.
        if a.table == 0 || (253..=255).contains(&a.table) {
            problem(
                "announce.table".into(),
                format!(
                    "{} is {}; choose a table of its own (e.g. 100)",
                    a.table,
                    match a.table {
                        0 => "no table",
                        253 => "the default table",
                        254 => "the main table",
                        _ => "the local table",
                    }
                ),
            );
        }
        if a.protocol <= 4 {
            problem(
                "announce.protocol".into(),
                format!(
                    "{} is reserved for the kernel and `ip route` (0-4); choose one of its own (e.g. 250)",
                    a.protocol
                ),
            );
        }
        if let Some(fleet) = &self.fleet {
            for (location, reason) in fleet.problems() {
                problem(location, reason);
            }
        }
        if a.hold_down_ms > MAX_HOLD_DOWN_MS {
            problem(
                "announce.hold_down_ms".into(),
                format!("{} is above the limit {MAX_HOLD_DOWN_MS}", a.hold_down_ms),
            );
        }
        if t.ring_size > 0 && !is_prime(t.ring_size) {
            problem(
                "tables.ring_size".into(),
                format!(
                    "{} is not prime (Maglev needs a prime; the default is 65537)",
                    t.ring_size
                ),
            );
        }
        if t.max_backends == xdp_common::NO_BACKEND {
            problem(
                "tables.max_backends".into(),
                format!("must be below {}", xdp_common::NO_BACKEND),
            );
        }
        if t.max_vips
            .checked_mul(2)
            .and_then(|n| n.checked_mul(t.ring_size))
            .is_none()
        {
            problem(
                "tables".into(),
                format!(
                    "max_vips ({}) x 2 x ring_size ({}) exceeds 2^32 ring slots",
                    t.max_vips, t.ring_size
                ),
            );
        }

        self.uplink_problems(&mut problem);
        if self.libxdp.is_some() {
            if self.chain.pass_to.is_some() {
                problem(
                    "chain.pass_to".into(),
                    "is for kernels without extension programs; with [libxdp], load the other \
                     program into the dispatcher (xdp-loader, xdp-filter) instead"
                        .into(),
                );
            }
            if self.xdp_mode == super::XdpModeName::Offload {
                problem(
                    "libxdp".into(),
                    "libxdp's dispatcher does not run offloaded; use xdp_mode native or generic"
                        .into(),
                );
            }
        }
        let f = &self.forwarding;
        if let Some(why) = self.next_hop_problem(
            f.gateway_mac.as_deref(),
            "encapsulated packets are sent to this next hop",
        ) {
            problem("forwarding.gateway_mac".into(), why);
        }
        match parse_prefix(&f.source_v4) {
            Some((IpAddr::V4(_), _)) => {}
            _ => problem(
                "forwarding.source_v4".into(),
                format!("{:?} is not an IPv4 prefix (a.b.c.d/len)", f.source_v4),
            ),
        }
        match parse_prefix(&f.source_v6) {
            Some((IpAddr::V6(_), len)) if len >= 96 => {}
            Some((IpAddr::V6(_), len)) => problem(
                "forwarding.source_v6".into(),
                format!("prefix length {len} too short: the flow hash fills at most the last 32 bits, so use /96 or longer"),
            ),
            _ => problem("forwarding.source_v6".into(), format!("{:?} is not an IPv6 prefix (x::/len)", f.source_v6)),
        }
        if f.outer_ttl == 0 {
            problem("forwarding.outer_ttl".into(), "must be at least 1".into());
        }
        if f.tunnel_mtu != 0 && !(MIN_TUNNEL_MTU..=65535).contains(&f.tunnel_mtu) {
            problem(
                "forwarding.tunnel_mtu".into(),
                format!(
                    "{} is out of range: 0 (no limit) or {MIN_TUNNEL_MTU}..=65535 bytes",
                    f.tunnel_mtu
                ),
            );
        }

        if !(1..=86_400).contains(&f.flow_idle_timeout) {
            problem(
                "forwarding.flow_idle_timeout".into(),
                format!("{} is out of range: 1..=86400 seconds", f.flow_idle_timeout),
            );
        }

        if self.vips.len() > t.max_vips as usize {
            problem(
                "vip".into(),
                format!(
                    "needs {} VIP slots, the table has {} (tables.max_vips)",
                    self.vips.len(),
                    t.max_vips
                ),
            );
        }
        let pairs: usize = self.vips.iter().map(|v| v.backends.len()).sum();
        if pairs > t.max_backends as usize {
            problem(
                "vip.backend".into(),
                format!("needs {pairs} backend slots, the table has {} (tables.max_backends; each VIP's backends count separately)", t.max_backends),
            );
        }
        let mut names = HashSet::new();
        let mut endpoints = BTreeMap::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}] {}", vip.label());
            if vip.name.trim().is_empty() {
                problem(format!("vip[{i}]"), "name must not be empty".into());
            } else if vip.name.chars().any(char::is_control) {
                problem(
                    format!("vip[{i}]"),
                    format!(
                        "name {:?} contains a line break or control character",
                        vip.name
                    ),
                );
            } else if !names.insert(vip.name.as_str()) {
                problem(at.clone(), format!("duplicate VIP name {:?}", vip.name));
            }
            if let Some(first) = endpoints.insert((vip.address, vip.port, vip.protocol), i) {
                problem(
                    at.clone(),
                    format!("duplicate VIP: same address, port and protocol as vip[{first}]"),
                );
            }
            if vip.source_hash && vip.hash.is_some_and(|h| h != HashFields::Source) {
                problem(
                    at.clone(),
                    format!(
                        "source_hash = true contradicts hash = \"{}\"; source_hash is the older spelling of \
                         hash = \"source\": keep only hash",
                        vip.hash()
                    ),
                );
            }
            self.quic_problems(&at, vip, &mut problem);
            self.subset_problems(&at, vip, &mut problem);
            if vip.port == Some(0) {
                problem(
                    at.clone(),
                    "port 0: omit the port for a port-less VIP".into(),
                );
            }
            let (vip_v4, backend_v4) = match vip.forwarding {
                ForwardingMode::Ipip => (Some(true), Some(true)),
                ForwardingMode::Ip6ip6 => (Some(false), Some(false)),
                ForwardingMode::Ip4ip6 => (Some(true), Some(false)),
                ForwardingMode::L2dsr => (None, None),
            };
            if vip_v4.is_some_and(|v4| v4 != vip.address.is_ipv4()) {
                problem(
                    at.clone(),
                    format!(
                        "forwarding {} needs an IPv{} VIP address",
                        vip.forwarding,
                        if vip_v4 == Some(true) { 4 } else { 6 }
                    ),
                );
            }
            self.health_problems(&at, vip, &mut problem);
            if let Some(ring) = RingNeed::of(vip).filter(|r| r.slots > u64::from(t.ring_size)) {
                problem(
                    at.clone(),
                    format!(
                        "tables.ring_size {} cannot give each backend its weight's share: \
                         the smallest share (weight {} of {}) needs a ring of at least {} slots",
                        t.ring_size, ring.smallest, ring.total, ring.slots
                    ),
                );
            }
            let mut seen = HashSet::new();
            for (j, b) in vip.backends.iter().enumerate() {
                let bat = format!("{at}.backend[{j}] ({})", b.address);
                if !seen.insert(b.address) {
                    problem(bat.clone(), "duplicate backend address in this VIP".into());
                }
                if b.weight > MAX_WEIGHT {
                    problem(
                        bat.clone(),
                        format!("weight {} out of range 0..={MAX_WEIGHT}", b.weight),
                    );
                }
                if backend_v4.is_some_and(|v4| v4 != b.address.is_ipv4()) {
                    problem(
                        bat.clone(),
                        format!(
                            "forwarding {} needs an IPv{} backend address",
                            vip.forwarding,
                            if backend_v4 == Some(true) { 4 } else { 6 }
                        ),
                    );
                }
                match (&b.mac, vip.forwarding) {
                    (Some(mac), _) if parse_mac(mac).is_none() => {
                        problem(bat.clone(), format!("mac {mac:?} is not a MAC address"))
                    }
                    (None, ForwardingMode::L2dsr) => problem(
                        bat.clone(),
                        "l2dsr forwarding needs the backend's mac".into(),
                    ),
                    _ => {}
                }
            }
        }
        out
    }

    fn health_problems(&self, at: &str, vip: &Vip, problem: &mut impl FnMut(String, String)) {
        let h = &vip.health;
        let hat = format!("{at}.health");
        if h.kind == CheckKind::None {
            return;
        }
        if vip.check_port().is_none() {
            problem(hat.clone(), "a port-less VIP needs health.port".into());
        }
        if h.kind == CheckKind::Tcp && vip.protocol == Protocol::Udp && h.port.is_none() {
            problem(
                hat.clone(),
                "a TCP check of a UDP VIP needs health.port (or use kind = \"udp\")".into(),
            );
        }
        if h.tunnel && h.kind == CheckKind::Http {
            problem(
                hat.clone(),
                "tunnel = true checks by a SYN (kind = \"tcp\") or a UDP request (kind = \"udp\"); \
                 an HTTP check cannot go through the tunnel: the backend answers the VIP's packets \
                 directly, so this host cannot hold the connection"
                    .into(),
            );
        }
        if h.tunnel && h.kind == CheckKind::Tcp && !h.half_open {
            problem(
                hat.clone(),
                "tunnel = true with kind = \"tcp\" is a SYN probe: it needs half_open = true"
                    .into(),
            );
        }
        if h.interval_ms == 0 {
            problem(hat.clone(), "interval_ms must be at least 1".into());
        }
        if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
            problem(
                hat.clone(),
                format!(
                    "timeout_ms {} must be between 1 and interval_ms ({})",
                    h.timeout_ms, h.interval_ms
                ),
            );
        }
        if h.jitter_ms >= h.interval_ms.max(1) {
            problem(
                hat.clone(),
                format!(
                    "jitter_ms {} must be below interval_ms ({})",
                    h.jitter_ms, h.interval_ms
                ),
            );
        }
        if h.rise == 0 || h.fall == 0 {
            problem(hat.clone(), "rise and fall must be at least 1".into());
        }
        if h.flap_limit > 0 && (h.flap_window_ms == 0 || h.flap_hold_ms == 0) {
            problem(
                hat.clone(),
                "flap damping needs flap_window_ms and flap_hold_ms of at least 1".into(),
            );
        }
        for (field, value) in [
            ("path", Some(h.path.as_str())),
            ("host", h.host.as_deref()),
            ("send", h.send.as_deref()),
            ("expect", h.expect.as_deref()),
        ] {
            if value.is_some_and(|v| v.chars().any(char::is_control)) {
                problem(
                    hat.clone(),
                    format!("{field} contains a line break or control character (it would split or forge the check's request)"),
                );
            }
        }
        match h.kind {
            CheckKind::Http => {
                if !h.path.starts_with('/') {
                    problem(hat.clone(), format!("path {:?} must start with /", h.path));
                }
                if h.path.chars().any(char::is_whitespace) {
                    problem(
                        hat.clone(),
                        format!(
                            "path {:?} contains whitespace (it would split the request line; write a space as %20)",
                            h.path
                        ),
                    );
                }
                if !(100..=599).contains(&h.expect_status) {
                    problem(
                        hat.clone(),
                        format!("expect_status {} is not an HTTP status", h.expect_status),
                    );
                }
            }
            CheckKind::Udp => {
                if h.send.as_deref().unwrap_or("").is_empty() {
                    problem(
                        hat.clone(),
                        "a UDP check needs a request payload (send)".into(),
                    );
                }
            }
            CheckKind::Tcp | CheckKind::None => {}
        }
    }

    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Invalid(problems))
        }
    }
}

/// Why `path` cannot name a file (a NUL byte, a control character, or not
/// absolute), if it cannot.
fn path_problem(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        Some(format!("{path:?} contains a NUL byte"))
    } else if bytes.iter().any(|b| b.is_ascii_control()) {
        Some(format!("{path:?} contains a control character"))
    } else if !path.is_absolute() {
        Some(format!("{path:?} is not an absolute path"))
    } else {
        None
    }
}

/// The ring a VIP needs so that every backend gets its weight's share: at
/// least one slot for the smallest share (Maglev's accumulation keeps
/// each backend within one slot of its share), so the total weight over
/// the smallest weight.
struct RingNeed {
    slots: u64,
    smallest: u64,
    total: u64,
}

impl RingNeed {
    /// None without weighted backends.
    fn of(vip: &Vip) -> Option<Self> {
        let weights = vip
            .backends
            .iter()
            .map(|b| u64::from(b.weight))
            .filter(|w| *w > 0);
        let smallest = weights.clone().min()?;
        let total: u64 = weights.sum();
        Some(Self {
            slots: total.div_ceil(smallest),
            smallest,
            total,
        })
    }
}
