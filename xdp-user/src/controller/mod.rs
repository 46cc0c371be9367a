//! The reconcile loop: desired state (config) + health -> rings and backend
//! states -> dataplane. The only holder of state; everything else asks it.
//!
//! A reconcile is planned whole first ([`plan`]: ids freed before new ones
//! are allocated, refused with the reason when the tables cannot hold it),
//! then applied in an order that never lets a packet see a half-applied
//! change ([`apply`]). A change of the desired state is planned before it is
//! accepted or written back, so the state the controller holds always fits
//! and health-driven changes always apply.

mod announce;
mod apply;
mod fleet;
mod health;
mod plan;
mod retired;
mod selfcheck;
mod status;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use tracing::warn;
use xdp_common::{backend_state, VipKey};

pub use announce::{lock_target as lock_announce_target, AnnounceStatus};
pub use fleet::{
    load_saved as load_saved_fleet_state, state_file as fleet_state_file, FleetStatus,
    Saved as SavedFleetState, Taken as FleetTaken,
};
pub use health::BackendHealth;
pub use plan::DoesNotFit;
pub use selfcheck::{SelfCheck, SELF_CHECK_INTERVAL};
pub use status::{state_name, BackendStatus, Drops, Status, SubsetStatus, Traffic, VipStatus};

use crate::{
    config::{parse_mac, parse_prefix, Change, CheckKind, Config, ConfigFile, PacketAction},
    dataplane::{addr_bytes, Dataplane},
    health::{CheckKey, CheckSpec, Health},
};

/// The ids and health a pinned dataplane holds (a restart adopts them, so
/// no flow moves).
#[derive(Debug, Default)]
pub struct Adopted {
    vip_ids: BTreeMap<VipKey, u32>,
    backend_ids: BTreeMap<(u32, IpAddr), u32>,
    state: BTreeMap<(u32, IpAddr), u32>,
}

impl Adopted {
    pub fn read(dp: &Dataplane) -> Result<Self> {
        let mut adopted = Self {
            vip_ids: dp
                .vips()?
                .into_iter()
                .map(|(key, meta)| (key, meta.vip_id))
                .collect(),
            ..Self::default()
        };
        for (id, b) in dp.backends()? {
            let addr = ip_of(b.addr, b.family);
            adopted.backend_ids.insert((b.vip_id, addr), id);
            adopted.state.insert((b.vip_id, addr), b.state);
        }
        Ok(adopted)
    }
}

pub struct Controller {
    config: Config,
    /// Where changes are written back; None: not persisted (tests).
    file: Option<ConfigFile>,
    dp: Dataplane,
    vip_ids: BTreeMap<VipKey, u32>,
    backend_ids: BTreeMap<(u32, IpAddr), u32>,
    health: BTreeMap<CheckKey, BackendHealth>,
    written: apply::Written,
    /// The last reconcile failed; it is retried.
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub reconcile_failures: u64,
    flows_cache: Option<(Instant, usize)>,
    /// Conntrack as a background thread sweeps it, when one runs (the
    /// daemon).
    swept: Option<std::sync::Arc<crate::dataplane::Swept>>,
    self_check: SelfCheck,
    local_errors: BTreeMap<&'static str, u64>,
    rings: plan::RingCache,
    /// Whether the last reload applied, and when the config was last
    /// loaded successfully (Unix seconds).
    last_reload: (bool, f64),
    announcer: announce::Announcer,
    /// A fresh start's wait for every backend's first verdict before it
    /// announces anything.
    settle: announce::Settle,
    /// Per VIP id: the counters of its backends that were removed, so the
    /// backends' totals never fall below the VIP's (Prometheus counters
    /// only grow). Kept in a state file by the daemon.
    retired: retired::Retired,
    /// Desired state and health shared through etcd, for a fleet member.
    fleet: Option<fleet::FleetState>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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

pub fn ip_of(addr: [u8; 16], family: u32) -> IpAddr {
    if family == u32::from(xdp_common::FAMILY_V4) {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(addr)
    }
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
        tunnel_mtu: f.tunnel_mtu,
        conntrack_rate: f.conntrack_rate,
        ..xdp_common::Config::default()
    })
}

