//! The network bed: guests on a bridge of multiqueue taps in a namespace
//! of its own (the segment's router), and the run of the LB, backends,
//! generator and client guests.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Result;

use super::*;

/// The guests' network: a bridge and multiqueue taps in a namespace of
/// its own, removed on drop (nothing reaches the host's network).
pub(super) struct Bed {
    pub(super) netns: String,
}

impl Bed {
    pub(super) fn create(taps: &[&str]) -> Result<Self> {
        let netns = format!("xdplb-vm-{}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &netns]))?;
        let bed = Self { netns };
        let ip = |args: &[&str]| sh(Command::new("ip").args(["-n", &bed.netns]).args(args));
        ip(&["link", "set", "lo", "up"])?;
        // A router port: a bridge with a fixed MAC (the LB's config names
        // it) and MTU 1600 (tunnels of full-size packets fit), its address
        // the segment's router: tunnel packets to each backend go through
        // it, as through a real router.
        let router_port = |name: &str, mac: &str, v4: &str| -> Result<()> {
            ip(&[
                "link", "add", name, "address", mac, "mtu", "1600", "type", "bridge",
            ])?;
            ip(&["addr", "add", v4, "dev", name])?;
            ip(&["link", "set", name, "up"]).map(drop)
        };
        router_port("br0", "52:54:00:00:01:fe", "198.18.210.254/24")?;
        ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:d2::fe/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        // A second segment for the LB's second uplink, behind a router
        // port of its own.
        router_port("br2", "52:54:00:00:02:fe", "198.18.212.254/24")?;
        // The IPv4 VIP lives behind both of the LB's uplinks where the bed
        // has the second (the 5-tuple picks one, so each carries flows;
        // its route is added below); the IPv6 one behind the bond.
        sh(Command::new("ip")
            .args(["netns", "exec", &bed.netns, "sysctl", "-q", "-w"])
            .args([
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.fib_multipath_hash_policy=1",
            ])
            .args(["br0", "br2"].iter().flat_map(|b| {
                [
                    format!("net.ipv4.conf.{b}.send_redirects=0"),
                    format!("net.ipv4.conf.{b}.rp_filter=0"),
                ]
            })))?;
        // The clients' segment, behind the router, with a narrower link
        // (MTU 1400) than the client's own (1500): a backend's full-size
        // replies get "fragmentation needed" from the router, sent to the
        // VIP, which only the LB can hand to the right backend.
        ip(&["link", "add", "br1", "type", "bridge"])?;
        ip(&["addr", "add", "198.18.211.254/24", "dev", "br1"])?;
        ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:d3::fe/64",
            "dev",
            "br1",
            "nodad",
        ])?;
        ip(&[
            "-6",
            "route",
            "add",
            "2001:db8::53/128",
            "via",
            "2001:db8:d2::2",
        ])?;
        for tap in taps {
            let (bridge, mtu) = if tap.contains("client") {
                ("br1", "1500")
            } else if tap.contains("uplink") {
                ("br2", "1600")
            } else {
                ("br0", "1600")
            };
            ip(&["tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"])?;
            ip(&["link", "set", tap, "mtu", mtu, "master", bridge, "up"])?;
        }
        ip(&["link", "set", "br1", "mtu", "1400", "up"])?;
        // With the LB's second uplink in the bed, the IPv4 VIP goes through
        // both; otherwise (the operator's host) through the segment only.
        if taps.iter().any(|t| t.contains("uplink")) {
            ip(&[
                "route",
                "add",
                "198.18.0.10/32",
                "nexthop",
                "via",
                "198.18.210.2",
                "nexthop",
                "via",
                "198.18.212.2",
            ])?;
        } else {
            ip(&["route", "add", "198.18.0.10/32", "via", "198.18.210.2"])?;
        }
        Ok(bed)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Boot the network bed's guests (LB, two backends, generator, client) on
/// a bridge of taps; their consoles, once the client and the generator are
/// done.
pub(super) fn run_bed(vmlinuz: &Path, initrd: &Path) -> Result<Vec<(&'static str, String)>> {
    let bed = Bed::create(&[
        "tap-client",
        "tap-lb",
        "tap-lb2",
        "tap-uplink",
        "tap-b1",
        "tap-b2",
        "tap-gen",
    ])?;
    // The LB has two NICs on the segment, bonded, and a third on a
    // segment of its own: two uplinks.
    let guests: [(&str, &[(&str, &str)]); 5] = [
        (
            "lb",
            &[
                ("52:54:00:00:01:02", "tap-lb"),
                ("52:54:00:00:01:12", "tap-lb2"),
                ("52:54:00:00:01:22", "tap-uplink"),
            ],
        ),
        ("backend", &[("52:54:00:00:01:03", "tap-b1")]),
        ("backend", &[("52:54:00:00:01:04", "tap-b2")]),
        ("gen", &[("52:54:00:00:01:05", "tap-gen")]),
        ("client", &[("52:54:00:00:01:01", "tap-client")]),
    ];
    let guests = guests
        .into_iter()
        .map(|(role, nics)| {
            let nics: Vec<(&str, Nic)> = nics
                .iter()
                .map(|(mac, tap)| (*mac, Nic::Tap((*tap).into())))
                .collect();
            Guest::boot(vmlinuz, initrd, role, &nics, Some(&bed.netns)).map(|g| (role, g))
        })
        .collect::<Result<Vec<_>>>()?;
    // The client and the generator decide: each powers off when done.
    let mut consoles = Vec::new();
    let mut rest = Vec::new();
    for (role, guest) in guests {
        if role == "client" || role == "gen" {
            consoles.push((role, guest.finish(GUEST_LIMIT).0));
        } else {
            rest.push((role, guest));
        }
    }
    for (role, guest) in rest {
        consoles.push((role, guest.finish(Duration::ZERO).0));
    }
    drop(bed);
    Ok(consoles)
}

/// A guest whose kernel panicked for QEMU TCG's sake, not the project's:
/// before /init started its role, or at any time on an `int3` oops outside
/// any BPF program (TCG racing the kernel's live text patching: seen with
/// Debian's 6.12 in `sched_clock_cpu` while booting and in
/// `secure_tcpv6_seq_and_ts_off` on a backend guest that runs no XDP).
pub(super) fn panicked_for_tcg(consoles: &[(&'static str, String)]) -> Option<&'static str> {
    consoles
        .iter()
        .find(|(_, c)| {
            c.contains("Kernel panic")
                && (!c.contains("XDPLB-VM: kernel ")
                    || (c.contains("Oops: int3") && !c.contains("bpf_prog_")))
        })
        .map(|(role, _)| *role)
}
