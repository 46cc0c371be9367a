//! The daemon's link to the fleet's store, on a task of its own: keeps a
//! session (lease, watch), hands the controller every revision of the
//! prefix whole, publishes this host's verdicts under its lease, and
//! reconnects when the store is lost, catching up by reading the prefix
//! again. It never blocks the controller: the daemon only sends it
//! verdicts and receives events.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    keys::{self, Entry, Verdicts},
    store,
};
use crate::config::Fleet;

/// What the agent tells the controller.
#[derive(Debug)]
pub enum Event {
    /// Every key under the prefix at a revision of the store.
    Snapshot { revision: i64, entries: Vec<Entry> },
    /// The store is lost (why); the last snapshot stands.
    Lost(String),
}

/// The daemon's end of the agent.
pub struct Agent {
    /// This host's verdicts to publish (the agent publishes the latest).
    pub verdicts: watch::Sender<Verdicts>,
    /// A client while the session is up (writes of operators' changes).
    pub client: watch::Receiver<Option<Client>>,
    pub events: mpsc::Receiver<Event>,
}

/// Start the agent on the current runtime. `lease_file` keeps this
/// instance's lease id, so a restart knows its own verdicts from another
/// host's that uses the same name.
pub fn spawn(fleet: Fleet, lease_file: std::path::PathBuf) -> Agent {
    let (verdicts_tx, verdicts_rx) = watch::channel(Verdicts::new());
    let (client_tx, client_rx) = watch::channel(None);
    let (events_tx, events_rx) = mpsc::channel(64);
    tokio::spawn(run(fleet, lease_file, verdicts_rx, client_tx, events_tx));
    Agent {
        verdicts: verdicts_tx,
        client: client_rx,
        events: events_rx,
    }
}

async fn run(
    fleet: Fleet,
    lease_file: std::path::PathBuf,
    mut verdicts: watch::Receiver<Verdicts>,
    client: watch::Sender<Option<Client>>,
    events: mpsc::Sender<Event>,
) {
    let mut lost_logged = false;
    loop {
        let result = session(
            &fleet,
            &lease_file,
            &mut verdicts,
            &client,
            &events,
            &mut lost_logged,
        )
        .await;
        client.send_replace(None);
        if events.is_closed() {
            return;
        }
        let why = match result {
            Ok(()) => "the session ended".to_owned(),
            // What failed and the innermost cause: gRPC's chain between
            // them says little to an operator.
            Err(e) => match e.chain().last() {
                Some(root) if e.chain().count() > 1 => format!("{e}: {root}"),
                _ => format!("{e}"),
            },
        };
        if !lost_logged {
            warn!(error = %why, "fleet store lost ({why}): forwarding goes on with the last applied state");
            lost_logged = true;
        }
        if events.send(Event::Lost(why)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(fleet.timeout_ms.min(500))).await;
    }
}

