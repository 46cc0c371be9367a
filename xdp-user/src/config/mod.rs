//! The desired state: one TOML file. Parsing, validation with every problem
//! reported at its location, and atomic write-back. Pure but for the file
//! read/write at the edges.

mod change;
mod file;
mod fleet;
pub mod reference;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Result;

pub use change::Change;
pub use file::{read_bounded, ConfigFile, MAX_CONFIG_BYTES};
pub use fleet::{Fleet, HealthRule};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{AttachMode, Sizes},
    maglev::is_prime,
};

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interface the balancer attaches to.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpModeName,
    #[serde(default)]
    pub tables: Tables,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub api: Api,
    #[serde(default)]
    pub daemon: Daemon,
    #[serde(default)]
    pub announce: Announce,
    /// Desired state and health shared with other LB hosts through etcd;
    /// then the VIPs live there, not in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    #[serde(default, rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<Vip>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeName {
    #[default]
    Native,
    Generic,
    Offload,
}

crate::display_as_written!(
    XdpModeName,
    PacketAction,
    Protocol,
    ForwardingMode,
    InitialState,
    CheckKind
);

impl From<XdpModeName> for AttachMode {
    fn from(m: XdpModeName) -> Self {
        match m {
            XdpModeName::Native => AttachMode::Native,
            XdpModeName::Generic => AttachMode::Generic,
            XdpModeName::Offload => AttachMode::Offload,
        }
    }
}

/// Table sizes; fixed for the life of a pinned dataplane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tables {
    pub max_vips: u32,
    pub max_backends: u32,
    pub ring_size: u32,
    pub max_flows: u32,
}

impl Default for Tables {
    fn default() -> Self {
        let s = Sizes::default();
        Self {
            max_vips: s.max_vips,
            max_backends: s.max_backends,
            ring_size: s.ring_size,
            max_flows: s.max_flows,
        }
    }
}

/// Most kernel memory the tables may take.
pub const MAX_TABLE_BYTES: u64 = 4 << 30;

impl Tables {
    /// About how much kernel memory the maps of these sizes take: rings,
    /// conntrack (key, value and the hash table's per-entry overhead),
    /// backends and VIPs with their per-CPU counters.
    pub fn memory_bytes(&self) -> u64 {
        use std::mem::size_of;
        use xdp_common::{Backend, Counters, FlowKey, FlowState, VipKey, VipMeta};
        /// Per-entry overhead of a BPF hash map element (htab_elem, LRU node).
        const HASH_OVERHEAD: u64 = 64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let n = |v: u32| u64::from(v);
        let sz = |s: usize| s as u64;
        let rings = n(self.max_vips) * 2 * n(self.ring_size) * 4;
        let flows = n(self.max_flows)
            * (sz(size_of::<FlowKey>()) + sz(size_of::<FlowState>()) + HASH_OVERHEAD);
        let backends =
            n(self.max_backends) * (sz(size_of::<Backend>()) + cpus * sz(size_of::<Counters>()));
        let vips = n(self.max_vips)
            * (sz(size_of::<VipKey>())
                + sz(size_of::<VipMeta>())
                + HASH_OVERHEAD
                + cpus * sz(size_of::<Counters>()));
        rings + flows + backends + vips
    }

    pub fn sizes(&self) -> Sizes {
        Sizes {
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            ring_size: self.ring_size,
            max_flows: self.max_flows,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PacketAction {
    #[default]
    Pass,
    Drop,
}

/// The flood guard's default: Katran's limit of new flows per CPU.
pub const DEFAULT_CONNTRACK_RATE: u32 = 125_000;

/// The smallest `forwarding.tunnel_mtu`: IPv6's minimum link MTU.
pub const MIN_TUNNEL_MTU: u32 = 1280;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Forwarding {
    /// MAC of the next hop towards the backends (encapsulating VIPs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_mac: Option<String>,
    /// Outer IPv4 source prefix; the flow hash fills the host bits.
    pub source_v4: String,
    /// Outer IPv6 source prefix (length ≥ 96); the flow hash fills the host bits.
    pub source_v6: String,
    pub fragments: PacketAction,
    pub malformed: PacketAction,
    pub outer_ttl: u8,
    /// Largest outer packet the path to the backends carries (bytes of IP,
    /// encapsulation included). A VIP packet that would exceed it and may
    /// not be fragmented is answered with ICMP "fragmentation needed" /
    /// ICMPv6 "packet too big" instead. 0: no limit (the path's routers
    /// answer, to the LB's outer source, which drops it).
    pub tunnel_mtu: u32,
    /// New conntrack entries per second per CPU (the flood guard): beyond
    /// it new flows are still balanced through the ring but not tracked,
    /// so a SYN flood cannot evict established flows. 0: no limit.
    pub conntrack_rate: u32,
    /// Seconds a flow in a changed ring slot may send nothing and still
    /// keep its backend. A slot that changed owner takes packets without
    /// conntrack state for flows of its previous owner this long, then
    /// follows the ring; its mark goes once no tracked flow needs it.
    pub flow_idle_timeout: u32,
}

/// `forwarding.flow_idle_timeout` by default: IPVS's UDP timeout.
pub const DEFAULT_FLOW_IDLE_TIMEOUT: u32 = 300;

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            gateway_mac: None,
            source_v4: "198.19.0.0/16".into(),
            source_v6: "2001:db8:ffff::/112".into(),
            fragments: PacketAction::Pass,
            malformed: PacketAction::Pass,
            outer_ttl: 64,
            tunnel_mtu: 0,
            conntrack_rate: DEFAULT_CONNTRACK_RATE,
            flow_idle_timeout: DEFAULT_FLOW_IDLE_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Admin API Unix socket (mode 0600).
    pub socket: PathBuf,
    /// A group whose members may use the admin socket too (socket 0660,
    /// directories the daemon creates 0750, both of this group); none:
    /// root only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Read-only metrics and health listener.
    pub metrics: SocketAddr,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/xdplb/admin.sock"),
            socket_group: None,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9477)),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Daemon {
    /// Where maps and the XDP link are pinned (on a bpffs).
    pub pin_dir: PathBuf,
    pub log_format: LogFormat,
}

impl Default for Daemon {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/xdplb"),
            log_format: LogFormat::Human,
        }
    }
}

