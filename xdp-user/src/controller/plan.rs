//! Planning a reconcile, with no I/O: from the desired state (config and
//! health) and the ids the dataplane holds now, the ids, backend entries and
//! rings the dataplane must end up with. Ids of VIPs and backends that go
//! away are freed before new ones are allocated, so a change that fits the
//! tables once applied always fits while it is applied; one that does not
//! fit is refused here, before anything is written, with the exact reason.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use xdp_common::{backend_state, fwd, Backend, VipKey, VIP_F_SOURCE_ROUTES, VIP_F_TRACK_ALL};

use crate::{
    config::{parse_mac, BackendConfig, Config, ForwardingMode, InitialState, Subset, Vip},
    dataplane::{addr_bytes, Sizes},
    health::{CheckKey, Health},
    maglev::{self, RingBackend},
};

use super::vip_key;

/// A backend of a VIP, as the dataplane knows it: (VIP id, address).
pub type BackendKey = (u32, IpAddr);

/// Why a desired state cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoesNotFit(pub String);

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DoesNotFit {}

/// One VIP as the dataplane must hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct VipPlan {
    pub key: VipKey,
    pub id: u32,
    pub flags: u32,
    pub mode: u32,
    /// The ring it ends with.
    pub ring: Vec<u32>,
    /// The ring to write first, while removed backends' ids are freed and
    /// before new backends exist: the final members minus the new ones.
    /// None when the VIP loses no backend.
    pub interim_ring: Option<Vec<u32>>,
    /// QUIC server id -> backend id (QUIC VIPs).
    pub quic: BTreeMap<u32, u32>,
}

impl Plan {
    /// Every QUIC server id entry the plan ends with.
    pub fn quic_servers(&self) -> BTreeMap<xdp_common::QuicServerKey, u32> {
        self.vips
            .iter()
            .flat_map(|v| {
                v.quic.iter().map(|(&server_id, &backend)| {
                    let key = xdp_common::QuicServerKey {
                        vip_id: v.id,
                        server_id,
                    };
                    (key, backend)
                })
            })
            .collect()
    }
}

/// Everything one reconcile writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub vip_ids: BTreeMap<VipKey, u32>,
    pub backend_ids: BTreeMap<BackendKey, u32>,
    pub vips: Vec<VipPlan>,
    /// Entry of every backend id in use after the reconcile.
    pub entries: BTreeMap<u32, Backend>,
    /// VIPs that go away, with their ids.
    pub stale_vips: Vec<(VipKey, u32)>,
    /// Backend ids that go away.
    pub stale_backends: BTreeSet<u32>,
    /// Source routes: (VIP id, client prefix) -> the subset's VIPS key.
    pub source_routes: BTreeMap<crate::dataplane::SourceRoute, VipKey>,
}

/// Allocate `n` ids below `limit`, none of `taken`; ids in `avoid` (just
/// freed) only once the never-used ones run out, so a freed id is rarely
/// handed to a new backend at once.
fn allocate(n: usize, limit: u32, taken: &BTreeSet<u32>, avoid: &BTreeSet<u32>) -> Vec<u32> {
    let free = (0..limit).filter(|id| !taken.contains(id));
    let (fresh, reused): (Vec<u32>, Vec<u32>) = free.partition(|id| !avoid.contains(id));
    fresh.into_iter().chain(reused).take(n).collect()
}

/// The dataplane state of a configured backend. `state = "down"` holds it
/// out whatever its checks say; a failed check takes it out whatever it is
/// configured (a dead backend cannot serve even the flows it has, so a
/// draining one that fails is down); a draining one keeps its flows;
/// otherwise it is up. No health (checks off) is up.
pub fn desired_state(configured: InitialState, health: Option<Health>) -> u32 {
    match (configured, health) {
        (InitialState::Down, _) | (_, Some(Health::Down)) => backend_state::DOWN,
        (InitialState::Drain, _) => backend_state::DRAINING,
        (InitialState::Up, _) => backend_state::UP,
    }
}

