//! The VIP address filter the program consults before its VIPS lookups:
//! per slot of `vip_filter_slot`, whether VIPs with a port and port-less
//! VIPs have addresses there. A slot may claim more than it holds (another
//! address shares it: one lookup too many), never less: a VIP's bit is set
//! before the VIP goes in, and cleared only after it is gone.

use anyhow::{Context as _, Result};
use aya::maps::Array;
use xdp_common::{
    map_names as names, vip_filter_slot, VipKey, VIP_FILTER_PORTLESS, VIP_FILTER_PORTS,
    VIP_FILTER_SLOTS,
};

use super::{map_data, update_batch, Dataplane};

/// The filter bit of a VIP.
fn kind(key: &VipKey) -> u32 {
    if key.port == 0 {
        VIP_FILTER_PORTLESS
    } else {
        VIP_FILTER_PORTS
    }
}

impl Dataplane {
    /// Let `key`'s lookups through (before it goes into VIPS).
    pub(super) fn filter_admit(&mut self, key: &VipKey) -> Result<()> {
        let slot = vip_filter_slot(&key.addr);
        let mut filter: Array<_, u32> = Array::try_from(self.map_mut(names::VIP_FILTER)?)?;
        let kinds = filter.get(&slot, 0).context("reading VIP_FILTER")?;
        filter
            .set(slot, kinds | kind(key), 0)
            .context("writing VIP_FILTER")
    }

    /// Recompute `key`'s slot from the VIPs there now (after it left VIPS).
    pub(super) fn filter_forget(&mut self, key: &VipKey) -> Result<()> {
        let slot = vip_filter_slot(&key.addr);
        let kinds = self
            .vips()?
            .iter()
            .filter(|(k, _)| vip_filter_slot(&k.addr) == slot)
            .fold(0, |acc, (k, _)| acc | kind(k));
        let mut filter: Array<_, u32> = Array::try_from(self.map_mut(names::VIP_FILTER)?)?;
        filter.set(slot, kinds, 0).context("writing VIP_FILTER")
    }

    /// Rebuild the whole filter from VIPS (a new or adopted filter map,
    /// before the program runs with it).
    pub(super) fn filter_rebuild(&mut self) -> Result<()> {
        let mut kinds = vec![0u32; VIP_FILTER_SLOTS as usize];
        for (key, _) in self.vips()? {
            kinds[vip_filter_slot(&key.addr) as usize] |= kind(&key);
        }
        let slots: Vec<u32> = (0..VIP_FILTER_SLOTS).collect();
        update_batch(map_data(self.map(names::VIP_FILTER)?)?, &slots, &kinds)
            .context("writing VIP_FILTER")
    }
}
