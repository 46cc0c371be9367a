//! The map ABI shared by the xdplb eBPF programs and userspace, and the flow
//! hash both sides must agree on.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields and derives
//! bytemuck's `Pod`, so the compiler rejects any implicit padding: the kernel
//! side and the user side see the same bytes. Addresses and ports are stored
//! in network byte order, exactly as they appear in packets.
#![no_std]

pub mod hash;

use bytemuck::{Pod, Zeroable};

pub use hash::{flow_hash, ring_hash};

/// Address family tag used in keys and backend entries.
pub const FAMILY_V4: u8 = 4;
/// Address family tag used in keys and backend entries.
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// XDP action codes, as the kernel defines them (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// A ring slot holding this value has no backend: packets are dropped and
/// counted as `NO_BACKEND`.
pub const NO_BACKEND: u32 = u32::MAX;

/// Key of the VIPS map: what a packet must match to be balanced.
///
/// IPv4 addresses occupy the first four bytes of `addr`, the rest is zero.
/// `port` is zero for a port-less VIP (all ports of the address and protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Destination port, network byte order; 0 means any port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `VipMeta::flags` bit: the ring hash covers the client's source address
/// only, so every connection of a client lands on the same backend.
pub const VIP_F_SOURCE_HASH: u32 = 1;
/// `VipMeta::flags` bit: the ring hash covers the client's source address
/// and port (IPVS's `sh` scheduler with `sh-port`).
pub const VIP_F_HASH_SOURCE_PORT: u32 = 4;
/// `VipMeta::flags` bit: the ring hash covers the 5-tuple without the
/// source port (Katran's `F_HASH_NO_SRC_PORT`), so a client's flows to one
/// port share a backend whatever ports it opens them from.
pub const VIP_F_HASH_NO_SOURCE_PORT: u32 = 8;
/// The `VipMeta::flags` bits that choose the ring hash's fields (at most
/// one is set; none: the 5-tuple).
pub const VIP_F_HASH: u32 = VIP_F_SOURCE_HASH | VIP_F_HASH_SOURCE_PORT | VIP_F_HASH_NO_SOURCE_PORT;
/// `VipMeta::flags` bit: track every flow of the VIP, in every ring slot
/// (it shares its address and protocol with another VIP, one of them
/// port-less, so a flow can move between the two as VIPs come and go).
pub const VIP_F_TRACK_ALL: u32 = 2;

/// `VipMeta::flags` bit: a UDP VIP carrying QUIC, whose packets are routed
/// by the server id in their destination connection ID ([`quic`]).
pub const VIP_F_QUIC: u32 = 16;

/// QUIC connection-ID routing, in the plaintext algorithm of the IETF
/// QUIC-LB draft (draft-ietf-quic-load-balancers): a server's connection
/// IDs start with one octet whose top three bits are the config rotation
/// (`0b111`: not routable), followed by its server id of a length the
/// VIP configures (1 to 4 octets here), then anything the server likes.
pub mod quic {
    /// Where a VIP's server id length (1..=4 octets) sits in
    /// `VipMeta::flags` (3 bits).
    pub const SERVER_ID_LEN_SHIFT: u32 = 8;
    /// The length's bits, before the shift.
    pub const SERVER_ID_LEN_MASK: u32 = 7;
    /// The longest server id, in octets.
    pub const MAX_SERVER_ID_LEN: u32 = 4;
    /// Config rotation bits that mark a connection ID not routable.
    pub const UNROUTABLE: u8 = 0b111;
}

/// Key of the QUIC_SERVERS map: a QUIC VIP's server id (its octets as a
/// big-endian number) -> backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct QuicServerKey {
    pub vip_id: u32,
    pub server_id: u32,
}

/// An extra interface the balancer serves (UPLINKS, keyed by interface
/// index): frames that arrived on it leave through it to its own next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Uplink {
    /// Destination MAC of encapsulated packets: this uplink's router.
    pub gateway_mac: [u8; 6],
    /// Source MAC of every frame sent through it: the interface's own.
    pub source_mac: [u8; 6],
}

