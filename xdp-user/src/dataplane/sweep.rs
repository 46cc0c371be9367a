//! Conntrack and SEEN from the daemon's side: the sweep that tells which
//! backends the flows of each changed ring slot are on (and deletes what
//! no packet can use), the SEEN epochs, and conntrack carried over from a
//! build that tracked every flow.

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, MapData};
use xdp_common::{
    flow_hash, map_names as names, ring_hash, Backend, FlowKey, FlowState, VipKey, VipMeta,
};

use super::{
    array_data, backends_in, map_data,
    marks::{self, Sweep},
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
pub(super) fn position(flow: &FlowKey, vip: &VipMeta, ring_size: u32) -> u32 {
    ring_hash(flow, vip.flags, flow_hash(flow, false)) % ring_size
}

impl Dataplane {
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
        let routes = routes_in(self.map(names::SOURCE_ROUTES)?)?;
        let mut rings: std::collections::HashMap<u32, Vec<u64>> = Default::default();
        let (mut kept_keys, mut kept) = (Vec::new(), Vec::new());
        for (key, state) in keys.iter().zip(states) {
            let Some(vip) = vip_of(&vips, &routes, key) else {
                continue;
            };
            let placed = still_placed(&backends, state, &vip);
            let ring = self.ring_in(&mut rings, &vip)?;
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
            routes: aya::maps::Map::LpmTrie(MapData::from_fd(dup(names::SOURCE_ROUTES)?)?),
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
    routes: aya::maps::Map,
    ring_size: u32,
}

impl FlowSweeper {
    /// Entries in the conntrack table now.
    pub fn count(&self) -> Result<u64> {
        count_flows(self.flows.as_fd())
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
        let routes = routes_in(&self.routes)?;
        let mut sweep = Sweep {
            started,
            ..Sweep::default()
        };
        let mut doomed: Vec<FlowKey> = Vec::new();
        read_flows(self.flows.as_fd(), |key, state| {
            let vip = vip_of(&vips, &routes, key);
            let placed = vip.is_some_and(|vip| still_placed(&backends, state, &vip));
            let idle_for = started.saturating_sub(state.last_seen);
            // An entry whose backend left still says where the flow went
            // last (newer than what SEEN holds of it) until SEEN forgot
            // that too.
            if idle_for > idle.saturating_mul(2) {
                doomed.push(*key);
                return;
            }
            if let (Some(vip), true, true) = (vip, placed, idle_for <= idle) {
                let p = position(key, &vip, self.ring_size);
                let slot = marks::slot_key(vip.vip_id, self.ring_size, p);
                let ids = sweep.held.entry(slot).or_default();
                if !ids.contains(&state.backend_id) {
                    ids.push(state.backend_id);
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

/// Entries of the conntrack map behind `fd`, read in batches.
pub(super) fn count_flows(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    sys::count_entries(
        fd,
        std::mem::size_of::<FlowKey>(),
        std::mem::size_of::<FlowState>(),
    )
}

/// Whether the backend a conntrack entry names still places its flow of
/// `vip`: the same generation, up or draining, serving the VIP (the
/// program's `still_placed`).
fn still_placed(
    backends: &std::collections::HashMap<u32, Backend>,
    state: &FlowState,
    vip: &VipMeta,
) -> bool {
    backends.get(&state.backend_id).is_some_and(|b| {
        b.generation == state.generation
            && b.vip_id == vip.vip_id
            && matches!(
                b.state,
                xdp_common::backend_state::UP | xdp_common::backend_state::DRAINING
            )
    })
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

/// The VIPS entry that places a flow: the VIP it is addressed to (its
/// port's, else the port-less one), or the backend subset the longest of
/// the VIP's source routes matching the client sends it to.
fn vip_of(
    vips: &std::collections::HashMap<VipKey, VipMeta>,
    routes: &[Route],
    flow: &FlowKey,
) -> Option<VipMeta> {
    let vip = addressed(vips, flow)?;
    if vip.flags & xdp_common::VIP_F_SOURCE_ROUTES == 0 {
        return Some(vip);
    }
    let best = routes
        .iter()
        .filter(|r| r.vip_id == vip.vip_id && r.matches(&flow.src))
        .max_by_key(|r| r.bits);
    Some(
        best.and_then(|r| vips.get(&r.subset).copied())
            .unwrap_or(vip),
    )
}

/// The VIP a flow is addressed to: its port's, else the port-less one.
fn addressed(vips: &std::collections::HashMap<VipKey, VipMeta>, flow: &FlowKey) -> Option<VipMeta> {
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

/// A source route as the sweeper matches it.
pub(super) struct Route {
    pub vip_id: u32,
    pub addr: [u8; 16],
    /// Bits of the client address the route matches.
    pub bits: u32,
    pub subset: VipKey,
}

impl Route {
    fn matches(&self, client: &[u8; 16]) -> bool {
        let whole = (self.bits / 8) as usize;
        let rest = self.bits % 8;
        self.addr[..whole] == client[..whole]
            && (rest == 0 || {
                let mask = 0xffu8 << (8 - rest);
                self.addr[whole] & mask == client[whole] & mask
            })
    }
}

/// Every source route in the SOURCE_ROUTES map `map`.
pub(super) fn routes_in(map: &aya::maps::Map) -> Result<Vec<Route>> {
    let trie: aya::maps::LpmTrie<_, xdp_common::SourcePrefix, VipKey> =
        aya::maps::LpmTrie::try_from(map)?;
    trie.iter()
        .map(|e| {
            let (k, subset) = e.context("reading SOURCE_ROUTES")?;
            let data = k.data();
            Ok(Route {
                vip_id: u32::from_be_bytes(data.vip_id),
                addr: data.addr,
                bits: k.prefix_len().saturating_sub(32),
                subset,
            })
        })
        .collect()
}
