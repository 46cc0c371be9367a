//! A test network built only of namespaces: one router, LB hosts, backends
//! and clients, each host on its own link to the router.
//!
//! ```text
//!   client i  198.18.(10+i).2 ─┐
//!   LB j      198.18.(40+j).2 ─┼─ router (forwards; VIP routes -> an LB)
//!   backend i 198.18.(64+i).2 ─┘
//! ```
//!
//! With `lb_segment` the LB hosts share one switched segment instead,
//! 198.18.40.0/24 on a bridge in the router's namespace (the HA tests).
//!
//! IPv6 mirrors it in 2001:db8:<third octet in hex>::/64. VIPs (198.18.0.0/24,
//! 2001:db8::/64) live on the backends' loopback; the backends run the
//! `decap` program on their link, so the LB's tunnels end there, and they
//! answer clients directly through the router (DSR). The router side of each
//! LB link runs `xdp_pass`, which veth needs for the LB's XDP_TX frames to
//! arrive. Links between router, LBs and backends have MTU 1600 so a full
//! 1500-byte client packet still fits once encapsulated.
//!
//! Every namespace is uniquely named and deleted on drop, also on panic.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
};

use anyhow::{Context as _, Result};
use xdp_user::dataplane::{AttachMode, AuxProgram, Decap, PASS_PROGRAM};

use crate::netns::Netns;

/// MTU of the links that carry tunnels.
pub const TUNNEL_MTU: u32 = 1600;

#[derive(Clone, Debug)]
pub struct Spec {
    pub tag: String,
    pub lbs: usize,
    pub backends: usize,
    pub clients: usize,
    pub vips: Vec<IpAddr>,
    /// LB hosts share one segment (a bridge in the router's namespace,
    /// 198.18.40.0/24 with the router at .1 and LB j at .(2+j)) instead of
    /// a link each: cutting an LB's port leaves the router's interface up,
    /// as a switch between them would.
    pub lb_segment: bool,
}

/// The router's MAC on the LB segment (fixed, so configs can name it).
pub const SEGMENT_ROUTER_MAC: &str = "02:00:00:00:28:01";
/// The router's bridge on the LB segment.
pub const SEGMENT_BRIDGE: &str = "br0";

/// One host: its namespace and its link to the router.
pub struct Host {
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: [u8; 6],
    /// The router's interface on this host's link.
    pub router_if: String,
    pub router_v4: Ipv4Addr,
    pub router_v6: Ipv6Addr,
    pub router_mac: [u8; 6],
}

pub struct Topology {
    // Programs go first: fields drop in order, and they must detach while
    // their namespaces still exist.
    decaps: Vec<Decap>,
    _passes: Vec<AuxProgram>,
    pub lbs: Vec<Host>,
    pub backends: Vec<Host>,
    pub clients: Vec<Host>,
    pub vips: Vec<IpAddr>,
    pub router: Netns,
}

/// The MAC of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().context("no MAC in ip -j output")?;
    xdp_user::config::parse_mac(text).with_context(|| format!("bad MAC {text}"))
}

fn sysctls(ns: &Netns, pairs: &[&str]) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(pairs);
    ns.exec(&argv).map(drop)
}

/// Two namespaces joined by one veth pair (`a_if` in the first, `b_if` in
/// the second), both ends up, IPv6 off so that nothing but the test's own
/// frames cross the link (for counting sinks).
pub fn veth_pair(a_tag: &str, a_if: &str, b_tag: &str, b_if: &str) -> Result<(Netns, Netns)> {
    let a = Netns::new(a_tag)?;
    let b = Netns::new(b_tag)?;
    for ns in [&a, &b] {
        sysctls(
            ns,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
    }
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok((a, b))
}

/// Run `f` on a thread inside `ns` (setns affects only the calling thread).
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let _inside = ns.enter()?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", ns.name))?
    })
}

