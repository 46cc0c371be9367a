//! Every map of the xdplb programs. Sizes declared here are placeholders:
//! the loader (`xdp-user/src/dataplane.rs`) sets each one from the config
//! before the object is loaded, so no size is fixed in two places.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use xdp_common::{
    decap_reason, reason, Backend, Config, Counters, DecapKey, FlowKey, FlowState, TraceFilter,
    VipDrops, VipKey, VipMeta,
};

/// Placeholder size of maps the loader resizes.
const SIZED_AT_LOAD: u32 = 1;

/// Flag of LRU hash maps: one LRU list per CPU, so CPUs never contend on
/// eviction.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// VIPs by (address, port, protocol); written by the controller.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(SIZED_AT_LOAD, 0);

/// Which VIPS lookups an address can hit, by `vip_filter_slot`
/// (`VIP_FILTER_PORTS`, `VIP_FILTER_PORTLESS`); written by the loader
/// before a VIP goes in, cleared after it goes.
#[map]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(xdp_common::VIP_FILTER_SLOTS, 0);

/// Maglev rings: two halves of RING_SIZE entries per VIP, at
/// `(vip_id * 2 + half) * RING_SIZE`, each a `ring_entry` (owner, marked
/// where the slot changed, and the previous owner while it takes over);
/// written by the controller.
#[map]
pub static RINGS: Array<u64> = Array::with_max_entries(SIZED_AT_LOAD, 0);

/// Backends by id: tunnel address, MAC, state; written by the controller.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(SIZED_AT_LOAD, 0);

/// Conntrack: flow (client to VIP) -> backend; written by the program,
/// per-CPU LRU lists.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(SIZED_AT_LOAD, BPF_F_NO_COMMON_LRU);

/// Which flows were placed on which backend lately: `SEEN_EPOCHS` epochs
/// of `SEEN_WORDS` words, four bits per placement (`seen_probe`); set by
/// the program on every placement by the ring, an epoch cleared by the
/// daemon before it becomes current again.
#[map]
pub static SEEN: Array<u64> =
    Array::with_max_entries(xdp_common::SEEN_WORDS * xdp_common::SEEN_EPOCHS, 0);

/// Each VIP's serial, by vip_id: a number the daemon gives every new VIP,
/// larger than any before (`FlowState::vip_serial`).
#[map]
pub static VIP_SERIALS: Array<u32> = Array::with_max_entries(SIZED_AT_LOAD, 0);

/// The current SEEN epoch (one entry); written by the daemon.
#[map]
pub static SEEN_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Global per-reason packet counters (`xdp_common::reason`), per CPU.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per-VIP packets, bytes, new flows, indexed by vip_id, per CPU.
#[map]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(SIZED_AT_LOAD, 0);

/// Per-VIP drops by reason, indexed by vip_id, per CPU; written by the
/// program on its drop paths only.
#[map]
pub static VIP_DROPS: PerCpuArray<VipDrops> = PerCpuArray::with_max_entries(SIZED_AT_LOAD, 0);

/// Per-backend packets, bytes, new flows, indexed by backend id, per CPU.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(SIZED_AT_LOAD, 0);

/// Runtime policy (one entry): next hop, outer source, odd-packet actions;
/// written by the controller.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// A per-CPU one-second window of events, for rate limits.
pub struct RateWindow {
    pub start_ns: u64,
    pub events: u64,
}

/// Rate-limit windows (per CPU), by `RATE_*` index. Not pinned: a window
/// restarts with the program.
#[map]
pub static RATES: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(2, 0);
/// RATES index: conntrack inserts (`Config::conntrack_rate`).
pub const RATE_CONNTRACK: u32 = 0;
/// RATES index: ICMP "too big" answers.
pub const RATE_TOO_BIG: u32 = 1;

/// Established flows, per CPU, direct-mapped (`flow_cache`). Not pinned:
/// a new program starts with it empty.
#[map]
pub static FLOW_CACHE: PerCpuArray<crate::flow_cache::Entry> =
    PerCpuArray::with_max_entries(crate::flow_cache::SLOTS, 0);

/// Each CPU's use of its flow cache lately (`flow_cache::admit`). Not
/// pinned.
#[map]
pub static FLOW_CACHE_WINDOW: PerCpuArray<crate::flow_cache::Window> =
    PerCpuArray::with_max_entries(1, 0);

/// The flow cache's generation (one entry): userspace bumps it on every
/// change of VIPs, backends or conntrack; 0 turns the cache off.
#[map]
pub static FLOW_CACHE_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Outer IPv4 IDs of fragmentable packets, counted per CPU. Not pinned.
#[map]
pub static IP_IDS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// What `xdplb trace` wants decision events for (one entry; written by it
/// through the pin, all zero when off).
#[map]
pub static TRACE: Array<TraceFilter> = Array::with_max_entries(1, 0);