/// Entries of UPLINKS: extra interfaces, and the ports of those that are
/// bonds (a bond's frames arrive with its port's index).
pub const UPLINKS_MAX: u32 = 64;

/// `VipMeta::flags` bit: the VIP has source routes (SOURCE_ROUTES): a
/// client in one of its prefixes goes to the subset of backends the
/// longest matching prefix names.
pub const VIP_F_SOURCE_ROUTES: u32 = 32;

/// `VipKey::family` bit of a VIP's backend subset (with
/// [`FAMILY_SUBSET_V6`] for an IPv6 VIP, and the subset's number, 1 to
/// [`MAX_SUBSETS`], in the low bits): never a packet's family, so only a
/// source route reaches the subset's VIPS entry, ring and backends.
pub const FAMILY_SUBSET: u8 = 0x80;
/// `VipKey::family` bit of an IPv6 VIP's subset.
pub const FAMILY_SUBSET_V6: u8 = 0x40;

impl VipKey {
    /// The key of subset `n` (from 0, below [`MAX_SUBSETS`]) of this VIP.
    pub fn subset(&self, n: usize) -> VipKey {
        let v6 = if self.family == FAMILY_V6 {
            FAMILY_SUBSET_V6
        } else {
            0
        };
        VipKey {
            family: FAMILY_SUBSET | v6 | (n as u8 + 1),
            ..*self
        }
    }

    /// For a subset's key: its VIP's key and its number (from 0).
    pub fn subset_of(&self) -> Option<(VipKey, usize)> {
        if self.family & FAMILY_SUBSET == 0 {
            return None;
        }
        let family = if self.family & FAMILY_SUBSET_V6 != 0 {
            FAMILY_V6
        } else {
            FAMILY_V4
        };
        let n = usize::from(self.family & 0x3f).checked_sub(1)?;
        Some((VipKey { family, ..*self }, n))
    }
}

/// The data of a SOURCE_ROUTES key: a VIP id, then a client address
/// (IPv4 in the first four bytes). The trie matches `32 + prefix` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct SourcePrefix {
    /// The VIP's id, big-endian: the trie compares bits from the first.
    pub vip_id: [u8; 4],
    pub addr: [u8; 16],
}

/// Entries of SOURCE_ROUTES: client prefixes of all VIPs together. The
/// trie allocates only the entries in use.
pub const SOURCE_ROUTES_MAX: u32 = 16384;

/// Subsets of one VIP at most (their numbers fit beside `FAMILY_SUBSET`
/// and `FAMILY_SUBSET_V6`).
pub const MAX_SUBSETS: usize = 63;

/// SOURCE_ROUTES prefix length of a client prefix of `bits` bits.
pub const fn source_route_len(bits: u32) -> u32 {
    32 + bits
}

/// How packets of a VIP reach its backends.
pub mod fwd {
    /// Encapsulate in an outer IP header whose family is the backend's:
    /// IPv4-in-IPv4 (IPIP), IPv6-in-IPv6 or IPv4-in-IPv6.
    pub const ENCAP: u32 = 0;
    /// Layer-2 direct server return: only the destination MAC is rewritten
    /// to the backend's; the backend must share the segment and own the VIP.
    pub const L2_DSR: u32 = 1;
}

/// Value of the VIPS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipMeta {
    /// Index of the VIP's ring pair in RINGS and of its VIP_STATS slot.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// One of `fwd::*`.
    pub mode: u32,
    /// Which half of the VIP's ring pair is live (0 or 1). The controller
    /// fills the other half and then rewrites this value: one map write.
    pub active_ring: u32,
}

/// Liveness of a backend, as the dataplane acts on it.
pub mod backend_state {
    /// Slot not allocated: never forwarded to.
    pub const UNUSED: u32 = 0;
    /// Healthy: receives new flows and keeps existing ones.
    pub const UP: u32 = 1;
    /// Failed: its flows are re-selected through the ring.
    pub const DOWN: u32 = 2;
    /// Draining: keeps existing flows, receives no new ones.
    pub const DRAINING: u32 = 3;
}

