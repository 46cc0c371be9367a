//! Which VIP addresses this host may announce, kept in step with the
//! kernel's announcement routes ([`crate::announce`]).
//!
//! An address is announced while all of these hold: the dataplane is
//! attached and pinned as the daemon left it (self-check) and in sync (the
//! last reconcile applied); no dataplane loss was seen within the hold-down;
//! the operator has not withdrawn this host; and at least one VIP on the
//! address has a usable backend in the dataplane (up, weight above 0).
//! Exiting withdraws nothing: the pinned dataplane keeps forwarding, and the
//! next daemon takes the routes over as they are.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{info, warn};
use xdp_common::backend_state;

use super::{vip_key, Controller};
use crate::announce::{self, Target};

#[derive(Debug, Default)]
pub struct Announcer {
    /// Where the routes are kept now (None: announcing is off).
    target: Option<Target>,
    /// What the last successful sync left announced.
    announced: BTreeSet<IpAddr>,
    /// The operator withdrew this host (`xdplb announce withdraw`).
    withdrawn: bool,
    /// Why addresses are withdrawn now, logged once per change.
    reason: Option<String>,
    last_error: Option<String>,
    /// Routes added or removed so far.
    changes: u64,
    /// The lock on `target`: one daemon per table and protocol.
    lock: Option<crate::lock::Lock>,
    /// The routes this instance added: the only ones it touches.
    owned: announce::Owned,
    /// Wanted addresses whose route in the table is someone else's, with
    /// what is there.
    conflicts: std::collections::BTreeMap<IpAddr, String>,
}

/// The announcement part of `xdplb status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct AnnounceStatus {
    pub enabled: bool,
    pub table: u32,
    pub protocol: u8,
    pub withdrawn_by_operator: bool,
    /// Milliseconds of hold-down left after a dataplane loss.
    pub held_down_ms: u64,
    pub announced: Vec<IpAddr>,
    /// Why configured addresses are not announced now.
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub changes: u64,
    /// Addresses not announced because the table holds a route xdplb did
    /// not add for them, with what is there.
    #[serde(default)]
    pub conflicts: std::collections::BTreeMap<IpAddr, String>,
}

impl Announcer {
    /// The announcer of `config`'s instance, with the routes it owns (an
    /// instance that already ran, `earlier`, may have routes of a build
    /// that kept no record of them).
    pub fn new(config: &crate::config::Config, earlier: bool) -> Self {
        let owned = if config.announce.enabled {
            announce::Owned::load(config, earlier).unwrap_or_else(|e| {
                    warn!(error = %format!("{e:#}"), "cannot read which announcement routes are ours ({e:#}); taking none");
                    announce::Owned::default()
                })
        } else {
            announce::Owned::default()
        };
        Self {
            withdrawn: announce::is_withdrawn(&config.daemon.pin_dir),
            owned,
            ..Self::default()
        }
    }
}

/// A fresh start (nothing adopted: a reboot, or pins detached) announces
/// only once its rings are the ones the other hosts build: once every
/// checked backend has a verdict, or, for backends that have none after
/// [`settle_bound`], once those are counted down (they join at their first
/// passing check, as the other hosts' do). A restart that adopts the
/// dataplane is settled at once: its rings are what was announced.
#[derive(Debug)]
pub struct Settle {
    since: Instant,
    done: bool,
}

impl Settle {
    pub fn new(adopted: bool) -> Self {
        Self {
            since: Instant::now(),
            done: adopted,
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }
}

/// How long a fresh start waits for first verdicts: two intervals (the
/// first check runs within one) and a timeout, of the slowest VIP.
pub fn settle_bound(config: &crate::config::Config) -> Duration {
    config
        .vips
        .iter()
        .filter(|v| v.health.kind != crate::config::CheckKind::None)
        .map(|v| Duration::from_millis(2 * v.health.interval_ms + v.health.timeout_ms))
        .max()
        .unwrap_or_default()
}

/// Take the lock on announcing at `target`, or say who holds it.
pub fn lock_target(target: Target) -> anyhow::Result<crate::lock::Lock> {
    crate::lock::acquire(
        &crate::lock::announce_lock(target.table, target.protocol)?,
        &format!("announcement {target} (give each daemon a table or protocol of its own)"),
    )
}

impl Controller {
    /// Whether `vip` has a usable backend in the dataplane (up, weight
    /// above 0).
    fn has_usable_backend(&self, vip: &crate::config::Vip) -> bool {
        let Some(&vip_id) = self.vip_ids.get(&vip_key(vip)) else {
            return false;
        };
        vip.backends.iter().any(|b| {
            b.weight > 0
                && self
                    .backend_ids
                    .get(&(vip_id, b.address))
                    .and_then(|id| self.dp.backend(*id).ok())
                    .is_some_and(|e| e.state == backend_state::UP)
        })
    }

