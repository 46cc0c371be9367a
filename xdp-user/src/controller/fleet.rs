//! A fleet member's controller: desired state from the store's revisions,
//! each applied whole or refused whole (naming the key), and health by the
//! fleet's verdict while the store is reachable (or lost for less than the
//! lease TTL), by this host's own checks after that.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{info, warn};

use super::Controller;
use crate::{
    config::{Fleet, HealthRule, Vip},
    fleet::{self, keys, Desired, Entry, Verdicts},
    health::{CheckKey, Health},
};

/// What a fleet member knows of the fleet.
#[derive(Debug)]
pub struct FleetState {
    prefix: String,
    host: String,
    rule: HealthRule,
    fallback_after: Duration,
    /// The desired state that runs, and the store's revision it came from
    /// (0: none yet, or carried over from before a restart).
    pub desired: Desired,
    /// The store's last revision seen.
    seen: i64,
    /// Why the store's newest desired state is not running, naming the key.
    refused: Option<String>,
    /// The other live hosts' verdicts.
    peers: BTreeMap<String, Verdicts>,
    bad_peers: Vec<String>,
    /// The store has been lost since then, and why.
    lost: Option<(Instant, String)>,
    /// Whether the last reconcile used the peers' verdicts.
    used_peers: bool,
}

/// The fleet as status reports it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FleetStatus {
    pub prefix: String,
    pub host: String,
    pub rule: HealthRule,
    /// The store's revision whose desired state runs.
    pub revision: i64,
    pub store_revision: i64,
    pub connected: bool,
    /// Seconds since the store was lost, and why.
    pub lost_for_s: Option<f64>,
    pub lost_error: Option<String>,
    /// The store is lost for longer than the lease TTL: the rings follow
    /// this host's checks alone.
    pub local_health: bool,
    /// Why the store's newest desired state was refused (the key named).
    pub refused: Option<String>,
    /// Live hosts that publish verdicts (this one included).
    pub hosts: Vec<String>,
    /// Backends this host judges otherwise than the fleet.
    pub disagreements: Vec<Disagreement>,
    pub bad_peer_keys: Vec<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Disagreement {
    pub vip: String,
    pub backend: IpAddr,
    pub own: bool,
    pub fleet: bool,
}

impl FleetState {
    pub fn new(fleet: &Fleet) -> Self {
        Self {
            prefix: fleet.prefix.clone(),
            host: fleet.host_name(),
            rule: fleet.health_rule,
            fallback_after: Duration::from_secs(u64::from(fleet.lease_ttl_s)),
            desired: Desired::default(),
            seen: 0,
            refused: None,
            peers: BTreeMap::new(),
            bad_peers: Vec::new(),
            lost: None,
            used_peers: false,
        }
    }

    /// The peers' verdicts count: the store answers, or was lost for less
    /// than a lease's TTL (the verdicts it held were still live then).
    fn peers_count(&self, now: Instant) -> bool {
        self.lost
            .as_ref()
            .is_none_or(|(since, _)| now.duration_since(*since) < self.fallback_after)
    }

    fn peer_verdicts<'a>(&'a self, key: &'a CheckKey) -> impl Iterator<Item = bool> + 'a {
        self.peers
            .values()
            .filter_map(|v| v.get(&key.vip).and_then(|b| b.get(&key.backend)).copied())
    }

    /// Why the store's newest desired state is not running, if it is not.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Whether any other host judges `key`.
    pub fn peers_judge(&self, key: &CheckKey) -> bool {
        self.peers_count(Instant::now()) && self.peer_verdicts(key).next().is_some()
    }

    /// The verdict the rings follow for `key`, given this host's own.
    pub fn verdict(&self, key: &CheckKey, own: Option<bool>, now: Instant) -> Option<bool> {
        if !self.peers_count(now) {
            return own;
        }
        fleet::fleet_verdict(self.rule, own, self.peer_verdicts(key))
    }
}

impl Controller {
    /// Make this controller a fleet member, running `carried` (the desired
    /// state a previous run applied) until the store answers.
    pub fn join_fleet(&mut self, fleet: &Fleet, carried: Option<Desired>) {
        let mut state = FleetState::new(fleet);
        if let Some(desired) = carried {
            state.desired = desired;
        }
        self.fleet = Some(state);
    }

    pub fn fleet(&self) -> Option<&FleetState> {
        self.fleet.as_ref()
    }

    /// This host's own verdict on a backend, if it has one: its checks
    /// ran (not blocked by a local reason).
    pub(super) fn own_verdict(&self, key: &CheckKey, now: Instant) -> Option<bool> {
        let h = self.health.get(key)?;
        if !h.verdict_known || h.checks_blocked().is_some() {
            return None;
        }
        // Waiting for a first passing check: the first one failed.
        Some(!h.awaiting_first_check && h.effective(now) == Health::Up)
    }

