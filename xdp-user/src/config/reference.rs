//! The configuration reference: every key of the config file, once. The
//! README's "Configuration reference" and the `xdplb.toml(5)` man page are
//! both rendered from [`KEYS`] (a unit test holds the README to it), and
//! the defaults they show are read from the parser's own defaults, never
//! written here.

use std::collections::BTreeMap;

use super::{Announce, Api, Config, Daemon, Forwarding, HealthCheck, Tables};

/// One key: its table (`""` for the top level), name, the values it
/// takes, and what it does.
pub struct Key {
    pub table: &'static str,
    pub name: &'static str,
    pub values: &'static str,
    pub doc: &'static str,
}

const fn key(
    table: &'static str,
    name: &'static str,
    values: &'static str,
    doc: &'static str,
) -> Key {
    Key {
        table,
        name,
        values,
        doc,
    }
}

/// Every key, in the order of the file.
pub const KEYS: &[Key] = &[
    key("", "interface", "interface name", "The NIC the balancer attaches to."),
    key("", "xdp_mode", "`native`, `generic`, `offload`", "How the program attaches: in the driver (native), in the kernel's generic path, or on the NIC."),
    key("tables", "max_vips", "1..", "VIPs the dataplane holds. The tables are fixed while a pinned dataplane exists."),
    key("tables", "max_backends", "1..", "VIP-backend pairs across all VIPs."),
    key("tables", "ring_size", "prime", "Maglev slots per VIP: at least each VIP's total weight over its smallest weight, so every backend gets a slot (Maglev keeps each backend within one slot of its weight's share)."),
    key("tables", "max_flows", "1..", "Conntrack entries. Only flows in ring slots that changed owner are tracked: a quarter of the active flows covers a change that moves a quarter of the ring."),
    key("forwarding", "gateway_mac", "MAC address", "Next hop towards the backends (required for encapsulation)."),
    key("forwarding", "source_v4", "IPv4 prefix", "Outer IPv4 source; the flow hash fills the host bits, so backends can spread tunnels over receive queues."),
    key("forwarding", "source_v6", "IPv6 prefix, /96 or longer", "Outer IPv6 source; the flow hash fills the host bits."),
    key("forwarding", "fragments", "`pass`, `drop`", "What happens to IPv4 and IPv6 fragments."),
    key("forwarding", "malformed", "`pass`, `drop`", "What happens to truncated or inconsistent headers."),
    key("forwarding", "outer_ttl", "1..=255", "TTL (hop limit) of the outer header."),
    key("forwarding", "tunnel_mtu", "0, 1280..=65535", "Largest outer packet the path to the backends carries; bigger DF packets get ICMP \"too big\" from the LB. 0: no limit."),
    key("forwarding", "conntrack_rate", "0..", "The SYN-flood guard: new conntrack entries per second per CPU (Katran's default). 0: no limit."),
    key("forwarding", "flow_idle_timeout", "seconds", "How long a flow in a ring slot that changed owner may be silent and keep its backend (IPVS's UDP timeout)."),
    key("api", "socket", "absolute path", "The admin API's Unix socket (mode 0600)."),
    key("api", "socket_group", "group name", "Members of this group may use the admin socket too (mode 0660). Unset: root only."),
    key("api", "metrics", "address:port", "The read-only `/metrics` and `/healthz` listener."),
    key("daemon", "pin_dir", "absolute path on a bpffs", "Where the maps and the XDP link are pinned."),
    key("daemon", "log_format", "`human`, `json`", "Log lines on stderr when not under systemd's journal."),
    key("announce", "enabled", "`true`, `false`", "Keep a route per usable VIP address for BIRD, FRR or keepalived to announce (see High availability)."),
    key("announce", "table", "routing table number", "The table the routes go to (not main, local or default)."),
    key("announce", "protocol", "0..=255", "The routes' protocol (`ip route ... proto N`)."),
    key("announce", "hold_down_ms", "0..=600000", "After a dataplane loss, announce again only after this long in sync."),
    key("chain", "pass_to", "path of a pinned XDP program", "Another XDP program on the interface (a DDoS filter, a firewall), loaded and pinned by its owner as `xdp.frags`: every packet the balancer passes (not for a VIP, or passed by policy) goes to it by a tail call, as Katran's root program chains programs. For kernels that refuse extension programs, where libxdp's dispatcher cannot share the interface. Changes by reload; unset: the kernel's stack."),
    key("libxdp", "run_priority", "0..=2^32-1", "The section turns sharing on: the balancer attaches as one program of libxdp's multi-program dispatcher on each interface it serves, beside programs `xdp-loader` and `xdp-filter` load there, which it keeps. This is its run priority: lower runs first; 50 (libxdp's default) when unset. What the balancer passes (not for a VIP) goes on to the next program. Needs extension programs (Linux 5.10 and later); changing it takes a restart (hitless)."),
    key("libxdp", "dispatcher", "path", "libxdp's `xdp-dispatcher.o` (package libxdp1); on Linux 6.13 and later (and 6.12's stable updates) that of libxdp 1.5.5 or later, whose slots accept a program that changes packet data. Unset: where libxdp looks for it (`$LIBXDP_OBJECT_PATH`, `/usr/lib/<arch>-linux-gnu/bpf`, `/usr/lib/bpf`, ...)."),
    key("uplink", "interface", "interface name", "Another interface served by the same program and maps, as a second uplink to its own router (with its own BGP session). A flow keeps its backend whichever uplink brings it; a frame leaves by the interface it arrived on. A bond may be an uplink (native XDP runs on its ports). Up to 8; changing them takes a restart (hitless)."),
    key("uplink", "gateway_mac", "MAC address", "The router behind this uplink: the next hop of encapsulated packets that arrived on it (required for encapsulation, like `forwarding.gateway_mac` for `interface`)."),
    key("fleet", "endpoints", "list of `http://` or `https://` URLs", "The etcd members' client URLs. With `[fleet]` the file has no `[[vip]]`: the VIPs are the store's (see Fleet), and `[fleet]` cannot change by reload."),
    key("fleet", "prefix", "key prefix", "Where the fleet's keys live: starts with `/`, no trailing `/`."),
    key("fleet", "host", "name", "This host's name in the fleet, unique in it (default: the host name)."),
    key("fleet", "ca", "path", "The CA that signed the etcd members' certificates."),
    key("fleet", "cert", "path", "Client certificate (with `key`)."),
    key("fleet", "key", "path", "Client key (with `cert`)."),
    key("fleet", "user", "name", "etcd user (with `password_file`)."),
    key("fleet", "password_file", "path", "File holding the etcd user's password."),
    key("fleet", "health_rule", "`any`, `majority`", "A backend stays in the rings while any live host (or at least half of those that judge it) sees it up."),
    key("fleet", "lease_ttl_s", "2..=3600", "Lease of this host's verdicts; peers' verdicts are trusted this long after the store is lost."),
    key("fleet", "timeout_ms", "100..=60000", "Timeout of each request to the store."),
    key("vip", "name", "name, no control characters", "Names the VIP in the CLI, metrics and logs."),
    key("vip", "address", "IPv4 or IPv6 address", "The VIP."),
    key("vip", "port", "1..=65535", "The VIP's port; omitted: every port of the address and protocol."),
    key("vip", "protocol", "`tcp`, `udp`", "The VIP's protocol."),
    key("vip", "forwarding", "`ipip`, `ip6ip6`, `ip4ip6`, `l2dsr`", "How packets reach the backends: `ipip` (IPv4 VIP and backends), `ip6ip6` (IPv6 VIP and backends), `ip4ip6` (IPv4 VIP, IPv6 backends), `l2dsr` (backends on the LB's segment with `mac` set and the VIP on their loopback)."),
    key("vip", "hash", "`five_tuple`, `source`, `source_port`, `no_source_port`", "The fields that pick a new flow's backend: the 5-tuple; the client address only (every connection of a client on one backend, IPVS `sh`); the client address and port (IPVS `sh-port`); everything but the client port (Katran's `F_HASH_NO_SRC_PORT`: a client keeps its backend when a NAT rebinds its port). Default `five_tuple`."),
    key("vip", "source_hash", "`true`, `false`", "The older spelling of `hash = \"source\"`, still read; contradicting `hash` is an error."),
    key("vip.health", "kind", "`tcp`, `http`, `udp`, `none`", "The backend's check."),
    key("vip.health", "port", "1..=65535", "Port checked on the backend (default: the VIP's port)."),
    key("vip.health", "path", "path, no whitespace", "HTTP: the path to GET."),
    key("vip.health", "expect_status", "100..=599", "HTTP: the status expected."),
    key("vip.health", "host", "name", "HTTP: the Host header (default: the backend's address)."),
    key("vip.health", "send", "text, one line", "UDP: the request payload."),
    key("vip.health", "expect", "text", "UDP: the reply must start with this."),
    key("vip.health", "interval_ms", "milliseconds", "Time between checks of one backend."),
    key("vip.health", "timeout_ms", "milliseconds", "A check not answered within this fails."),
    key("vip.health", "rise", "1..", "Consecutive passing checks that bring a down backend up."),
    key("vip.health", "fall", "1..", "Consecutive failing checks that take an up backend down."),
    key("vip.health", "jitter_ms", "milliseconds", "Random extra delay per check, so checks do not synchronise."),
    key("vip.health", "half_open", "`true`, `false`", "TCP checks: a SYN probe that leaves no connection on the backend (needs CAP_NET_RAW), or a full connect."),
    key("vip.health", "tunnel", "`true`, `false`", "Check through the tunnel: the SYN probe (`tcp`) or the request (`udp`) goes to the VIP, wrapped exactly as the dataplane sends the VIP's packets to this backend (same outer header and source rule, TTL, next hop; for `l2dsr` the backend's MAC), and the backend's direct answer from the VIP is matched. A backend whose decapsulation or VIP binding is broken is then down, as it is for every real flow. Not for `http`; needs CAP_NET_RAW."),
    key("vip.health", "init_state", "`checked`, `up`", "Where a backend not checked yet starts: out of the ring until its first check passes, or in it at once."),
    key("vip.health", "flap_limit", "0..", "Flap damping: a backend that changes state more than this many times within `flap_window_ms` is held down for `flap_hold_ms` after its last change. 0: off."),
    key("vip.health", "flap_window_ms", "milliseconds", "The flap damping window."),
    key("vip.health", "flap_hold_ms", "milliseconds", "How long a flapping backend is held down."),
    key("vip.quic", "server_id_bytes", "1..=4", "With `[vip.quic]` (UDP VIPs) QUIC packets are routed by their destination connection ID: a short-header, Handshake or Retry packet whose CID carries a backend's `server_id` goes to that backend while it is up or draining, whatever the client's address and port now are; Initial and 0-RTT packets (CIDs the client chose) and unknown ids go by the hash. The CID layout is the plaintext algorithm of the IETF QUIC-LB draft: one octet whose top 3 bits are the config rotation (`111`: not routable), then the server id in this many octets, big-endian."),
    key("vip.subset", "name", "name", "Source routing (Katran's): names a subset of the VIP's backends. Each subset takes a VIP slot of `tables.max_vips` and its backends backend slots; its traffic counts in the VIP's."),
    key("vip.subset", "backends", "list of the VIP's backend addresses", "The backends that serve the subset's clients, in the VIP's ring order and weights; they leave it as they leave the VIP (health, drain). A subset without a usable backend drops its clients (it does not spill onto the rest of the VIP)."),
    key("vip.subset", "sources", "list of prefixes of the VIP's family", "Client prefixes routed to the subset, e.g. `198.18.100.0/24`; the longest prefix over all the VIP's subsets wins; a prefix belongs to one subset. Reordering subsets renumbers them, placing their flows again."),
    key("vip.backend", "address", "IPv4 or IPv6 address", "The tunnel endpoint, and what health checks connect to."),
    key("vip.backend", "weight", "0..=65535", "Share of the VIP's flows; 0 keeps it out of the ring."),
    key("vip.backend", "mac", "MAC address", "The backend's MAC (required for `l2dsr`)."),
    key("vip.backend", "state", "`up`, `down`, `drain`", "`up`: its checks decide. `down`: held out whatever its checks say (its flows are placed again; checks still run). `drain`: keeps its flows, gets no new ones. `xdplb backend drain` sets `drain`, `undrain` sets `up`."),
    key("vip.backend", "server_id", "0..2^(8 x `server_id_bytes`)", "QUIC VIPs: the server id this backend writes into the connection IDs it issues; unique in the VIP."),
];