    /// Addresses with at least one usable backend behind some VIP.
    fn serviceable(&self) -> BTreeSet<IpAddr> {
        self.config
            .vips
            .iter()
            .filter(|v| self.has_usable_backend(v))
            .map(|v| v.address)
            .collect()
    }

    /// The service manager's status line (`systemctl status`): "forwarding"
    /// only while the program's frames get out and every VIP has a usable
    /// backend; otherwise what is wrong, naming the VIPs.
    pub fn service_status(&self) -> String {
        if let Some(why) = self.transmit_problem() {
            return format!("NOT forwarding: {why}");
        }
        let vips = &self.config.vips;
        if vips.is_empty() {
            return "running, no VIP configured".into();
        }
        let without: Vec<&str> = vips
            .iter()
            .filter(|v| !self.has_usable_backend(v))
            .map(|v| v.name.as_str())
            .collect();
        match without.len() {
            0 => "forwarding".into(),
            n if n == vips.len() => format!(
                "NOT forwarding: no VIP has a usable backend ({})",
                without.join(", ")
            ),
            _ => format!(
                "degraded: no usable backend for VIP {} (its packets are dropped); the other VIPs forward",
                without.join(", ")
            ),
        }
    }

    /// How much longer announcements are held down after the last
    /// dataplane loss, if they are.
    fn held_down(&self, now: Instant) -> Option<Duration> {
        let hold_down = Duration::from_millis(self.config.announce.hold_down_ms);
        let until = self.self_check.last_loss? + hold_down;
        (now < until).then(|| until - now)
    }

    /// Why a fresh start may not announce yet, if it may not: backends
    /// still without a first verdict within the bound. Past the bound they
    /// are counted down, and it may.
    fn settling(&mut self, now: Instant) -> Option<String> {
        if self.settle.done {
            return None;
        }
        let pending: Vec<crate::health::CheckKey> = self
            .health
            .iter()
            // The fleet's verdict is a verdict: a fresh fleet member
            // adopts it at once.
            .filter(|(k, h)| !h.verdict_known && !self.fleet().is_some_and(|f| f.peers_judge(k)))
            .map(|(k, _)| k.clone())
            .collect();
        let bound = settle_bound(&self.config);
        let waited = now.duration_since(self.settle.since);
        if pending.is_empty() {
            self.settle.done = true;
            info!(
                waited_ms = waited.as_millis() as u64,
                "every backend has a first verdict after {} ms: the rings are the other hosts'",
                waited.as_millis()
            );
            return None;
        }
        if waited < bound {
            return Some(format!(
                "a fresh start waits for the first check of {} backends ({} ms at most)",
                pending.len(),
                (bound - waited).as_millis()
            ));
        }
        self.settle.done = true;
        let mut changed = false;
        for key in &pending {
            let Some(vip) = self.config.vip(&key.vip) else {
                continue;
            };
            let (rise, fall) = (vip.health.rise, vip.health.fall);
            if let Some(h) = self.health.get_mut(key) {
                changed |= h.tracker.state != crate::health::Health::Down;
                h.tracker = crate::health::Tracker::new(crate::health::Health::Down, rise, fall);
                h.awaiting_first_check = true;
            }
            warn!(
                vip = %key.vip,
                backend = %key.backend,
                bound_ms = bound.as_millis() as u64,
                "backend {} of VIP {} has no verdict {} ms after a fresh start: counted down until its first check passes",
                key.backend,
                key.vip,
                bound.as_millis()
            );
        }
        if changed {
            self.reconcile_logged();
        }
        None
    }

    /// What may be announced now, and why the rest is not.
    fn wanted_announcements(&mut self, now: Instant) -> (BTreeSet<IpAddr>, Option<String>) {
        if !self.self_check.problems.is_empty() {
            return (BTreeSet::new(), Some("the dataplane is lost".into()));
        }
        if let Some(why) = self.transmit_problem() {
            return (
                BTreeSet::new(),
                Some(format!("the transmit path drops every frame: {why}")),
            );
        }
        if let Some(e) = &self.last_error {
            return (
                BTreeSet::new(),
                Some(format!("the dataplane is out of sync: {e}")),
            );
        }
        if let Some(left) = self.held_down(now) {
            return (
                BTreeSet::new(),
                Some(format!(
                    "held down for {} ms after a dataplane loss",
                    left.as_millis()
                )),
            );
        }
        if self.announcer.withdrawn {
            return (
                BTreeSet::new(),
                Some("withdrawn by the operator (`xdplb announce restore` ends it)".into()),
            );
        }
        if let Some(why) = self.settling(now) {
            return (BTreeSet::new(), Some(why));
        }
        let want = self.serviceable();
        let configured: BTreeSet<IpAddr> = self.config.vips.iter().map(|v| v.address).collect();
        let missing: Vec<String> = configured
            .difference(&want)
            .map(ToString::to_string)
            .collect();
        let reason =
            (!missing.is_empty()).then(|| format!("no usable backend for {}", missing.join(", ")));
        (want, reason)
    }