/// Rings computed before, by VIP id and members: a reconcile recomputes
/// only the rings whose members changed, so a flapping backend costs one
/// ring, not all of them.
#[derive(Debug, Default)]
pub struct RingCache {
    rings: std::cell::RefCell<HashMap<u32, CachedRing>>,
    computed: std::cell::Cell<u64>,
}

impl RingCache {
    fn ring(&self, vip_id: u32, members: &[RingBackend], size: u32) -> Vec<u32> {
        let mut rings = self.rings.borrow_mut();
        if let Some((m, s, ring)) = rings.get(&vip_id) {
            if m == members && *s == size {
                return ring.clone();
            }
        }
        let ring = maglev::populate(members, size);
        self.computed.set(self.computed.get() + 1);
        rings.insert(vip_id, (members.to_vec(), size, ring.clone()));
        ring
    }

    /// Rings computed so far.
    pub fn computed(&self) -> u64 {
        self.computed.get()
    }
}

/// A ring and what it was computed from: members and size.
type CachedRing = (Vec<RingBackend>, u32, Vec<u32>);

/// Plan `config` with `health` against the ids in use now.
pub fn plan(
    config: &Config,
    health: &dyn Fn(&CheckKey) -> Option<Health>,
    rings: &RingCache,
    vip_ids: &BTreeMap<VipKey, u32>,
    backend_ids: &BTreeMap<BackendKey, u32>,
    sizes: Sizes,
) -> Result<Plan, DoesNotFit> {
    let entries = vip_entries(config);
    let wanted_vips: Vec<VipKey> = entries.iter().map(|e| e.key).collect();
    if wanted_vips.len() > sizes.max_vips as usize {
        return Err(DoesNotFit(format!(
            "needs {} VIP slots, the table has {} (tables.max_vips; each backend subset takes one)",
            wanted_vips.len(),
            sizes.max_vips
        )));
    }
    let pairs: usize = entries.iter().map(|e| e.backends.len()).sum();
    if pairs > sizes.max_backends as usize {
        return Err(DoesNotFit(format!(
            "needs {pairs} backend slots, the table has {} (tables.max_backends; each VIP's \
             backends count separately, and a subset's again)",
            sizes.max_backends
        )));
    }

    // VIP ids: kept where the VIP stays, freed where it goes, then new.
    let mut plan = Plan::default();
    for key in &wanted_vips {
        if let Some(&id) = vip_ids.get(key) {
            plan.vip_ids.insert(*key, id);
        }
    }
    plan.stale_vips = vip_ids
        .iter()
        .filter(|(k, _)| !plan.vip_ids.contains_key(k))
        .map(|(k, id)| (*k, *id))
        .collect();
    let taken: BTreeSet<u32> = plan.vip_ids.values().copied().collect();
    let freed: BTreeSet<u32> = plan.stale_vips.iter().map(|(_, id)| *id).collect();
    let new_vips: Vec<&VipKey> = wanted_vips
        .iter()
        .filter(|k| !plan.vip_ids.contains_key(*k))
        .collect();
    for (key, id) in new_vips
        .iter()
        .zip(allocate(new_vips.len(), sizes.max_vips, &taken, &freed))
    {
        plan.vip_ids.insert(**key, id);
    }

    // Backend ids likewise, keyed by the VIP's (new) id.
    let mut wanted_backends = Vec::new();
    for e in &entries {
        let vip_id = plan.vip_ids[&e.key];
        for b in &e.backends {
            wanted_backends.push((vip_id, b.address));
        }
    }
    // A backend keeps its id only where its VIP kept its own: a VIP id
    // freed and handed to another VIP in this plan (a full table) does not
    // hand that VIP the old one's backends, nor their flows.
    let kept_vips: BTreeSet<u32> = wanted_vips
        .iter()
        .filter_map(|k| vip_ids.get(k).copied())
        .collect();
    for key in &wanted_backends {
        if let Some(&id) = backend_ids.get(key).filter(|_| kept_vips.contains(&key.0)) {
            plan.backend_ids.insert(*key, id);
        }
    }
    let carried: BTreeSet<u32> = plan.backend_ids.values().copied().collect();
    plan.stale_backends = backend_ids
        .values()
        .filter(|id| !carried.contains(id))
        .copied()
        .collect();
    let taken: BTreeSet<u32> = plan.backend_ids.values().copied().collect();
    let new_backends: Vec<BackendKey> = wanted_backends
        .iter()
        .filter(|k| !plan.backend_ids.contains_key(k))
        .copied()
        .collect();
    let new_ids = allocate(
        new_backends.len(),
        sizes.max_backends,
        &taken,
        &plan.stale_backends,
    );
    for (key, id) in new_backends.iter().zip(&new_ids) {
        plan.backend_ids.insert(*key, *id);
    }
    let new_ids: BTreeSet<u32> = new_ids.into_iter().collect();
    // VIPs (by id) that some freed backend belonged to.
    let losing: BTreeSet<u32> = backend_ids
        .iter()
        .filter(|(_, id)| plan.stale_backends.contains(id))
        .map(|(k, _)| k.0)
        .collect();

    // Entries and rings.
    for e in &entries {
        let (vip, key) = (e.vip, e.key);
        let vip_id = plan.vip_ids[&key];
        let mut members = Vec::new();
        for b in &e.backends {
            let id = plan.backend_ids[&(vip_id, b.address)];
            let state = desired_state(
                b.state,
                health(&CheckKey {
                    vip: vip.name.clone(),
                    backend: b.address,
                }),
            );
            let (addr, family) = addr_bytes(b.address);
            plan.entries.insert(
                id,
                Backend {
                    addr,
                    mac: b.mac.as_deref().and_then(parse_mac).unwrap_or([0; 6]),
                    _pad: [0; 2],
                    family: u32::from(family),
                    state,
                    vip_id,
                    generation: 0,
                },
            );
            if state == backend_state::UP && b.weight > 0 {
                members.push(RingBackend {
                    identity: match b.address {
                        IpAddr::V4(a) => a.octets().to_vec(),
                        IpAddr::V6(a) => a.octets().to_vec(),
                    },
                    weight: b.weight,
                    id,
                });
            }
        }
        let interim_ring = losing.contains(&vip_id).then(|| {
            let kept: Vec<RingBackend> = members
                .iter()
                .filter(|m| !new_ids.contains(&m.id))
                .cloned()
                .collect();
            maglev::populate(&kept, sizes.ring_size)
        });
        plan.vips.push(VipPlan {
            key,
            id: vip_id,
            flags: vip.hash().flag()
                | vip.quic.map_or(0, |q| q.flags())
                | (if e.subset.is_none() && !vip.subsets.is_empty() {
                    VIP_F_SOURCE_ROUTES
                } else {
                    0
                })
                | (if e.subset.is_none() && overlaps(config, vip) {
                    VIP_F_TRACK_ALL
                } else {
                    0
                }),
            mode: forward_mode(vip.forwarding),
            ring: rings.ring(vip_id, &members, sizes.ring_size),
            interim_ring,
            quic: e
                .backends
                .iter()
                .filter_map(|b| Some((b.server_id?, plan.backend_ids[&(vip_id, b.address)])))
                .collect(),
        });
    }
    // Source routes: each subset's prefixes, to its VIPS entry.
    for e in &entries {
        let Some(subset) = e.subset else { continue };
        let parent = plan.vip_ids[&vip_key(e.vip)];
        for text in &subset.sources {
            if let Some((addr, len)) = crate::config::parse_prefix(text) {
                plan.source_routes.insert((parent, addr, len), e.key);
            }
        }
    }
    Ok(plan)
}

