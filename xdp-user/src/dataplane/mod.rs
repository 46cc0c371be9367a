//! The only module that touches aya: loads the eBPF object with its map sizes,
//! attaches the programs, and reads and writes their maps through typed
//! functions in the operator's vocabulary (VIP, backend, ring, flow).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

mod aux;
mod bpffs;
mod chain;
mod counters;
mod decap;
mod entries;
mod flow_cache;
pub mod libxdp;
mod link;
pub mod marks;
mod pins;
mod quic;
mod sharing;
mod slots;
mod source_routes;
mod sweep;
mod sys;
pub mod trace;
mod upgrade;
mod uplinks;
mod vip_filter;

pub use aux::*;
use bpffs::*;
pub use bpffs::{detach, detach_pinned_link, detach_pinned_uplink};
pub use chain::pinned_xdp_program;
pub use counters::add_drops;
pub use decap::Decap;
use decap::DECAP_MAPS;
pub use entries::generation_after;
use entries::{backends_in, vips_in};
use link::attach_xdp;
pub use link::{Attachment, LINK_PIN};
pub use sharing::find_dispatcher;
pub use source_routes::SourceRoute;
pub use sweep::{monotonic_secs, FlowSweeper, Swept};
use sys::update_batch;
use xdp_common::{
    map_names as names, Backend, Config, Counters, FlowKey, FlowState, VipDrops, VipKey, VipMeta,
    FAMILY_V4, FAMILY_V6,
};

/// The eBPF object built by `build.rs` (empty when built with AYA_BUILD_SKIP).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-ebpf"));

/// Name of the balancer program in the object.
pub const LB_PROGRAM: &str = "xdp_lb";
/// Name of the backend-side decapsulation program in the object.
pub const DECAP_PROGRAM: &str = "decap";

/// Table sizes, fixed when the dataplane is loaded. Each comes from one
/// config value; nothing else states them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Most VIPs at once.
    pub max_vips: u32,
    /// Most backends at once (backend ids are `0..max_backends`).
    pub max_backends: u32,
    /// Slots of each Maglev ring; prime.
    pub ring_size: u32,
    /// Conntrack entries (LRU).
    pub max_flows: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            max_vips: 64,
            max_backends: 4096,
            ring_size: 65537,
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// Conntrack entries by default: flows are tracked only in ring slots that
/// changed owner, so a quarter of a million covers a million active flows
/// while a quarter of the ring changes at once.
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 18;

impl Sizes {
    /// Entries of the RINGS array: two halves per VIP.
    pub fn ring_entries(&self) -> Result<u32> {
        self.max_vips
            .checked_mul(2)
            .and_then(|n| n.checked_mul(self.ring_size))
            .ok_or_else(|| {
                anyhow!(
                    "max_vips ({}) x 2 x ring_size ({}) exceeds 2^32 ring slots",
                    self.max_vips,
                    self.ring_size
                )
            })
    }

    fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_vips", self.max_vips),
            ("max_backends", self.max_backends),
            ("ring_size", self.ring_size),
            ("max_flows", self.max_flows),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.max_backends >= marks::NO_OWNER {
            bail!("max_backends must be below {}", marks::NO_OWNER);
        }
        self.ring_entries().map(drop)
    }
}

/// How the program is attached to the interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before any skb exists: the fast path.
    #[default]
    Native,
    /// In the stack after skb allocation: works on every device, slower.
    Generic,
    /// On the NIC itself, where the hardware supports it.
    Offload,
}

impl AttachMode {
    pub(crate) fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
            Self::Offload => XdpMode::Hardware,
        }
    }
}

/// As the config writes it: `native`, `generic`, `offload`.
impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Offload => "offload",
        })
    }
}

impl std::str::FromStr for AttachMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "offload" => Ok(Self::Offload),
            _ => bail!("unknown XDP mode {s:?}: expected native, generic or offload"),
        }
    }
}

fn object() -> Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        bail!("this binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild without it");
    }
    Ok(EBPF_OBJECT)
}

/// Load one XDP program of `ebpf` into the kernel (the verifier runs here).
fn load_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program = xdp_program_mut(ebpf, name)?;
    program
        .load()
        .with_context(|| format!("the kernel rejected program {name}"))?;
    Ok(program)
}

fn attach_program(ebpf: &mut Ebpf, name: &str, iface: &str, mode: AttachMode) -> Result<()> {
    attach_xdp(xdp_program_mut(ebpf, name)?, name, iface, mode).map(drop)
}

/// An address as the maps store it: IPv4 in the first four bytes.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// An XDP program of `ebpf` by name, for loading or attaching.
fn xdp_program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// A loaded XDP program of `ebpf` by name.
fn xdp_program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    Ok(ebpf
        .program(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
        .try_into()?)
}