    /// Bring the kernel's announcement routes to what may be announced now.
    /// Failures are logged and retried at the next call.
    pub fn announce(&mut self) {
        let settings = &self.config.announce;
        let target = settings.enabled.then(|| Target::from(settings));
        if self.announcer.target != target {
            // Another daemon announcing there would withdraw our routes
            // and we theirs: take the new place before leaving the old.
            let lock = match target.map(lock_target).transpose() {
                Ok(lock) => lock,
                Err(e) => {
                    let e = format!("{e:#}");
                    if self.announcer.last_error.as_ref() != Some(&e) {
                        tracing::error!(error = %e, "cannot announce ({e}); retrying");
                        self.announcer.last_error = Some(e);
                    }
                    return;
                }
            };
            if let Some(old) = self.announcer.target {
                match announce::withdraw_all(old, &mut self.announcer.owned) {
                    Ok(gone) => {
                        info!(%old, withdrawn = ?gone, "announcement settings changed; withdrew {gone:?} from the old table {old}")
                    }
                    Err(e) => {
                        warn!(%old, error = %format!("{e:#}"), "cannot withdraw from the old announcement table {old}: {e:#}")
                    }
                }
            }
            self.announcer.target = target;
            self.announcer.lock = lock;
            self.announcer.announced.clear();
        }
        let Some(target) = target else {
            return;
        };
        let (want, mut reason) = self.wanted_announcements(Instant::now());
        match announce::sync(target, &want, &mut self.announcer.owned) {
            Ok(done) => {
                for addr in &done.added {
                    info!(%addr, %target, "announcing {addr} in {target}");
                }
                for addr in &done.removed {
                    warn!(%addr, %target, reason = ?reason, "withdrawn {addr} from {target}: {}", reason.as_deref().unwrap_or("no VIP on it is usable"));
                }
                if done.conflicts != self.announcer.conflicts {
                    for (addr, what) in &done.conflicts {
                        tracing::error!(
                            %addr,
                            %target,
                            existing = %what,
                            "not announcing {addr}: {target} holds a {what} that xdplb did not add; it is left alone"
                        );
                    }
                    self.announcer.conflicts = done.conflicts;
                }
                self.announcer.changes += (done.added.len() + done.removed.len()) as u64;
                self.announcer.announced = want
                    .into_iter()
                    .filter(|a| !self.announcer.conflicts.contains_key(a))
                    .collect();
                self.announcer.last_error = None;
            }
            Err(e) => {
                let e = format!("{e:#}");
                if self.announcer.last_error.as_ref() != Some(&e) {
                    warn!(error = %e, "cannot update the announcement routes ({e}); retrying");
                    self.announcer.last_error = Some(e);
                }
            }
        }
        if !self.announcer.conflicts.is_empty() {
            let held: Vec<String> = self
                .announcer
                .conflicts
                .keys()
                .map(ToString::to_string)
                .collect();
            let why = format!("a route xdplb did not add holds {}", held.join(", "));
            reason = Some(match reason {
                Some(r) => format!("{r}; {why}"),
                None => why,
            });
        }
        if reason != self.announcer.reason {
            if let Some(r) = &reason {
                warn!(reason = %r, "not announcing every VIP address: {r}");
            }
            self.announcer.reason = reason;
        }
    }

    /// The operator's withdrawal (`true`) or its end; kept across restarts.
    pub fn set_withdrawn(&mut self, withdrawn: bool) -> anyhow::Result<()> {
        if !self.config.announce.enabled {
            anyhow::bail!("announcing is off in the config (set `[announce] enabled = true`)");
        }
        announce::set_withdrawn(&self.config.daemon.pin_dir, withdrawn)?;
        self.announcer.withdrawn = withdrawn;
        self.announce();
        match &self.announcer.last_error {
            Some(e) => anyhow::bail!("recorded, but the routes could not be updated yet: {e}"),
            None => Ok(()),
        }
    }

    /// Hold the announcement lock taken at start-up (see [`lock_target`]).
    pub fn hold_announce_lock(&mut self, lock: crate::lock::Lock) {
        self.announcer.target = self
            .config
            .announce
            .enabled
            .then(|| Target::from(&self.config.announce));
        self.announcer.lock = Some(lock);
    }

    pub fn announce_status(&self) -> AnnounceStatus {
        let a = &self.config.announce;
        let now = Instant::now();
        AnnounceStatus {
            enabled: a.enabled,
            table: a.table,
            protocol: a.protocol,
            withdrawn_by_operator: self.announcer.withdrawn,
            held_down_ms: self.held_down(now).map_or(0, |d| d.as_millis() as u64),
            announced: self.announcer.announced.iter().copied().collect(),
            reason: self.announcer.reason.clone(),
            last_error: self.announcer.last_error.clone(),
            changes: self.announcer.changes,
            conflicts: self.announcer.conflicts.clone(),
        }
    }
}