/// One entry of VIPS as the plan makes it: a configured VIP, or one of its
/// backend subsets (reached only by source routes).
struct VipEntry<'a> {
    key: VipKey,
    vip: &'a Vip,
    /// The subset it is, if one.
    subset: Option<&'a Subset>,
    /// Its backends: the VIP's, or the subset's of them.
    backends: Vec<&'a BackendConfig>,
}

/// Every VIPS entry `config` asks for, each VIP followed by its subsets.
fn vip_entries(config: &Config) -> Vec<VipEntry<'_>> {
    let mut out = Vec::new();
    for vip in &config.vips {
        let key = vip_key(vip);
        out.push(VipEntry {
            key,
            vip,
            subset: None,
            backends: vip.backends.iter().collect(),
        });
        for (n, subset) in vip.subsets.iter().enumerate() {
            out.push(VipEntry {
                key: key.subset(n),
                vip,
                subset: Some(subset),
                backends: vip
                    .backends
                    .iter()
                    .filter(|b| subset.backends.contains(&b.address))
                    .collect(),
            });
        }
    }
    out
}

/// Whether a packet of `vip` may match another VIP as VIPs come and go:
/// it shares its address and protocol with another VIP, one of them
/// port-less. A flow can then move between the two, and only conntrack on
/// every flow knows where it went last.
fn overlaps(config: &Config, vip: &crate::config::Vip) -> bool {
    config.vips.iter().any(|other| {
        other.name != vip.name
            && other.address == vip.address
            && other.protocol == vip.protocol
            && (other.port.is_none() || vip.port.is_none())
    })
}

