//! What the controller knows of each backend's health, and the rules that
//! turn check results into it: rise/fall, a first check before a new
//! backend joins the ring, flap damping, and local errors that are never a
//! backend's fault.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Controller;
use crate::{
    config::{CheckKind, HealthCheck, InitState},
    health::{CheckKey, CheckResult, Health, Tracker},
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
    /// Not checked yet, and kept out of the ring until the first check
    /// passes (`init_state = "checked"`).
    pub awaiting_first_check: bool,
    /// A check has given this backend a verdict (passed or failed), or
    /// its health was adopted from the dataplane: what this host says of
    /// it is what the other hosts say.
    pub verdict_known: bool,
    /// When its recent state changes happened (flap damping).
    flips: VecDeque<Instant>,
    /// Held down by flap damping until then.
    pub damped_until: Option<Instant>,
    /// Checks in a row that could not run for a local reason, and the last
    /// such reason.
    local_in_a_row: u32,
    last_local_error: Option<String>,
    /// Checks of this backend that could not run for a local reason, by
    /// kind (`xdplb_health_check_errors_total{vip,backend,kind}`).
    pub local_errors: BTreeMap<&'static str, u64>,
}

/// Checks in a row that could not run for a local reason before the
/// backend is reported as not checked (status, metrics, `xdplb check`).
pub const BLOCKED_AFTER: u32 = 3;

impl BackendHealth {
    pub fn new(state: Health, rise: u32, fall: u32) -> Self {
        Self {
            tracker: Tracker::new(state, rise, fall),
            last_latency: None,
            last_error: None,
            checks_ok: 0,
            checks_failed: 0,
            transitions: 0,
            awaiting_first_check: false,
            verdict_known: false,
            flips: VecDeque::new(),
            damped_until: None,
            local_in_a_row: 0,
            last_local_error: None,
            // Every kind from 0: the series exist before the first error.
            local_errors: crate::health::LOCAL_ERROR_KINDS
                .iter()
                .map(|k| (*k, 0))
                .collect(),
        }
    }

    /// Why the backend's checks have not run for [`BLOCKED_AFTER`] checks
    /// or more: its health is not known, whatever it was.
    pub fn checks_blocked(&self) -> Option<&str> {
        (self.local_in_a_row >= BLOCKED_AFTER)
            .then_some(self.last_local_error.as_deref())
            .flatten()
    }

    /// The health the dataplane follows: down while damped.
    pub fn effective(&self, now: Instant) -> Health {
        if self.damped_until.is_some_and(|t| t > now) {
            Health::Down
        } else {
            self.tracker.state
        }
    }

    pub fn damped(&self, now: Instant) -> bool {
        self.damped_until.is_some_and(|t| t > now)
    }

    /// Note a state change; true if it starts (or extends) damping.
    fn flip(&mut self, now: Instant, h: &HealthCheck) -> bool {
        if h.flap_limit == 0 {
            return false;
        }
        let window = Duration::from_millis(h.flap_window_ms);
        self.flips.push_back(now);
        while self
            .flips
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.flips.pop_front();
        }
        if self.flips.len() > h.flap_limit as usize {
            self.damped_until = Some(now + Duration::from_millis(h.flap_hold_ms));
            return true;
        }
        false
    }
}