/// The defaults the parser fills in, by table and key, as TOML values.
pub fn defaults() -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    let mut add = |table: &str, value: Option<toml::Value>| {
        if let Some(toml::Value::Table(t)) = value {
            for (k, v) in t {
                if !matches!(v, toml::Value::Table(_)) {
                    out.insert((table.to_owned(), k), v.to_string());
                }
            }
        }
    };
    // The smallest file, VIP, backend and fleet the parser takes: what
    // comes back beyond them is its defaults.
    let minimal: Option<Config> = toml::from_str(
        "interface = \"eth0\"\n\
         [[vip]]\nname = \"v\"\naddress = \"198.18.0.1\"\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n\
         [[vip.backend]]\naddress = \"198.18.0.2\"\n",
    )
    .ok();
    if let Some(c) = &minimal {
        add("", value(&TopLevel(c)));
        if let Some(v) = c.vips.first() {
            let mut vip = value(v);
            if let Some(toml::Value::Table(t)) = vip.as_mut() {
                for required in ["name", "address", "protocol", "forwarding"] {
                    t.remove(required);
                }
            }
            add("vip", vip);
            if let Some(b) = v.backends.first() {
                let mut backend = value(b);
                if let Some(toml::Value::Table(t)) = backend.as_mut() {
                    t.remove("address");
                }
                add("vip.backend", backend);
            }
        }
    }
    add("tables", value(&Tables::default()));
    add("forwarding", value(&Forwarding::default()));
    add("api", value(&Api::default()));
    add("daemon", value(&Daemon::default()));
    add("announce", value(&Announce::default()));
    add("vip.health", value(&HealthCheck::default()));
    add("vip.quic", value(&super::Quic::default()));
    let fleet: Option<super::Fleet> =
        toml::from_str("endpoints = [\"http://198.18.0.1:2379\"]\nprefix = \"/p\"\n").ok();
    if let Some(f) = fleet {
        let mut v = value(&f);
        if let Some(toml::Value::Table(t)) = v.as_mut() {
            t.remove("endpoints");
            t.remove("prefix");
        }
        add("fleet", v);
    }
    out
}

