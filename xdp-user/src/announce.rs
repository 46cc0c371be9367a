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
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
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

/// A host route in a table: its address, protocol and type.
struct HostRoute {
    addr: IpAddr,
    protocol: RouteProtocol,
    kind: RouteType,
}

/// Every host route (/32, /128) in `target.table`, whoever added it.
fn host_routes(target: Target) -> Result<Vec<HostRoute>> {
    let mut out = Vec::new();
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
            if !matches!(m.header.destination_prefix_length, 32 | 128) {
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
                let addr = match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v)) => IpAddr::V4(*v),
                    RouteAttribute::Destination(RouteAddress::Inet6(v)) => IpAddr::V6(*v),
                    _ => continue,
                };
                out.push(HostRoute {
                    addr,
                    protocol: m.header.protocol,
                    kind: m.header.kind,
                });
            }
        }
    }
    Ok(out)
}

impl HostRoute {
    /// Shaped as this daemon adds routes: a blackhole of its protocol.
    fn shaped_as_ours(&self, target: Target) -> bool {
        self.protocol == RouteProtocol::from(target.protocol) && self.kind == RouteType::BlackHole
    }

    fn describe(&self) -> String {
        format!("{:?} route proto {:?}", self.kind, self.protocol).to_lowercase()
    }
}

/// The addresses whose routes this instance added. Routes are kernel state
/// and outlive the daemon, so the record is too: a state file beside the
/// other per-instance state (gone at reboot with the routes). Only these
/// routes are ever replaced or removed; anything else in the table, even
/// a route carrying xdplb's protocol number, is someone else's.
#[derive(Debug, Default)]
pub struct Owned {
    path: Option<PathBuf>,
    addrs: BTreeSet<IpAddr>,
}

impl Owned {
    /// The record of `config`'s instance. Without one, an instance that
    /// already ran (`earlier`: an upgrade from a build that kept no
    /// record) owns the routes shaped as its own for its configured VIP
    /// addresses; a fresh one owns nothing.
    pub fn load(config: &crate::config::Config, earlier: bool) -> Result<Self> {
        let target = Target::from(&config.announce);
        let path = crate::lock::state_file("announced", &config.daemon.pin_dir);
        let addrs = match std::fs::read_to_string(&path) {
            Ok(text) => text.lines().filter_map(|l| l.trim().parse().ok()).collect(),
            // (A reader without access to the runtime directory, such as
            // a track script run as another user, sees the routes too.)
            Err(e)
                if earlier
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                    ) =>
            {
                let configured: BTreeSet<IpAddr> = config.vips.iter().map(|v| v.address).collect();
                host_routes(target)?
                    .into_iter()
                    .filter(|r| r.shaped_as_ours(target) && configured.contains(&r.addr))
                    .map(|r| r.addr)
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self {
            path: Some(path),
            addrs,
        })
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text: String = self.addrs.iter().map(|a| format!("{a}\n")).collect();
        crate::lock::write_state(path, text.as_bytes())
    }

    /// The addresses of `routes` that are this instance's: recorded, and
    /// still shaped as it adds them.
    fn present(&self, routes: &[HostRoute], target: Target) -> BTreeSet<IpAddr> {
        routes
            .iter()
            .filter(|r| r.shaped_as_ours(target) && self.addrs.contains(&r.addr))
            .map(|r| r.addr)
            .collect()
    }
}

/// What a [`sync`] did, and what it could not take.
#[derive(Debug, Default)]
pub struct Synced {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Wanted addresses whose route in the table is not ours, with what
    /// is there: never replaced, not announced.
    pub conflicts: std::collections::BTreeMap<IpAddr, String>,
}

/// The addresses announced now by routes this instance owns.
pub fn announced(target: Target, owned: &Owned) -> Result<BTreeSet<IpAddr>> {
    Ok(owned.present(&host_routes(target)?, target))
}

/// Add our route for `addr`; an existing route for it is left alone
/// (`Ok(false)`).
fn add(target: Target, addr: IpAddr) -> Result<bool> {
    match crate::iface::transact(
        RouteNetlinkMessage::NewRoute(route(target, addr)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        other => other
            .map(|_| true)
            .with_context(|| format!("adding the route {addr} to {target}")),
    }
}

/// Remove our route for `addr` (the kernel matches its type and protocol,
/// so no other route for the address goes); gone already is not an error.
fn remove(target: Target, addr: IpAddr) -> Result<()> {
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

/// Make the announced set `want`, touching only routes `owned` records:
/// add what is missing where the table has no route for the address
/// (conflicts are reported, not replaced), remove our routes for the rest.
/// Every address is tried; the first failure is returned after the others
/// were attempted, with the record kept up to date either way.
pub fn sync(target: Target, want: &BTreeSet<IpAddr>, owned: &mut Owned) -> Result<Synced> {
    let routes = host_routes(target)?;
    let have = owned.present(&routes, target);
    // A recorded route someone removed is no longer ours.
    let before = owned.addrs.len();
    owned.addrs.retain(|a| have.contains(a));
    let mut changed = before != owned.addrs.len();
    let mut first_error = None;
    let mut done = Synced::default();
    for addr in want.difference(&have) {
        if let Some(r) = routes.iter().find(|r| r.addr == *addr) {
            done.conflicts.insert(*addr, r.describe());
            continue;
        }
        match add(target, *addr) {
            Ok(true) => {
                owned.addrs.insert(*addr);
                changed = true;
                done.added.push(*addr);
            }
            Ok(false) => {
                done.conflicts
                    .insert(*addr, "a route added meanwhile".into());
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for addr in have.difference(want) {
        match remove(target, *addr) {
            Ok(()) => {
                owned.addrs.remove(addr);
                changed = true;
                done.removed.push(*addr);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if changed {
        if let Err(e) = owned.save() {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Withdraw every route this instance owns in `target`.
pub fn withdraw_all(target: Target, owned: &mut Owned) -> Result<Vec<IpAddr>> {
    sync(target, &BTreeSet::new(), owned).map(|s| s.removed)
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
        crate::lock::write_state(&path, b"withdrawn by `xdplb announce withdraw`\n")
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}