fn find_map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map> {
    ebpf.map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn find_map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// The first `N` slots of a per-CPU `u64` counter array, summed over CPUs.
fn sum_counters<const N: usize>(map: &Map) -> Result<[u64; N]> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    let mut out = [0u64; N];
    for (i, slot) in (0..).zip(out.iter_mut()) {
        *slot = sum_per_cpu(&map, i, |a, b| a + b, 0)?;
    }
    Ok(out)
}

/// Read a per-CPU array slot summed over all CPUs.
fn sum_per_cpu<T: aya::Pod + Copy>(
    map: &PerCpuArray<&MapData, T>,
    index: u32,
    add: impl Fn(T, T) -> T,
    zero: T,
) -> Result<T> {
    let values = map
        .get(&index, 0)
        .with_context(|| format!("reading counter slot {index}"))?;
    Ok(values.iter().copied().fold(zero, add))
}

/// Two counters of a VIP or backend added up (CPUs, or a VIP's subsets).
pub fn add_counters(a: Counters, b: Counters) -> Counters {
    Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}

/// Bring `map`, which holds the entries `have`, to `want`: first remove
/// what `want` lacks or maps elsewhere, then (unless `removals_only`)
/// write what `want` has and `have` does not. A caller removes before the
/// entries its map's values name go away, and writes once they exist.
fn sync_entries<M, K: Ord, V: PartialEq>(
    map: &mut M,
    (have, want): (
        &std::collections::BTreeMap<K, V>,
        &std::collections::BTreeMap<K, V>,
    ),
    removals_only: bool,
    remove: impl Fn(&mut M, &K) -> Result<()>,
    write: impl Fn(&mut M, &K, &V) -> Result<()>,
) -> Result<()> {
    for (key, value) in have {
        if want.get(key) != Some(value) {
            remove(map, key)?;
        }
    }
    if removals_only {
        return Ok(());
    }
    for (key, value) in want {
        if have.get(key) != Some(value) {
            write(map, key, value)?;
        }
    }
    Ok(())
}

/// Maps of the balancer, all pinned by a daemon.
const LB_MAPS: [&str; 19] = [
    names::VIPS,
    names::VIP_SERIALS,
    names::RINGS,
    names::SEEN,
    names::SEEN_EPOCH,
    names::BACKENDS,
    names::FLOWS,
    names::STATS,
    names::VIP_STATS,
    names::VIP_DROPS,
    names::BACKEND_STATS,
    names::CONFIG,
    names::TRACE,
    names::VIP_FILTER,
    names::FLOW_CACHE_GEN,
    names::QUIC_SERVERS,
    names::PASS_TO,
    names::SOURCE_ROUTES,
    names::UPLINKS,
];

/// Key and value size of every balancer map: the ABI a pinned map must
/// match to be adopted.
fn map_layouts() -> [(&'static str, u32, u32); LB_MAPS.len()] {
    use std::mem::size_of;
    let sz = |n: usize| n as u32;
    [
        (
            names::VIPS,
            sz(size_of::<VipKey>()),
            sz(size_of::<VipMeta>()),
        ),
        (names::RINGS, 4, 8),
        (names::SEEN, 4, 8),
        (names::VIP_SERIALS, 4, 4),
        (names::SEEN_EPOCH, 4, 4),
        (names::BACKENDS, 4, sz(size_of::<Backend>())),
        (
            names::FLOWS,
            sz(size_of::<FlowKey>()),
            sz(size_of::<FlowState>()),
        ),
        (names::STATS, 4, 8),
        (names::VIP_STATS, 4, sz(size_of::<Counters>())),
        (names::VIP_DROPS, 4, sz(size_of::<VipDrops>())),
        (names::BACKEND_STATS, 4, sz(size_of::<Counters>())),
        (names::CONFIG, 4, sz(size_of::<Config>())),
        (names::TRACE, 4, sz(size_of::<xdp_common::TraceFilter>())),
        (names::VIP_FILTER, 4, 4),
        (names::FLOW_CACHE_GEN, 4, 4),
        (
            names::QUIC_SERVERS,
            sz(size_of::<xdp_common::QuicServerKey>()),
            4,
        ),
        (names::PASS_TO, 4, 4),
        (
            names::SOURCE_ROUTES,
            sz(4 + size_of::<xdp_common::SourcePrefix>()),
            sz(size_of::<VipKey>()),
        ),
        (names::UPLINKS, 4, sz(size_of::<xdp_common::Uplink>())),
    ]
}

fn map_data(map: &Map) -> Result<&MapData> {
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::ProgramArray(d)
        | Map::LpmTrie(d) => Ok(d),
        other => bail!("unexpected map type {other:?}"),
    }
}

