//! The dataplane self-check: at least once a second the daemon verifies
//! that its program is attached to its interface through its pinned link and
//! that the pins are the maps it uses; on loss it reports (log, metric,
//! `/healthz`, `xdplb check`), then repairs what it can.

use std::time::Duration;

use tracing::{error, info, warn};

use super::Controller;

/// How often the daemon runs the self-check (and retries a failed
/// reconcile).
pub const SELF_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The dataplane self-check's findings.
#[derive(Debug, Default)]
pub struct SelfCheck {
    /// What is wrong now; empty when the program is attached through our
    /// link and the pins are our maps.
    pub problems: Vec<String>,
    /// Times the check found the dataplane not as the daemon left it.
    pub losses: u64,
    /// Repairs that were carried out.
    pub repairs: u64,
    /// The last repair failure, logged once until it changes.
    pub(super) repair_error: Option<String>,
    /// When the check last found the dataplane not as the daemon left it
    /// (announcements are held down for a while after it).
    pub(super) last_loss: Option<std::time::Instant>,
    /// Why what the program sends is lost before it leaves this host, when
    /// this host can tell (`iface::tx_delivers`): the dataplane is not
    /// forwarding, whatever it is attached to.
    pub transmit: Option<String>,
}

impl Controller {
    /// Verify the dataplane is attached and pinned as the daemon left it;
    /// on loss report it, then repair what can be repaired.
    pub fn self_check(&mut self) {
        self.check_transmit();
        let problems = self.dp.problems();
        if problems.is_empty() {
            if !self.self_check.problems.is_empty() {
                info!("dataplane self-check passes again");
            }
            self.self_check.problems.clear();
            return;
        }
        self.self_check.last_loss = Some(std::time::Instant::now());
        if self.self_check.problems.is_empty() {
            self.self_check.losses += 1;
            error!(
                problems = ?problems,
                "dataplane self-check failed: the dataplane is not as the daemon left it ({}); repairing",
                problems.join("; ")
            );
        }
        self.self_check.problems = problems;
        let repaired = self.dp.repair();
        if repaired.is_ok() {
            self.self_check.repair_error = None;
        }
        match repaired {
            Ok(done) if !done.is_empty() => {
                self.self_check.repairs += 1;
                self.self_check.problems = self.dp.problems();
                warn!(
                    done = ?done,
                    remaining = ?self.self_check.problems,
                    "dataplane repaired ({}); conntrack and counters kept (the daemon held the maps){}",
                    done.join("; "),
                    if self.self_check.problems.is_empty() { String::new() } else { format!("; still wrong: {}", self.self_check.problems.join("; ")) }
                );
            }
            Ok(_) => {}
            Err(e) => {
                let e = format!("{e:#}");
                if self.self_check.repair_error.as_ref() != Some(&e) {
                    warn!(error = %e, "dataplane repair failed ({e}); retrying every {:?}", SELF_CHECK_INTERVAL);
                    self.self_check.repair_error = Some(e);
                }
            }
        }
    }

    /// Whether the interface delivers what the program sends; a change is
    /// logged once.
    fn check_transmit(&mut self) {
        let now = match crate::iface::by_name(&self.config.interface) {
            Ok(Some(i)) => crate::iface::tx_delivers(&i).err(),
            // A missing interface is the self-check's to report.
            _ => None,
        };
        if now != self.self_check.transmit {
            match &now {
                Some(why) => error!(reason = %why, "NOT forwarding: {why}"),
                None if self.self_check.transmit.is_some() => {
                    info!("the interface delivers what the program sends again")
                }
                None => {}
            }
            self.self_check.transmit = now;
        }
    }

    /// Why the program's frames are lost on this host, if they are.
    pub fn transmit_problem(&self) -> Option<&str> {
        self.self_check.transmit.as_deref()
    }

    /// Whether the dataplane forwards: attached as configured, in sync,
    /// and what it sends gets out.
    pub fn forwarding(&self) -> bool {
        self.self_check.problems.is_empty() && self.in_sync() && self.transmit_problem().is_none()
    }

    /// What the self-check found wrong now (empty: all is well).
    pub fn self_check_problems(&self) -> &[String] {
        &self.self_check.problems
    }

    pub fn self_check_counts(&self) -> (u64, u64) {
        (self.self_check.losses, self.self_check.repairs)
    }

    /// Conditions that may lose packets silently, beyond what
    /// [`Controller::transmit_problem`] reports.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(Some(i)) = crate::iface::by_name(&self.config.interface) {
            out.extend(crate::iface::peer_unseen_warning(&i));
        }
        out
    }
}
