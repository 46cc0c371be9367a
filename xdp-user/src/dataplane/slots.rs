//! Writing rings with changed-slot marks ([`marks`]), and the marks'
//! later steps: settle, clear, and the sweep of conntrack that decides
//! when a mark may go.

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, HashMap, MapData};
use xdp_common::{
    flow_hash, map_names as names, Backend, FlowKey, FlowState, SlotPrevious, VipKey, VipMeta,
    NO_BACKEND, SLOT_CHANGED, VIP_F_SOURCE_HASH,
};

use super::{
    array_data, backends_in, map_data,
    marks::{self, Step, Sweep},
    sys, update_batch, vips_in, Dataplane,
};

/// Seconds of CLOCK_MONOTONIC: the clock of `FlowState::last_seen` (the
/// program's `bpf_ktime_get_coarse_ns`) and of the marks' records.
pub fn monotonic_secs() -> u32 {
    // SAFETY: clock_gettime writes the struct we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// The ring position of a flow of `vip` (as the program computes it).
fn position(flow: &FlowKey, vip: &VipMeta, ring_size: u32) -> u32 {
    flow_hash(flow, vip.flags & VIP_F_SOURCE_HASH != 0) % ring_size
}

impl Dataplane {
    /// The live half of a VIP's ring as stored: backend ids with their
    /// `SLOT_CHANGED` marks.
    pub fn ring_entries(&self, meta: &VipMeta) -> Result<Vec<u32>> {
        let size = self.sizes.ring_size;
        let base = (meta.vip_id * 2 + (meta.active_ring & 1)) * size;
        let fd = map_data(self.map(names::RINGS)?)?
            .fd()
            .as_fd()
            .try_clone_to_owned()?;
        sys::read_array_u32(fd.as_fd(), base, size).context("reading RINGS")
    }

    fn previous_map(&mut self) -> Result<HashMap<&mut MapData, u32, SlotPrevious>> {
        Ok(HashMap::try_from(self.map_mut(names::PREVIOUS)?)?)
    }

    /// The PREVIOUS records, from this process's copy.
    fn records(&mut self) -> Result<&mut std::collections::HashMap<u32, SlotPrevious>> {
        if self.records.is_none() {
            self.records = Some(self.marks()?.into_iter().collect());
        }
        // Just filled.
        self.records.as_mut().context("PREVIOUS records")
    }

    /// Write PREVIOUS records, in the map and the copy.
    fn put_records(&mut self, keys: &[u32], values: &[SlotPrevious]) -> Result<()> {
        self.records()?;
        update_batch(map_data(self.map(names::PREVIOUS)?)?, keys, values)
            .context("recording the previous owners of changed ring slots (is PREVIOUS full?)")?;
        let records = self.records()?;
        for (k, v) in keys.iter().zip(values) {
            records.insert(*k, *v);
        }
        Ok(())
    }

    /// Remove a PREVIOUS record, from the map and the copy.
    fn drop_record(&mut self, key: u32) -> Result<()> {
        self.records()?.remove(&key);
        match self.previous_map()?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing a PREVIOUS record"),
        }
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
    /// sees a half-written ring. The marks' records are written before the
    /// flip.
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
        // The backends that give slots away, and the VIP's records.
        let mut backends: std::collections::HashMap<u32, Backend> = Default::default();
        for (&old, &new) in live.iter().zip(ring) {
            if let Some(id) = marks::owner(old).filter(|&id| new != id) {
                if let std::collections::hash_map::Entry::Vacant(e) = backends.entry(id) {
                    e.insert(self.backend(id)?);
                }
            }
        }
        // The records of marked slots that move again.
        let records: std::collections::HashMap<u32, SlotPrevious> = {
            let all = self.records()?;
            (0u32..)
                .zip(live.iter().zip(ring))
                .filter(|(_, (&old, &new))| marks::is_marked(old) && marks::owner(old) != Some(new))
                .filter_map(|(p, _)| {
                    all.get(&xdp_common::slot_key(vip_id, size, p))
                        .map(|r| (p, *r))
                })
                .collect()
        };
        let marked = {
            let record = |position| records.get(&position).copied();
            let generation = |id: u32| {
                backends
                    .get(&id)
                    .filter(|b| b.vip_id == vip_id && stays(id))
                    .map(|b| b.generation)
            };
            marks::mark(&live, ring, record, generation, monotonic_secs())
        };
        if !marked.records.is_empty() {
            let keys: Vec<u32> = marked
                .records
                .iter()
                .map(|(p, _)| xdp_common::slot_key(vip_id, size, *p))
                .collect();
            let values: Vec<SlotPrevious> = marked.records.iter().map(|(_, r)| *r).collect();
            self.put_records(&keys, &values)?;
        }
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
        let mut map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(self.map_mut(names::VIPS)?)?;
        map.insert(key, meta, 0)
            .context("flipping the VIP's ring")?;
        self.flow_cache_invalidate()
    }

    /// Whether the SEEN filter holds `flow` on backend `backend_id` (as it
    /// is now), in either epoch.
    pub fn was_seen(&self, flow: &FlowKey, backend_id: u32) -> Result<bool> {
        let b = self.backend(backend_id)?;
        let hash = flow_hash(flow, false);
        let fold = xdp_common::flow_fold(flow);
        let (word, bits) = xdp_common::seen_probe(hash, fold, backend_id, b.generation);
        let seen: Array<_, u64> = Array::try_from(self.map(names::SEEN)?)?;
        for epoch in 0..xdp_common::SEEN_EPOCHS {
            let w = seen
                .get(&(epoch * xdp_common::SEEN_WORDS + word), 0)
                .context("reading SEEN")?;
            if w & bits == bits {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Ring slots marked as changed: (taking over, settled).
    pub fn changed_slots(&mut self) -> Result<(usize, usize)> {
        let records = self.records()?;
        let taking_over = records
            .values()
            .filter(|r| r.backend_id != NO_BACKEND)
            .count();
        Ok((taking_over, records.len() - taking_over))
    }

    /// Every changed-slot record: (PREVIOUS key, record).
    pub fn marks(&self) -> Result<Vec<(u32, SlotPrevious)>> {
        let fd = map_data(self.map(names::PREVIOUS)?)?
            .fd()
            .as_fd()
            .try_clone_to_owned()?;
        let value_size = std::mem::size_of::<SlotPrevious>();
        let mut out = Vec::new();
        sys::read_batches(fd.as_fd(), 4, value_size, |k, v, n| {
            for i in 0..n {
                out.push((
                    bytemuck::pod_read_unaligned(&k[i * 4..(i + 1) * 4]),
                    bytemuck::pod_read_unaligned(&v[i * value_size..(i + 1) * value_size]),
                ));
            }
        })
        .context("reading PREVIOUS")?;
        Ok(out)
    }

    /// Forget the marks of VIP `vip_id` (the VIP is gone; its id may be
    /// reused).
    pub(super) fn forget_marks(&mut self, vip_id: u32) -> Result<()> {
        let size = self.sizes.ring_size;
        let keys: Vec<u32> = self
            .records()?
            .keys()
            .copied()
            .filter(|k| k / size == vip_id)
            .collect();
        for k in keys {
            self.drop_record(k)?;
        }
        Ok(())
    }

    /// Turn the SEEN filter's epoch once `idle` seconds passed since the
    /// last turn: clear the older epoch, make it current, and retire the
    /// flow cache (its hits record nothing, so each cached flow passes the
    /// ring once per epoch and is recorded in the new one).
    pub fn turn_seen_epoch(&mut self, idle: u32) -> Result<bool> {
        let now = monotonic_secs();
        let Some(last) = self.seen_turned else {
            self.seen_turned = Some(now);
            return Ok(false);
        };
        if now.wrapping_sub(last) < idle {
            return Ok(false);
        }
        let epoch: Array<_, u32> = Array::try_from(self.map(names::SEEN_EPOCH)?)?;
        let next = (epoch.get(&0, 0).context("reading SEEN_EPOCH")? & 1) ^ 1;
        let base = next * xdp_common::SEEN_WORDS;
        let words: Vec<u32> = (base..base + xdp_common::SEEN_WORDS).collect();
        let zeros = vec![0u64; words.len()];
        update_batch(array_data(self.map(names::SEEN)?)?, &words, &zeros)
            .context("clearing the older SEEN epoch")?;
        let mut epoch: Array<_, u32> = Array::try_from(self.map_mut(names::SEEN_EPOCH)?)?;
        epoch.set(0, next, 0).context("writing SEEN_EPOCH")?;
        self.seen_turned = Some(now);
        self.flow_cache_invalidate()?;
        Ok(true)
    }

    /// Take the marks one step ([`marks::review`]) with `idle` seconds as
    /// the bound and the latest `sweep`: the number settled and cleared.
    /// The SEEN epoch turns here too.
    pub fn review_marks(&mut self, idle: u32, sweep: Option<&Sweep>) -> Result<(usize, usize)> {
        self.turn_seen_epoch(idle)?;
        let size = self.sizes.ring_size;
        let vips: std::collections::HashMap<u32, VipMeta> = self
            .vips()?
            .into_iter()
            .map(|(_, m)| (m.vip_id, m))
            .collect();
        let now = monotonic_secs();
        let (mut settled, mut cleared) = (0, 0);
        let mut rings: std::collections::HashMap<u32, Vec<u32>> = Default::default();
        let records: Vec<(u32, SlotPrevious)> =
            self.records()?.iter().map(|(k, r)| (*k, *r)).collect();
        for (key, record) in records {
            let (vip_id, position) = (key / size, key % size);
            let Some(meta) = vips.get(&vip_id) else {
                self.drop_record(key)?;
                continue;
            };
            // The owner matters only to a settled mark, with a sweep.
            let entry = if record.backend_id == NO_BACKEND && sweep.is_some() {
                let ring = match rings.entry(vip_id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(self.ring_entries(meta)?)
                    }
                };
                ring[position as usize]
            } else {
                NO_BACKEND
            };
            match marks::review(key, &record, marks::owner(entry), now, idle, sweep) {
                None => {}
                Some(Step::Settle) => {
                    let r = SlotPrevious {
                        backend_id: NO_BACKEND,
                        settled: now,
                        ..record
                    };
                    self.put_records(&[key], &[r])?;
                    settled += 1;
                }
                Some(Step::Clear) => {
                    // The live half first (one word: packets see the mark
                    // or not), then the record.
                    let slot = (vip_id * 2 + (meta.active_ring & 1)) * size + position;
                    let mut ring: Array<_, u32> = Array::try_from(self.map_mut(names::RINGS)?)?;
                    let unmarked = if marks::owner(entry).is_some() {
                        entry & !SLOT_CHANGED
                    } else {
                        NO_BACKEND
                    };
                    ring.set(slot, unmarked, 0)
                        .context("clearing a changed ring slot")?;
                    self.drop_record(key)?;
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
        let vips: std::collections::HashMap<u32, VipMeta> = self
            .vips()?
            .into_iter()
            .map(|(_, m)| (m.vip_id, m))
            .collect();
        let now = monotonic_secs();
        let mut marked = 0;
        for (&key, held) in &sweep.held {
            let (vip_id, position) = (key / size, key % size);
            let Some(meta) = vips
                .get(&vip_id)
                .filter(|_| only.is_none_or(|v| v == vip_id))
            else {
                continue;
            };
            let slot = (vip_id * 2 + (meta.active_ring & 1)) * size + position;
            let ring: Array<_, u32> = Array::try_from(self.map(names::RINGS)?)?;
            let entry = ring.get(&slot, 0).context("reading RINGS")?;
            let owner = marks::owner(entry);
            if marks::is_marked(entry) || held.iter().all(|&id| Some(id) == owner) {
                continue;
            }
            let record = SlotPrevious {
                backend_id: NO_BACKEND,
                generation: 0,
                since: now,
                settled: now,
            };
            self.put_records(&[key], &[record])?;
            let mut ring: Array<_, u32> = Array::try_from(self.map_mut(names::RINGS)?)?;
            let marked_entry = match owner {
                Some(id) => SLOT_CHANGED | id,
                None => SLOT_CHANGED | marks::NO_OWNER,
            };
            ring.set(slot, marked_entry, 0)
                .context("marking a ring slot")?;
            marked += 1;
        }
        if marked > 0 {
            self.flow_cache_invalidate()?;
        }
        Ok(marked)
    }

    /// Keep, of conntrack carried over from a build that tracked every
    /// flow, the live entries of flows the ring would now place on another
    /// backend (the rest the ring places as their entries did), then mark
    /// their slots: (entries kept, slots marked).
    pub(super) fn carry_flows(
        &mut self,
        keys: &[FlowKey],
        states: &[FlowState],
    ) -> Result<(usize, usize)> {
        let size = self.sizes.ring_size;
        let backends: std::collections::HashMap<u32, Backend> =
            self.backends()?.into_iter().collect();
        let vips: std::collections::HashMap<VipKey, VipMeta> = self.vips()?.into_iter().collect();
        let mut rings: std::collections::HashMap<u32, Vec<u32>> = Default::default();
        let (mut kept_keys, mut kept) = (Vec::new(), Vec::new());
        for (key, state) in keys.iter().zip(states) {
            let Some(vip) = vip_of(&vips, key) else {
                continue;
            };
            let placed = backends.get(&state.backend_id).is_some_and(|b| {
                b.generation == state.generation
                    && b.vip_id == vip.vip_id
                    && matches!(
                        b.state,
                        xdp_common::backend_state::UP | xdp_common::backend_state::DRAINING
                    )
            });
            let ring = match rings.entry(vip.vip_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.ring_entries(&vip)?),
            };
            let owner = marks::owner(ring[position(key, &vip, size) as usize]);
            if placed && owner != Some(state.backend_id) {
                kept_keys.push(*key);
                kept.push(*state);
            }
        }
        if kept.len() > self.sizes.max_flows as usize {
            bail!(
                "{} carried flows are on another backend than the ring's, more than tables.max_flows ({}): \
                 raise max_flows for this upgrade",
                kept.len(),
                self.sizes.max_flows
            );
        }
        if !kept.is_empty() {
            update_batch(map_data(self.map(names::FLOWS)?)?, &kept_keys, &kept)
                .context("writing the carried flows")?;
        }
        let marked = self.mark_held(None)?;
        Ok((kept.len(), marked))
    }

    /// A sweeper of conntrack that another thread can run: it holds its own
    /// descriptors of the maps it reads.
    pub fn flow_sweeper(&self) -> Result<FlowSweeper> {
        let dup = |name: &str| -> Result<OwnedFd> {
            map_data(self.map(name)?)?
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the {name} map's descriptor"))
        };
        Ok(FlowSweeper {
            flows: dup(names::FLOWS)?,
            backends: aya::maps::Map::Array(MapData::from_fd(dup(names::BACKENDS)?)?),
            vips: aya::maps::Map::HashMap(MapData::from_fd(dup(names::VIPS)?)?),
            ring_size: self.sizes.ring_size,
        })
    }
}

/// What the sweeping thread and the controller share.
#[derive(Debug, Default)]
pub struct Swept {
    /// Entries in conntrack at the last sweep.
    pub flows: std::sync::atomic::AtomicU64,
    /// The idle bound the controller runs with (seconds).
    pub idle: std::sync::atomic::AtomicU32,
    /// The last sweep.
    pub latest: std::sync::Mutex<Option<Sweep>>,
}

/// Reads conntrack off the controller's thread: counts entries, finds the
/// backends each changed slot's live flows are on, and deletes entries no
/// packet can use any more.
pub struct FlowSweeper {
    flows: OwnedFd,
    backends: aya::maps::Map,
    vips: aya::maps::Map,
    ring_size: u32,
}

impl FlowSweeper {
    /// Entries in the conntrack table now.
    pub fn count(&self) -> Result<u64> {
        sys::count_entries(
            self.flows.as_fd(),
            std::mem::size_of::<FlowKey>(),
            std::mem::size_of::<FlowState>(),
        )
    }

    /// One pass over conntrack. An entry is live if its backend still
    /// keeps it (same generation, up or draining, serving the flow's VIP)
    /// and it saw a packet within `idle` seconds. With `delete`, entries
    /// idle twice the bound are deleted (a packet of such a flow is placed
    /// as one without state).
    pub fn sweep(&self, idle: u32, delete: bool) -> Result<Sweep> {
        let started = monotonic_secs();
        let backends: std::collections::HashMap<u32, Backend> =
            backends_in(&self.backends)?.into_iter().collect();
        let vips: std::collections::HashMap<VipKey, VipMeta> =
            vips_in(&self.vips)?.into_iter().collect();
        let mut sweep = Sweep {
            started,
            ..Sweep::default()
        };
        let mut doomed: Vec<FlowKey> = Vec::new();
        read_flows(self.flows.as_fd(), |key, state| {
            {
                let (key, state) = (*key, *state);
                let vip = vip_of(&vips, &key);
                let placed = vip.is_some_and(|vip| {
                    backends.get(&state.backend_id).is_some_and(|b| {
                        b.generation == state.generation
                            && b.vip_id == vip.vip_id
                            && matches!(
                                b.state,
                                xdp_common::backend_state::UP | xdp_common::backend_state::DRAINING
                            )
                    })
                });
                let idle_for = started.saturating_sub(state.last_seen);
                // An entry whose backend left still says where the flow
                // went last (newer than what SEEN holds of it) until SEEN
                // forgot that too.
                if idle_for > idle.saturating_mul(2) {
                    doomed.push(key);
                    return;
                }
                if let (Some(vip), true, true) = (vip, placed, idle_for <= idle) {
                    let p = position(&key, &vip, self.ring_size);
                    let slot = xdp_common::slot_key(vip.vip_id, self.ring_size, p);
                    let ids = sweep.held.entry(slot).or_default();
                    if !ids.contains(&state.backend_id) {
                        ids.push(state.backend_id);
                    }
                }
            }
        })?;
        if delete {
            for key in &doomed {
                // Gone already (the LRU evicted it) is fine.
                let _ = sys::delete(self.flows.as_fd(), key);
            }
        }
        Ok(sweep)
    }
}

/// Every conntrack entry of the map behind `fd`.
fn read_flows(
    fd: std::os::fd::BorrowedFd<'_>,
    mut each: impl FnMut(&FlowKey, &FlowState),
) -> Result<()> {
    let key_size = std::mem::size_of::<FlowKey>();
    let value_size = std::mem::size_of::<FlowState>();
    sys::read_batches(fd, key_size, value_size, |k, v, n| {
        for i in 0..n {
            let key: FlowKey = bytemuck::pod_read_unaligned(&k[i * key_size..(i + 1) * key_size]);
            let state: FlowState =
                bytemuck::pod_read_unaligned(&v[i * value_size..(i + 1) * value_size]);
            each(&key, &state);
        }
    })
    .context("reading conntrack")
}

/// The VIP a flow is addressed to: its port's, else the port-less one.
fn vip_of(vips: &std::collections::HashMap<VipKey, VipMeta>, flow: &FlowKey) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    if let Some(m) = vips.get(&key) {
        return Some(*m);
    }
    key.port = 0;
    vips.get(&key).copied()
}