/// Entry of the BACKENDS array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Tunnel endpoint (encapsulation) address; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// MAC used in L2 DSR mode.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// `FAMILY_V4` or `FAMILY_V6`, widened so the struct has no padding.
    pub family: u32,
    /// One of `backend_state::*`.
    pub state: u32,
    /// The VIP this entry serves (health is per VIP, so a backend address
    /// in two VIPs has two entries); lets a restarted daemon map pinned
    /// entries back to its config.
    pub vip_id: u32,
    /// Which backend has held this slot: bumped whenever the slot is given
    /// to another backend (an unused slot reused, or another address or
    /// VIP), kept through state changes and while unused. Whatever
    /// remembers a backend by id (conntrack, the flow cache) remembers its
    /// generation too, so a flow never follows an id to the backend that
    /// reused it.
    pub generation: u32,
}

/// Key of the FLOWS conntrack table, in the client-to-VIP direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the FLOWS conntrack table. Only flows in a ring slot whose
/// owner changed ([`SLOT_CHANGED`]) are tracked: elsewhere the ring alone
/// places every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowState {
    pub backend_id: u32,
    /// The backend's `Backend::generation` when the flow was placed: the
    /// entry holds only while the slot still holds that backend.
    pub generation: u32,
    /// When a packet of the flow was last seen, in whole seconds of
    /// CLOCK_MONOTONIC (the program's coarse clock); written at most once a
    /// second. An entry idle longer than the daemon's idle bound no longer
    /// keeps its slot marked.
    pub last_seen: u32,
    /// The serial (`VIP_SERIALS`) of the VIP that placed the flow: an
    /// entry whose backend left is the flow's last placement only if its
    /// VIP is this one or came later (else the ring's later placements,
    /// which leave no entry, are newer).
    pub vip_serial: u32,
}

/// Bit of a RINGS entry's owner word: the slot's owner changed since flows
/// could have begun on its previous owner, so packets in it consult
/// conntrack. Backend ids stay below it.
pub const SLOT_CHANGED: u32 = 1 << 31;

/// A RINGS entry: the owner word (a backend id, `SLOT_CHANGED` set where
/// the slot changed, `NO_BACKEND` for none) in the low 32 bits, and in the
/// high 32 bits the slot's previous owner while it is taking over (a packet
/// without state that SEEN saw there belongs to it), else `NO_BACKEND`.
/// Array values take 8 bytes whatever their size, so the previous owner
/// costs no memory.
#[inline(always)]
pub const fn ring_entry(owner: u32, previous: u32) -> u64 {
    (owner as u64) | ((previous as u64) << 32)
}

/// 64-bit words of one epoch of the SEEN filter (1 MiB).
pub const SEEN_WORDS: u32 = 1 << 17;
/// Epochs the SEEN filter keeps: the current one and the one before.
pub const SEEN_EPOCHS: u32 = 2;

/// A second summary of a flow key beside `flow_hash`, independent of it:
/// the SEEN filter draws its bits from this one, so two flows whose
/// `flow_hash` collides are still told apart.
#[inline(always)]
pub fn flow_fold(key: &FlowKey) -> u32 {
    let w = |b: &[u8; 16], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let ports = u32::from(key.sport) | (u32::from(key.dport) << 16);
    let kind = u32::from(key.proto) | (u32::from(key.family) << 8);
    let mut h = w(&key.src, 0).wrapping_mul(0x2c1b_3c6d)
        ^ w(&key.src, 4).rotate_left(5)
        ^ w(&key.src, 8).rotate_left(9)
        ^ w(&key.src, 12).rotate_left(13);
    h = h.wrapping_mul(0x297a_2d39)
        ^ w(&key.dst, 0).rotate_left(3)
        ^ w(&key.dst, 4).rotate_left(7)
        ^ w(&key.dst, 8).rotate_left(11)
        ^ w(&key.dst, 12).rotate_left(17);
    h = (h ^ ports.rotate_left(19)).wrapping_mul(0x9e37_79b1) ^ kind;
    h ^ (h >> 15)
}