fn array_data(map: &Map) -> Result<&MapData> {
    match map {
        Map::Array(d) => Ok(d),
        other => bail!("expected an array map, found {other:?}"),
    }
}

/// The balancer's dataplane: the loaded `xdp_lb` program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    sizes: Sizes,
    adopted: bool,
    /// Where the maps are pinned (None: private maps).
    pin_dir: Option<PathBuf>,
    /// The pinned attachment, once attached with [`Dataplane::attach_pinned`].
    attached: Option<Attached>,
    /// The extra uplinks' attachments ([`Dataplane::attach_uplinks`]).
    uplinks: Vec<Attached>,
    /// Attach as a member of libxdp's dispatcher (`[libxdp]`), not alone.
    sharing: Option<sharing::Sharing>,
    /// The extra uplinks and their next hops, as UPLINKS should hold them.
    uplink_hops: Vec<(String, [u8; 6])>,
    /// The MAC of the interface attached to: the source of every frame the
    /// balancer sends, written into CONFIG with the rest of the policy.
    source_mac: [u8; 6],
    /// A program is chained after the balancer (PASS_TO): CONFIG says so.
    chained: bool,
    /// When this process last turned the SEEN filter's epoch
    /// (CLOCK_MONOTONIC seconds); None until its first review.
    seen_turned: Option<u32>,
    /// When each marked ring slot changed and settled, by slot key (the
    /// marks themselves are in RINGS); found there on first use.
    records: Option<std::collections::HashMap<u32, marks::Record>>,
}

/// Where and how the balancer is attached.
struct Attached {
    hold: Hold,
    iface: String,
    mode: AttachMode,
}

/// How the balancer holds an interface.
enum Hold {
    /// Alone, through its own pinned bpf_link.
    Link(Attachment),
    /// As a member of libxdp's dispatcher there; `adopted`: in place of
    /// the member an earlier run left. `link_pin`: where the link of this
    /// interface would be pinned in link mode (one an earlier run left
    /// there is detached when joining).
    Dispatcher { adopted: bool, link_pin: PathBuf },
}

impl Attached {
    /// It took over what an earlier run left (link or member).
    fn adopted(&self) -> bool {
        match &self.hold {
            Hold::Link(l) => l.adopted,
            Hold::Dispatcher { adopted, .. } => *adopted,
        }
    }
}

impl Dataplane {
    /// Load the balancer with `sizes`, maps private to this process (tests,
    /// benchmarks). The verifier runs here: an error names the program the
    /// kernel rejected.
    pub fn load(sizes: Sizes) -> Result<Self> {
        Self::load_with(sizes, None)
    }

    /// Load the balancer with its maps pinned under `pin_dir` (on a bpffs).
    /// Maps already pinned there by an earlier run are adopted, with their
    /// contents (VIPs, rings, backends, conntrack, counters): a restarted
    /// or upgraded daemon keeps every flow. Their sizes must match `sizes`.
    pub fn open(sizes: Sizes, pin_dir: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        Self::load_with(sizes, Some(pin_dir))
    }

    fn load_with(sizes: Sizes, pin_dir: Option<&Path>) -> Result<Self> {
        sizes.validate().context("invalid dataplane sizes")?;
        let ring_entries = sizes.ring_entries()?;
        let adopted = pin_dir.is_some_and(|d| d.join(names::VIPS).exists());
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::VIPS, sizes.max_vips)
            .map_max_entries(names::VIP_STATS, sizes.max_vips)
            .map_max_entries(names::VIP_DROPS, sizes.max_vips)
            .map_max_entries(names::VIP_SERIALS, sizes.max_vips)
            .map_max_entries(names::RINGS, ring_entries)
            .map_max_entries(names::BACKENDS, sizes.max_backends)
            .map_max_entries(names::BACKEND_STATS, sizes.max_backends)
            .map_max_entries(names::QUIC_SERVERS, sizes.max_backends)
            .map_max_entries(names::FLOWS, sizes.max_flows)
            .override_global(names::RING_SIZE_GLOBAL, &sizes.ring_size, true);
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => LB_MAPS.iter().map(|&n| (n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let carried = match pin_dir {
            Some(dir) => upgrade::before_load(dir, &sizes)?,
            None => upgrade::Carried::default(),
        };
        let mut ebpf = loader
            .load(object()?)
            .context("loading the eBPF object (map creation)")?;
        let (carried_keys, carried_states) = upgrade::after_load(&mut ebpf, carried)?;
        if let Err(e) = check_adopted_maps(&ebpf, &sizes, ring_entries)
            .and_then(|()| load_program(&mut ebpf, LB_PROGRAM).map(drop))
        {
            if let (Some(dir), false) = (pin_dir, adopted) {
                remove_own_pins(&ebpf, dir);
            }
            return Err(e);
        }
        let mut dataplane = Self {
            ebpf,
            sizes,
            adopted,
            pin_dir: pin_dir.map(Path::to_owned),
            attached: None,
            uplinks: Vec::new(),
            sharing: None,
            uplink_hops: Vec::new(),
            source_mac: [0; 6],
            chained: false,
            seen_turned: None,
            records: None,
        };
        if adopted {
            // What the adopted program chains stays chained.
            dataplane.chained = dataplane.config()?.chained != 0;
        } else {
            dataplane.set_config(&Config::default())?;
        }
        // Before any program runs with it: an older build's dataplane has
        // VIPs but no filter yet (a fresh, empty one would pass them all).
        dataplane.filter_rebuild()?;
        // Before the new program runs: flows an older build tracked on
        // another backend than the ring's keep it.
        if !carried_keys.is_empty() {
            let (kept, marked) = dataplane
                .carry_flows(&carried_keys, &carried_states)
                .context("carrying the older build's conntrack over")?;
            tracing::info!(
                carried = carried_keys.len(),
                kept,
                marked,
                "conntrack of an older build: of {} flows carried over, kept the {kept} the ring now places elsewhere, their {marked} slots marked",
                carried_keys.len()
            );
        }
        // A non-zero generation turns the new program's flow cache on.
        dataplane.flow_cache_invalidate()?;
        Ok(dataplane)
    }

    /// Whether the maps were adopted from an earlier run.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// Attach the balancer to `iface`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        self.take_source_mac(iface)?;
        attach_program(&mut self.ebpf, LB_PROGRAM, iface, mode)
    }