/// QUIC VIPs' server ids -> backend id (`quic`); written by the
/// controller.
#[map]
pub static QUIC_SERVERS: HashMap<xdp_common::QuicServerKey, u32> =
    HashMap::with_max_entries(SIZED_AT_LOAD, 0);

/// Inner destinations the decap program strips tunnels for; written by the
/// backend-side loader.
#[map]
pub static DECAP_VIPS: HashMap<DecapKey, u32> = HashMap::with_max_entries(SIZED_AT_LOAD, 0);

/// Decap program counters (`xdp_common::decap_reason`), per CPU.
#[map]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap_reason::COUNT, 0);

/// Load generator: frames sent so far on this CPU (picks each frame's flow).
#[map]
pub static GEN_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Load generator: the first bytes of the template frame, rewritten into
/// every frame (live-frames pages come back with whatever the last user,
/// e.g. an encapsulating balancer, left in them).
#[map]
pub static GEN_TEMPLATE: Array<[u8; xdp_common::GEN_HEADER_LEN]> = Array::with_max_entries(1, 0);

/// Client prefixes of VIPs with source routes -> the VIPS key of the
/// backend subset they go to; written by the controller.
#[map]
pub static SOURCE_ROUTES: LpmTrie<xdp_common::SourcePrefix, VipKey> =
    LpmTrie::with_max_entries(xdp_common::SOURCE_ROUTES_MAX, 0);

/// Extra interfaces the balancer serves, by interface index: the MACs of
/// frames that arrived on one (CONFIG's are the main interface's). Read
/// only when CONFIG's `uplinks` is set.
#[map]
pub static UPLINKS: HashMap<u32, xdp_common::Uplink> =
    HashMap::with_max_entries(xdp_common::UPLINKS_MAX, 0);

/// The program every packet `xdp_lb` passes goes to (`chain.pass_to`), at
/// index 0; empty: the kernel's stack. Pinned, so the chain survives a
/// restart.
#[map]
pub static PASS_TO: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Benchmark harness: the program under test, at index 0.
#[map]
pub static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Packet sink: frames received, per CPU.
#[map]
pub static SINK_COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Number of distinct flows the load generator cycles through; a read-only
/// global set at load time.
#[unsafe(no_mangle)]
static GEN_FLOWS: u32 = 1;

#[inline(always)]
pub fn gen_flows() -> u32 {
    // SAFETY: as for RING_SIZE.
    unsafe { core::ptr::read_volatile(&GEN_FLOWS) }
}

/// Length of the benchmark harness's frame; a read-only global set at load.
#[unsafe(no_mangle)]
static BENCH_FRAME_LEN: u32 = 0;

#[inline(always)]
pub fn bench_frame_len() -> u32 {
    // SAFETY: as for RING_SIZE.
    unsafe { core::ptr::read_volatile(&BENCH_FRAME_LEN) }
}

/// Size of each ring half; a read-only global set at load time.
#[unsafe(no_mangle)]
static RING_SIZE: u32 = 1;

/// The ring size of this load. Read through a volatile load so the compiler
/// does not fold the placeholder value in.
#[inline(always)]
pub fn ring_size() -> u32 {
    // SAFETY: RING_SIZE is a plain static; the loader rewrites it in
    // .rodata before load, after which it is never written.
    unsafe { core::ptr::read_volatile(&RING_SIZE) }
}

/// What places a client at `addr` (of `family`) of `vip`: the backend
/// subset its longest matching source route names, if the VIP has source
/// routes and one matches; else the VIP itself.
#[inline(always)]
pub fn routed(vip: VipMeta, addr: [u8; 16], family: u8) -> VipMeta {
    if vip.flags & xdp_common::VIP_F_SOURCE_ROUTES == 0 {
        return vip;
    }
    source_route(vip.vip_id, addr, family).unwrap_or(vip)
}

/// The backend subset a client of the VIP `vip_id` at `addr` (of
/// `family`) goes to, by its longest matching source route.
#[inline(always)]
fn source_route(vip_id: u32, addr: [u8; 16], family: u8) -> Option<VipMeta> {
    let bits = if family == xdp_common::FAMILY_V4 {
        32
    } else {
        128
    };
    let key = Key::new(
        xdp_common::source_route_len(bits),
        xdp_common::SourcePrefix {
            vip_id: vip_id.to_be_bytes(),
            addr,
        },
    );
    let subset = SOURCE_ROUTES.get(&key)?;
    // SAFETY: the value is copied out at once.
    unsafe { VIPS.get(subset) }.copied()
}