    /// The health the rings follow for `key`.
    pub(super) fn ring_health(&self, key: &CheckKey, now: Instant) -> Option<Health> {
        let local = self.health.get(key).map(|h| h.effective(now));
        let Some(fleet) = &self.fleet else {
            return local;
        };
        match fleet.verdict(key, self.own_verdict(key, now), now) {
            Some(true) => Some(Health::Up),
            Some(false) => Some(Health::Down),
            None => local,
        }
    }

    /// This host's verdicts, to publish.
    pub fn own_verdicts(&self) -> Verdicts {
        let now = Instant::now();
        let mut out = Verdicts::new();
        for key in self.health.keys() {
            if let Some(up) = self.own_verdict(key, now) {
                out.entry(key.vip.clone())
                    .or_default()
                    .insert(key.backend, up);
            }
        }
        out
    }

    /// A revision of the store: every key under the prefix. Applies its
    /// desired state whole, or refuses it whole naming the key and keeps
    /// the running one; takes the other hosts' verdicts.
    pub fn fleet_snapshot(&mut self, revision: i64, entries: &[Entry]) -> Taken {
        let Some(fleet) = self.fleet.as_mut() else {
            return Taken::default();
        };
        if fleet.lost.take().is_some() {
            info!(revision, "fleet store back at revision {revision}");
        }
        fleet.seen = revision;
        let (mut peers, bad) = keys::read_peers(&fleet.prefix, entries);
        peers.remove(&fleet.host);
        fleet.bad_peers = bad.iter().map(ToString::to_string).collect();
        let peers_changed = peers != fleet.peers;
        fleet.peers = peers;
        let prefix = fleet.prefix.clone();
        let mut applied = false;
        let refusal = match keys::read_desired(&prefix, revision, entries) {
            Err(bad) => Some(bad.to_string()),
            Ok(desired) if desired.vips == self.config.vips => {
                if let Some(f) = self.fleet.as_mut() {
                    f.desired = desired;
                }
                None
            }
            Ok(desired) => {
                let mut new = self.config.clone();
                new.vips = desired.vips.clone();
                // Admitted, it runs: a failure to write the maps is not a
                // refusal (the reconcile is retried, as for a reload).
                match self.admit(&new) {
                    Ok(()) => {
                        self.config = new;
                        self.reconcile_logged();
                        info!(
                            revision,
                            vips = desired.vips.len(),
                            "fleet desired state of revision {revision} applied: {} VIPs",
                            desired.vips.len()
                        );
                        if let Some(f) = self.fleet.as_mut() {
                            f.desired = desired;
                        }
                        self.save_fleet_state();
                        applied = true;
                        None
                    }
                    Err(e) => {
                        // Name the keys that changed since the running state.
                        let running = &self.config.vips;
                        let mut changed: Vec<String> = desired
                            .vips
                            .iter()
                            .filter(|v| !running.contains(v))
                            .map(|v| keys::vip_key(&prefix, &v.name))
                            .collect();
                        changed.extend(
                            running
                                .iter()
                                .filter(|r| desired.vips.iter().all(|v| v.name != r.name))
                                .map(|r| format!("{} (deleted)", keys::vip_key(&prefix, &r.name))),
                        );
                        let why = match e.downcast_ref::<crate::config::Invalid>() {
                            Some(invalid) => keys::locate(&prefix, &desired.vips, invalid),
                            None => format!("{e:#}"),
                        };
                        // No revision in the text: a refusal repeated by
                        // later revisions (verdicts) is logged once.
                        Some(format!("etcd keys {}: {why}", changed.join(", ")))
                    }
                }
            }
        };
        let Some(fleet) = self.fleet.as_mut() else {
            return Taken::default();
        };
        if let Some(why) = &refusal {
            if fleet.refused.as_ref() != Some(why) {
                warn!(revision, error = %why, "fleet desired state of revision {revision} refused ({why}); the last good state runs");
            }
        }
        fleet.refused = refusal;
        Taken {
            desired: applied,
            verdicts: peers_changed,
        }
    }

    /// The store is lost (why). The rings do not change yet: the peers'
    /// verdicts count for a lease's TTL more ([`Controller::fleet_fallback_changed`]).
    pub fn fleet_lost(&mut self, why: String) {
        if let Some(fleet) = self.fleet.as_mut() {
            match &mut fleet.lost {
                Some((_, last)) => *last = why,
                None => fleet.lost = Some((Instant::now(), why)),
            }
        }
    }

