//! A loaded balancer with a fixed set of VIPs and backends, and the
//! predictions a test compares the program's output against.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use xdp_common::{
    backend_state, flow_hash, fwd, reason, ring_hash, Backend, Config, FlowKey, VipKey, FAMILY_V4,
    FAMILY_V6, NO_BACKEND, PROTO_TCP, PROTO_UDP, VIP_F_SOURCE_HASH, XDP_PASS,
};
use xdp_user::dataplane::{addr_bytes, Dataplane, Sizes};

use crate::packet::{self, GATEWAY_MAC};

pub const RING_SIZE: u32 = 13;

pub const SIZES: Sizes = Sizes {
    max_vips: 8,
    max_backends: 16,
    ring_size: RING_SIZE,
    max_flows: 4096,
};

/// One VIP of the lab.
pub struct LabVip {
    pub addr: IpAddr,
    /// 0: port-less.
    pub port: u16,
    pub proto: u8,
    pub vip_id: u32,
    pub flags: u32,
    pub mode: u32,
    pub backends: &'static [u32],
}

impl LabVip {
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr_bytes(self.addr);
        VipKey {
            addr,
            port: self.port.to_be(),
            proto: self.proto,
            family,
        }
    }
}

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);

pub const WEB4: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
    port: 80,
    proto: PROTO_TCP,
    vip_id: 0,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[0, 1, 2],
};
/// Served by the same three hosts as WEB4, through entries of its own (one
/// backend entry per VIP and address, as the controller makes them).
pub const DNS4: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
    port: 0,
    proto: PROTO_UDP,
    vip_id: 1,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[7, 8, 9],
};
pub const WEB6: LabVip = LabVip {
    addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)),
    port: 443,
    proto: PROTO_TCP,
    vip_id: 2,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[3, 4],
};
/// An IPv4 VIP served by IPv6 backends: IPv4-in-IPv6.
pub const MIXED: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 12)),
    port: 80,
    proto: PROTO_TCP,
    vip_id: 3,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[5],
};
pub const DSR: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 13)),
    port: 80,
    proto: PROTO_TCP,
    vip_id: 4,
    flags: 0,
    mode: fwd::L2_DSR,
    backends: &[6],
};
pub const STICKY: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 14)),
    port: 80,
    proto: PROTO_TCP,
    vip_id: 5,
    flags: VIP_F_SOURCE_HASH,
    mode: fwd::ENCAP,
    backends: &[10, 11, 12],
};
/// A VIP whose ring is empty.
pub const EMPTY: LabVip = LabVip {
    addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 15)),
    port: 80,
    proto: PROTO_TCP,
    vip_id: 6,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[],
};
pub const DNS6: LabVip = LabVip {
    addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11)),
    port: 53,
    proto: PROTO_UDP,
    vip_id: 7,
    flags: 0,
    mode: fwd::ENCAP,
    backends: &[13, 14],
};

pub const VIPS: [&LabVip; 8] = [&WEB4, &DNS4, &WEB6, &MIXED, &DSR, &STICKY, &EMPTY, &DNS6];

/// The host behind backend entry `id` (entries 7.. are other VIPs' entries
/// for the hosts 0..=4).
fn host_of(id: u32) -> u32 {
    match id {
        7..=9 => id - 7,
        10..=12 => id - 10,
        13..=14 => id - 10,
        _ => id,
    }
}

/// Backend `id`'s tunnel address.
pub fn backend_addr(id: u32) -> IpAddr {
    match host_of(id) {
        0..=2 | 6 => IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1 + id as u8)),
        _ => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1 + id as u16)),
    }
}

pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, host_of(id) as u8]
}

pub const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
pub const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0);

pub fn lab_config() -> Config {
    Config {
        gateway_mac: GATEWAY_MAC,
        source_v4: SOURCE_V4.octets(),
        source_v4_host_mask: 0xffff,
        source_v6: SOURCE_V6.octets(),
        source_v6_host_mask: 0xffff,
        ..Config::default()
    }
}

/// The ring a test installs for `backends`: slot i holds backends[i % n].
pub fn ring_of(backends: &[u32]) -> Vec<u32> {
    ring_of_size(backends, RING_SIZE)
}