/// Announcing VIP addresses to routers: while a VIP address may receive
/// traffic on this host, the daemon keeps a route for it in a routing table
/// of its own (type blackhole, tagged with its own route protocol), which a
/// routing daemon learns and announces (BIRD: `protocol kernel { kernel
/// table N; learn; }`) and a keepalived `track_script` can test
/// (`xdplb announce check`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Announce {
    pub enabled: bool,
    /// The routing table the routes go to (not main, local or default).
    pub table: u32,
    /// The routes' protocol number (`ip route ... proto N`).
    pub protocol: u8,
    /// After the dataplane was lost, it must be attached and in sync this
    /// long before its VIPs are announced again.
    pub hold_down_ms: u64,
}

impl Default for Announce {
    fn default() -> Self {
        Self {
            enabled: false,
            table: 100,
            protocol: 250,
            hold_down_ms: 2000,
        }
    }
}

/// Longest announcement hold-down.
pub const MAX_HOLD_DOWN_MS: u64 = 600_000;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => xdp_common::PROTO_TCP,
            Self::Udp => xdp_common::PROTO_UDP,
        }
    }
}

/// How a VIP's packets reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// IPv4 in IPv4 (IPv4 VIP, IPv4 backends).
    Ipip,
    /// IPv6 in IPv6 (IPv6 VIP, IPv6 backends).
    Ip6ip6,
    /// IPv4 in IPv6 (IPv4 VIP, IPv6 backends).
    Ip4ip6,
    /// L2 direct server return (backends on the segment, MAC required).
    L2dsr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    /// Omitted: every port of the address and protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub forwarding: ForwardingMode,
    /// Hash on the client address only (client stickiness).
    #[serde(default)]
    pub source_hash: bool,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    /// In service: its checks decide (`fall` failures take it out).
    #[default]
    Up,
    /// Held out whatever its checks say: no new flows, its flows placed
    /// again. Checks still run, so its health shows.
    Down,
    /// Keeps existing flows, receives no new ones (a failed check takes
    /// it down).
    Drain,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Tunnel endpoint, and what health checks connect to.
    pub address: IpAddr,
    #[serde(default = "default_weight", deserialize_with = "weight_in_range")]
    pub weight: u32,
    /// Required for L2 DSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default)]
    pub state: InitialState,
}

fn default_weight() -> u32 {
    100
}

/// A weight, with the real range in the error for any other integer.
fn weight_in_range<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    let w = i64::deserialize(d)?;
    u32::try_from(w)
        .ok()
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("weight {w} out of range 0..={MAX_WEIGHT}"))
        })
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// TCP connect.
    #[default]
    Tcp,
    /// HTTP GET, expecting a status.
    Http,
    /// UDP request, expecting a reply.
    Udp,
    /// No check: the backend keeps its configured state.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to check on the backend; default: the VIP's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Random extra delay (0..jitter) per check, so checks do not synchronise.
    pub jitter_ms: u64,
    /// HTTP: path to GET.
    pub path: String,
    /// HTTP: expected status.
    pub expect_status: u16,
    /// HTTP: Host header; default: the backend address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// UDP: request payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// UDP: the reply must start with this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// TCP checks: a half-open SYN probe (true: no connection on the
    /// backend, far cheaper at scale) or a full connect (false). Half-open
    /// needs CAP_NET_RAW; without it checks connect.
    pub half_open: bool,
    /// Where a backend the daemon has not checked yet starts: `checked`
    /// keeps it out of the ring until its first check passes; `up` puts it
    /// in at once (until `fall` failures).
    pub init_state: InitState,
    /// Flap damping: a backend that changes state more than this many
    /// times within `flap_window_ms` is held down for `flap_hold_ms`
    /// after its last change. 0: off.
    pub flap_limit: u32,
    pub flap_window_ms: u64,
    pub flap_hold_ms: u64,
}