/// One session with the store, until it fails.
async fn session(
    fleet: &Fleet,
    lease_file: &std::path::Path,
    verdicts: &mut watch::Receiver<Verdicts>,
    client_out: &watch::Sender<Option<Client>>,
    events: &mpsc::Sender<Event>,
    lost_logged: &mut bool,
) -> Result<()> {
    let prefix = &fleet.prefix;
    let host_key = keys::health_key(prefix, &fleet.host_name());
    let timeout = Duration::from_millis(fleet.timeout_ms);
    let mut client = store::connect(fleet).await?;
    let lease = client
        .lease_grant(i64::from(fleet.lease_ttl_s), None)
        .await
        .context("granting this host's lease")?
        .id();
    if let Err(e) = claim_host_name(&mut client, fleet, &host_key, lease, lease_file).await {
        let _ = client.lease_revoke(lease).await;
        return Err(e);
    }
    let (mut keeper, mut kept) = client
        .lease_keep_alive(lease)
        .await
        .context("keeping this host's lease alive")?;
    let (revision, entries) = store::read_all(&mut client, prefix).await?;
    let mut state: BTreeMap<String, Entry> =
        entries.into_iter().map(|e| (e.key.clone(), e)).collect();
    let mut stream = client
        .watch(
            format!("{prefix}/"),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .context("watching the fleet's prefix")?;
    let publish = |client: &mut Client, v: &Verdicts| {
        let mut client = client.clone();
        let value = keys::verdicts_value(v);
        let key = host_key.clone();
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
                .context("publishing this host's verdicts")
        }
    };
    let mine = verdicts.borrow_and_update().clone();
    publish(&mut client, &mine).await?;
    info!(
        endpoints = %fleet.endpoints.join(","),
        prefix = %prefix,
        revision,
        lease,
        "fleet store {} at revision {revision} ({}, prefix {prefix}, lease {lease:x})",
        if *lost_logged { "back, catching up" } else { "connected" },
        fleet.endpoints.join(",")
    );
    *lost_logged = false;
    client_out.send_replace(Some(client.clone()));
    send_snapshot(events, revision, &state).await?;

    let mut keepalive = tokio::time::interval(
        Duration::from_millis(u64::from(fleet.lease_ttl_s) * 1000 / 3)
            .max(Duration::from_millis(300)),
    );
    let mut last_kept = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(response) = message.context("the watch failed")? else {
                    bail!("the store closed the watch");
                };
                if response.canceled() {
                    bail!("the store cancelled the watch: {}", response.cancel_reason());
                }
                let Some(revision) = response.header().map(|h| h.revision()) else {
                    continue;
                };
                if response.events().is_empty() {
                    continue;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let e = store::entry(kv);
                    match event.event_type() {
                        EventType::Put => {
                            state.insert(e.key.clone(), e);
                        }
                        EventType::Delete => {
                            state.remove(&e.key);
                        }
                    }
                }
                send_snapshot(events, revision, &state).await?;
            }
            changed = verdicts.changed() => {
                if changed.is_err() {
                    // The daemon is gone.
                    return Ok(());
                }
                let mine = verdicts.borrow_and_update().clone();
                tokio::time::timeout(timeout, publish(&mut client, &mine))
                    .await
                    .map_err(|_| anyhow!("publishing verdicts timed out after {timeout:?}"))??;
            }
            _ = keepalive.tick() => {
                if last_kept.elapsed() > Duration::from_secs(u64::from(fleet.lease_ttl_s)) {
                    bail!("this host's lease was not renewed within its TTL ({} s)", fleet.lease_ttl_s);
                }
                keeper.keep_alive().await.context("renewing this host's lease")?;
            }
            reply = kept.message() => {
                match reply.context("renewing this host's lease")? {
                    Some(r) if r.ttl() > 0 => last_kept = tokio::time::Instant::now(),
                    Some(_) => bail!("this host's lease expired"),
                    None => bail!("the store closed the lease's keep-alive stream"),
                }
            }
        }
    }
}

/// Refuse to publish under a name another live host publishes under (two
/// hosts with one `host` would overwrite each other's verdicts); remember
/// `lease` as this instance's.
async fn claim_host_name(
    client: &mut Client,
    fleet: &Fleet,
    host_key: &str,
    lease: i64,
    lease_file: &std::path::Path,
) -> Result<()> {
    let ours = std::fs::read_to_string(lease_file)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let held = client
        .get(host_key, None)
        .await
        .context("reading this host's verdicts key")?
        .kvs()
        .first()
        .map(|kv| kv.lease())
        .filter(|l| *l != 0 && Some(*l) != ours);
    if let Some(other) = held {
        let alive = client
            .lease_time_to_live(other, None)
            .await
            .map(|r| r.ttl() > 0)
            .unwrap_or(false);
        if alive {
            bail!(
                "another live host publishes verdicts as {:?} ({host_key}, lease {other:x}); \
                 give each host its own fleet.host",
                fleet.host_name()
            );
        }
    }
    if let Err(e) = crate::lock::write_state(lease_file, lease.to_string().as_bytes()) {
        warn!(error = %format!("{e:#}"), "cannot keep this host's lease id: {e:#}");
    }
    Ok(())
}

async fn send_snapshot(
    events: &mpsc::Sender<Event>,
    revision: i64,
    state: &BTreeMap<String, Entry>,
) -> Result<()> {
    events
        .send(Event::Snapshot {
            revision,
            entries: state.values().cloned().collect(),
        })
        .await
        .map_err(|_| anyhow!("the daemon is gone"))
}