impl Controller {
    /// Take over `dp`: ids and health of everything already in its maps
    /// (a restart) are kept, so no flow moves.
    pub fn new(config: Config, file: Option<ConfigFile>, dp: Dataplane) -> Result<Self> {
        let adopted = Adopted::read(&dp)?;
        Ok(Self::with_adopted(config, file, dp, adopted))
    }

    /// [`Controller::new`] with the adopted state already read.
    pub fn with_adopted(
        config: Config,
        file: Option<ConfigFile>,
        dp: Dataplane,
        adopted: Adopted,
    ) -> Self {
        let announcer = announce::Announcer::new(&config, dp.adopted());
        // Kept on disk by a daemon (one with a config file) only.
        let retired = retired::Retired::load(
            file.as_ref()
                .map(|_| crate::lock::state_file("retired-counters", &config.daemon.pin_dir)),
        );
        let settle = announce::Settle::new(dp.adopted());
        let mut controller = Self {
            settle,
            config,
            file,
            dp,
            vip_ids: adopted.vip_ids,
            backend_ids: adopted.backend_ids,
            health: BTreeMap::new(),
            written: apply::Written::default(),
            last_error: None,
            reconciles: 0,
            reconcile_failures: 0,
            flows_cache: None,
            swept: None,
            self_check: SelfCheck::default(),
            local_errors: crate::health::LOCAL_ERROR_KINDS
                .iter()
                .map(|k| (*k, 0))
                .collect(),
            rings: plan::RingCache::default(),
            last_reload: (true, unix_now()),
            announcer,
            retired,
            fleet: None,
        };
        // Health of adopted, checked backends starts from what the
        // dataplane had: down there means a check failed, unless the
        // backend is configured down (then its health is not known).
        for vip in &controller.config.vips {
            let Some(&vip_id) = controller.vip_ids.get(&vip_key(vip)) else {
                continue;
            };
            if vip.health.kind == CheckKind::None {
                continue;
            }
            for b in &vip.backends {
                if b.state == crate::config::InitialState::Down {
                    continue;
                }
                if let Some(&state) = adopted.state.get(&(vip_id, b.address)) {
                    let health = if state == backend_state::DOWN {
                        Health::Down
                    } else {
                        Health::Up
                    };
                    let mut h = BackendHealth::new(health, vip.health.rise, vip.health.fall);
                    h.verdict_known = true;
                    controller.health.insert(
                        CheckKey {
                            vip: vip.name.clone(),
                            backend: b.address,
                        },
                        h,
                    );
                }
            }
        }
        controller
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
    pub fn wanted_checks(&self) -> std::collections::HashMap<CheckKey, CheckSpec> {
        let mut out = std::collections::HashMap::new();
        let tunnels = self.config.vips.iter().any(|v| v.health.tunnel);
        let path = if tunnels {
            self.tunnel_path()
        } else {
            (0, xdp_common::Config::default())
        };
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
                    CheckSpec {
                        tunnel: vip.health.tunnel.then(|| crate::health::tunnel::Tunnel {
                            ifindex: path.0,
                            mode: plan::forward_mode(vip.forwarding),
                            backend: b.address,
                            backend_mac: b.mac.as_deref().and_then(parse_mac).unwrap_or([0; 6]),
                            policy: path.1,
                            vip: std::net::SocketAddr::new(vip.address, port),
                        }),
                        ..CheckSpec::new(&vip.health, std::net::SocketAddr::new(b.address, port))
                    },
                );
            }
        }
        out
    }

    /// Where checks through the tunnel leave, and the policy they are
    /// wrapped by: the interface's index (0 while it is missing: such
    /// checks fail, saying so) and the dataplane's policy, with the
    /// interface's own MAC as the source.
    fn tunnel_path(&self) -> (u32, xdp_common::Config) {
        let iface = crate::iface::by_name(&self.config.interface)
            .ok()
            .flatten()
            .unwrap_or_default();
        let policy = dataplane_config(&self.config).unwrap_or_default();
        let policy = xdp_common::Config {
            source_mac: iface.mac.unwrap_or([0; 6]),
            ..policy
        };
        (iface.index, policy)
    }

    /// Reconcile, logging (not returning) a failure; it is retried later.
    pub fn reconcile_logged(&mut self) {
        if let Err(e) = self.reconcile() {
            warn!(error = %format!("{e:#}"), "reconcile failed ({e:#}); will retry");
        }
    }

    /// Plan `config` against the ids in use now, with the current health.
    fn plan(&self, config: &Config) -> Result<plan::Plan, DoesNotFit> {
        let now = Instant::now();
        let health = |k: &CheckKey| self.ring_health(k, now);
        plan::plan(
            config,
            &health,
            &self.rings,
            &self.vip_ids,
            &self.backend_ids,
            self.dp.sizes(),
        )
    }

    /// Bring the dataplane to the desired state. On failure the error is
    /// kept (the dataplane is reported out of sync) and a later call retries
    /// from where the maps really are.
    pub fn reconcile(&mut self) -> Result<()> {
        if self.fleet.as_ref().is_some_and(|f| f.desired.revision == 0) {
            // A fleet member that has never read its desired state leaves
            // the dataplane as it is (an adopted one keeps forwarding).
            return Ok(());
        }
        self.reconciles += 1;
        self.sync_health();
        self.fleet_reconciling();
        let result = (|| {
            let plan = self.plan(&self.config)?;
            let dp_config = dataplane_config(&self.config)?;
            // The plan's ids are the truth from here: what the maps hold is
            // either written or being retried.
            self.vip_ids = plan.vip_ids.clone();
            self.backend_ids = plan.backend_ids.clone();
            let pass_to = &self.config.chain.pass_to;
            apply::apply(&mut self.dp, &plan, &dp_config, pass_to, &mut self.written)
        })();
        let live: Vec<u32> = self.vip_ids.values().copied().collect();
        self.retired
            .update(std::mem::take(&mut self.written.retired), &live);
        match &result {
            Ok(()) => self.last_error = None,
            Err(e) => {
                self.reconcile_failures += 1;
                self.last_error = Some(format!("{e:#}"));
                self.written.forget();
            }
        }
        result
    }

    /// Refuse `new` unless it can replace the running config: valid, with
    /// the same interface, mode, tables and pin directory, and fitting the
    /// tables alongside what they hold now.
    fn admit(&self, new: &Config) -> Result<()> {
        new.validate().map_err(anyhow::Error::new)?;
        let old = &self.config;
        if new.interface != old.interface || new.xdp_mode != old.xdp_mode {
            bail!("interface and xdp_mode cannot change while running; restart with `xdplb detach` first");
        }
        if new.libxdp != old.libxdp {
            bail!("[libxdp] cannot change while running; restart the daemon (the restart keeps every flow)");
        }
        if new.uplinks != old.uplinks {
            bail!("uplinks cannot change while running; restart the daemon (the restart keeps every flow)");
        }
        if new.tables != old.tables {
            bail!("table sizes cannot change under a running dataplane; `xdplb detach` and restart (drops conntrack)");
        }
        if new.fleet != old.fleet {
            bail!("[fleet] cannot change while running; restart the daemon to join another fleet or leave one");
        }
        if new.daemon.pin_dir != old.daemon.pin_dir {
            bail!("daemon.pin_dir cannot change while running");
        }
        if let Some(path) = new.chain.pass_to.as_deref() {
            crate::dataplane::pinned_xdp_program(path)
                .with_context(|| format!("chain.pass_to: cannot chain {}", path.display()))?;
        }
        self.plan(new)?;
        Ok(())
    }

    /// Replace the desired state without touching the config file (tests,
    /// and the tail of a reload). Refused, changing nothing, if it cannot
    /// replace the running config (see `admit`).
    pub fn apply(&mut self, new: Config) -> Result<()> {
        self.admit(&new)?;
        self.config = new;
        self.reconcile()
    }

    /// Re-read the config file and apply it whole, or refuse it whole.
    pub fn reload(&mut self) -> Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| anyhow!("the daemon runs without a config file"))?;
        let fleet_vips = self.fleet.as_ref().map(|_| self.config.vips.clone());
        let loaded = ConfigFile::load(file.path()).and_then(|(mut new, fresh)| {
            // A fleet member's VIPs are the store's, not the file's.
            if let Some(vips) = fleet_vips {
                new.vips = vips;
            }
            self.admit(&new)?;
            Ok((new, fresh))
        });
        let (new, fresh) = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.last_reload.0 = false;
                return Err(e);
            }
        };
        self.last_reload = (true, unix_now());
        self.file = Some(fresh);
        self.config = new;
        self.reconcile()
    }

    /// An operator's change: checked against the running state, written
    /// back to the config file (keeping its layout and comments), then
    /// applied. Refused, changing nothing, when any step before the write
    /// fails.
    pub fn change(&mut self, change: &Change) -> Result<()> {
        let new = change.apply_to(&self.config)?;
        self.admit(&new)?;
        if let Some(file) = &mut self.file {
            file.write_change(change, &new)
                .with_context(|| format!("writing the change to {}", file.path().display()))?;
        }
        self.config = new;
        self.reconcile().map_err(|e| {
            // Not a refusal: the change is made and kept; only writing the
            // maps failed, and that is retried.
            anyhow!(
                "the change was accepted{} but the dataplane could not be updated yet \
                 (retried every {:?}; see `xdplb status`): {e:#}",
                if self.file.is_some() {
                    " and written to the config file,"
                } else {
                    ","
                },
                SELF_CHECK_INTERVAL
            )
        })
    }

    /// Whether the last reload applied, and when the config was last
    /// loaded successfully (Unix seconds).
    pub fn last_reload(&self) -> (bool, f64) {
        self.last_reload
    }

    /// Maglev rings computed so far (the ring cache's misses).
    pub fn ring_rebuilds(&self) -> u64 {
        self.rings.computed()
    }

    /// Take flow counts and conntrack sweeps from a background thread
    /// instead of walking the table on this thread.
    pub fn sweep_with(&mut self, swept: std::sync::Arc<crate::dataplane::Swept>) {
        self.swept = Some(swept);
    }

    /// Take the changed ring slots' marks one step: settle those past the
    /// idle bound, clear those the last sweep found no other flows in.
    pub fn review_marks(&mut self) {
        use std::sync::atomic::Ordering;
        let idle = self.config.forwarding.flow_idle_timeout;
        let sweep = self.swept.as_ref().and_then(|s| {
            s.idle.store(idle, Ordering::Relaxed);
            s.latest.lock().ok().and_then(|l| l.clone())
        });
        match self.dp.review_marks(idle, sweep.as_ref()) {
            Ok((0, 0)) => {}
            Ok((settled, cleared)) => {
                tracing::debug!(settled, cleared, "changed ring slots")
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reviewing changed ring slots failed: {e:#}")
            }
        }
    }

    /// Flows in the conntrack table: the background count where one runs,
    /// else counted here at most every 2 s.
    pub fn flows_in_use(&mut self) -> usize {
        if let Some(s) = &self.swept {
            return s.flows.load(std::sync::atomic::Ordering::Relaxed) as usize;
        }
        if let Some((at, n)) = self.flows_cache {
            if at.elapsed() < Duration::from_secs(2) {
                return n;
            }
        }
        let n = self.dp.flow_count().unwrap_or(0);
        self.flows_cache = Some((Instant::now(), n));
        n
    }

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
}