/// Where a new backend starts (HAProxy's `init-state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitState {
    /// Out of the ring until its first check passes.
    #[default]
    Checked,
    /// In the ring at once.
    Up,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            port: None,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            jitter_ms: 100,
            path: "/".into(),
            expect_status: 200,
            host: None,
            send: None,
            expect: None,
            half_open: true,
            init_state: InitState::Checked,
            flap_limit: 0,
            flap_window_ms: 60_000,
            flap_hold_ms: 60_000,
        }
    }
}

/// One problem found in a config: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub location: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

/// Every problem of a config, or of the file holding it.
#[derive(Debug)]
pub struct Invalid(pub Vec<Problem>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the config:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// Parse a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// Parse `address/len`.
pub fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

impl Vip {
    /// `name (address:port/proto)` for messages.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.endpoint())
    }

    /// `address:port/proto`, `*` for a port-less VIP.
    pub fn endpoint(&self) -> String {
        let port = self.port.map_or("*".to_owned(), |p| p.to_string());
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.address {
            IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
            IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
        }
    }

    /// The port health checks connect to, if any can be determined.
    pub fn check_port(&self) -> Option<u16> {
        self.health.port.or(self.port)
    }
}

/// Where a span of `text` starts, as an editor shows it.
fn line_and_column(text: &str, at: usize) -> String {
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

/// Every type error of a file that does not deserialize, not only the
/// first: each error's key line is blanked (line numbers stay) and the
/// text parsed again, until it parses, a syntax error or a table header
/// is at fault, or a blanked key turns out to be required.
fn type_errors(text: &str) -> Vec<Problem> {
    const MOST: usize = 100;
    let mut text = text.to_owned();
    let mut problems = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    while problems.len() < MOST {
        let Err(e) = toml::from_str::<Config>(&text) else {
            break;
        };
        let message = e.message().to_owned();
        // A key blanked here is missing now: no problem of its own.
        if message.starts_with("missing field")
            && blanked.iter().any(|k| message.contains(&format!("`{k}`")))
        {
            break;
        }
        let Some(span) = e.span() else {
            problems.push(Problem {
                location: "file".into(),
                reason: message,
            });
            break;
        };
        problems.push(Problem {
            location: line_and_column(&text, span.start),
            reason: message,
        });
        let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let end = text[span.start..]
            .find('\n')
            .map_or(text.len(), |i| span.start + i);
        let line = text[start..end].trim();
        let Some((key, _)) = line.split_once('=').filter(|_| !line.starts_with('[')) else {
            break;
        };
        blanked.push(key.trim().trim_matches('"').to_owned());
        text.replace_range(start..end, "");
    }
    problems
}

impl Config {
    /// Parse TOML text; syntax and type errors carry line and column, and
    /// every type error is listed (see [`type_errors`]).
    pub fn parse(text: &str) -> std::result::Result<Self, Invalid> {
        let config: Config = toml::from_str(text).map_err(|_| Invalid(type_errors(text)))?;
        config.validate()?;
        if let (Some(fleet), Some(vip)) = (&config.fleet, config.vips.first()) {
            return Err(Invalid(vec![Problem {
                location: format!("vip {}", vip.name),
                reason: format!(
                    "with [fleet] the VIPs live in etcd under {}/vips/; move this file's there with \
                     `xdplb fleet import FILE` and remove them here",
                    fleet.prefix
                ),
            }]));
        }
        Ok(config)
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = file::read_bounded(path)?;
        Self::parse(&text)
            .map_err(|e| anyhow::Error::new(e).context(format!("config {}", path.display())))
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
        ] {
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

        let f = &self.forwarding;
        let encapsulating = self
            .vips
            .iter()
            .any(|v| v.forwarding != ForwardingMode::L2dsr);
        match &f.gateway_mac {
            Some(mac) if parse_mac(mac).is_none() => problem(
                "forwarding.gateway_mac".into(),
                format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
            ),
            None if encapsulating => problem(
                "forwarding.gateway_mac".into(),
                "required: encapsulated packets are sent to this next hop".into(),
            ),
            _ => {}
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
                        "forwarding {:?} needs an IPv{} VIP address",
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
                            "forwarding {:?} needs an IPv{} backend address",
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

    pub fn vip(&self, name: &str) -> Option<&Vip> {
        self.vips.iter().find(|v| v.name == name)
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

#[cfg(test)]
mod tests {
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
        assert_eq!(c.vips.len(), 2);
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
}
