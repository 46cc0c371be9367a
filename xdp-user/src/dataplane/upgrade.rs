//! Pinned maps a newer build reshaped, carried over on upgrade instead of
//! refused: CONFIG (its entry grew; the daemon rewrites it whole before
//! attaching) and STATS (more reasons; the counts of the reasons both
//! builds know are copied, so Prometheus counters never go back). The
//! running program keeps its own maps until the new one replaces it.
//! Every other map (VIPs, rings, backends, conntrack) must match exactly.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use xdp_common::{map_names as names, reason, Config};

use super::find_map_mut;

/// What was read from reshaped pins before they were removed.
#[derive(Default)]
pub(super) struct Carried {
    stats: Vec<PerCpuValues<u64>>,
}

/// Remove the pins of CONFIG and STATS under `dir` if this build shapes
/// them differently, keeping STATS's counts.
pub(super) fn before_load(dir: &Path) -> Result<Carried> {
    let mut carried = Carried::default();
    let config = dir.join(names::CONFIG);
    if let Ok(map) = MapData::from_pin(&config) {
        if map.info()?.value_size() as usize != std::mem::size_of::<Config>() {
            std::fs::remove_file(&config)
                .with_context(|| format!("replacing the older build's {}", config.display()))?;
        }
    }
    let stats = dir.join(names::STATS);
    if let Ok(map) = MapData::from_pin(&stats) {
        let entries = map.info()?.max_entries();
        if entries != reason::COUNT {
            let old: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
            for i in 0..entries.min(reason::COUNT) {
                carried
                    .stats
                    .push(old.get(&i, 0).context("reading the older build's STATS")?);
            }
            std::fs::remove_file(&stats)
                .with_context(|| format!("replacing the older build's {}", stats.display()))?;
        }
    }
    Ok(carried)
}

/// Write what [`before_load`] kept into the new maps.
pub(super) fn after_load(ebpf: &mut Ebpf, carried: Carried) -> Result<()> {
    if carried.stats.is_empty() {
        return Ok(());
    }
    let mut stats: PerCpuArray<_, u64> = PerCpuArray::try_from(find_map_mut(ebpf, names::STATS)?)?;
    for (i, values) in (0..).zip(carried.stats) {
        stats
            .set(i, values, 0)
            .context("carrying the older build's counters over")?;
    }
    Ok(())
}
