//! Extra uplinks: more interfaces served by the same program and maps, each
//! through a link of its own (pinned at `link-<name>`). A frame leaves by
//! the interface it arrived on, so UPLINKS gives each (by interface index,
//! a bond's ports included) its next hop and its own MAC.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::HashMap;
use tracing::warn;
use xdp_common::{map_names as names, Uplink};

use super::{
    link::{uplink_pin, uplink_pins},
    AttachMode, Dataplane,
};
use crate::iface;

impl Dataplane {
    /// The extra uplinks to serve, with their next hops: UPLINKS and
    /// CONFIG's flag are written now, before [`Dataplane::set_config`] and
    /// any attaching, so that no frame (a restart's included) arriving on
    /// an uplink leaves by the main interface's router.
    pub fn set_uplinks(&mut self, hops: &[(String, [u8; 6])]) -> Result<()> {
        self.uplink_hops = hops.to_vec();
        self.write_uplinks()
    }

    /// Attach to the uplinks of [`Dataplane::set_uplinks`] (after
    /// [`Dataplane::attach_pinned`]). A link a previous run pinned for an
    /// uplink gets this program swapped in; a link pinned for an interface
    /// no longer listed is unpinned, which detaches it.
    pub fn attach_uplinks(&mut self, mode: AttachMode, replace: bool) -> Result<()> {
        let dir = self
            .pin_dir
            .clone()
            .ok_or_else(|| anyhow!("a dataplane with private maps has no pin directory"))?;
        let hops = self.uplink_hops.clone();
        for (file, name) in uplink_pins(&dir)? {
            if !hops.iter().any(|(i, _)| *i == name) {
                let path = dir.join(&file);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                warn!(
                    interface = name,
                    "{name} is no longer an uplink: its link is unpinned and the program leaves it"
                );
            }
        }
        for (iface, _) in &hops {
            let attached = self
                .attach_through(iface, mode, &uplink_pin(iface), replace)
                .with_context(|| format!("serving the uplink {iface}"))?;
            self.uplinks.push(attached);
        }
        Ok(())
    }

    /// The extra uplinks served.
    pub fn uplinks(&self) -> Vec<String> {
        self.uplinks.iter().map(|a| a.iface.clone()).collect()
    }

    /// UPLINKS as the uplinks' interfaces are now: index (and each bond
    /// port's), next hop, own MAC.
    fn wanted_uplinks(&self) -> Result<BTreeMap<u32, Uplink>> {
        let mut want = BTreeMap::new();
        for (name, gateway_mac) in &self.uplink_hops {
            let i = iface::require(name)?;
            let entry = Uplink {
                gateway_mac: *gateway_mac,
                source_mac: i.mac.unwrap_or([0; 6]),
            };
            want.insert(i.index, entry);
            for port in iface::ports_of(i.index)? {
                want.insert(port, entry);
            }
        }
        Ok(want)
    }

    fn uplinks_held(&self) -> Result<BTreeMap<u32, Uplink>> {
        let map: HashMap<_, u32, Uplink> = HashMap::try_from(self.map(names::UPLINKS)?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Bring UPLINKS (and CONFIG's flag that turns it on) to the uplinks'
    /// interfaces as they are now.
    pub(super) fn write_uplinks(&mut self) -> Result<()> {
        let want = self.wanted_uplinks()?;
        let have = self.uplinks_held()?;
        let mut map: HashMap<_, u32, Uplink> = HashMap::try_from(self.map_mut(names::UPLINKS)?)?;
        super::sync_entries(
            &mut map,
            (&have, &want),
            false,
            |map, index| {
                map.remove(index)
                    .with_context(|| format!("removing uplink index {index}"))
            },
            |map, index, entry| {
                map.insert(index, entry, 0)
                    .with_context(|| format!("writing uplink index {index} (too many bond ports?)"))
            },
        )?;
        let config = self.config()?;
        self.set_config(&config)
    }

    /// What is wrong with UPLINKS: an interface gone, re-created (a new
    /// index or MAC) or with other bond ports than written. Empty when all
    /// is well.
    pub(super) fn uplink_problems(&self) -> Vec<String> {
        if self.uplink_hops.is_empty() {
            return Vec::new();
        }
        match (self.wanted_uplinks(), self.uplinks_held()) {
            (Ok(want), Ok(have)) if want == have => Vec::new(),
            (Ok(want), Ok(have)) => vec![format!(
                "UPLINKS holds interfaces {:?}, the uplinks are now {:?}",
                have.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            )],
            (Err(e), _) | (_, Err(e)) => vec![format!("cannot check the uplinks: {e:#}")],
        }
    }
}
