//! Writing rings with changed-slot marks ([`marks`]), and the marks'
//! later steps: settle and clear. The marks live in the RINGS entries; this
//! process keeps when each changed and settled (it is the only writer; a
//! restarted daemon starts those clocks again from the entries).

use std::{collections::HashMap, os::fd::AsFd as _};

use anyhow::{bail, Context as _, Result};
use aya::maps::Array;
use xdp_common::{map_names as names, ring_entry, VipKey, VipMeta, NO_BACKEND, SLOT_CHANGED};

use super::{
    array_data, map_data,
    marks::{self, slot_key, Record, Step, Sweep},
    monotonic_secs, sys, update_batch, Dataplane,
};

impl Dataplane {
    /// The live half of a VIP's ring as stored (`xdp_common::ring_entry`).
    pub fn ring_entries(&self, meta: &VipMeta) -> Result<Vec<u64>> {
        let size = self.sizes.ring_size;
        let base = (meta.vip_id * 2 + (meta.active_ring & 1)) * size;
        let fd = map_data(self.map(names::RINGS)?)?
            .fd()
            .as_fd()
            .try_clone_to_owned()?;
        sys::read_array::<u64>(fd.as_fd(), base, size).context("reading RINGS")
    }

    /// The live half of `meta`'s ring, read once per `rings` (a pass over
    /// many slots of the same VIPs).
    pub(super) fn ring_in<'a>(
        &self,
        rings: &'a mut HashMap<u32, Vec<u64>>,
        meta: &VipMeta,
    ) -> Result<&'a [u64]> {
        Ok(match rings.entry(meta.vip_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.ring_entries(meta)?),
        })
    }

    /// Every VIP's entry by vip_id.
    fn vips_by_id(&self) -> Result<HashMap<u32, VipMeta>> {
        Ok(self
            .vips()?
            .into_iter()
            .map(|(_, m)| (m.vip_id, m))
            .collect())
    }

    /// Write one entry of a VIP's live half.
    fn set_live_entry(&mut self, meta: &VipMeta, position: u32, entry: u64) -> Result<()> {
        let size = self.sizes.ring_size;
        let slot = (meta.vip_id * 2 + (meta.active_ring & 1)) * size + position;
        let mut ring: Array<_, u64> = Array::try_from(self.map_mut(names::RINGS)?)?;
        ring.set(slot, entry, 0).context("writing a ring slot")
    }

    /// The records of the marked slots, by slot key; found in the live
    /// halves on first use.
    fn records(&mut self) -> Result<&mut HashMap<u32, Record>> {
        if self.records.is_none() {
            let now = monotonic_secs();
            let found = self
                .marks()?
                .into_iter()
                .map(|(key, entry)| (key, Record::found(entry, now)))
                .collect();
            self.records = Some(found);
        }
        // Just filled.
        self.records.as_mut().context("the marks' records")
    }

    /// [`Dataplane::write_ring_keeping`] with the backends BACKENDS holds
    /// now.
    pub fn write_ring(&mut self, key: &VipKey, ring: &[u32]) -> Result<()> {
        let present: std::collections::HashSet<u32> =
            self.backends()?.into_iter().map(|(id, _)| id).collect();
        self.write_ring_keeping(key, ring, &|id| present.contains(&id))
    }

    /// Write `ring` (one backend id per slot) into the VIP's inactive half,
    /// marked against the live half ([`marks::mark`]; `stays(id)`: whether
    /// backend `id` is still in the VIP once this change is applied, in any
    /// state), then flip the VIP to it in one map write, so no packet ever
    /// sees a half-written ring.
    pub fn write_ring_keeping(
        &mut self,
        key: &VipKey,
        ring: &[u32],
        stays: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        let size = self.sizes.ring_size;
        if ring.len() != size as usize {
            bail!(
                "ring has {} slots, the dataplane's ring_size is {size}",
                ring.len()
            );
        }
        let Some(mut meta) = self.vip(key)? else {
            bail!("no VIP {key:?} to write a ring for");
        };
        if let Some(bad) = ring
            .iter()
            .find(|&&id| id != NO_BACKEND && id >= self.sizes.max_backends)
        {
            bail!(
                "ring names backend id {bad}, beyond max_backends {}",
                self.sizes.max_backends
            );
        }
        let live = self.ring_entries(&meta)?;
        let vip_id = meta.vip_id;
        let marked = marks::mark(&live, ring, stays, monotonic_secs());
        self.records()?;
        let inactive = (meta.active_ring & 1) ^ 1;
        let base = (vip_id * 2 + inactive) * size;
        let slots: Vec<u32> = (base..base + size).collect();
        update_batch(
            array_data(self.map(names::RINGS)?)?,
            &slots,
            &marked.entries,
        )
        .context("writing the VIP's inactive ring half")?;
        meta.active_ring = inactive;
        let mut map: aya::maps::HashMap<_, VipKey, VipMeta> =
            aya::maps::HashMap::try_from(self.map_mut(names::VIPS)?)?;
        map.insert(key, meta, 0)
            .context("flipping the VIP's ring")?;
        let records = self.records()?;
        for (position, record) in marked.records {
            records.insert(slot_key(vip_id, size, position), record);
        }
        self.flow_cache_invalidate()
    }

    /// Ring slots marked as changed: (taking over, settled).
    pub fn changed_slots(&mut self) -> Result<(usize, usize)> {
        let records = self.records()?;
        let taking_over = records
            .values()
            .filter(|r| r.previous != NO_BACKEND)
            .count();
        Ok((taking_over, records.len() - taking_over))
    }

    /// Every marked slot of the live rings: (slot key, its entry).
    pub fn marks(&self) -> Result<Vec<(u32, u64)>> {
        let size = self.sizes.ring_size;
        let mut out = Vec::new();
        for (_, meta) in self.vips()? {
            for (position, entry) in (0u32..).zip(self.ring_entries(&meta)?) {
                if marks::is_marked(entry) {
                    out.push((slot_key(meta.vip_id, size, position), entry));
                }
            }
        }
        Ok(out)
    }

    /// Forget the marks of VIP `vip_id` (the VIP is gone; its id may be
    /// reused, and its rings are emptied when it is).
    pub(super) fn forget_marks(&mut self, vip_id: u32) -> Result<()> {
        let size = self.sizes.ring_size;
        self.records()?.retain(|k, _| k / size != vip_id);
        Ok(())
    }

    /// Take the marks one step ([`marks::review`]) with `idle` seconds as
    /// the bound and the latest `sweep`: the number settled and cleared.
    /// The SEEN epoch turns here too.
    pub fn review_marks(&mut self, idle: u32, sweep: Option<&Sweep>) -> Result<(usize, usize)> {
        self.turn_seen_epoch(idle)?;
        let size = self.sizes.ring_size;
        let now = monotonic_secs();
        let records: Vec<(u32, Record)> = self.records()?.iter().map(|(k, r)| (*k, *r)).collect();
        if records.is_empty() {
            return Ok((0, 0));
        }
        let vips = self.vips_by_id()?;
        let mut rings: HashMap<u32, Vec<u64>> = HashMap::new();
        let (mut settled, mut cleared) = (0, 0);
        for (key, record) in records {
            let (vip_id, position) = (key / size, key % size);
            let Some(meta) = vips.get(&vip_id) else {
                self.records()?.remove(&key);
                continue;
            };
            let entry = self.ring_in(&mut rings, meta)?[position as usize];
            if !marks::is_marked(entry) {
                self.records()?.remove(&key);
                continue;
            }
            match marks::review(key, &record, marks::owner(entry), now, idle, sweep) {
                None => {}
                Some(Step::Settle) => {
                    // One word: packets see the previous owner or not.
                    self.set_live_entry(
                        meta,
                        position,
                        ring_entry(marks::word(entry), NO_BACKEND),
                    )?;
                    if let Some(r) = self.records()?.get_mut(&key) {
                        r.previous = NO_BACKEND;
                        r.settled = now;
                    }
                    settled += 1;
                }
                Some(Step::Clear) => {
                    let unmarked = match marks::owner(entry) {
                        Some(id) => ring_entry(id, NO_BACKEND),
                        None => ring_entry(NO_BACKEND, NO_BACKEND),
                    };
                    self.set_live_entry(meta, position, unmarked)?;
                    self.records()?.remove(&key);
                    cleared += 1;
                }
            }
        }
        if settled + cleared > 0 {
            self.flow_cache_invalidate()?;
        }
        Ok((settled, cleared))
    }

    /// Mark every slot (of VIP `only`, or all) where a conntrack entry
    /// holds a live flow on a backend other than the slot's owner, settled
    /// from now: conntrack carried over from a build that tracked every
    /// flow, or kept by a VIP that did.
    pub(super) fn mark_held(&mut self, only: Option<u32>) -> Result<usize> {
        let sweeper = self.flow_sweeper()?;
        let sweep = sweeper.sweep(u32::MAX, false)?;
        let size = self.sizes.ring_size;
        let vips = self.vips_by_id()?;
        let now = monotonic_secs();
        let mut marked = 0;
        let mut rings: HashMap<u32, Vec<u64>> = HashMap::new();
        for (&key, held) in &sweep.held {
            let (vip_id, position) = (key / size, key % size);
            let Some(meta) = vips
                .get(&vip_id)
                .filter(|_| only.is_none_or(|v| v == vip_id))
            else {
                continue;
            };
            let entry = self.ring_in(&mut rings, meta)?[position as usize];
            let owner = marks::owner(entry);
            if marks::is_marked(entry) || held.iter().all(|&id| Some(id) == owner) {
                continue;
            }
            let owner_word = SLOT_CHANGED | owner.unwrap_or(marks::NO_OWNER);
            self.set_live_entry(meta, position, ring_entry(owner_word, NO_BACKEND))?;
            self.records()?.insert(
                key,
                Record {
                    previous: NO_BACKEND,
                    since: now,
                    settled: now,
                },
            );
            marked += 1;
        }
        if marked > 0 {
            self.flow_cache_invalidate()?;
        }
        Ok(marked)
    }
}
