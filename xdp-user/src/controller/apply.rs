//! Applying a [`Plan`] to the dataplane in an order that never lets a packet
//! see a half-applied change:
//! 1. VIPs that go away are removed, VIPs that lose backends get a ring
//!    without them, and the freed backend entries are cleared;
//! 2. backends that become usable get their entry (state UP);
//! 3. new and changed VIP entries, then the final rings (each flip atomic);
//! 4. backends that go down or drain change state once no ring names them.
//!
//! A write that fails does not stop the others (a failed VIP never keeps a
//! dead backend in another VIP's ring); every failure is reported.

use std::collections::{BTreeSet, HashMap};

use anyhow::{anyhow, Context as _, Result};
use xdp_common::{backend_state, VIP_F_TRACK_ALL};

use super::plan::Plan;
use crate::dataplane::Dataplane;

/// What the controller last wrote, so a reconcile writes only differences.
/// Cleared after a failure: the next reconcile compares against the maps.
#[derive(Debug, Default)]
pub struct Written {
    pub rings: HashMap<u32, Vec<u32>>,
    pub config: Option<xdp_common::Config>,
    /// The program chained after the balancer (`chain.pass_to`), once
    /// written.
    pub pass_to: Option<Option<std::path::PathBuf>>,
    /// Counters of the backend entries the last apply removed, with their
    /// VIP's id: the controller adds them to the VIP's retired totals.
    pub retired: Vec<(u32, xdp_common::Counters)>,
}

impl Written {
    pub fn forget(&mut self) {
        self.rings.clear();
        self.config = None;
        self.pass_to = None;
    }
}

/// Collects failures while the remaining steps go on.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn note<T>(&mut self, r: Result<T>) -> Option<T> {
        r.map_err(|e| self.0.push(format!("{e:#}"))).ok()
    }
}

/// Write a VIP's ring. A slot given away by a backend that stays in the
/// VIP under `plan` (in any state: a backend down now may come back before
/// its silent flows are placed again) is marked.
fn write_ring(
    dp: &mut Dataplane,
    written: &mut Written,
    plan: &Plan,
    key: &xdp_common::VipKey,
    id: u32,
    ring: &[u32],
) -> Result<()> {
    if written.rings.get(&id).map(Vec::as_slice) == Some(ring) {
        return Ok(());
    }
    let stays = |backend: u32| {
        plan.entries
            .get(&backend)
            .is_some_and(|b| b.state != backend_state::UNUSED)
    };
    dp.write_ring_keeping(key, ring, &stays)
        .with_context(|| format!("writing the ring of VIP id {id}"))?;
    written.rings.insert(id, ring.to_vec());
    Ok(())
}

/// Bring `dp` to `plan` (and the runtime policy `config`).
pub fn apply(
    dp: &mut Dataplane,
    plan: &Plan,
    config: &xdp_common::Config,
    pass_to: &Option<std::path::PathBuf>,
    written: &mut Written,
) -> Result<()> {
    let mut failed = Failures::default();
    if written.config.as_ref() != Some(config) && failed.note(dp.set_config(config)).is_some() {
        written.config = Some(*config);
    }
    if written.pass_to.as_ref() != Some(pass_to)
        && failed.note(dp.set_pass_to(pass_to.as_deref())).is_some()
    {
        written.pass_to = Some(pass_to.clone());
    }

    // 1. Removals: server ids first, so none names a backend id freed
    // here and given to another backend.
    let quic_servers = plan.quic_servers();
    failed.note(dp.sync_quic_servers(&quic_servers, true));
    // Source routes before the subsets they lead to go.
    failed.note(dp.sync_source_routes(&plan.source_routes, true));
    for (key, id) in &plan.stale_vips {
        written.rings.remove(id);
        if let Some(Some(_)) = failed.note(dp.vip(key)) {
            failed.note(
                dp.remove_vip(key)
                    .with_context(|| format!("removing VIP id {id}")),
            );
        }
    }
    for vip in &plan.vips {
        let Some(interim) = &vip.interim_ring else {
            continue;
        };
        if let Some(Some(meta)) = failed.note(dp.vip(&vip.key)) {
            if meta.vip_id == vip.id {
                failed.note(write_ring(dp, written, plan, &vip.key, vip.id, interim));
            }
        }
    }
    for &id in &plan.stale_backends {
        let in_use = failed
            .note(dp.backend(id))
            .filter(|b| b.state != backend_state::UNUSED);
        if let Some(entry) = in_use {
            let counters = failed.note(dp.backend_stats(id));
            if failed.note(dp.remove_backend(id)).is_some() {
                if let Some(c) = counters {
                    written.retired.push((entry.vip_id, c));
                }
            }
        }
    }

    // 2. Backends that become usable.
    let mut broken: BTreeSet<u32> = BTreeSet::new();
    let mut going_down = Vec::new();
    for (&id, entry) in &plan.entries {
        let Some(current) = failed.note(dp.backend(id)) else {
            broken.insert(id);
            continue;
        };
        // The plan leaves generations to the dataplane.
        if current.state != backend_state::UNUSED
            && current
                == (xdp_common::Backend {
                    generation: current.generation,
                    ..*entry
                })
        {
            continue;
        }
        if entry.state == backend_state::UP {
            if failed.note(dp.set_backend(id, entry)).is_none() {
                broken.insert(id);
            }
        } else {
            going_down.push((id, *entry));
        }
    }

    // 3. VIP entries and final rings; a VIP whose new backend could not be
    // written keeps its current ring rather than point at it.
    for vip in &plan.vips {
        let meta = failed.note(dp.vip(&vip.key));
        let current = match meta {
            Some(m) => m,
            None => continue,
        };
        // A VIP that tracked every flow keeps doing so: its entries are the
        // last placement of flows that went to a VIP gone since.
        let flags = vip.flags
            | current
                .filter(|m| m.vip_id == vip.id)
                .map_or(0, |m| m.flags & VIP_F_TRACK_ALL);
        let same =
            current.is_some_and(|m| m.vip_id == vip.id && m.flags == flags && m.mode == vip.mode);
        if !same {
            if failed
                .note(dp.add_vip(&vip.key, vip.id, flags, vip.mode))
                .is_none()
            {
                continue;
            }
            written.rings.remove(&vip.id);
        }
        if let Some(bad) = vip.ring.iter().find(|id| broken.contains(id)) {
            failed.0.push(format!(
                "VIP id {} keeps its ring: backend {bad}'s entry could not be written",
                vip.id
            ));
            continue;
        }
        failed.note(write_ring(dp, written, plan, &vip.key, vip.id, &vip.ring));
    }

    // 4. Backends that leave the rings.
    for (id, entry) in going_down {
        failed.note(dp.set_backend(id, &entry));
    }

    // 5. Server ids of QUIC VIPs' backends, once those exist; source
    // routes, once their subsets do.
    failed.note(dp.sync_quic_servers(&quic_servers, false));
    failed.note(dp.sync_source_routes(&plan.source_routes, false));

    if failed.0.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(failed.0.join("; ")))
    }
}
