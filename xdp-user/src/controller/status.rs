//! What the controller reports: per VIP and backend configuration, health,
//! dataplane state and counters, and the daemon's own condition.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;
use xdp_common::{backend_state, reason, Counters};

use super::{vip_key, Controller};
use crate::{
    config::{CheckKind, ForwardingMode, InitialState},
    dataplane::{add_counters, add_drops},
    health::{CheckKey, Health},
};

impl Controller {
    pub fn status(&mut self) -> Status {
        let flows = self.flows_in_use();
        let mut vips = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let vip_id = self.vip_ids.get(&key).copied();
            // The VIP's backend subsets: their traffic is the VIP's.
            let subset_ids: Vec<Option<u32>> = (0..vip.subsets.len())
                .map(|n| self.vip_ids.get(&key.subset(n)).copied())
                .collect();
            let all_ids: Vec<u32> = vip_id
                .iter()
                .chain(subset_ids.iter().flatten())
                .copied()
                .collect();
            let mut backends = Vec::new();
            for b in &vip.backends {
                let id = vip_id.and_then(|v| self.backend_ids.get(&(v, b.address)).copied());
                let entries = all_ids
                    .iter()
                    .filter_map(|v| self.backend_ids.get(&(*v, b.address)).copied());
                let h = self.health.get(&CheckKey {
                    vip: vip.name.clone(),
                    backend: b.address,
                });
                let dataplane_state = id
                    .and_then(|id| self.dp.backend(id).ok())
                    .map_or("absent", |e| state_name(e.state));
                let counters = entries
                    .filter_map(|id| self.dp.backend_stats(id).ok())
                    .fold(Counters::default(), add_counters);
                backends.push(BackendStatus {
                    address: b.address,
                    weight: b.weight,
                    server_id: b.server_id,
                    configured: b.state,
                    health: h.map(|h| h.tracker.state),
                    dataplane_state,
                    id,
                    last_check_ms: h
                        .and_then(|h| h.last_latency)
                        .map(|d| d.as_secs_f64() * 1e3),
                    last_error: h.and_then(|h| h.last_error.clone()),
                    transitions: h.map_or(0, |h| h.transitions),
                    damped: h.is_some_and(|h| h.damped(std::time::Instant::now())),
                    awaiting_first_check: h.is_some_and(|h| h.awaiting_first_check),
                    checks_blocked: h.and_then(|h| h.checks_blocked()).map(str::to_owned),
                    counters: counters.into(),
                });
            }
            let counters = all_ids
                .iter()
                .filter_map(|&id| self.dp.vip_stats(id).ok())
                .fold(Counters::default(), add_counters);
            let drops = all_ids
                .iter()
                .filter_map(|&id| self.dp.vip_drops(id).ok())
                .fold(xdp_common::VipDrops::default(), add_drops);
            let subsets = vip
                .subsets
                .iter()
                .zip(&subset_ids)
                .map(|(s, id)| SubsetStatus {
                    name: s.name.clone(),
                    sources: s.sources.clone(),
                    backends: s.backends.clone(),
                    counters: id
                        .and_then(|id| self.dp.vip_stats(id).ok())
                        .unwrap_or_default()
                        .into(),
                })
                .collect();
            vips.push(VipStatus {
                name: vip.name.clone(),
                endpoint: vip.endpoint(),
                forwarding: vip.forwarding,
                hash: vip.hash(),
                quic: vip.quic,
                check: vip.health.kind,
                id: vip_id,
                counters: counters.into(),
                removed_backends: vip_id.map(|id| self.retired.of(id)).unwrap_or_default(),
                drops: Drops {
                    no_backend: drops.no_backend,
                    encap_failed: drops.encap_failed,
                },
                backends,
                subsets,
            });
        }
        let reasons = self
            .dp
            .stats()
            .map(|s| {
                reason::NAMES
                    .iter()
                    .zip(s)
                    .map(|(n, v)| ((*n).to_owned(), v))
                    .collect()
            })
            .unwrap_or_default();
        let driver_xdp_errors = crate::iface::xdp_errors(&self.config.interface)
            .unwrap_or_default()
            .into_iter()
            .collect();
        Status {
            interface: self.config.interface.clone(),
            uplinks: self.dp.uplinks(),
            libxdp_priority: self.config.libxdp.as_ref().map(|l| l.run_priority),
            adopted: self.dp.adopted(),
            attached: self.self_check.problems.is_empty(),
            dataplane_problems: self.self_check.problems.clone(),
            forwarding: self.forwarding(),
            transmit_problem: self.transmit_problem().map(str::to_owned),
            driver_xdp_errors,
            warnings: self.warnings(),
            in_sync: self.in_sync(),
            last_error: self.last_error.clone(),
            flows,
            max_flows: self.dp.sizes().max_flows,
            changed_slots: self.dp.changed_slots().unwrap_or_default(),
            reasons,
            vips,
            announce: self.announce_status(),
            fleet: self.fleet_status(),
        }
    }
}

