//! The daemon's side of a fleet: the state carried over a restart, the
//! agent's events, this host's verdicts, and operators' changes written to
//! the store and answered once this host runs them.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    api::{Request, Response},
    controller::{Controller, FleetTaken},
    fleet::{store, Agent, Desired, Event},
};

use super::audit::{self, Asker};

/// How long a change written to the store waits for this host to run it
/// before its answer says it does not yet.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// The desired state this instance applied before a restart, if it kept
/// one that still fits its config.
pub fn carried_state(config: &crate::config::Config) -> Option<Desired> {
    let saved = crate::controller::load_saved_fleet_state(&config.daemon.pin_dir)?;
    let mut running = config.clone();
    running.vips = saved.vip.clone();
    if let Err(e) = running.validate() {
        warn!(error = %e, "the fleet state kept from the last run no longer fits the config ({e}); waiting for the store");
        return None;
    }
    info!(
        revision = saved.revision,
        vips = saved.vip.len(),
        "running the fleet state kept from the last run (revision {}, {} VIPs) until the store answers",
        saved.revision,
        saved.vip.len()
    );
    Some(Desired {
        revision: saved.revision,
        vips: saved.vip,
        mod_revisions: Default::default(),
    })
}

/// Hand the controller what the agent reports; what it changed.
pub fn on_event(ctl: &mut Controller, event: Event) -> FleetTaken {
    match event {
        Event::Snapshot { revision, entries } => ctl.fleet_snapshot(revision, &entries),
        Event::Lost(why) => {
            ctl.fleet_lost(why);
            FleetTaken::default()
        }
    }
}

/// Give the agent this host's verdicts; it publishes them when they
/// changed.
pub fn publish_verdicts(ctl: &Controller, agent: Option<&Agent>) {
    if let Some(agent) = agent {
        let mine = ctl.own_verdicts();
        agent.verdicts.send_if_modified(|v| {
            let changed = *v != mine;
            *v = mine;
            changed
        });
    }
}

/// A change written to the store at a revision, waiting for this host to
/// run it.
pub struct Written {
    revision: i64,
    reply: oneshot::Sender<Response>,
    since: Instant,
}

/// Changes written, not answered yet.
#[derive(Default)]
pub struct Awaiting(Vec<Written>);

impl Awaiting {
    pub fn push(&mut self, w: Written) {
        self.0.push(w);
    }

    /// Answer the changes this host runs now (and, with `late`, those
    /// waited for too long, saying so).
    pub fn answer(&mut self, ctl: &Controller, late: bool) {
        let Some(fleet) = ctl.fleet() else { return };
        let running = fleet.desired.revision;
        let refused = fleet.refused();
        let mut kept = Vec::new();
        for w in self.0.drain(..) {
            let note = if running >= w.revision {
                None
            } else if refused.is_some() || (late && w.since.elapsed() > APPLY_WAIT) {
                Some(format!(
                    "written, but this host does not run it yet: {}",
                    refused.map_or_else(|| format!("it runs revision {running}"), str::to_owned)
                ))
            } else {
                kept.push(w);
                continue;
            };
            let mut data = serde_json::json!({ "revision": w.revision });
            if let Some(note) = note {
                data["note"] = note.into();
            }
            let _ = w.reply.send(Response::ok(Some(data)));
        }
        self.0 = kept;
    }
}

/// An operator's change on a fleet member: checked against the running
/// state here, then written to the store with a compare-and-swap on the
/// revision this host runs, on a task of its own (the controller goes on).
/// Every member, this one included, applies it from the store; the answer
/// waits until this one does (`written`).
pub fn change(
    ctl: &Controller,
    agent: Option<&Agent>,
    request: &Request,
    asker: Asker,
    reply: oneshot::Sender<Response>,
    written: mpsc::Sender<Written>,
) {
    let what = audit::describe(request).unwrap_or_default();
    let refuse = |reply: oneshot::Sender<Response>, why: String| {
        let response = Response::error(why);
        audit::log(asker, &what, &response, None);
        let _ = reply.send(response);
    };
    let planned = request
        .change()
        .ok_or_else(|| anyhow::anyhow!("not a change"))
        .and_then(|change| ctl.fleet_change(&change));
    let (base, vips) = match planned {
        Ok(p) => p,
        Err(e) => return refuse(reply, format!("{e:#}")),
    };
    let client = agent.and_then(|a| a.client.borrow().clone());
    let Some(mut client) = client else {
        return refuse(
            reply,
            "the fleet's store (etcd) is not connected; changes are refused until it is back"
                .into(),
        );
    };
    let prefix = ctl
        .config()
        .fleet
        .as_ref()
        .map(|f| f.prefix.clone())
        .unwrap_or_default();
    tokio::spawn(async move {
        let result = store::write_vips(&mut client, &prefix, &base, &vips).await;
        let outcome = match &result {
            Ok(Some(revision)) => format!("written to the fleet's store at revision {revision}"),
            Ok(None) => "the fleet's store already holds it".into(),
            Err(_) => String::new(),
        };
        match result {
            Ok(Some(revision)) => {
                audit::log(asker, &what, &Response::ok(None), Some(&outcome));
                let w = Written {
                    revision,
                    reply,
                    since: Instant::now(),
                };
                if let Err(mpsc::error::SendError(w)) = written.send(w).await {
                    let _ = w.reply.send(Response::ok(None));
                }
            }
            Ok(None) => {
                audit::log(asker, &what, &Response::ok(None), Some(&outcome));
                let _ = reply.send(Response::ok(None));
            }
            Err(e) => {
                let response = Response::error(format!("{e:#}"));
                audit::log(asker, &what, &response, None);
                let _ = reply.send(response);
            }
        }
    });
}
