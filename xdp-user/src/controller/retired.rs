//! Counters of backends removed from a VIP. A removed backend's entry (and
//! its counters) is freed for reuse, so without these the backends' totals
//! would fall below their VIP's; Prometheus counters must never go back.
//! They are exported per VIP as the backend `removed`, and kept across
//! daemon restarts in a state file.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Result;
use tracing::warn;
use xdp_common::Counters;

use super::Traffic;

#[derive(Debug, Default)]
pub struct Retired {
    /// By VIP id.
    totals: BTreeMap<u32, Traffic>,
    /// Where they are kept (the daemon); None: in memory only (tests).
    path: Option<PathBuf>,
}

impl Retired {
    /// What an earlier run kept at `path`; nothing if it kept nothing.
    pub fn load(path: Option<PathBuf>) -> Self {
        let totals = path
            .as_ref()
            .and_then(|p| match std::fs::read(p) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| warn!(path = %p.display(), error = %e, "ignoring unreadable retired counters in {}: {e}", p.display()))
                    .ok(),
                Err(_) => None,
            })
            .unwrap_or_default();
        Self { totals, path }
    }

    /// Totals of VIP `vip_id`'s removed backends.
    pub fn of(&self, vip_id: u32) -> Traffic {
        self.totals.get(&vip_id).copied().unwrap_or_default()
    }

    /// Add removed backends' counters (by VIP id) and forget VIP ids no
    /// longer in `live` (a new VIP reusing one starts from zero, as its own
    /// counters do); written out if anything changed.
    pub fn update(&mut self, removed: Vec<(u32, Counters)>, live: &[u32]) {
        let before = self.totals.len();
        self.totals.retain(|id, _| live.contains(id));
        let changed = before != self.totals.len() || !removed.is_empty();
        for (vip_id, c) in removed {
            let t = self.totals.entry(vip_id).or_default();
            t.packets += c.packets;
            t.bytes += c.bytes;
            t.new_flows += c.new_flows;
        }
        if changed {
            if let Err(e) = self.save() {
                warn!(error = %format!("{e:#}"), "could not keep the removed backends' counters: {e:#}");
            }
        }
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        crate::lock::write_state(path, &serde_json::to_vec(&self.totals)?)
    }
}