/// Where the SEEN filter records that a flow (its `flow_hash` and
/// [`flow_fold`]) was placed on backend `backend_id` of `generation`: a
/// word of an epoch, and four bits of it (fewer when two coincide).
/// Placements on different backends are different records, so a flow seen
/// on one backend is never taken for a flow of another.
#[inline(always)]
pub fn seen_probe(hash: u32, fold: u32, backend_id: u32, generation: u32) -> (u32, u64) {
    let salt = backend_id.wrapping_mul(0x9e37_79b1) ^ generation.rotate_left(16);
    let finish = |mut h: u32| {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    };
    let word = finish(hash ^ salt) % SEEN_WORDS;
    let b = finish(fold ^ salt.rotate_left(7));
    let bits = (1u64 << (b & 63))
        | (1u64 << ((b >> 6) & 63))
        | (1u64 << ((b >> 12) & 63))
        | (1u64 << ((b >> 18) & 63));
    (word, bits)
}

/// Packet, byte and new-flow counters of one VIP or one backend (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Packets of one VIP the balancer dropped, by reason (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipDrops {
    /// No usable backend in the VIP's ring.
    pub no_backend: u64,
    /// No headroom to encapsulate.
    pub encap_failed: u64,
}

/// Global per-reason counters (STATS map indexes).
///
/// The reasons in `ACTIONS` are exclusive: every packet the balancer sees
/// is counted in exactly one of them, so they add up to the packets
/// received. The rest count events on the way.
pub mod reason {
    /// Not addressed to a VIP (including non-IP): `XDP_PASS`, untouched.
    pub const PASS_NOT_VIP: u32 = 0;
    /// IP traffic the balancer does not handle (a second VLAN tag, IPv6
    /// extension headers other than Fragment): `XDP_PASS`, untouched.
    pub const PASS_UNSUPPORTED: u32 = 1;
    /// Truncated or inconsistent headers: `Config::malformed_action`.
    pub const MALFORMED: u32 = 2;
    /// IPv4 or IPv6 fragment (cannot be balanced by port): `Config::fragment_action`.
    pub const FRAGMENT: u32 = 3;
    /// VIP matched but no usable backend: dropped.
    pub const NO_BACKEND: u32 = 4;
    /// Encapsulated and transmitted to a backend.
    pub const TX_ENCAP: u32 = 5;
    /// Destination MAC rewritten and transmitted to a backend.
    pub const TX_L2_DSR: u32 = 6;
    /// ICMP frag-needed / ICMPv6 packet-too-big quoting a VIP flow,
    /// transmitted to the flow's backend.
    pub const TX_ICMP: u32 = 7;
    /// No headroom to encapsulate: dropped.
    pub const ENCAP_FAILED: u32 = 8;
    /// The first release's exclusive action reasons (indexes
    /// `0..ACTION_COUNT`); [`ACTIONS`] lists them all.
    pub const ACTION_COUNT: u32 = 9;

