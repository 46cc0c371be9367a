//! The pinned dataplane as `xdplb trace` reads and steers it, with or
//! without a daemon: the attached program's id, the VIP ids and backends
//! in its maps, the TRACE filter, and the program's aya-log records.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use xdp_common::{map_names as names, Backend, TraceFilter, VipKey, VipMeta};

use super::{sys, LINK_PIN};

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

    /// Every VIP in the dataplane, with its id.
    pub fn vips(&self) -> Result<Vec<(VipKey, u32)>> {
        let map: HashMap<_, VipKey, VipMeta> =
            HashMap::try_from(Map::HashMap(open(&self.dir, names::VIPS)?))?;
        map.iter()
            .map(|e| e.map(|(k, m)| (k, m.vip_id)).context("reading VIPS"))
            .collect()
    }

    /// Every backend entry in use, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let map: Array<_, Backend> =
            Array::try_from(Map::Array(open(&self.dir, names::BACKENDS)?))?;
        let mut out = Vec::new();
        for (id, entry) in (0..).zip(map.iter()) {
            let b = entry.context("reading BACKENDS")?;
            if b.state != xdp_common::backend_state::UNUSED {
                out.push((id, b));
            }
        }
        Ok(out)
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