/// The top level's own keys (no tables, no VIPs).
struct TopLevel<'a>(&'a Config);

/// A section as a TOML value.
fn value<T: serde::Serialize>(section: &T) -> Option<toml::Value> {
    toml::Value::try_from(section).ok()
}

impl serde::Serialize for TopLevel<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("xdp_mode", &self.0.xdp_mode)?;
        m.end()
    }
}

fn table_heading(table: &str) -> String {
    match table {
        "" => "Top level".into(),
        "vip" | "vip.backend" | "vip.subset" | "uplink" => format!("`[[{table}]]`"),
        t => format!("`[{t}]`"),
    }
}

/// The README's configuration reference: a table of keys per section.
pub fn markdown() -> String {
    let defaults = defaults();
    let mut out = String::new();
    let mut current = None;
    for k in KEYS {
        if current != Some(k.table) {
            current = Some(k.table);
            out += &format!(
                "\n### {}\n\n| key | values | default | meaning |\n|---|---|---|---|\n",
                table_heading(k.table)
            );
        }
        let default = defaults
            .get(&(k.table.to_owned(), k.name.to_owned()))
            .map(|d| format!("`{d}`"))
            .unwrap_or_else(|| "-".into());
        out += &format!(
            "| `{}` | {} | {} | {} |\n",
            k.name, k.values, default, k.doc
        );
    }
    out
}

