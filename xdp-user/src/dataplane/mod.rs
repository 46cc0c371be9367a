//! The only module that touches aya: loads the eBPF object with its map sizes,
//! attaches the programs, and reads and writes their maps through typed
//! functions in the operator's vocabulary (VIP, backend, ring, flow).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

mod counters;
mod flow_cache;
mod link;
pub mod marks;
mod pins;
mod slots;
mod sweep;
mod sys;
pub mod trace;
mod upgrade;
mod vip_filter;

use link::attach_xdp;
pub use link::{Attachment, LINK_PIN};
pub use sweep::{monotonic_secs, FlowSweeper, Swept};
use sys::update_batch;
use xdp_common::{
    backend_state, decap_reason, map_names as names, Backend, Config, Counters, DecapKey, FlowKey,
    FlowState, VipDrops, VipKey, VipMeta, FAMILY_V4, FAMILY_V6,
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

fn add_counters(a: Counters, b: Counters) -> Counters {
    Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}

/// Maps of the balancer, all pinned by a daemon.
const LB_MAPS: [&str; 15] = [
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
];

/// Key and value size of every balancer map: the ABI a pinned map must
/// match to be adopted.
fn map_layouts() -> [(&'static str, u32, u32); 15] {
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
    ]
}

/// Every entry of a VIPS map.
fn vips_in(map: &Map) -> Result<Vec<(VipKey, VipMeta)>> {
    let map: HashMap<_, VipKey, VipMeta> = HashMap::try_from(map)?;
    map.iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("reading VIPS")
}

/// The slots of a BACKENDS map in use, with their ids.
fn backends_in(map: &Map) -> Result<Vec<(u32, Backend)>> {
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

/// Maps of the decap program, pinned by `xdplb decap`.
const DECAP_MAPS: [&str; 2] = [names::DECAP_VIPS, names::DECAP_STATS];

fn map_data(map: &Map) -> Result<&MapData> {
    match map {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) => Ok(d),
        other => bail!("unexpected map type {other:?}"),
    }
}

fn array_data(map: &Map) -> Result<&MapData> {
    match map {
        Map::Array(d) => Ok(d),
        other => bail!("expected an array map, found {other:?}"),
    }
}

/// bpffs magic number (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Make sure `pin_dir` exists on a bpffs, mounting one at /sys/fs/bpf if
/// none is mounted there (as systemd normally does).
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: constant NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "/sys/fs/bpf is not a bpffs and mounting one failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!(
            "{} is not on a bpffs (mount -t bpf bpf <dir>)",
            pin_dir.display()
        );
    }
    Ok(())
}

/// Remove a pinned dataplane (balancer or decap): unpinning the link detaches the program
/// (nothing else holds it), unpinning the maps frees them with their state.
/// Returns whether anything was there.
pub fn detach(pin_dir: &Path) -> Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let mut removed = false;
    for name in std::iter::once(LINK_PIN).chain(LB_MAPS).chain(DECAP_MAPS) {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    std::fs::remove_dir(pin_dir)
        .with_context(|| format!("removing {} (does it hold other files?)", pin_dir.display()))?;
    Ok(removed)
}

/// Detach the XDP link pinned in `pin_dir` from its interface and leave
/// every pin in place, as `bpftool link detach` does: the program stops
/// running while the maps and the (now defunct) link stay pinned. This is
/// the fault the daemon's self-check repairs; the HA tests inject it.
pub fn detach_pinned_link(pin_dir: &Path) -> Result<()> {
    let facts = sys::pinned_link_facts(&pin_dir.join(LINK_PIN))?;
    sys::detach_link_by_id(facts.id)
}

/// An adopted map keeps the layout and size of the run that created it: a
/// build whose entries differ must not read or write it, and table sizes
/// cannot change under it.
fn check_adopted_maps(ebpf: &Ebpf, sizes: &Sizes, ring_entries: u32) -> Result<()> {
    let dataplane_sizes = [
        (names::VIPS, sizes.max_vips),
        (names::VIP_STATS, sizes.max_vips),
        (names::VIP_DROPS, sizes.max_vips),
        (names::VIP_SERIALS, sizes.max_vips),
        (names::RINGS, ring_entries),
        (names::BACKENDS, sizes.max_backends),
        (names::BACKEND_STATS, sizes.max_backends),
        (names::FLOWS, sizes.max_flows),
    ];
    // An adopted map keeps the layout and size of the run that created
    // it: a build whose entries differ must not read or write it, and
    // table sizes cannot change under it.
    for (name, key, value) in map_layouts() {
        let info = map_data(find_map(ebpf, name)?)?.info()?;
        if (info.key_size(), info.value_size()) != (key, value) {
            bail!(
                "the pinned map {name} has {}-byte keys and {}-byte values, this build uses {key} and {value}: \
                 it was made by an incompatible xdplb version; run `xdplb detach` (this drops conntrack)",
                info.key_size(),
                info.value_size()
            );
        }
        let Some(&(_, want)) = dataplane_sizes.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let have = info.max_entries();
        if have != want {
            bail!(
                "the pinned dataplane's {name} holds {have} entries but the config asks for {want}: \
                 table sizes cannot change under a running dataplane; \
                 run `xdplb detach` (this drops conntrack) or restore the old sizes"
            );
        }
    }
    Ok(())
}

