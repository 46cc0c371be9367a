//! A VIP, its backends and its health check, as the file writes them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::*;

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

/// The fields a VIP's ring hash covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum HashFields {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// The client's address only: every connection of a client goes to one
    /// backend (IPVS `sh`).
    Source,
    /// The client's address and port (IPVS `sh` with `sh-port`).
    SourcePort,
    /// Everything but the client's port (Katran's `F_HASH_NO_SRC_PORT`): a
    /// client's flows to one port share a backend whatever port they come
    /// from, as QUIC and UDP clients behind NATs that rebind want.
    NoSourcePort,
}

impl HashFields {
    /// The `VipMeta::flags` bit that chooses these fields (0: the 5-tuple).
    pub fn flag(self) -> u32 {
        match self {
            Self::FiveTuple => 0,
            Self::Source => xdp_common::VIP_F_SOURCE_HASH,
            Self::SourcePort => xdp_common::VIP_F_HASH_SOURCE_PORT,
            Self::NoSourcePort => xdp_common::VIP_F_HASH_NO_SOURCE_PORT,
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
    /// The fields a new flow's ring slot is hashed from; unset: `source`
    /// if the older `source_hash` is true, else `five_tuple` ([`Vip::hash`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashFields>,
    /// The older spelling of `hash = "source"`, still read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_hash: bool,
    #[serde(default)]
    pub health: HealthCheck,
    /// QUIC connection-ID routing (UDP VIPs); absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<Quic>,
    /// Source routes: clients in a subset's prefixes (longest match over
    /// all of them) go to that subset of the backends.
    #[serde(default, rename = "subset", skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
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
    /// The server id this backend writes into its QUIC connection IDs
    /// (QUIC VIPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
}

/// A named subset of a VIP's backends and the client prefixes routed to
/// it (Katran's source routing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    /// Addresses of the VIP's backends that serve these clients.
    pub backends: Vec<IpAddr>,
    /// Client prefixes, `198.18.100.0/24` or `2001:db8:100::/48`, of the
    /// VIP's family.
    pub sources: Vec<String>,
}

/// A VIP's QUIC connection-ID routing: its backends write their server id
/// into the connection IDs they issue, after a first octet whose top three
/// bits are not `111` (the plaintext algorithm of the IETF QUIC-LB draft).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// Octets of a server id, 1 to 4.
    #[serde(default = "default_server_id_bytes")]
    pub server_id_bytes: u8,
}

fn default_server_id_bytes() -> u8 {
    2
}

impl Quic {
    /// The largest server id that fits.
    pub fn max_server_id(self) -> u32 {
        (1u64 << (8 * u32::from(self.server_id_bytes.min(4))))
            .saturating_sub(1)
            .try_into()
            .unwrap_or(u32::MAX)
    }

    /// Its `VipMeta::flags` bits: `VIP_F_QUIC` and the server id length.
    pub fn flags(self) -> u32 {
        xdp_common::VIP_F_QUIC
            | ((u32::from(self.server_id_bytes) & xdp_common::quic::SERVER_ID_LEN_MASK)
                << xdp_common::quic::SERVER_ID_LEN_SHIFT)
    }
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            server_id_bytes: default_server_id_bytes(),
        }
    }
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
    /// Check through the tunnel: to the VIP, wrapped exactly as the
    /// dataplane sends the VIP's packets to the backend, so a backend that
    /// does not decapsulate or lacks the VIP fails (TCP SYN probes and UDP
    /// checks; needs CAP_NET_RAW).
    pub tunnel: bool,
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
            tunnel: false,
            init_state: InitState::Checked,
            flap_limit: 0,
            flap_window_ms: 60_000,
            flap_hold_ms: 60_000,
        }
    }
}

/// How a VIP is written in status and logs: `198.18.0.10:80/tcp`,
/// `[2001:db8::53]:*/udp` (no port: every port).
pub fn endpoint(address: IpAddr, port: Option<u16>, protocol: Protocol) -> String {
    let port = port.map_or("*".to_owned(), |p| p.to_string());
    match address {
        IpAddr::V4(a) => format!("{a}:{port}/{protocol}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{protocol}"),
    }
}

impl Vip {
    /// `name (address:port/proto)` for messages.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.endpoint())
    }

    /// `address:port/proto`, `*` for a port-less VIP.
    pub fn endpoint(&self) -> String {
        endpoint(self.address, self.port, self.protocol)
    }

    /// The fields its ring hash covers: `hash`, else `source` where the
    /// older `source_hash` says so.
    pub fn hash(&self) -> HashFields {
        self.hash.unwrap_or(if self.source_hash {
            HashFields::Source
        } else {
            HashFields::FiveTuple
        })
    }

    /// The port health checks connect to, if any can be determined.
    pub fn check_port(&self) -> Option<u16> {
        self.health.port.or(self.port)
    }
}