impl Topology {
    pub fn build(spec: &Spec) -> Result<Self> {
        let router = Netns::new(&format!("{}-r", spec.tag))?;
        sysctls(
            &router,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        if spec.lb_segment {
            router.ip(&[
                "link",
                "add",
                SEGMENT_BRIDGE,
                "address",
                SEGMENT_ROUTER_MAC,
                "mtu",
                &TUNNEL_MTU.to_string(),
                "type",
                "bridge",
            ])?;
            router.ip(&["addr", "add", "198.18.40.1/24", "dev", SEGMENT_BRIDGE])?;
            router.ip(&[
                "-6",
                "addr",
                "add",
                "2001:db8:28::1/64",
                "dev",
                SEGMENT_BRIDGE,
                "nodad",
            ])?;
            router.ip(&["link", "set", SEGMENT_BRIDGE, "up"])?;
        }
        // Host `index` of kind `kind` at 198.18.<third>.<host>, on a link
        // of its own to the router or, with `bridge`, on that segment.
        let link = |kind: &str,
                    index: usize,
                    (third, host): (u8, u8),
                    mtu: u32,
                    bridge: Option<&str>|
         -> Result<Host> {
            let ns = Netns::new(&format!("{}-{kind}{index}", spec.tag))?;
            sysctls(
                &ns,
                &[
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            let rif = format!("r{kind}{index}");
            let mtu = mtu.to_string();
            router.ip(&[
                "link", "add", &rif, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.name, "mtu", &mtu,
            ])?;
            let (rv4, hv4) = (
                Ipv4Addr::new(198, 18, third, 1),
                Ipv4Addr::new(198, 18, third, host),
            );
            let (rv6, hv6) = (
                Ipv6Addr::new(0x2001, 0xdb8, u16::from(third), 0, 0, 0, 0, 1),
                Ipv6Addr::new(0x2001, 0xdb8, u16::from(third), 0, 0, 0, 0, host.into()),
            );
            let router_mac = match bridge {
                Some(br) => {
                    router.ip(&["link", "set", &rif, "master", br])?;
                    // A switch floods unknown unicast, but a real NIC drops
                    // frames for other MACs before XDP sees them; a veth
                    // does not. Keep frames for one LB host away from the
                    // others, as on real hardware.
                    router.exec(&["bridge", "link", "set", "dev", &rif, "flood", "off"])?;
                    mac_of(&router, br)?
                }
                None => {
                    router.ip(&["addr", "add", &format!("{rv4}/24"), "dev", &rif])?;
                    router.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{rv6}/64"),
                        "dev",
                        &rif,
                        "nodad",
                    ])?;
                    mac_of(&router, &rif)?
                }
            };
            router.ip(&["link", "set", &rif, "up"])?;
            ns.ip(&["addr", "add", &format!("{hv4}/24"), "dev", "eth0"])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{hv6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &rv4.to_string()])?;
            ns.ip(&["-6", "route", "add", "default", "via", &rv6.to_string()])?;
            Ok(Host {
                mac: mac_of(&ns, "eth0")?,
                router_mac,
                ns,
                v4: hv4,
                v6: hv6,
                router_if: rif,
                router_v4: rv4,
                router_v6: rv6,
            })
        };
        let clients = (0..spec.clients)
            .map(|i| link("c", i, (10 + i as u8, 2), 1500, None))
            .collect::<Result<Vec<_>>>()?;
        // veth leaves TX checksums to "hardware", which here is nobody:
        // packets reach the LB with only the pseudo-header sum, and XDP
        // forwards bytes as they are. A real client's NIC fills the checksum
        // in on the wire; make the clients' veths do the same.
        for c in &clients {
            c.ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        let lbs = (0..spec.lbs)
            .map(|j| {
                if spec.lb_segment {
                    link("l", j, (40, 2 + j as u8), TUNNEL_MTU, Some(SEGMENT_BRIDGE))
                } else {
                    link("l", j, (40 + j as u8, 2), TUNNEL_MTU, None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let backends = (0..spec.backends)
            .map(|i| link("b", i, (64 + i as u8, 2), TUNNEL_MTU, None))
            .collect::<Result<Vec<_>>>()?;

        // Backends: VIPs on loopback, tunnels ended by `decap`.
        let mut decaps = Vec::new();
        for b in &backends {
            for vip in &spec.vips {
                match vip {
                    IpAddr::V4(v) => b.ns.ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"])?,
                    IpAddr::V6(v) => b.ns.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{v}/128"),
                        "dev",
                        "lo",
                        "nodad",
                    ])?,
                };
            }
            let decap = in_ns(&b.ns, || -> Result<Decap> {
                let mut d = Decap::load(spec.vips.len().max(1) as u32)?;
                d.set_vips(&spec.vips)?;
                d.attach("eth0", AttachMode::Native)?;
                Ok(d)
            })??;
            decaps.push(decap);
        }
        // Router side of the LB links: XDP_TX from the LB must arrive.
        let passes = in_ns(&router, || -> Result<Vec<AuxProgram>> {
            lbs.iter()
                .map(|lb| {
                    let mut p = AuxProgram::load(PASS_PROGRAM)?;
                    p.attach(&lb.router_if, AttachMode::Native)?;
                    Ok(p)
                })
                .collect()
        })??;
        let topo = Self {
            decaps,
            _passes: passes,
            lbs,
            backends,
            clients,
            vips: spec.vips.clone(),
            router,
        };
        // On a shared segment the VIPs' routes come from BGP or VRRP.
        if !spec.lb_segment {
            topo.route_vips_via(0)?;
        }
        Ok(topo)
    }

    /// The VIPs backend `i`'s `decap` ends tunnels for (none: it strips
    /// no tunnel, and this kernel, without ipip, drops them).
    pub fn set_decap_vips(&mut self, i: usize, vips: &[IpAddr]) -> Result<()> {
        self.decaps[i].set_vips(vips)
    }

    /// Send all VIP traffic to LB `j`.
    pub fn route_vips_via(&self, j: usize) -> Result<()> {
        let lb = &self.lbs[j];
        for vip in &self.vips {
            match vip {
                IpAddr::V4(v) => self.router.ip(&[
                    "route",
                    "replace",
                    &format!("{v}/32"),
                    "via",
                    &lb.v4.to_string(),
                ])?,
                IpAddr::V6(v) => self.router.ip(&[
                    "-6",
                    "route",
                    "replace",
                    &format!("{v}/128"),
                    "via",
                    &lb.v6.to_string(),
                ])?,
            };
        }
        Ok(())
    }

    /// A config for LB `j`: per VIP address a port-less TCP VIP and, with
    /// `udp`, a UDP VIP on port 53 (`<name>-dns`), each served by the backends that
    /// `weights` lists (all of them, weight 100, when it is empty), checked
    /// with `health`.
    pub fn lb_config(
        &self,
        j: usize,
        pin_dir: &std::path::Path,
        socket: &std::path::Path,
        health: &str,
        weights: &[u32],
        udp: bool,
    ) -> String {
        let lb = &self.lbs[j];
        let mut out = format!(
            r#"interface = "eth0"
xdp_mode = "native"

[tables]
max_vips = 8
max_backends = 64
ring_size = 4093
max_flows = 65536

[forwarding]
gateway_mac = "{}"

[api]
socket = "{}"
metrics = "127.0.0.1:9477"

[daemon]
pin_dir = "{}"
"#,
            crate::ops::mac_text(lb.router_mac),
            socket.display(),
            pin_dir.display()
        );
        for (k, vip) in self.vips.iter().enumerate() {
            let (forwarding, name) = match vip {
                IpAddr::V4(_) => ("ipip", format!("web{k}")),
                IpAddr::V6(_) => ("ip6ip6", format!("web{k}v6")),
            };
            let serving = if weights.is_empty() {
                self.backends.len()
            } else {
                weights.len()
            };
            let backends: String = self
                .backends
                .iter()
                .enumerate()
                .take(serving)
                .map(|(i, b)| {
                    let addr: IpAddr = if vip.is_ipv4() {
                        b.v4.into()
                    } else {
                        b.v6.into()
                    };
                    let weight = weights.get(i).copied().unwrap_or(100);
                    format!("\n[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n")
                })
                .collect();
            out += &format!(
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\nforwarding = \"{forwarding}\"\nhealth = {health}\n{backends}"
            );
            if !udp {
                continue;
            }
            out += &format!(
                "\n[[vip]]\nname = \"{name}-dns\"\naddress = \"{vip}\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"{forwarding}\"\n\
                 health = {{ kind = \"udp\", send = \"ping\", expect = \"pong\", interval_ms = 200, timeout_ms = 150, jitter_ms = 20 }}\n{backends}"
            );
        }
        out
    }
}