/// Escape text for roff: backslashes, and a line's leading `.` or `'`.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('`', "");
    match text.chars().next() {
        Some('.') | Some('\'') => format!("\\&{text}"),
        _ => text,
    }
}

/// `xdplb.toml(5)`.
pub fn man_page() -> String {
    let defaults = defaults();
    let mut out = String::from(
        ".TH XDPLB.TOML 5 \"\" \"xdplb\" \"File Formats\"\n\
         .SH NAME\n\
         xdplb.toml \\- configuration file of the xdplb load balancer\n\
         .SH SYNOPSIS\n\
         /etc/xdplb/xdplb.toml\n\
         .SH DESCRIPTION\n\
         A TOML file read by \\fBxdplb run\\fR at start and on reload (\\fBsystemctl reload xdplb\\fR, \
         \\fBxdplb reload\\fR or SIGHUP). \\fBxdplb check-config\\fR lists every problem in a file; \
         a reload with any problem is refused whole and the running state stays. \
         Runtime changes made with the CLI are written back to the file.\n",
    );
    let mut current = None;
    for k in KEYS {
        if current != Some(k.table) {
            current = Some(k.table);
            out += &format!(".SH \"{}\"\n", roff(&table_heading(k.table)).to_uppercase());
        }
        out += &format!(".TP\n.B {}\n{}", k.name, roff(k.values));
        if let Some(d) = defaults.get(&(k.table.to_owned(), k.name.to_owned())) {
            out += &format!(" (default: {})", roff(d));
        }
        out += &format!("\n.br\n{}\n", roff(k.doc));
    }
    out += ".SH FILES\n/etc/xdplb/xdplb.toml\n.br\n/usr/share/doc/xdplb/examples/\n\
            .SH SEE ALSO\n\\fBxdplb\\fR(8), \\fBxdplb-check-config\\fR(8)\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys an example file sets or shows commented out.
    fn example_keys(text: &str) -> Vec<(String, String)> {
        let mut table = String::new();
        let mut keys = Vec::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(t) = line.strip_prefix('[') {
                let t = t.trim_start_matches('[');
                if let Some(end) = t.find(']') {
                    table = t[..end].to_owned();
                }
                continue;
            }
            let Some((k, rest)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !rest.trim().is_empty()
            {
                if k == "health" && rest.trim().starts_with('{') {
                    continue;
                }
                keys.push((table.clone(), k.to_owned()));
            }
        }
        keys
    }

    #[test]
    fn every_key_the_examples_use_is_in_the_reference_and_back() {
        let mut used: Vec<(String, String)> = [
            include_str!("../../../examples/xdplb.toml"),
            include_str!("../../../examples/fleet/xdplb.toml"),
            include_str!("../../../examples/uplinks/xdplb.toml"),
            include_str!("../../../examples/libxdp/xdplb.toml"),
        ]
        .iter()
        .flat_map(|t| example_keys(t))
        .collect();
        used.sort();
        used.dedup();
        let known: Vec<(String, String)> = KEYS
            .iter()
            .map(|k| (k.table.to_owned(), k.name.to_owned()))
            .collect();
        for u in &used {
            assert!(
                known.contains(u),
                "{u:?} is in an example but not in the reference"
            );
        }
        for k in &known {
            assert!(
                used.contains(k),
                "{k:?} is in the reference but in no example"
            );
        }
    }

    #[test]
    fn defaults_come_from_the_parser() {
        let d = defaults();
        let get = |t: &str, k: &str| d.get(&(t.to_owned(), k.to_owned())).cloned();
        assert_eq!(get("tables", "ring_size").as_deref(), Some("65537"));
        assert_eq!(get("", "xdp_mode").as_deref(), Some("\"native\""));
        assert_eq!(get("vip.backend", "weight").as_deref(), Some("100"));
        assert_eq!(get("fleet", "lease_ttl_s").as_deref(), Some("3"));
        assert_eq!(get("vip.health", "rise").as_deref(), Some("2"));
        assert_eq!(get("vip", "name"), None);
        assert_eq!(get("", "interface"), None);
    }

    #[test]
    fn the_readme_shows_this_reference() {
        let readme = include_str!("../../../README.md");
        let begin = "<!-- config-reference: generated from xdp-user/src/config/reference.rs -->\n";
        let end = "<!-- config-reference end -->";
        let shown = readme
            .split_once(begin)
            .and_then(|(_, rest)| rest.split_once(end))
            .map(|(block, _)| block)
            .expect("the README's configuration reference markers");
        assert!(
            shown == markdown(),
            "README.md's configuration reference differs from KEYS; replace the block between \
             its markers with DIR/config-reference.md of `xdplb __generate DIR`:\n{}",
            markdown()
        );
    }

    #[test]
    fn the_man_page_names_every_key() {
        let page = man_page();
        for k in KEYS {
            assert!(page.contains(&format!(".B {}\n", k.name)), "{}", k.name);
        }
        assert!(page.contains("xdplb.toml \\- configuration file"));
    }
}
