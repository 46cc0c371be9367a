//! VIP announcements as the kernel holds them: one blackhole route per
//! announced VIP address in a routing table of the daemon's own, tagged with
//! its own route protocol. A routing daemon learns them from that table
//! (BIRD: `protocol kernel { kernel table 100; learn; }`; FRR: `ip
//! import-table 100`) and announces them; keepalived tests them with
//! `xdplb announce check`. The routes are kernel state, so they outlive a
//! daemon restart exactly as the pinned dataplane does: nothing is withdrawn
//! while a new daemon takes over.
//!
//! The operator's withdrawal (maintenance) is kept in a file under the
//! runtime directory, so it also survives restarts (until reboot, like the
//! pins).

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::{
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};

use crate::config::Announce;

/// Where announcements go: a routing table and a route protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub table: u32,
    pub protocol: u8,
}

impl From<&Announce> for Target {
    fn from(a: &Announce) -> Self {
        Self {
            table: a.table,
            protocol: a.protocol,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "table {} proto {}", self.table, self.protocol)
    }
}

fn message(target: Target, family: AddressFamily) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    // Tables above 255 only fit the attribute; the header says "see it".
    m.header.table = u8::try_from(target.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.header.protocol = RouteProtocol::from(target.protocol);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::BlackHole;
    m.attributes.push(RouteAttribute::Table(target.table));
    m
}

fn route(target: Target, addr: IpAddr) -> RouteMessage {
    let (family, dest, len) = match addr {
        IpAddr::V4(a) => (AddressFamily::Inet, RouteAddress::Inet(a), 32),
        IpAddr::V6(a) => (AddressFamily::Inet6, RouteAddress::Inet6(a), 128),
    };
    let mut m = message(target, family);
    m.header.destination_prefix_length = len;
    m.attributes.push(RouteAttribute::Destination(dest));
    m
}

/// The host routes of protocol `target.protocol` in `target.table`: the
/// addresses announced now.
pub fn announced(target: Target) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let replies = crate::iface::transact(
            RouteNetlinkMessage::GetRoute(message(target, family)),
            NLM_F_DUMP,
        )
        .with_context(|| format!("listing routes in {target}"))?;
        for reply in replies {
            let RouteNetlinkMessage::NewRoute(m) = reply else {
                continue;
            };
            if m.header.protocol != RouteProtocol::from(target.protocol)
                || !matches!(m.header.destination_prefix_length, 32 | 128)
            {
                continue;
            }
            let table = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(m.header.table));
            if table != target.table {
                continue;
            }
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v)) => {
                        out.insert(IpAddr::V4(*v));
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(v)) => {
                        out.insert(IpAddr::V6(*v));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

/// Announce `addr` (idempotent).
pub fn add(target: Target, addr: IpAddr) -> Result<()> {
    crate::iface::transact(
        RouteNetlinkMessage::NewRoute(route(target, addr)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .with_context(|| format!("adding the route {addr} to {target}"))?;
    Ok(())
}

/// Withdraw `addr`; withdrawing what is not announced is not an error.
pub fn remove(target: Target, addr: IpAddr) -> Result<()> {
    match crate::iface::transact(
        RouteNetlinkMessage::DelRoute(route(target, addr)),
        NLM_F_ACK,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other
            .map(drop)
            .with_context(|| format!("removing the route {addr} from {target}")),
    }
}

/// Make the announced set `want`: add what is missing, remove the rest.
/// Returns what was added and what was removed. Every address is tried;
/// the first failure is returned after the others were attempted.
pub fn sync(target: Target, want: &BTreeSet<IpAddr>) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let have = announced(target)?;
    let mut first_error = None;
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for addr in want.difference(&have) {
        match add(target, *addr) {
            Ok(()) => added.push(*addr),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for addr in have.difference(want) {
        match remove(target, *addr) {
            Ok(()) => removed.push(*addr),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((added, removed)),
    }
}

/// Withdraw everything announced in `target`.
pub fn withdraw_all(target: Target) -> Result<Vec<IpAddr>> {
    sync(target, &BTreeSet::new()).map(|(_, removed)| removed)
}

/// The file that marks an operator's withdrawal for the instance pinned at
/// `pin_dir`.
pub fn withdrawn_marker(pin_dir: &Path) -> PathBuf {
    crate::lock::state_file("announce-withdrawn", pin_dir)
}

/// Whether the operator withdrew the announcements of `pin_dir`'s instance.
pub fn is_withdrawn(pin_dir: &Path) -> bool {
    withdrawn_marker(pin_dir).exists()
}

/// Record (or clear) the operator's withdrawal.
pub fn set_withdrawn(pin_dir: &Path, withdrawn: bool) -> Result<()> {
    let path = withdrawn_marker(pin_dir);
    if withdrawn {
        if let Some(dir) = path.parent() {
            crate::lock::create_private_dir(dir)?;
        }
        std::fs::write(&path, b"withdrawn by `xdplb announce withdraw`\n")
            .with_context(|| format!("writing {}", path.display()))
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}
