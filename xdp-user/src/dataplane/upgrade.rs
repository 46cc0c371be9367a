//! Pinned maps a newer build reshaped, carried over on upgrade instead of
//! refused: RINGS (entries widened to hold a changed slot's previous owner),
//! CONFIG (its entry grew; the daemon rewrites it whole before
//! attaching), STATS (more reasons; the counts of the reasons both builds
//! know are copied, so Prometheus counters never go back), BACKENDS of
//! builds before backend generations (copied with generation 0), and FLOWS
//! of builds that tracked every flow (the loader keeps, seen now, the
//! entries of flows the ring would now place on another backend, into a
//! table of the configured size, and marks their slots, so they keep it).
//! The running program keeps its own maps until the new one replaces it;
//! flows it opens between the copy and the swap are placed again by the
//! ring. Every other map (VIPs, rings) must match exactly.

use std::{os::fd::AsFd as _, path::Path};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use xdp_common::{map_names as names, reason, Backend, Config, FlowKey, FlowState};

use super::{find_map_mut, map_data, sys, update_batch, Sizes};

/// A BACKENDS value before generations: `Backend` without its last field.
const BACKEND_V1: usize = std::mem::size_of::<Backend>() - 4;
/// A FLOWS value before generations: backend id, hash.
const FLOW_STATE_V1: usize = 8;
/// A FLOWS value of builds that tracked every flow: backend id, hash,
/// generation.
const FLOW_STATE_V2: usize = 12;

