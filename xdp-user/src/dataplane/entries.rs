//! The VIP and backend maps: VIPs with their ring pairs, backend slots
//! and their generations, in the operator's vocabulary.

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, HashMap, Map};
use xdp_common::{backend_state, map_names as names, Backend, Counters, VipDrops, VipKey, VipMeta};

use super::*;

/// Every entry of a VIPS map.
pub(super) fn vips_in(map: &Map) -> Result<Vec<(VipKey, VipMeta)>> {
    let map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(map)?;
    map.iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("reading VIPS")
}

/// The slots of a BACKENDS map in use, with their ids.
pub(super) fn backends_in(map: &Map) -> Result<Vec<(u32, Backend)>> {
    let map: Array<_, Backend> = Array::try_from(map)?;
    let mut out = Vec::new();
    for (id, entry) in (0..).zip(map.iter()) {
        let backend = entry.context("reading BACKENDS")?;
        if backend.state != backend_state::UNUSED {
            out.push((id, backend));
        }
    }
    Ok(out)
}

/// The generation of a backend slot that holds `current` once `next` is
/// written: the same backend (address, family and VIP) keeps it through
/// state, weight and MAC changes, an unused slot keeps the last one, and
/// any other backend (in a slot that was unused, or in place of another)
/// gets the next, so nothing that remembered the slot's earlier backend
/// by id follows it to this one.
pub fn generation_after(current: &Backend, next: &Backend) -> u32 {
    let unused = |b: &Backend| b.state == backend_state::UNUSED;
    let same = !unused(current)
        && (current.addr, current.family, current.vip_id) == (next.addr, next.family, next.vip_id);
    if unused(next) || same {
        current.generation
    } else {
        current.generation.wrapping_add(1)
    }
}

impl Dataplane {
    pub(super) fn check_vip_id(&self, vip_id: u32) -> Result<()> {
        if vip_id >= self.sizes.max_vips {
            bail!(
                "vip id {vip_id} out of range: max_vips is {}",
                self.sizes.max_vips
            );
        }
        Ok(())
    }

    pub(super) fn check_backend_id(&self, backend_id: u32) -> Result<()> {
        if backend_id >= self.sizes.max_backends {
            bail!(
                "backend id {backend_id} out of range: max_backends is {}",
                self.sizes.max_backends
            );
        }
        Ok(())
    }