impl Controller {
    /// Record a check result. Returns whether the backend's effective
    /// health changed (the rings must follow).
    pub fn record_check(&mut self, result: CheckResult) -> bool {
        let now = Instant::now();
        let Some(vip) = self.config.vip(&result.key.vip) else {
            return false;
        };
        let settling = !self.settle.done();
        let Some(h) = self.health.get_mut(&result.key) else {
            return false;
        };
        if let Err(e) = &result.result {
            if let Some(kind) = e.local {
                // The host could not make the check: say so, count it, and
                // leave the backend's health as it was.
                h.local_in_a_row += 1;
                h.last_local_error = Some(e.reason.clone());
                *h.local_errors.entry(kind).or_insert(0) += 1;
                if h.local_in_a_row == BLOCKED_AFTER {
                    warn!(
                        vip = %result.key.vip,
                        backend = %result.key.backend,
                        checks = BLOCKED_AFTER,
                        error = %e,
                        "health of backend {} of VIP {} unknown: its last {BLOCKED_AFTER} checks could not run here ({e})",
                        result.key.backend,
                        result.key.vip
                    );
                }
                let n = self.local_errors.entry(kind).or_insert(0);
                *n += 1;
                if n.is_power_of_two() {
                    warn!(
                        vip = %result.key.vip,
                        backend = %result.key.backend,
                        kind,
                        count = *n,
                        error = %e,
                        "health check of backend {} of VIP {} could not run for a local reason ({kind}, {n} times so far: {e}); not counted against the backend",
                        result.key.backend,
                        result.key.vip
                    );
                }
                return false;
            }
        }
        h.local_in_a_row = 0;
        // A fresh start's last missing verdict lets it announce: say so
        // at once rather than at the next tick.
        let first_while_settling = settling && !h.verdict_known;
        h.verdict_known = true;
        let ok = result.result.is_ok();
        match &result.result {
            Ok(latency) => {
                h.checks_ok += 1;
                h.last_latency = Some(*latency);
            }
            Err(e) => {
                // A failed check has no latency to show.
                h.checks_failed += 1;
                h.last_error = Some(e.reason.clone());
                h.last_latency = None;
            }
        }
        let before = h.effective(now);
        let transition = if h.awaiting_first_check {
            h.awaiting_first_check = false;
            if ok {
                let (rise, fall) = (vip.health.rise, vip.health.fall);
                h.tracker = Tracker::new(Health::Up, rise, fall);
                Some((Health::Down, Health::Up))
            } else {
                None
            }
        } else {
            h.tracker.record(ok).map(|t| (t.from, t.to))
        };
        let Some((from, to)) = transition else {
            return first_while_settling;
        };
        h.transitions += 1;
        let damped = h.flip(now, &vip.health);
        let why = match &result.result {
            Ok(l) => format!("check passed in {l:?}"),
            Err(e) => e.reason.clone(),
        };
        info!(
            vip = %result.key.vip,
            endpoint = %vip.endpoint(),
            backend = %result.key.backend,
            from = %from,
            to = %to,
            reason = %why,
            "backend {} of VIP {} ({}) is {to}, was {from}: {why}",
            result.key.backend,
            result.key.vip,
            vip.endpoint()
        );
        if damped {
            warn!(
                vip = %result.key.vip,
                backend = %result.key.backend,
                changes = vip.health.flap_limit + 1,
                window_ms = vip.health.flap_window_ms,
                hold_ms = vip.health.flap_hold_ms,
                "backend {} of VIP {} is flapping ({} changes within {} ms): held down for {} ms by flap damping",
                result.key.backend,
                result.key.vip,
                vip.health.flap_limit + 1,
                vip.health.flap_window_ms,
                vip.health.flap_hold_ms
            );
        }
        h.effective(now) != before || first_while_settling
    }

    /// Record a check result and, if it changed a backend's health,
    /// reconcile at once (tests; the daemon coalesces with `record_check`).
    pub fn on_check(&mut self, result: CheckResult) {
        if self.record_check(result) {
            self.reconcile_logged();
        }
    }

    /// Backends whose flap damping ran out since the last call; true if
    /// any did (the rings must follow).
    pub fn expire_damping(&mut self) -> bool {
        let now = Instant::now();
        let mut any = false;
        for (key, h) in &mut self.health {
            if h.damped_until.is_some_and(|t| t <= now) {
                h.damped_until = None;
                any |= h.tracker.state == Health::Up;
                info!(vip = %key.vip, backend = %key.backend, "flap damping of backend {} of VIP {} ended", key.backend, key.vip);
            }
        }
        any
    }

    /// Health entries follow the config: a backend of a VIP with checks
    /// has one (new ones wait for their first check where asked, whatever
    /// their configured state, so a backend set up later joins by what its
    /// checks say); backends removed, or of VIPs without checks, have none
    /// (no check can say they are down).
    pub(super) fn sync_health(&mut self) {
        let mut wanted = BTreeSet::new();
        for vip in &self.config.vips {
            if vip.health.kind == CheckKind::None {
                continue;
            }
            for b in &vip.backends {
                let key = CheckKey {
                    vip: vip.name.clone(),
                    backend: b.address,
                };
                let checked_first = vip.health.init_state == InitState::Checked;
                let initial = if checked_first {
                    Health::Down
                } else {
                    Health::Up
                };
                self.health
                    .entry(key.clone())
                    .or_insert_with(|| {
                        let mut h = BackendHealth::new(initial, vip.health.rise, vip.health.fall);
                        h.awaiting_first_check = checked_first;
                        h
                    })
                    .tracker
                    .retune(vip.health.rise, vip.health.fall);
                wanted.insert(key);
            }
        }
        self.health.retain(|k, _| wanted.contains(k));
    }
}
