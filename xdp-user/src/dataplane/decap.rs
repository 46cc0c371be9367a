//! The backend-side decapsulator program and its maps.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{maps::HashMap, programs::Xdp, Ebpf, EbpfLoader};
use xdp_common::{decap_reason, map_names as names, DecapKey};

use super::*;

/// Maps of the decap program, pinned by `xdplb decap`.
pub(super) const DECAP_MAPS: [&str; 2] = [names::DECAP_VIPS, names::DECAP_STATS];

/// The backend-side decapsulator: the `decap` program and its VIP set.
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    /// Load `decap` for up to `max_vips` VIP addresses. The balancer's maps
    /// in the same object are created at their minimum size.
    pub fn load(max_vips: u32) -> Result<Self> {
        Self::load_with(max_vips, None)
    }

    /// Load `decap` with its VIP set and counters pinned under `pin_dir`
    /// (adopted if an earlier run left them), for [`Decap::attach_pinned`].
    pub fn open(max_vips: u32, pin_dir: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        Self::load_with(max_vips, Some(pin_dir))
    }

    fn load_with(max_vips: u32, pin_dir: Option<&Path>) -> Result<Self> {
        if max_vips == 0 {
            bail!("max_vips must be at least 1");
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::DECAP_VIPS, max_vips);
        let pins: Vec<(&str, PathBuf)> = pin_dir
            .map(|d| DECAP_MAPS.iter().map(|&n| (n, d.join(n))).collect())
            .unwrap_or_default();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object()?)
            .context("loading the eBPF object (map creation)")?;
        load_program(&mut ebpf, DECAP_PROGRAM)?;
        Ok(Self { ebpf })
    }

    /// Attach through a pinned link, so it stays after this process exits.
    pub fn attach_pinned(&mut self, iface: &str, mode: AttachMode, pin_dir: &Path) -> Result<bool> {
        let program = xdp_program_mut(&mut self.ebpf, DECAP_PROGRAM)?;
        Ok(Attachment::attach(
            program,
            DECAP_PROGRAM,
            iface,
            mode,
            &pin_dir.join(super::LINK_PIN),
            false,
        )?
        .adopted)
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        attach_program(&mut self.ebpf, DECAP_PROGRAM, iface, mode)
    }

    pub fn program(&self) -> Result<&Xdp> {
        xdp_program(&self.ebpf, DECAP_PROGRAM)
    }

    /// Decapsulate for exactly `vips`: others left from an earlier run are
    /// removed.
    pub fn set_vips(&mut self, vips: &[IpAddr]) -> Result<()> {
        let wanted: Vec<DecapKey> = vips
            .iter()
            .map(|v| {
                let (addr, family) = addr_bytes(*v);
                DecapKey {
                    addr,
                    family: u32::from(family),
                }
            })
            .collect();
        let mut map: HashMap<_, DecapKey, u32> =
            HashMap::try_from(find_map_mut(&mut self.ebpf, names::DECAP_VIPS)?)?;
        let stale: Vec<DecapKey> = map
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            map.remove(&key).context("removing a decap VIP")?;
        }
        for key in wanted {
            map.insert(key, 1, 0)
                .context("adding a decap VIP (is max_vips too small?)")?;
        }
        Ok(())
    }

    /// Counters indexed by `xdp_common::decap_reason`, summed over CPUs.
    pub fn stats(&self) -> Result<[u64; decap_reason::COUNT as usize]> {
        sum_counters(find_map(&self.ebpf, names::DECAP_STATS)?)
    }
}