/// Remove the map pins under `dir` that are `ebpf`'s own maps (never
/// another run's), then the directory if that left it empty.
fn remove_own_pins(ebpf: &Ebpf, dir: &Path) {
    for name in LB_MAPS {
        let path = dir.join(name);
        let ours = find_map(ebpf, name)
            .and_then(map_data)
            .and_then(|m| Ok(m.info()?.id()))
            .ok();
        let pinned = MapData::from_pin(&path)
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id());
        if ours.is_some() && ours == pinned {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = std::fs::remove_dir(dir);
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
    /// The MAC of the interface attached to: the source of every frame the
    /// balancer sends, written into CONFIG with the rest of the policy.
    source_mac: [u8; 6],
    /// When this process last turned the SEEN filter's epoch
    /// (CLOCK_MONOTONIC seconds); None until its first review.
    seen_turned: Option<u32>,
    /// When each marked ring slot changed and settled, by slot key (the
    /// marks themselves are in RINGS); found there on first use.
    records: Option<std::collections::HashMap<u32, marks::Record>>,
}

/// Where and how the balancer is attached.
struct Attached {
    link: Attachment,
    iface: String,
    mode: AttachMode,
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
            source_mac: [0; 6],
            seen_turned: None,
            records: None,
        };
        if !adopted {
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

    fn check_vip_id(&self, vip_id: u32) -> Result<()> {
        if vip_id >= self.sizes.max_vips {
            bail!(
                "vip id {vip_id} out of range: max_vips is {}",
                self.sizes.max_vips
            );
        }
        Ok(())
    }

    fn check_backend_id(&self, backend_id: u32) -> Result<()> {
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

/// The empty program: a benchmark baseline, and what a veth peer needs
/// attached for XDP_TX frames to arrive.
pub const PASS_PROGRAM: &str = "xdp_pass";
/// The live-frames load generator.
pub const GEN_PROGRAM: &str = "xdp_gen";
/// The counting sink of load tests.
pub const SINK_PROGRAM: &str = "xdp_sink";
/// The MAC-swapping forwarder, the load tests' XDP baseline.
pub const SWAP_PROGRAM: &str = "xdp_swap";
/// The SYN-answering benchmark backend.
pub const SYNACK_PROGRAM: &str = "xdp_synack";
/// The per-path benchmark harness.
pub const BENCH_PROGRAM: &str = "xdp_bench";
/// The harness for programs under test that are not `xdp.frags`.
pub const BENCH_PLAIN_PROGRAM: &str = "xdp_bench_plain";

/// Load every program of the object into the running kernel (maps at
/// small sizes, nothing attached): what the verifier says of each, by name.
pub fn verify_all() -> Vec<(&'static str, Result<()>)> {
    let sizes = Sizes {
        max_vips: 2,
        max_backends: 4,
        ring_size: 13,
        max_flows: 64,
    };
    let mut out = vec![
        (LB_PROGRAM, Dataplane::load(sizes).map(drop)),
        (DECAP_PROGRAM, Decap::load(1).map(drop)),
    ];
    for name in [
        PASS_PROGRAM,
        GEN_PROGRAM,
        SINK_PROGRAM,
        SWAP_PROGRAM,
        SYNACK_PROGRAM,
        BENCH_PROGRAM,
        BENCH_PLAIN_PROGRAM,
    ] {
        out.push((name, AuxProgram::load(name).map(drop)));
    }
    out
}

/// One of the object's helper programs, loaded on its own (its maps are
/// created at their minimum sizes).
pub struct AuxProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl AuxProgram {
    pub fn load(name: &'static str) -> Result<Self> {
        Self::load_with(name, 1, 0)
    }

    /// Writes the first GEN_HEADER_LEN bytes of `template` into GEN_TEMPLATE.
    fn set_template(&mut self, template: &[u8]) -> Result<()> {
        let head: [u8; xdp_common::GEN_HEADER_LEN] = template
            .get(..xdp_common::GEN_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| anyhow!("template shorter than {} bytes", xdp_common::GEN_HEADER_LEN))?;
        let mut map: Array<_, [u8; xdp_common::GEN_HEADER_LEN]> =
            Array::try_from(find_map_mut(&mut self.ebpf, names::GEN_TEMPLATE)?)?;
        map.set(0, head, 0).context("writing the template")
    }

    /// The benchmark harness: every run restores `frame` (stamped with one
    /// of `flows` flows) and tail-calls `target`. Run it with `frame` as
    /// the test-run input.
    pub fn bench(flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        Self::bench_with(BENCH_PROGRAM, flows, frame, target)
    }

    /// [`AuxProgram::bench`] for a program under test that is not
    /// `xdp.frags` (another balancer, measured side by side).
    pub fn bench_plain(flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        Self::bench_with(BENCH_PLAIN_PROGRAM, flows, frame, target)
    }

    fn bench_with(name: &'static str, flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        let len = u32::try_from(frame.len()).context("frame length")?;
        let mut bench = Self::load_with(name, flows.max(1), len)?;
        bench.set_template(frame)?;
        let mut targets =
            aya::maps::ProgramArray::try_from(find_map_mut(&mut bench.ebpf, names::BENCH_TARGET)?)?;
        targets
            .set(0, target.fd()?, 0)
            .context("putting the program under test behind the harness")?;
        Ok(bench)
    }

    /// The load generator, cycling through `flows` flows, restoring
    /// `template`'s first bytes in every frame.
    pub fn generator(flows: u32, template: &[u8]) -> Result<Self> {
        if flows == 0 {
            bail!("flows must be at least 1");
        }
        let mut gen = Self::load_with(GEN_PROGRAM, flows, 0)?;
        gen.set_template(template)
            .context("the generator's template")?;
        Ok(gen)
    }

    fn load_with(name: &'static str, flows: u32, frame_len: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GEN_FLOWS_GLOBAL, &flows, true)
            .override_global(names::BENCH_FRAME_LEN_GLOBAL, &frame_len, true)
            .load(object()?)
            .context("loading the eBPF object (map creation)")?;
        load_program(&mut ebpf, name)?;
        Ok(Self { ebpf, name })
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        attach_program(&mut self.ebpf, self.name, iface, mode)
    }

    pub fn program(&self) -> Result<&Xdp> {
        xdp_program(&self.ebpf, self.name)
    }

    /// A one-slot per-CPU counter (GEN_COUNTER, SINK_COUNTER), summed.
    pub fn counter(&self, map: &str) -> Result<u64> {
        let [total] = sum_counters(find_map(&self.ebpf, map)?)?;
        Ok(total)
    }
}

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
        Ok(Attachment::attach(program, DECAP_PROGRAM, iface, mode, pin_dir, false)?.adopted)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, vip_id: u32, state: u32) -> Backend {
        Backend {
            addr: addr_bytes(IpAddr::from([198, 18, 1, last])).0,
            family: u32::from(FAMILY_V4),
            state,
            vip_id,
            ..Backend::default()
        }
    }

    #[test]
    fn a_slot_changes_generation_only_when_it_changes_backend() {
        use backend_state::*;
        let at = |generation, b: Backend| Backend { generation, ..b };
        let one = at(7, backend(1, 0, UP));
        // The same backend keeps it: drain, down, a new MAC.
        for next in [
            backend(1, 0, DRAINING),
            backend(1, 0, DOWN),
            Backend {
                mac: [2, 0, 0, 0, 0, 9],
                ..backend(1, 0, UP)
            },
        ] {
            assert_eq!(generation_after(&one, &next), 7);
        }
        // Freed: the slot keeps the last generation...
        assert_eq!(generation_after(&one, &Backend::default()), 7);
        // ...and whatever takes it next, even the same address, is new.
        let freed = at(7, Backend::default());
        assert_eq!(generation_after(&freed, &backend(1, 0, UP)), 8);
        // Another address, or another VIP, in place of a live one: new.
        assert_eq!(generation_after(&one, &backend(2, 0, UP)), 8);
        assert_eq!(generation_after(&one, &backend(1, 1, UP)), 8);
        assert_eq!(
            generation_after(&at(u32::MAX, backend(1, 0, UP)), &backend(2, 0, UP)),
            0
        );
    }
}
