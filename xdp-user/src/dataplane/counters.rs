//! Reading what the dataplane counted: global reasons, per VIP and per
//! backend traffic, per VIP drops, conntrack entries, the program's run
//! time; and zeroing the counters of a reused id.

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, PerCpuArray, PerCpuValues};
use xdp_common::{map_names as names, reason, Counters, FlowKey, FlowState, VipDrops};

use super::{add_counters, map_data, sum_counters, sum_per_cpu, update_batch, Dataplane};

impl Dataplane {
    /// Total run time and run count of the balancer program, as the kernel
    /// counts them while `kernel.bpf_stats_enabled` is 1 (zero otherwise).
    pub fn program_stats(&self) -> Result<(std::time::Duration, u64)> {
        let info = self.program()?.info().context("reading program info")?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Zero one slot of a per-CPU counter map of `T`s (a reused VIP or
    /// backend id).
    pub(super) fn reset_counters<T: aya::Pod + Default>(
        &mut self,
        map: &str,
        index: u32,
    ) -> Result<()> {
        let mut counters: PerCpuArray<_, T> = PerCpuArray::try_from(self.map_mut(map)?)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        counters
            .set(index, PerCpuValues::try_from(vec![T::default(); cpus])?, 0)
            .with_context(|| format!("resetting {map}[{index}]"))?;
        Ok(())
    }

    /// Drops of one VIP by reason, summed over CPUs.
    pub fn vip_drops(&self, vip_id: u32) -> Result<VipDrops> {
        self.check_vip_id(vip_id)?;
        let map: PerCpuArray<_, VipDrops> = PerCpuArray::try_from(self.map(names::VIP_DROPS)?)?;
        sum_per_cpu(&map, vip_id, add_drops, VipDrops::default())
    }

    /// The conntrack entry of a flow, if tracked.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        let map: HashMap<_, FlowKey, FlowState> = HashMap::try_from(self.map(names::FLOWS)?)?;
        match map.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading FLOWS"),
        }
    }

    /// The bytes the kernel charges each of the balancer's maps.
    pub fn memory(&self) -> Result<Vec<(&'static str, u64)>> {
        use std::os::fd::AsFd as _;
        super::LB_MAPS
            .iter()
            .map(|&name| {
                let fd = map_data(self.map(name)?)?
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()?;
                Ok((name, super::sys::memlock(fd.as_fd())?))
            })
            .collect()
    }

    /// Number of tracked flows (reads the table in batches: for status,
    /// not hot paths).
    pub fn flow_count(&self) -> Result<usize> {
        use std::os::fd::AsFd as _;
        let map = map_data(self.map(names::FLOWS)?)?;
        Ok(super::sweep::count_flows(map.fd().as_fd())? as usize)
    }

    /// Number of tracked flows, one lookup per entry: the baseline the
    /// benchmarks compare [`Dataplane::flow_count`] with.
    pub fn flow_count_walk(&self) -> Result<usize> {
        let map: HashMap<_, FlowKey, FlowState> = HashMap::try_from(self.map(names::FLOWS)?)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// Track `flows` (batched): fills conntrack for tests and benchmarks.
    pub fn set_flows(&mut self, keys: &[FlowKey], states: &[FlowState]) -> Result<()> {
        update_batch(map_data(self.map(names::FLOWS)?)?, keys, states)?;
        self.flow_cache_invalidate()
    }

    /// Global per-reason counters, summed over CPUs, indexed by
    /// `xdp_common::reason`.
    pub fn stats(&self) -> Result<[u64; reason::COUNT as usize]> {
        sum_counters(self.map(names::STATS)?)
    }

    /// Counters of one VIP, summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<Counters> {
        self.check_vip_id(vip_id)?;
        let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(self.map(names::VIP_STATS)?)?;
        sum_per_cpu(&map, vip_id, add_counters, Counters::default())
    }

    /// Counters of one backend, summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<Counters> {
        self.check_backend_id(backend_id)?;
        let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(self.map(names::BACKEND_STATS)?)?;
        sum_per_cpu(&map, backend_id, add_counters, Counters::default())
    }
}

/// Two drop counters of a VIP added up (CPUs, or a VIP's subsets).
pub fn add_drops(a: VipDrops, b: VipDrops) -> VipDrops {
    VipDrops {
        no_backend: a.no_backend + b.no_backend,
        encap_failed: a.encap_failed + b.encap_failed,
    }
}
