//! The reconcile loop: desired state (config) + health -> rings and backend
//! states -> dataplane. The only holder of state; everything else asks it.
//!
//! Reconcile is idempotent: it compares what it wants with what it last
//! wrote (and, after a restart, with what the pinned maps hold) and writes
//! only the difference, in an order that never lets a packet see a
//! half-applied change:
//! 1. backends that become usable get their entry (state UP) first;
//! 2. rings are rewritten (each flip is atomic);
//! 3. backends that go down or drain change state only once no ring points
//!    at them, and removed ones are cleared last.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;
use tracing::{info, warn};
use xdp_common::{backend_state, fwd, reason, Backend, Counters, VipKey, VIP_F_SOURCE_HASH};

use crate::{
    config::{
        parse_mac, parse_prefix, CheckKind, Config, ForwardingMode, InitialState, PacketAction,
    },
    dataplane::{addr_bytes, Dataplane},
    health::{CheckKey, CheckResult, CheckSpec, Health, Tracker},
    maglev::{self, RingBackend},
};

/// What the controller knows of one backend of one VIP.
#[derive(Debug)]
pub struct BackendHealth {
    pub tracker: Tracker,
    pub last_latency: Option<Duration>,
    pub last_error: Option<String>,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub transitions: u64,
}

impl BackendHealth {
    fn new(state: Health, rise: u32, fall: u32) -> Self {
        Self {
            tracker: Tracker::new(state, rise, fall),
            last_latency: None,
            last_error: None,
            checks_ok: 0,
            checks_failed: 0,
            transitions: 0,
        }
    }
}

pub struct Controller {
    config: Config,
    /// Where API changes are written back; None: not persisted (tests).
    config_path: Option<PathBuf>,
    dp: Dataplane,
    vip_ids: BTreeMap<VipKey, u32>,
    backend_ids: BTreeMap<(u32, IpAddr), u32>,
    health: BTreeMap<CheckKey, BackendHealth>,
    /// Rings as last written, by vip id.
    written_rings: HashMap<u32, Vec<u32>>,
    written_config: Option<xdp_common::Config>,
    /// The last reconcile failed; it is retried.
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub reconcile_failures: u64,
    flows_cache: Option<(Instant, usize)>,
}