/// The dataplane's forwarding mode (`fwd::*`) of a VIP forwarded by `f`.
pub fn forward_mode(f: ForwardingMode) -> u32 {
    if f == ForwardingMode::L2dsr {
        fwd::L2_DSR
    } else {
        fwd::ENCAP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &[&str], port: u16, max_backends: u32) -> Config {
        let mut text = format!(
            "interface = \"eth0\"\n[tables]\nmax_vips = 2\nmax_backends = {max_backends}\nring_size = 13\n\
             [forwarding]\ngateway_mac = \"02:00:00:00:00:fe\"\n\
             [[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nport = {port}\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n"
        );
        for b in backends {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n"));
        }
        Config::parse(&text).unwrap()
    }

    fn replan(c: &Config, before: &Plan) -> Result<Plan, DoesNotFit> {
        plan(
            c,
            &|_| None,
            &RingCache::default(),
            &before.vip_ids,
            &before.backend_ids,
            c.tables.sizes(),
        )
    }

    #[test]
    fn a_full_table_can_swap_a_backend() {
        let a = config(
            &["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"],
            80,
            4,
        );
        let first = replan(&a, &Plan::default()).unwrap();
        let b = config(
            &["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.5"],
            80,
            4,
        );
        let second = replan(&b, &first).unwrap();
        let old = first.backend_ids[&(0, "198.18.1.4".parse().unwrap())];
        assert_eq!(second.stale_backends, BTreeSet::from([old]));
        // The only free id is the freed one: reused, and the VIP gets an
        // interim ring without it before the new backend takes the id.
        assert_eq!(second.backend_ids[&(0, "198.18.1.5".parse().unwrap())], old);
        let interim = second.vips[0].interim_ring.as_ref().unwrap();
        assert!(!interim.contains(&old));
        assert!(second.vips[0].ring.contains(&old));
    }

    #[test]
    fn a_port_change_with_a_full_table_fits() {
        let backends = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
        let first = replan(&config(&backends, 80, 3), &Plan::default()).unwrap();
        let moved = replan(&config(&backends, 8080, 3), &first).unwrap();
        assert_eq!(moved.stale_vips.len(), 1);
        assert_eq!(moved.stale_backends.len(), 3);
        assert_eq!(moved.backend_ids.len(), 3);
        // The new VIP has no interim ring: it lost nothing, it is new.
        assert_eq!(moved.vips[0].interim_ring, None);
    }

    #[test]
    fn freed_ids_are_reused_last() {
        let taken = BTreeSet::from([0, 2]);
        let avoid = BTreeSet::from([1]);
        assert_eq!(allocate(3, 5, &taken, &avoid), vec![3, 4, 1]);
    }

    #[test]
    fn too_much_is_refused_with_the_exact_need() {
        let mut c = config(&["198.18.1.1", "198.18.1.2"], 80, 2);
        let extra = c.vips[0].backends[0].clone();
        c.vips[0].backends.push(extra);
        c.vips[0].backends[2].address = "198.18.1.3".parse().unwrap();
        let e = replan(&c, &Plan::default()).unwrap_err().to_string();
        assert!(e.contains("needs 3 backend slots, the table has 2"), "{e}");
    }
}