/// [`ring_of`] for a ring of `size` slots.
pub fn ring_of_size(backends: &[u32], size: u32) -> Vec<u32> {
    (0..size as usize)
        .map(|i| {
            if backends.is_empty() {
                NO_BACKEND
            } else {
                backends[i % backends.len()]
            }
        })
        .collect()
}

pub struct Lab {
    pub dp: Dataplane,
}

impl Lab {
    pub fn new() -> Result<Self> {
        Self::with_sizes(SIZES)
    }

    /// The lab's VIPs and backends on a dataplane of any size (benchmarks).
    pub fn with_sizes(sizes: Sizes) -> Result<Self> {
        let mut dp = Dataplane::load(sizes)?;
        dp.set_config(&lab_config())?;
        for vip in VIPS {
            for &id in vip.backends {
                let (addr, family) = addr_bytes(backend_addr(id));
                dp.set_backend(
                    id,
                    &Backend {
                        addr,
                        mac: backend_mac(id),
                        _pad: [0; 2],
                        family: u32::from(family),
                        state: backend_state::UP,
                        vip_id: vip.vip_id,
                        generation: 0,
                    },
                )?;
            }
        }
        for vip in VIPS {
            dp.add_vip(&vip.key(), vip.vip_id, vip.flags, vip.mode)?;
            dp.write_ring(&vip.key(), &ring_of_size(vip.backends, sizes.ring_size))?;
        }
        Ok(Self { dp })
    }

    /// Global counters now.
    pub fn stats(&self) -> [u64; reason::COUNT as usize] {
        self.dp.stats().expect("reading STATS")
    }
}

/// The flow key of a client-to-VIP packet.
pub fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (src, family) = addr_bytes(src);
    let (dst, _) = addr_bytes(dst);
    FlowKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The backend the ring `ring` gives a new flow of `vip`.
pub fn predicted_backend(vip: &LabVip, ring: &[u32], key: &FlowKey) -> u32 {
    let hash = ring_hash(key, vip.flags, flow_hash(key, false));
    ring[(hash % ring.len() as u32) as usize]
}

/// `frame` (IP header at `l3`) as the LB sends it to `backend` for flow `key`.
pub fn expected_forward(
    vip: &LabVip,
    frame: &[u8],
    l3: usize,
    key: &FlowKey,
    backend: u32,
) -> Vec<u8> {
    if vip.mode == fwd::L2_DSR {
        return packet::expected_l2_dsr(frame, backend_mac(backend));
    }
    let hash = flow_hash(key, false);
    match backend_addr(backend) {
        IpAddr::V4(dst) => {
            let src = Ipv4Addr::from(u32::from(SOURCE_V4) | (hash & 0xffff));
            packet::expected_encap4(frame, l3, src, dst)
        }
        IpAddr::V6(dst) => {
            let src = Ipv6Addr::from(u128::from(SOURCE_V6) | u128::from(hash & 0xffff));
            packet::expected_encap6(frame, l3, src, dst, hash & 0xf_ffff)
        }
    }
}

/// Family tag of an address.
pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// A pass-through expectation: same bytes out.
pub fn unchanged(input: &[u8]) -> (u32, Vec<u8>) {
    (XDP_PASS, input.to_vec())
}

/// A TCP packet of the lab client to WEB4 from `sport`, and its flow key.
pub fn client_flow_frame(sport: u16) -> (Vec<u8>, FlowKey) {
    let IpAddr::V4(vip) = WEB4.addr else {
        unreachable!("WEB4 is IPv4")
    };
    (
        packet::tcp4(CLIENT4, vip, sport, WEB4.port, b"GET /"),
        flow_to(&WEB4, sport),
    )
}

/// The flow key of the lab client's TCP flow from `sport` to `vip`.
pub fn flow_to(vip: &LabVip, sport: u16) -> FlowKey {
    let client = if vip.addr.is_ipv4() {
        IpAddr::V4(CLIENT4)
    } else {
        IpAddr::V6(CLIENT6)
    };
    flow(client, vip.addr, sport, vip.port, vip.proto)
}