/// Packets, bytes and new flows of a VIP or backend (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

pub fn state_name(state: u32) -> &'static str {
    match state {
        backend_state::UP => "up",
        backend_state::DOWN => "down",
        backend_state::DRAINING => "draining",
        _ => "unused",
    }
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub weight: u32,
    /// Its QUIC server id (QUIC VIPs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
    pub configured: InitialState,
    pub health: Option<Health>,
    pub dataplane_state: &'static str,
    pub id: Option<u32>,
    pub last_check_ms: Option<f64>,
    pub last_error: Option<String>,
    pub transitions: u64,
    /// Held down by flap damping.
    pub damped: bool,
    /// Not checked yet; joins the ring at its first passing check.
    pub awaiting_first_check: bool,
    /// Its last checks could not run for a reason of this host's (the
    /// last one): its health is not known.
    pub checks_blocked: Option<String>,
    pub counters: Traffic,
}

/// Packets of a VIP the balancer dropped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Drops {
    pub no_backend: u64,
    pub encap_failed: u64,
}

#[derive(Debug, Serialize)]
pub struct VipStatus {
    pub name: String,
    pub endpoint: String,
    pub forwarding: ForwardingMode,
    pub hash: crate::config::HashFields,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<crate::config::Quic>,
    pub check: CheckKind,
    pub id: Option<u32>,
    pub counters: Traffic,
    /// What backends removed from it had forwarded: with the backends'
    /// own counters, the VIP's.
    pub removed_backends: Traffic,
    pub drops: Drops,
    pub backends: Vec<BackendStatus>,
    /// Its backend subsets (source routes); their traffic is in the
    /// VIP's and its backends' counters too.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<SubsetStatus>,
}

/// A backend subset of a VIP and the traffic its source routes sent it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SubsetStatus {
    pub name: String,
    pub sources: Vec<String>,
    pub backends: Vec<IpAddr>,
    pub counters: Traffic,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub interface: String,
    /// The extra uplinks served with the same maps (`[[uplink]]`).
    pub uplinks: Vec<String>,
    /// A member of libxdp's dispatcher on each, with this run priority
    /// (`[libxdp]`); None: alone, through its own links.
    pub libxdp_priority: Option<u32>,
    pub adopted: bool,
    /// The self-check passes: the program is attached to the interface
    /// through the daemon's pinned link and the pins are its maps.
    pub attached: bool,
    /// What the self-check found wrong, if anything.
    pub dataplane_problems: Vec<String>,
    /// Attached, in sync, and what the program sends gets out.
    pub forwarding: bool,
    /// Why what the program sends is lost on this host, when it can tell.
    pub transmit_problem: Option<String>,
    /// The driver's XDP TX/redirect error counters (ethtool), by name:
    /// frames the balancer sent that the kernel dropped.
    pub driver_xdp_errors: BTreeMap<String, u64>,
    /// Conditions that lose packets without an error elsewhere.
    pub warnings: Vec<String>,
    pub in_sync: bool,
    pub last_error: Option<String>,
    pub flows: usize,
    pub max_flows: u32,
    /// Ring slots marked as changed: (taking over, settled). Packets in
    /// them consult conntrack; elsewhere the ring alone places them.
    pub changed_slots: (usize, usize),
    pub reasons: BTreeMap<String, u64>,
    pub vips: Vec<VipStatus>,
    pub announce: super::AnnounceStatus,
    /// For a fleet member: the store, the revision running, and where this
    /// host's checks disagree with the fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<super::FleetStatus>,
}