    /// Whether the rings must be rebuilt because the peers' verdicts
    /// stopped (or started) counting since the last reconcile.
    pub fn fleet_fallback_changed(&mut self) -> bool {
        let now = Instant::now();
        let Some(fleet) = self.fleet.as_mut() else {
            return false;
        };
        let count = fleet.peers_count(now);
        if count == fleet.used_peers {
            return false;
        }
        if !count {
            warn!(
                after_s = fleet.fallback_after.as_secs(),
                "fleet store lost for longer than the lease TTL ({} s): the rings follow this host's checks alone",
                fleet.fallback_after.as_secs()
            );
        }
        true
    }

    /// Note which verdicts the reconcile about to run uses.
    pub(super) fn fleet_reconciling(&mut self) {
        let now = Instant::now();
        if let Some(fleet) = self.fleet.as_mut() {
            fleet.used_peers = fleet.peers_count(now);
        }
    }

    /// Refuse an operator's change while the store cannot take it.
    pub fn fleet_refuses_changes(&self) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        if let Some((since, why)) = &fleet.lost {
            return Some(format!(
                "the fleet's store (etcd) is unreachable for {:.1} s ({why}); changes are refused \
                 until it is back (forwarding goes on with revision {})",
                since.elapsed().as_secs_f64(),
                fleet.desired.revision
            ));
        }
        fleet.refused.as_ref().map(|why| {
            format!(
                "the store holds a desired state this host refused, so a change cannot be based on it: \
                 {why}; fix or delete that key (etcdctl, or `xdplb fleet import`)"
            )
        })
    }

    /// The VIPs an operator's change leads to, checked against the
    /// running state, and the state it is based on (compare-and-swap).
    pub fn fleet_change(
        &self,
        change: &crate::config::Change,
    ) -> anyhow::Result<(Desired, Vec<Vip>)> {
        if let Some(why) = self.fleet_refuses_changes() {
            anyhow::bail!(why);
        }
        let fleet = self
            .fleet
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not a fleet member"))?;
        let new = change.apply_to(&self.config)?;
        self.admit(&new)?;
        Ok((fleet.desired.clone(), new.vips))
    }

    fn save_fleet_state(&self) {
        let Some(fleet) = &self.fleet else { return };
        if self.file.is_none() {
            return;
        }
        let saved = Saved {
            revision: fleet.desired.revision,
            vip: fleet.desired.vips.clone(),
        };
        let result = toml::to_string(&saved)
            .map_err(anyhow::Error::new)
            .and_then(|text| {
                crate::lock::write_state(&state_file(&self.config.daemon.pin_dir), text.as_bytes())
            });
        if let Err(e) = result {
            warn!(error = %format!("{e:#}"), "cannot keep the fleet's desired state for a restart: {e:#}");
        }
    }

    pub fn fleet_status(&self) -> Option<FleetStatus> {
        let fleet = self.fleet.as_ref()?;
        let now = Instant::now();
        let mut disagreements = Vec::new();
        for key in self.health.keys() {
            let own = self.own_verdict(key, now);
            if let (Some(own), Some(verdict)) = (own, fleet.verdict(key, own, now)) {
                if own != verdict {
                    disagreements.push(Disagreement {
                        vip: key.vip.clone(),
                        backend: key.backend,
                        own,
                        fleet: verdict,
                    });
                }
            }
        }
        let mut hosts: Vec<String> = fleet.peers.keys().cloned().collect();
        hosts.push(fleet.host.clone());
        hosts.sort();
        Some(FleetStatus {
            prefix: fleet.prefix.clone(),
            host: fleet.host.clone(),
            rule: fleet.rule,
            revision: fleet.desired.revision,
            store_revision: fleet.seen,
            connected: fleet.lost.is_none(),
            lost_for_s: fleet.lost.as_ref().map(|(t, _)| t.elapsed().as_secs_f64()),
            lost_error: fleet.lost.as_ref().map(|(_, e)| e.clone()),
            local_health: !fleet.peers_count(now),
            refused: fleet.refused.clone(),
            hosts,
            disagreements,
            bad_peer_keys: fleet.bad_peers.clone(),
        })
    }
}

/// The desired state a fleet member keeps for a restart.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Saved {
    pub revision: i64,
    #[serde(default)]
    pub vip: Vec<Vip>,
}

/// What a revision of the store changed on this host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// A new desired state runs (the checks and announcements follow).
    pub desired: bool,
    /// The other hosts' verdicts changed (the rings follow).
    pub verdicts: bool,
}

/// Where the fleet member pinned at `pin_dir` keeps the desired state it
/// applied (a restart runs it until the store answers).
pub fn state_file(pin_dir: &std::path::Path) -> std::path::PathBuf {
    crate::lock::state_file("fleet-desired", pin_dir)
}

/// The desired state a previous run of the instance pinned at `pin_dir`
/// applied, if any.
pub fn load_saved(pin_dir: &std::path::Path) -> Option<Saved> {
    let text = std::fs::read_to_string(state_file(pin_dir)).ok()?;
    toml::from_str(&text).ok()
}