    /// The loaded balancer program (for BPF_PROG_TEST_RUN).
    pub fn program(&self) -> Result<&Xdp> {
        xdp_program(&self.ebpf, LB_PROGRAM)
    }

    fn map(&self, name: &str) -> Result<&Map> {
        find_map(&self.ebpf, name)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        find_map_mut(&mut self.ebpf, name)
    }

    /// Replace the runtime policy (next hop, outer source, odd-packet
    /// actions). Its `source_mac` is this dataplane's interface's, once
    /// attached (or set with [`Dataplane::set_source_mac`]).
    pub fn set_config(&mut self, config: &Config) -> Result<()> {
        let config = Config {
            source_mac: self.source_mac,
            chained: u8::from(self.chained),
            uplinks: u8::from(!self.uplink_hops.is_empty()),
            ..*config
        };
        let mut map: Array<_, Config> = Array::try_from(self.map_mut(names::CONFIG)?)?;
        map.set(0, config, 0).context("writing CONFIG")?;
        Ok(())
    }

    /// What `xdplb trace` asks decision events for (benchmarks and tests;
    /// the command writes it through the pin).
    pub fn set_trace_filter(&mut self, filter: &xdp_common::TraceFilter) -> Result<()> {
        let mut map: Array<_, xdp_common::TraceFilter> =
            Array::try_from(self.map_mut(names::TRACE)?)?;
        map.set(0, filter, 0).context("writing TRACE")
    }

    /// The policy in force.
    pub fn config(&self) -> Result<Config> {
        let map: Array<_, Config> = Array::try_from(self.map(names::CONFIG)?)?;
        map.get(&0, 0).context("reading CONFIG")
    }

    /// Send every frame from `mac` (the attached interface's; attaching
    /// sets it), keeping the rest of the policy in force.
    pub fn set_source_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        let config = self.config()?;
        self.source_mac = mac;
        self.set_config(&config)
    }

    /// Take the MAC of `iface` as the frames' source (before attaching to
    /// it, so the first frame already has it).
    fn take_source_mac(&mut self, iface: &str) -> Result<()> {
        let mac = crate::iface::by_name(iface)?
            .and_then(|i| i.mac)
            .unwrap_or([0; 6]);
        if mac != self.source_mac {
            self.set_source_mac(mac)?;
        }
        Ok(())
    }
}

/// The bytes the kernel charges an LRU hash map with per-CPU lists (as
/// FLOWS is made) of `entries` entries of these sizes: what a conntrack
/// table of another shape would cost.
pub fn lru_memory(key: u32, value: u32, entries: u32) -> Result<u64> {
    use std::os::fd::AsFd as _;
    /// `BPF_MAP_TYPE_LRU_HASH`, `BPF_F_NO_COMMON_LRU`.
    const LRU_HASH: u32 = 9;
    const NO_COMMON_LRU: u32 = 1 << 1;
    let fd = sys::map_create(LRU_HASH, key, value, entries, NO_COMMON_LRU)
        .context("creating an LRU map to measure")?;
    sys::memlock(fd.as_fd())
}

#[cfg(test)]
mod tests;