    /// In a changed slot: a conntrack entry was written for a flow the
    /// ring (or the slot's previous owner) placed.
    pub const FLOW_NEW: u32 = 9;
    /// In a changed slot: a conntrack hit on a usable backend.
    pub const FLOW_HIT: u32 = 10;
    /// In a changed slot: a conntrack hit on a backend that no longer
    /// keeps the flow: placed again through the ring.
    pub const FLOW_RESELECTED: u32 = 11;
    /// The conntrack insert failed (the packet was still forwarded).
    pub const FLOW_INSERT_FAILED: u32 = 12;
    /// Packets that carried one 802.1Q tag.
    pub const VLAN: u32 = 13;
    /// In a changed slot: placed without the conntrack entry it would have
    /// got: a TCP reset, or beyond `Config::conntrack_rate` (a flood).
    pub const FLOW_UNTRACKED: u32 = 14;
    /// A VIP packet too big for the tunnel (`Config::tunnel_mtu`), answered
    /// with ICMP "fragmentation needed" / ICMPv6 "packet too big".
    pub const TX_TOO_BIG: u32 = 15;
    /// A VIP packet too big for the tunnel while the ICMP answers of this
    /// CPU were over their rate: dropped.
    pub const TOO_BIG_DROPPED: u32 = 16;
    /// A packet in a slot whose owner never changed: placed by the ring
    /// alone, no conntrack lookup.
    pub const FLOW_RING: u32 = 17;
    /// In a changed slot, a packet without conntrack state taken for a flow
    /// that began before the change: sent to the slot's previous owner.
    pub const FLOW_PREVIOUS: u32 = 18;
    /// A QUIC VIP's packet whose connection ID carried the server id of a
    /// backend that keeps flows: sent to it, past the ring.
    pub const QUIC_ROUTED: u32 = 19;
    /// A QUIC VIP's packet whose connection ID should carry a server id
    /// (a short header, a Handshake or Retry packet) but names none the
    /// VIP has, or a backend that no longer keeps flows, or is marked not
    /// routable: placed by the ring.
    pub const QUIC_UNKNOWN: u32 = 20;
    /// A QUIC VIP's UDP payload too short for its header and server id, or
    /// not QUIC (the fixed bit clear): placed by the ring.
    pub const QUIC_MALFORMED: u32 = 21;
    /// Number of STATS entries.
    pub const COUNT: u32 = 22;

    /// The exclusive action reasons (added after the first release, past
    /// the event reasons, so counters keep their indexes across upgrades).
    pub const ACTIONS: [u32; 11] = [
        PASS_NOT_VIP,
        PASS_UNSUPPORTED,
        MALFORMED,
        FRAGMENT,
        NO_BACKEND,
        TX_ENCAP,
        TX_L2_DSR,
        TX_ICMP,
        ENCAP_FAILED,
        TX_TOO_BIG,
        TOO_BIG_DROPPED,
    ];

    /// Whether `r` is one of [`ACTIONS`].
    pub const fn is_action(r: u32) -> bool {
        r < ACTION_COUNT || r == TX_TOO_BIG || r == TOO_BIG_DROPPED
    }

    /// Operator-facing names, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_vip",
        "pass_unsupported",
        "malformed",
        "fragment",
        "no_backend",
        "tx_encap",
        "tx_l2_dsr",
        "tx_icmp",
        "encap_failed",
        "flow_new",
        "flow_hit",
        "flow_reselected",
        "flow_insert_failed",
        "vlan",
        "flow_untracked",
        "tx_too_big",
        "too_big_dropped",
        "flow_ring",
        "flow_previous",
        "quic_routed",
        "quic_unknown",
        "quic_malformed",
    ];
}

/// The single entry of the CONFIG map: runtime policy of the balancer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Destination MAC of encapsulated packets (the next hop to backends).
    pub gateway_mac: [u8; 6],
    /// Source MAC of every frame the balancer sends: the interface's own,
    /// set by the loader at attach. Zero until then: the arriving frame's
    /// destination MAC is used.
    pub source_mac: [u8; 6],
    /// Non-zero: a program is chained after the balancer (PASS_TO), so
    /// what it passes is handed on by a tail call. (Was padding: a CONFIG
    /// written by an older build reads as "not chained".)
    pub chained: u8,
    /// Non-zero: the balancer serves more interfaces than the one whose
    /// MACs are above; a frame that arrived on one of them (UPLINKS, by
    /// ingress interface index) leaves with that uplink's MACs. (Was
    /// padding: an older CONFIG reads as "one interface".)
    pub uplinks: u8,
    pub _pad: [u8; 2],
    /// Outer IPv4 source: these bits, with the host bits from the flow hash.
    pub source_v4: [u8; 4],
    /// Host-bit mask (host byte order) applied to the flow hash for IPv4.
    pub source_v4_host_mask: u32,
    /// Outer IPv6 source prefix; the flow hash fills the host bits of its
    /// last 32 bits.
    pub source_v6: [u8; 16],
    /// Host-bit mask (host byte order) for the last 32 bits of the IPv6 source.
    pub source_v6_host_mask: u32,
    /// `XDP_PASS` or `XDP_DROP` for fragments.
    pub fragment_action: u32,
    /// `XDP_PASS` or `XDP_DROP` for malformed packets.
    pub malformed_action: u32,
    /// TTL / hop limit of outer headers.
    pub outer_ttl: u32,
    /// Largest outer IP packet the path to the backends carries; a bigger
    /// VIP packet is answered with ICMP "fragmentation needed" / ICMPv6
    /// "packet too big" (when it may not be fragmented). 0: no limit.
    pub tunnel_mtu: u32,
    /// New conntrack entries per second per CPU; above it new flows are
    /// still balanced through the ring but not tracked. 0: no limit.
    pub conntrack_rate: u32,
}