    /// The VIP entry for `key`, if present.
    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        let map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.map(names::VIPS)?)?;
        match map.get(key, 0) {
            Ok(meta) => Ok(Some(meta)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading VIPS"),
        }
    }

    /// Add a VIP, or update the flags and mode of an existing one (its live
    /// ring half is kept). A new VIP starts on ring half 0, which should be
    /// written with [`Dataplane::write_ring`] first: until then it has no
    /// backends and its packets are dropped as `no_backend`.
    pub fn add_vip(&mut self, key: &VipKey, vip_id: u32, flags: u32, mode: u32) -> Result<()> {
        self.check_vip_id(vip_id)?;
        let existing = self.vip(key)?;
        if existing.is_none() {
            // A new VIP goes live on half 0: make it empty first, so its
            // first packets are dropped as no_backend rather than sent to
            // whatever backend ids an earlier VIP left in that half.
            let size = self.sizes.ring_size;
            let base = vip_id * 2 * size;
            let slots: Vec<u32> = (base..base + size).collect();
            let empty = vec![
                xdp_common::ring_entry(xdp_common::NO_BACKEND, xdp_common::NO_BACKEND);
                size as usize
            ];
            update_batch(array_data(self.map(names::RINGS)?)?, &slots, &empty)
                .context("clearing the new VIP's ring")?;
            self.reset_counters::<Counters>(names::VIP_STATS, vip_id)?;
            self.reset_counters::<VipDrops>(names::VIP_DROPS, vip_id)?;
            // A serial above every other VIP's, before any packet can match
            // it: conntrack entries older VIPs left are older than the
            // placements this one makes.
            let mut serials: Array<_, u32> = Array::try_from(self.map_mut(names::VIP_SERIALS)?)?;
            let highest = serials
                .iter()
                .collect::<std::result::Result<Vec<u32>, _>>()
                .context("reading VIP_SERIALS")?
                .into_iter()
                .max()
                .unwrap_or(0);
            serials
                .set(vip_id, highest.wrapping_add(1), 0)
                .context("writing the new VIP's serial")?;
        }
        self.filter_admit(key)?;
        // A VIP that stops tracking every flow keeps the flows tracked on
        // another backend than the ring's: their slots are marked first.
        let untracks = existing.is_some_and(|m| {
            m.flags & xdp_common::VIP_F_TRACK_ALL != 0 && flags & xdp_common::VIP_F_TRACK_ALL == 0
        });
        if untracks {
            self.mark_held(Some(vip_id))?;
        }
        let active_ring = existing.map_or(0, |m| m.active_ring);
        let meta = VipMeta {
            vip_id,
            flags,
            mode,
            active_ring,
        };
        let mut map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.map_mut(names::VIPS)?)?;
        map.insert(key, meta, 0)
            .with_context(|| format!("writing VIP {key:?} (is VIPS full?)"))?;
        self.flow_cache_invalidate()
    }

    /// Remove a VIP: its traffic passes to the stack from now on.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let vip_id = self.vip(key)?.map(|m| m.vip_id);
        let mut map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.map_mut(names::VIPS)?)?;
        map.remove(key)
            .with_context(|| format!("removing VIP {key:?}"))?;
        self.flow_cache_invalidate()?;
        if let Some(id) = vip_id {
            self.forget_marks(id)?;
        }
        self.filter_forget(key)
    }

    /// The live ring of a VIP, as the dataplane places by it: a backend id
    /// per slot, `NO_BACKEND` for none (marks left out).
    pub fn ring(&self, key: &VipKey) -> Result<Vec<u32>> {
        let Some(meta) = self.vip(key)? else {
            bail!("no VIP {key:?}");
        };
        Ok(self
            .ring_entries(&meta)?
            .into_iter()
            .map(|e| marks::owner(e).unwrap_or(xdp_common::NO_BACKEND))
            .collect())
    }

    /// Add or replace backend `backend_id`. Its generation is the slot's
    /// ([`generation_after`]; `backend.generation` is ignored), and a slot
    /// given to another backend gets fresh counters.
    pub fn set_backend(&mut self, backend_id: u32, backend: &Backend) -> Result<()> {
        self.check_backend_id(backend_id)?;
        let current = self.backend(backend_id)?;
        let entry = Backend {
            generation: generation_after(&current, backend),
            ..*backend
        };
        if entry.state != backend_state::UNUSED && entry.generation != current.generation {
            self.reset_counters::<Counters>(names::BACKEND_STATS, backend_id)?;
        }
        let mut map: Array<_, Backend> = Array::try_from(self.map_mut(names::BACKENDS)?)?;
        map.set(backend_id, entry, 0)
            .with_context(|| format!("writing backend {backend_id}"))?;
        self.flow_cache_invalidate()
    }

    pub fn backend(&self, backend_id: u32) -> Result<Backend> {
        self.check_backend_id(backend_id)?;
        let map: Array<_, Backend> = Array::try_from(self.map(names::BACKENDS)?)?;
        map.get(&backend_id, 0)
            .with_context(|| format!("reading backend {backend_id}"))
    }

    /// Remove backend `backend_id`: its slot becomes unused, and flows still
    /// tracked to it are re-selected on their next packet.
    pub fn remove_backend(&mut self, backend_id: u32) -> Result<()> {
        self.set_backend(backend_id, &Backend::default())
    }

    /// Set a backend's state (`backend_state::UP`, `DOWN`, `DRAINING`).
    pub fn set_backend_state(&mut self, backend_id: u32, state: u32) -> Result<()> {
        if ![
            backend_state::UP,
            backend_state::DOWN,
            backend_state::DRAINING,
        ]
        .contains(&state)
        {
            bail!("invalid backend state {state}");
        }
        let mut backend = self.backend(backend_id)?;
        if backend.state == backend_state::UNUSED {
            bail!("backend {backend_id} is not configured");
        }
        backend.state = state;
        self.set_backend(backend_id, &backend)
    }

    /// Every VIP in the map (adoption after a restart).
    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        vips_in(self.map(names::VIPS)?)
    }

    /// Every configured backend slot, with its id (adoption after a restart).
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        backends_in(self.map(names::BACKENDS)?)
    }
}
