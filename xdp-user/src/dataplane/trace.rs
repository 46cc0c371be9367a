//! The pinned dataplane as `xdplb trace` reads and steers it, with or
//! without a daemon: the attached program's id, the VIP ids and backends
//! in its maps, the TRACE filter, and the program's aya-log records.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use xdp_common::{map_names as names, Backend, Counters, TraceFilter, VipKey};

use super::{add_counters, backends_in, sys, vips_in, LINK_PIN};

/// A pinned dataplane's maps, opened through their pins.
pub struct Pinned {
    dir: PathBuf,
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the dataplane of this config attached? an xdplb older than `trace` has no {name})",
            path.display()
        )
    })
}

impl Pinned {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The id of the program the pinned link runs.
    pub fn program_id(&self) -> Result<u32> {
        let facts = sys::pinned_link_facts(&self.dir.join(LINK_PIN))?;
        if facts.ifindex == 0 {
            return Err(anyhow!(
                "the pinned link in {} is detached: the dataplane does not run",
                self.dir.display()
            ));
        }
        Ok(facts.prog_id)
    }

    /// The interface index the pinned link is attached to; 0: detached.
    pub fn attached_ifindex(&self) -> Result<u32> {
        Ok(sys::pinned_link_facts(&self.dir.join(LINK_PIN))?.ifindex)
    }

    /// Every VIP in the dataplane, with its id.
    pub fn vips(&self) -> Result<Vec<(VipKey, u32)>> {
        let vips = vips_in(&Map::HashMap(open(&self.dir, names::VIPS)?))?;
        Ok(vips.into_iter().map(|(k, m)| (k, m.vip_id)).collect())
    }

    /// Every backend entry in use, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        backends_in(&Map::Array(open(&self.dir, names::BACKENDS)?))
    }

    /// Packets the balancer has counted for every VIP, summed over CPUs.
    pub fn vip_packets(&self) -> Result<u64> {
        let map = Map::PerCpuArray(open(&self.dir, names::VIP_STATS)?);
        let stats: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(&map)?;
        self.vips()?.into_iter().try_fold(0, |sum, (_, id)| {
            Ok(sum + super::sum_per_cpu(&stats, id, add_counters, Counters::default())?.packets)
        })
    }

    fn filter_map(&self) -> Result<Array<MapData, TraceFilter>> {
        Ok(Array::try_from(Map::Array(open(&self.dir, names::TRACE)?))?)
    }

    pub fn trace_filter(&self) -> Result<TraceFilter> {
        self.filter_map()?.get(&0, 0).context("reading TRACE")
    }

    pub fn set_trace_filter(&self, filter: &TraceFilter) -> Result<()> {
        self.filter_map()?
            .set(0, filter, 0)
            .context("writing TRACE")
    }
}

/// The aya-log records of program `program_id`, handed to `logger` on
/// each flush.
pub fn logger<L: log::Log>(program_id: u32, logger: L) -> Result<aya_log::EbpfLogger<L>> {
    aya_log::EbpfLogger::init_from_id_with_logger(program_id, logger)
        .map_err(|e| anyhow!("reading the balancer's trace events: {e}"))
}