/// An older FLOWS value as this build's: the flow seen `now`.
fn flow_state(old: &[u8], now: u32) -> FlowState {
    let word = |i: usize| {
        old.get(i * 4..i * 4 + 4)
            .map_or(0, |w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
    };
    FlowState {
        backend_id: word(0),
        generation: word(2),
        last_seen: now,
        vip_serial: 0,
    }
}

/// What was read from reshaped pins before they were removed.
#[derive(Default)]
pub(super) struct Carried {
    stats: Vec<PerCpuValues<u64>>,
    /// RINGS of builds with 4-byte entries (before the previous owner was
    /// kept in them).
    rings: Vec<u32>,
    backends: Vec<Backend>,
    flows: (Vec<FlowKey>, Vec<FlowState>),
}

/// A value of an older build's shape (this build's without its last
/// fields), widened with those fields zero.
fn widened<T: bytemuck::Pod>(old: &[u8]) -> T {
    let mut full = T::zeroed();
    bytemuck::bytes_of_mut(&mut full)[..old.len()].copy_from_slice(old);
    full
}

/// Remove the pin `path`, which an older build shaped differently.
fn replace(path: &Path) -> Result<()> {
    std::fs::remove_file(path)
        .with_context(|| format!("replacing the older build's {}", path.display()))
}

/// Remove the pins of maps under `dir` that this build shapes differently,
/// keeping what must survive (counters, backends, conntrack). Refused,
/// removing nothing, when the older maps' sizes are not `sizes`.
pub(super) fn before_load(dir: &Path, sizes: &Sizes) -> Result<Carried> {
    let mut carried = Carried::default();
    let pinned = |name: &str| MapData::from_pin(dir.join(name)).ok();
    let old_backends = pinned(names::BACKENDS).filter(|m| {
        m.info()
            .is_ok_and(|i| i.value_size() as usize == BACKEND_V1)
    });
    let old_flows = pinned(names::FLOWS).filter(|m| {
        m.info()
            .is_ok_and(|i| matches!(i.value_size() as usize, FLOW_STATE_V1 | FLOW_STATE_V2))
    });
    // Conntrack is carried into a new table of the configured size (only
    // the flows the ring would now place elsewhere need entries).
    for (map, name, want) in [(&old_backends, names::BACKENDS, sizes.max_backends)] {
        if let Some(m) = map {
            let have = m.info()?.max_entries();
            if have != want {
                bail!(
                    "the pinned dataplane's {name} holds {have} entries but the config asks for {want}: \
                     table sizes cannot change under a running dataplane; \
                     run `xdplb detach` (this drops conntrack) or restore the old sizes"
                );
            }
        }
    }

    if let Some(map) = pinned(names::RINGS) {
        let info = map.info()?;
        if info.value_size() == 4 {
            let want = sizes.ring_entries()?;
            if info.max_entries() != want {
                bail!(
                    "the pinned dataplane's {} holds {} entries but the config asks for {want}: \
                     table sizes cannot change under a running dataplane; \
                     run `xdplb detach` (this drops conntrack) or restore the old sizes",
                    names::RINGS,
                    info.max_entries()
                );
            }
            carried.rings = sys::read_array::<u32>(map.fd().as_fd(), 0, want)
                .context("reading the older build's RINGS")?;
            replace(&dir.join(names::RINGS))?;
        }
    }
    if let Some(map) = pinned(names::CONFIG) {
        if map.info()?.value_size() as usize != std::mem::size_of::<Config>() {
            replace(&dir.join(names::CONFIG))?;
        }
    }
    if let Some(map) = pinned(names::STATS) {
        let entries = map.info()?.max_entries();
        if entries != reason::COUNT {
            let old: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
            for i in 0..entries.min(reason::COUNT) {
                carried
                    .stats
                    .push(old.get(&i, 0).context("reading the older build's STATS")?);
            }
            replace(&dir.join(names::STATS))?;
        }
    }
    if let Some(map) = old_backends {
        let old: Array<_, [u8; BACKEND_V1]> = Array::try_from(aya::maps::Map::Array(map))?;
        for entry in old.iter() {
            let bytes = entry.context("reading the older build's BACKENDS")?;
            carried.backends.push(widened(&bytes));
        }
        replace(&dir.join(names::BACKENDS))?;
    }
    if let Some(map) = old_flows {
        let (keys, states) = &mut carried.flows;
        let key_size = std::mem::size_of::<FlowKey>();
        let value_size = map.info()?.value_size() as usize;
        let now = super::monotonic_secs();
        sys::read_batches(map.fd().as_fd(), key_size, value_size, |k, v, n| {
            for i in 0..n {
                keys.push(bytemuck::pod_read_unaligned(
                    &k[i * key_size..(i + 1) * key_size],
                ));
                states.push(flow_state(&v[i * value_size..(i + 1) * value_size], now));
            }
        })
        .context("reading the older build's FLOWS")?;
        replace(&dir.join(names::FLOWS))?;
    }
    Ok(carried)
}

/// Write what [`before_load`] kept into the new maps, but for conntrack:
/// returned, for the loader to keep what it needs once the maps are there.
pub(super) fn after_load(
    ebpf: &mut Ebpf,
    carried: Carried,
) -> Result<(Vec<FlowKey>, Vec<FlowState>)> {
    if !carried.stats.is_empty() {
        let mut stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(find_map_mut(ebpf, names::STATS)?)?;
        for (i, values) in (0..).zip(carried.stats) {
            stats
                .set(i, values, 0)
                .context("carrying the older build's counters over")?;
        }
    }
    if !carried.rings.is_empty() {
        let slots: Vec<u32> = (0..).take(carried.rings.len()).collect();
        let entries: Vec<u64> = carried
            .rings
            .iter()
            .map(|&e| xdp_common::ring_entry(e, xdp_common::NO_BACKEND))
            .collect();
        update_batch(
            map_data(find_map_mut(ebpf, names::RINGS)?)?,
            &slots,
            &entries,
        )
        .context("carrying the older build's rings over")?;
    }
    if !carried.backends.is_empty() {
        let ids: Vec<u32> = (0..).take(carried.backends.len()).collect();
        update_batch(
            map_data(find_map_mut(ebpf, names::BACKENDS)?)?,
            &ids,
            &carried.backends,
        )
        .context("carrying the older build's backends over")?;
    }
    Ok(carried.flows)
}