impl Config {
    /// Outer IPv4 source of a flow of `hash`: the configured prefix with
    /// the host bits from the hash.
    #[inline(always)]
    pub fn outer_source_v4(&self, hash: u32) -> [u8; 4] {
        let mask = self.source_v4_host_mask;
        ((u32::from_be_bytes(self.source_v4) & !mask) | (hash & mask)).to_be_bytes()
    }

    /// Outer IPv6 source of a flow of `hash`: the configured prefix with
    /// the host bits of its last 32 bits from the hash.
    #[inline(always)]
    pub fn outer_source_v6(&self, hash: u32) -> [u8; 16] {
        let mut src = self.source_v6;
        let mask = self.source_v6_host_mask;
        let low = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
        src[12..].copy_from_slice(&((low & !mask) | (hash & mask)).to_be_bytes());
        src
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gateway_mac: [0; 6],
            source_mac: [0; 6],
            chained: 0,
            uplinks: 0,
            _pad: [0; 2],
            source_v4: [0; 4],
            source_v4_host_mask: 0,
            source_v6: [0; 16],
            source_v6_host_mask: 0,
            fragment_action: XDP_PASS,
            malformed_action: XDP_PASS,
            outer_ttl: 64,
            tunnel_mtu: 0,
            conntrack_rate: 0,
        }
    }
}

/// Key of the decap program's DECAP_VIPS map: an inner destination address
/// that the backend serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DecapKey {
    pub addr: [u8; 16],
    pub family: u32,
}

/// Decap program counters (DECAP_STATS indexes).
pub mod decap_reason {
    /// Decapsulated and passed to the stack.
    pub const DECAPSULATED: u32 = 0;
    /// Not an IPIP/IP6IP6/4in6 packet for a configured VIP: passed untouched.
    pub const PASS: u32 = 1;
    /// Truncated tunnel packet: passed untouched (the stack drops it).
    pub const MALFORMED: u32 = 2;
    pub const COUNT: u32 = 3;
    pub const NAMES: [&str; COUNT as usize] = ["decapsulated", "pass", "malformed"];
}

/// Bytes of the load generator's template that `xdp_gen` restores in every
/// frame: Ethernet, IPv6 and the ports and length of UDP fit. Also the
/// smallest frame it sends.
pub const GEN_HEADER_LEN: usize = 64;

/// Bytes of the offending IP packet an ICMP "too big" answer of the
/// balancer quotes: its IP header (IPv4 options included) and more than
/// the 8 bytes of transport header the client's stack needs.
pub const TOO_BIG_QUOTE: usize = 128;

/// ICMP "too big" answers per second per CPU; beyond it such packets are
/// dropped (`reason::TOO_BIG_DROPPED`).
pub const TOO_BIG_PER_SEC: u32 = 1000;

/// The TRACE map's entry: which packets `xdplb trace` wants the balancer's
/// decision for. All zero: tracing off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceFilter {
    /// Non-zero: tracing on.
    pub enabled: u32,
    /// Only packets of this VIP id; [`TRACE_ANY_VIP`]: every packet
    /// (packets for no VIP included).
    pub vip_id: u32,
    /// Only clients in this prefix (`client_family` 0: any client).
    pub client: [u8; 16],
    pub client_family: u32,
    /// Prefix length in bits.
    pub client_len: u32,
    /// The tracing process, so a second one can tell whether it is alive.
    pub owner_pid: u32,
    /// Tags each event, so a trace prints only the events of its own
    /// filter, never those an earlier trace left unread in the ring.
    pub session: u32,
}