/// The dataplane key of a configured VIP.
pub fn vip_key(vip: &crate::config::Vip) -> VipKey {
    let (addr, family) = addr_bytes(vip.address);
    VipKey {
        addr,
        port: vip.port.unwrap_or(0).to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

fn ip_of(addr: [u8; 16], family: u32) -> IpAddr {
    if family == u32::from(xdp_common::FAMILY_V4) {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(addr)
    }
}

fn lowest_free(used: impl Iterator<Item = u32>, limit: u32) -> Option<u32> {
    let used: BTreeSet<u32> = used.collect();
    (0..limit).find(|id| !used.contains(id))
}

/// Host-bit mask of a prefix length within its last 32 bits.
fn host_mask(len: u8, bits: u8) -> u32 {
    let host = bits.saturating_sub(len).min(32);
    if host == 32 {
        u32::MAX
    } else {
        (1u32 << host) - 1
    }
}

/// The dataplane's CONFIG entry for a (validated) config.
pub fn dataplane_config(config: &Config) -> Result<xdp_common::Config> {
    let f = &config.forwarding;
    let (v4, v4_len) = parse_prefix(&f.source_v4).ok_or_else(|| anyhow!("bad source_v4"))?;
    let (v6, v6_len) = parse_prefix(&f.source_v6).ok_or_else(|| anyhow!("bad source_v6"))?;
    let action = |a: PacketAction| match a {
        PacketAction::Pass => xdp_common::XDP_PASS,
        PacketAction::Drop => xdp_common::XDP_DROP,
    };
    let (IpAddr::V4(v4), IpAddr::V6(v6)) = (v4, v6) else {
        bail!("source prefixes have the wrong families");
    };
    Ok(xdp_common::Config {
        gateway_mac: f
            .gateway_mac
            .as_deref()
            .and_then(parse_mac)
            .unwrap_or([0; 6]),
        source_v4: v4.octets(),
        source_v4_host_mask: host_mask(v4_len, 32),
        source_v6: v6.octets(),
        source_v6_host_mask: host_mask(v6_len, 128),
        fragment_action: action(f.fragments),
        malformed_action: action(f.malformed),
        outer_ttl: u32::from(f.outer_ttl),
        ..xdp_common::Config::default()
    })
}

impl Controller {
    /// Take over `dp`: ids and health of everything already in its maps
    /// (a restart) are kept, so no flow moves.
    pub fn new(config: Config, config_path: Option<PathBuf>, dp: Dataplane) -> Result<Self> {
        let vip_ids: BTreeMap<VipKey, u32> = dp
            .vips()?
            .into_iter()
            .map(|(key, meta)| (key, meta.vip_id))
            .collect();
        let mut backend_ids = BTreeMap::new();
        let mut adopted_state = BTreeMap::new();
        for (id, b) in dp.backends()? {
            let addr = ip_of(b.addr, b.family);
            backend_ids.insert((b.vip_id, addr), id);
            adopted_state.insert((b.vip_id, addr), b.state);
        }
        let mut controller = Self {
            config,
            config_path,
            dp,
            vip_ids,
            backend_ids,
            health: BTreeMap::new(),
            written_rings: HashMap::new(),
            written_config: None,
            last_error: None,
            reconciles: 0,
            reconcile_failures: 0,
            flows_cache: None,
        };
        // Health of adopted backends starts from what the dataplane had.
        for vip in &controller.config.vips {
            let Some(&vip_id) = controller.vip_ids.get(&vip_key(vip)) else {
                continue;
            };
            for b in &vip.backends {
                if let Some(&state) = adopted_state.get(&(vip_id, b.address)) {
                    let health = if state == backend_state::DOWN {
                        Health::Down
                    } else {
                        Health::Up
                    };
                    controller.health.insert(
                        CheckKey {
                            vip: vip.name.clone(),
                            backend: b.address,
                        },
                        BackendHealth::new(health, vip.health.rise, vip.health.fall),
                    );
                }
            }
        }
        Ok(controller)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn in_sync(&self) -> bool {
        self.last_error.is_none()
    }

    /// The checks the config asks for.
    pub fn wanted_checks(&self) -> HashMap<CheckKey, CheckSpec> {
        let mut out = HashMap::new();
        for vip in &self.config.vips {
            if vip.health.kind == CheckKind::None {
                continue;
            }
            let Some(port) = vip.check_port() else {
                continue;
            };
            for b in &vip.backends {
                out.insert(
                    CheckKey {
                        vip: vip.name.clone(),
                        backend: b.address,
                    },
                    CheckSpec::new(&vip.health, SocketAddr::new(b.address, port)),
                );
            }
        }
        out
    }

    /// Record a check result; reconcile if it changed a backend's health.
    pub fn on_check(&mut self, result: CheckResult) {
        let Some(vip) = self.config.vip(&result.key.vip) else {
            return;
        };
        let endpoint = vip.endpoint();
        let Some(h) = self.health.get_mut(&result.key) else {
            return;
        };
        let ok = result.result.is_ok();
        match &result.result {
            Ok(latency) => {
                h.checks_ok += 1;
                h.last_latency = Some(*latency);
            }
            Err(e) => {
                h.checks_failed += 1;
                h.last_error = Some(e.clone());
            }
        }
        if let Some(t) = h.tracker.record(ok) {
            h.transitions += 1;
            let why = match &result.result {
                Ok(l) => format!("check passed in {l:?}"),
                Err(e) => e.clone(),
            };
            info!(
                vip = %result.key.vip,
                endpoint = %endpoint,
                backend = %result.key.backend,
                from = ?t.from,
                to = ?t.to,
                reason = %why,
                "backend health changed"
            );
            self.reconcile_logged();
        }
    }

    /// Reconcile, logging (not returning) a failure; it is retried later.
    pub fn reconcile_logged(&mut self) {
        if let Err(e) = self.reconcile() {
            warn!(error = %format!("{e:#}"), "reconcile failed; will retry");
        }
    }

    /// Bring the dataplane to the desired state. On failure the error is
    /// kept (the dataplane is reported out of sync) and a later call retries
    /// from where the maps really are.
    pub fn reconcile(&mut self) -> Result<()> {
        self.reconciles += 1;
        let result = self.try_reconcile();
        match &result {
            Ok(()) => self.last_error = None,
            Err(e) => {
                self.reconcile_failures += 1;
                self.last_error = Some(format!("{e:#}"));
                // What was written is no longer known for sure: compare
                // against the maps' real content on the retry.
                self.written_rings.clear();
                self.written_config = None;
            }
        }
        result
    }

    fn desired_state(&self, vip: &crate::config::Vip, b: &crate::config::BackendConfig) -> u32 {
        if b.state == InitialState::Drain {
            return backend_state::DRAINING;
        }
        let key = CheckKey {
            vip: vip.name.clone(),
            backend: b.address,
        };
        match self.health.get(&key).map(|h| h.tracker.state) {
            Some(Health::Down) => backend_state::DOWN,
            _ => backend_state::UP,
        }
    }

    fn try_reconcile(&mut self) -> Result<()> {
        let sizes = self.dp.sizes();
        let dp_config = dataplane_config(&self.config)?;
        if self.written_config != Some(dp_config) {
            self.dp.set_config(&dp_config)?;
            self.written_config = Some(dp_config);
        }

        // Health entries follow the config: new backends start in their
        // configured state, removed ones are forgotten.
        let mut wanted_health = BTreeSet::new();
        for vip in &self.config.vips {
            for b in &vip.backends {
                let key = CheckKey {
                    vip: vip.name.clone(),
                    backend: b.address,
                };
                let initial = if b.state == InitialState::Down {
                    Health::Down
                } else {
                    Health::Up
                };
                self.health
                    .entry(key.clone())
                    .or_insert_with(|| {
                        BackendHealth::new(initial, vip.health.rise, vip.health.fall)
                    })
                    .tracker
                    .retune(vip.health.rise, vip.health.fall);
                wanted_health.insert(key);
            }
        }
        self.health.retain(|k, _| wanted_health.contains(k));

        // VIP ids.
        let wanted_vips: BTreeMap<VipKey, usize> = self
            .config
            .vips
            .iter()
            .enumerate()
            .map(|(i, v)| (vip_key(v), i))
            .collect();
        for key in wanted_vips.keys() {
            if !self.vip_ids.contains_key(key) {
                let id = lowest_free(self.vip_ids.values().copied(), sizes.max_vips)
                    .ok_or_else(|| anyhow!("no free VIP id (max_vips {})", sizes.max_vips))?;
                self.vip_ids.insert(*key, id);
            }
        }

        // Per VIP: its entry, its backends' entries, its ring.
        struct Plan {
            key: VipKey,
            vip_id: u32,
            ring: Vec<u32>,
        }
        let mut plans = Vec::new();
        let mut going_down: Vec<(u32, Backend)> = Vec::new();
        let mut wanted_backends = BTreeSet::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let vip_id = self.vip_ids[&key];
            let flags = if vip.source_hash {
                VIP_F_SOURCE_HASH
            } else {
                0
            };
            let mode = if vip.forwarding == ForwardingMode::L2dsr {
                fwd::L2_DSR
            } else {
                fwd::ENCAP
            };
            match self.dp.vip(&key)? {
                Some(meta) if meta.vip_id == vip_id && meta.flags == flags && meta.mode == mode => {
                }
                _ => {
                    self.dp.add_vip(&key, vip_id, flags, mode)?;
                    self.written_rings.remove(&vip_id);
                }
            }
            let mut members = Vec::new();
            for b in &vip.backends {
                let id = match self.backend_ids.get(&(vip_id, b.address)) {
                    Some(&id) => id,
                    None => {
                        let id =
                            lowest_free(self.backend_ids.values().copied(), sizes.max_backends)
                                .ok_or_else(|| {
                                    anyhow!(
                                        "no free backend id (max_backends {})",
                                        sizes.max_backends
                                    )
                                })?;
                        self.backend_ids.insert((vip_id, b.address), id);
                        id
                    }
                };
                wanted_backends.insert(id);
                let (addr, family) = addr_bytes(b.address);
                let state = self.desired_state(vip, b);
                let entry = Backend {
                    addr,
                    mac: b.mac.as_deref().and_then(parse_mac).unwrap_or([0; 6]),
                    _pad: [0; 2],
                    family: u32::from(family),
                    state,
                    vip_id,
                };
                if self.dp.backend(id)? != entry {
                    if state == backend_state::UP {
                        self.dp.set_backend(id, &entry)?;
                    } else {
                        going_down.push((id, entry));
                    }
                }
                if state == backend_state::UP && b.weight > 0 {
                    members.push(RingBackend {
                        identity: match b.address {
                            IpAddr::V4(a) => a.octets().to_vec(),
                            IpAddr::V6(a) => a.octets().to_vec(),
                        },
                        weight: b.weight,
                        id,
                    });
                }
            }
            plans.push(Plan {
                key,
                vip_id,
                ring: maglev::populate(&members, sizes.ring_size),
            });
        }
        for plan in plans {
            if self.written_rings.get(&plan.vip_id) != Some(&plan.ring) {
                self.dp
                    .write_ring(&plan.key, &plan.ring)
                    .with_context(|| format!("writing the ring of VIP id {}", plan.vip_id))?;
                self.written_rings.insert(plan.vip_id, plan.ring);
            }
        }
        for (id, entry) in going_down {
            self.dp.set_backend(id, &entry)?;
        }

        // Removed backends and VIPs, now that no ring names them.
        let stale: Vec<((u32, IpAddr), u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| !wanted_backends.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (k, id) in stale {
            self.dp.remove_backend(id)?;
            self.backend_ids.remove(&k);
        }
        let stale_vips: Vec<(VipKey, u32)> = self
            .vip_ids
            .iter()
            .filter(|(k, _)| !wanted_vips.contains_key(k))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (key, id) in stale_vips {
            if self.dp.vip(&key)?.is_some() {
                self.dp.remove_vip(&key)?;
            }
            self.vip_ids.remove(&key);
            self.written_rings.remove(&id);
        }
        Ok(())
    }

    /// Replace the desired state (reload or API change). Refused, changing
    /// nothing, if the new config is invalid or changes what only a restart
    /// can (interface, mode, table sizes, pin directory).
    pub fn apply(&mut self, new: Config, persist: bool) -> Result<()> {
        new.validate().map_err(anyhow::Error::new)?;
        let old = &self.config;
        if new.interface != old.interface || new.xdp_mode != old.xdp_mode {
            bail!("interface and xdp_mode cannot change while running; restart with `xdplb detach` first");
        }
        if new.tables != old.tables {
            bail!("table sizes cannot change under a running dataplane; `xdplb detach` and restart (drops conntrack)");
        }
        if new.daemon.pin_dir != old.daemon.pin_dir {
            bail!("daemon.pin_dir cannot change while running");
        }
        if persist {
            if let Some(path) = &self.config_path {
                new.save(path)
                    .with_context(|| format!("writing the config back to {}", path.display()))?;
            }
        }
        self.config = new;
        self.reconcile()
    }

    /// Flows in the conntrack table, counted at most every 2 s (walking a
    /// large table costs one syscall per entry: about a second for 1M).
    pub fn flows_in_use(&mut self) -> usize {
        if let Some((at, n)) = self.flows_cache {
            if at.elapsed() < Duration::from_secs(2) {
                return n;
            }
        }
        let n = self.dp.flow_count().unwrap_or(0);
        self.flows_cache = Some((Instant::now(), n));
        n
    }

    pub fn status(&mut self) -> Status {
        let flows = self.flows_in_use();
        let mut vips = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let vip_id = self.vip_ids.get(&key).copied();
            let mut backends = Vec::new();
            for b in &vip.backends {
                let id = vip_id.and_then(|v| self.backend_ids.get(&(v, b.address)).copied());
                let h = self.health.get(&CheckKey {
                    vip: vip.name.clone(),
                    backend: b.address,
                });
                let dataplane_state = id
                    .and_then(|id| self.dp.backend(id).ok())
                    .map_or("absent", |e| state_name(e.state));
                let counters = id
                    .and_then(|id| self.dp.backend_stats(id).ok())
                    .unwrap_or_default();
                backends.push(BackendStatus {
                    address: b.address,
                    weight: b.weight,
                    configured: b.state,
                    health: h.map(|h| h.tracker.state),
                    dataplane_state,
                    id,
                    last_check_ms: h
                        .and_then(|h| h.last_latency)
                        .map(|d| d.as_secs_f64() * 1e3),
                    last_error: h.and_then(|h| h.last_error.clone()),
                    transitions: h.map_or(0, |h| h.transitions),
                    counters: counters.into(),
                });
            }
            let counters = vip_id
                .and_then(|id| self.dp.vip_stats(id).ok())
                .unwrap_or_default();
            vips.push(VipStatus {
                name: vip.name.clone(),
                endpoint: vip.endpoint(),
                forwarding: vip.forwarding,
                source_hash: vip.source_hash,
                check: vip.health.kind,
                id: vip_id,
                counters: counters.into(),
                backends,
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
        Status {
            interface: self.config.interface.clone(),
            adopted: self.dp.adopted(),
            in_sync: self.in_sync(),
            last_error: self.last_error.clone(),
            flows,
            max_flows: self.dp.sizes().max_flows,
            reasons,
            vips,
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
    pub configured: InitialState,
    pub health: Option<Health>,
    pub dataplane_state: &'static str,
    pub id: Option<u32>,
    pub last_check_ms: Option<f64>,
    pub last_error: Option<String>,
    pub transitions: u64,
    pub counters: Traffic,
}

#[derive(Debug, Serialize)]
pub struct VipStatus {
    pub name: String,
    pub endpoint: String,
    pub forwarding: ForwardingMode,
    pub source_hash: bool,
    pub check: CheckKind,
    pub id: Option<u32>,
    pub counters: Traffic,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub interface: String,
    pub adopted: bool,
    pub in_sync: bool,
    pub last_error: Option<String>,
    pub flows: usize,
    pub max_flows: u32,
    pub reasons: BTreeMap<String, u64>,
    pub vips: Vec<VipStatus>,
}

impl Controller {
    /// Every check's health record (metrics).
    pub fn health(&self) -> &BTreeMap<CheckKey, BackendHealth> {
        &self.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_masks() {
        assert_eq!(host_mask(16, 32), 0xffff);
        assert_eq!(host_mask(32, 32), 0);
        assert_eq!(host_mask(0, 32), u32::MAX);
        assert_eq!(host_mask(112, 128), 0xffff);
        assert_eq!(host_mask(96, 128), u32::MAX);
        assert_eq!(host_mask(64, 128), u32::MAX);
    }

    #[test]
    fn lowest_free_ids() {
        assert_eq!(lowest_free([0, 1, 3].into_iter(), 5), Some(2));
        assert_eq!(lowest_free([0, 1].into_iter(), 2), None);
    }
}
