//! The generation of the program's per-CPU flow cache (`FLOW_CACHE_GEN`):
//! the program uses a cached flow only while the generation it was cached
//! under is current, so every write to VIPS, BACKENDS or FLOWS bumps it,
//! after the write. Pinned, so a restarting daemon's writes also retire the
//! entries of the program still running until its link is updated.

use anyhow::{Context as _, Result};
use aya::maps::Array;
use xdp_common::map_names as names;

use super::Dataplane;

impl Dataplane {
    /// Retire every cached flow (0 is skipped: it turns the cache off).
    pub(super) fn flow_cache_invalidate(&mut self) -> Result<()> {
        let mut generation: Array<_, u32> = Array::try_from(self.map_mut(names::FLOW_CACHE_GEN)?)?;
        let now = generation.get(&0, 0).context("reading FLOW_CACHE_GEN")?;
        let next = now.wrapping_add(1).max(1);
        generation.set(0, next, 0).context("writing FLOW_CACHE_GEN")
    }
}