/// [`TraceFilter::vip_id`]: any packet.
pub const TRACE_ANY_VIP: u32 = u32::MAX;

/// Slots of the VIP address filter (VIP_FILTER): a packet whose destination
/// falls in an empty slot is for no VIP, known without a hash lookup.
pub const VIP_FILTER_SLOTS: u32 = 4096;
/// VIP_FILTER bit: some VIP with a port has an address in this slot.
pub const VIP_FILTER_PORTS: u32 = 1;
/// VIP_FILTER bit: some port-less VIP has an address in this slot.
pub const VIP_FILTER_PORTLESS: u32 = 2;

/// The VIP_FILTER slot of an address (16-byte form): a multiplicative hash
/// of its words, the same in the program and the loader.
#[inline(always)]
pub fn vip_filter_slot(addr: &[u8; 16]) -> u32 {
    vip_filter_slot_of(vip_filter_fold(addr))
}

/// An address's words folded into one, the input of [`vip_filter_slot_of`]:
/// for an IPv4 address (the other words zero), its first word.
#[inline(always)]
pub fn vip_filter_fold(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    w(0) ^ w(4).rotate_left(8) ^ w(8).rotate_left(16) ^ w(12).rotate_left(24)
}

/// The slot of an address whose words fold to `folded`.
#[inline(always)]
pub fn vip_filter_slot_of(folded: u32) -> u32 {
    folded.wrapping_mul(0x9e37_79b1) >> 20
}

/// Map names, so the loader and the program cannot disagree.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const SEEN: &str = "SEEN";
    pub const SEEN_EPOCH: &str = "SEEN_EPOCH";
    pub const VIP_SERIALS: &str = "VIP_SERIALS";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const VIP_DROPS: &str = "VIP_DROPS";
    pub const CONFIG: &str = "CONFIG";
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const GEN_COUNTER: &str = "GEN_COUNTER";
    pub const GEN_TEMPLATE: &str = "GEN_TEMPLATE";
    pub const SINK_COUNTER: &str = "SINK_COUNTER";
    pub const BENCH_TARGET: &str = "BENCH_TARGET";
    pub const TRACE: &str = "TRACE";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const QUIC_SERVERS: &str = "QUIC_SERVERS";
    pub const PASS_TO: &str = "PASS_TO";
    pub const SOURCE_ROUTES: &str = "SOURCE_ROUTES";
    pub const UPLINKS: &str = "UPLINKS";
    pub const FLOW_CACHE_GEN: &str = "FLOW_CACHE_GEN";
    /// Read-only global: the benchmark harness's frame length.
    pub const BENCH_FRAME_LEN_GLOBAL: &str = "BENCH_FRAME_LEN";
    /// Read-only global: flows the load generator cycles through.
    pub const GEN_FLOWS_GLOBAL: &str = "GEN_FLOWS";
    /// Read-only global holding the ring size, set at load time.
    pub const RING_SIZE_GLOBAL: &str = "RING_SIZE";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY (all impls): the types are `#[repr(C)]`, `Copy`, and derive
    // bytemuck::Pod, which proves they have no padding and every bit pattern
    // is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for VipDrops {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for DecapKey {}
    unsafe impl aya::Pod for QuicServerKey {}
    unsafe impl aya::Pod for SourcePrefix {}
    unsafe impl aya::Pod for Uplink {}
    unsafe impl aya::Pod for TraceFilter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_address_has_the_slot_of_its_first_word() {
        for a in [
            [198u8, 18, 0, 10],
            [198, 19, 255, 1],
            [0, 0, 0, 0],
            [255; 4],
        ] {
            let mut full = [0u8; 16];
            full[..4].copy_from_slice(&a);
            assert_eq!(
                vip_filter_slot(&full),
                vip_filter_slot_of(u32::from_le_bytes(a))
            );
            assert!(vip_filter_slot(&full) < VIP_FILTER_SLOTS);
        }
    }
}
