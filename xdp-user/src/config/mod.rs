//! The desired state: one TOML file. Parsing, validation with every problem
//! reported at its location, and atomic write-back. Pure but for the file
//! read/write at the edges.

mod change;
mod file;
mod fleet;
mod problem;
pub mod reference;
mod routing;
mod uplink;
mod validate;
mod vip;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Result;

pub use change::Change;
pub use file::{read_bounded, ConfigFile, MAX_CONFIG_BYTES};
pub use fleet::{Fleet, HealthRule};
use problem::type_errors;
pub use problem::{Invalid, Problem};
use serde::{Deserialize, Serialize};
pub use uplink::{Uplink, MAX_UPLINKS};
pub use vip::{
    endpoint, BackendConfig, CheckKind, ForwardingMode, HashFields, HealthCheck, InitState,
    InitialState, Protocol, Quic, Subset, Vip,
};

use crate::dataplane::{AttachMode, Sizes};

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
    #[serde(default)]
    pub chain: Chain,
    /// Share the interfaces with other XDP programs through libxdp's
    /// multi-program dispatcher (present: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libxdp: Option<Libxdp>,
    /// Desired state and health shared with other LB hosts through etcd;
    /// then the VIPs live there, not in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    /// More interfaces served by the same program and maps, each with its
    /// own next hop.
    #[serde(default, rename = "uplink", skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<Uplink>,
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
    CheckKind,
    HashFields
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

/// Other XDP programs on the interface, chained by tail calls (where the
/// kernel refuses extension programs, libxdp's dispatcher cannot share it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Chain {
    /// A pinned XDP program (`xdp.frags`) that gets every packet the
    /// balancer passes (not for a VIP, or left alone by policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_to: Option<PathBuf>,
}

/// `[libxdp]`: the balancer as one program of libxdp's multi-program
/// dispatcher, beside programs `xdp-loader` and `xdp-filter` load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Libxdp {
    /// Its run priority in the dispatcher: lower runs first.
    pub run_priority: u32,
    /// libxdp's `xdp-dispatcher.o` (unset: where libxdp looks for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatcher: Option<PathBuf>,
}

impl Default for Libxdp {
    fn default() -> Self {
        Self {
            run_priority: crate::dataplane::libxdp::DEFAULT_RUN_PRIO,
            dispatcher: None,
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

    pub fn vip(&self, name: &str) -> Option<&Vip> {
        self.vips.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests;
