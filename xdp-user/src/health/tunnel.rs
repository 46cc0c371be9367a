//! Checks through the tunnel: a check packet addressed to the VIP, wrapped
//! exactly as the dataplane wraps that VIP's packets to one backend (the
//! same outer header, outer source rule, TTL, next hop and source MAC; or
//! for L2 DSR, only the backend's MAC), and sent on the balancer's
//! interface. The backend answers from the VIP, directly, as it answers
//! clients: a backend whose decapsulation or VIP binding is broken fails
//! its check as it fails every real flow.

use std::net::{IpAddr, SocketAddr};

use xdp_common::{flow_hash, fwd, FlowKey, FAMILY_V4, FAMILY_V6};

use super::probe::checksum;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
/// Hop limit of the inner packet (the backend sees it as sent).
const INNER_TTL: u8 = 64;

/// How the dataplane sends one VIP's packets to one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The balancer's interface, where the frames leave.
    pub ifindex: u32,
    /// `fwd::ENCAP` or `fwd::L2_DSR`.
    pub mode: u32,
    /// The backend: the outer destination (encapsulation).
    pub backend: IpAddr,
    /// The backend's MAC (L2 DSR).
    pub backend_mac: [u8; 6],
    /// The policy in force: next hop, source MAC, outer source, TTL.
    pub policy: xdp_common::Config,
    /// The VIP and the port checked there.
    pub vip: SocketAddr,
}

/// An address's 16 bytes as the maps hold it (IPv4 in the first four).
fn addr_bytes(a: IpAddr) -> [u8; 16] {
    crate::dataplane::addr_bytes(a).0
}

/// The pseudo-header words of a TCP or UDP checksum.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            p.extend_from_slice(&addr_bytes(src));
            p.extend_from_slice(&addr_bytes(dst));
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    p
}

/// An IP packet from `src` to `dst` carrying `l4` of protocol `proto`,
/// whose checksum (at `sum_at` in `l4`) is filled in.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, mut l4: Vec<u8>, sum_at: usize) -> Vec<u8> {
    l4[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
    let mut sum = checksum(&[&pseudo(src, dst, proto, l4.len()), &l4]);
    if proto == libc::IPPROTO_UDP as u8 && sum == 0 {
        sum = 0xffff;
    }
    l4[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, INNER_TTL, proto, 0, 0];
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let sum = checksum(&[&h]);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
        _ => {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            h.extend_from_slice(&[proto, INNER_TTL]);
            h.extend_from_slice(&addr_bytes(src));
            h.extend_from_slice(&addr_bytes(dst));
            h
        }
    };
    p.extend_from_slice(&l4);
    p
}

/// A UDP datagram from `src` to `dst` carrying `payload`, as an IP packet.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src.port().to_be_bytes());
    u.extend_from_slice(&dst.port().to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), libc::IPPROTO_UDP as u8, u, 6)
}

impl Tunnel {
    /// The flow hash the dataplane computes for the check's packets (it
    /// picks the outer source, as for any flow).
    fn hash(&self, source: IpAddr, inner: &[u8]) -> u32 {
        let v4 = self.vip.is_ipv4();
        let (l4, proto) = if v4 {
            (usize::from(inner[0] & 0x0f) * 4, inner[9])
        } else {
            (40, inner[6])
        };
        let port = |at: usize| u16::from_be_bytes([inner[l4 + at], inner[l4 + at + 1]]);
        let key = FlowKey {
            src: addr_bytes(source),
            dst: addr_bytes(self.vip.ip()),
            sport: port(0).to_be(),
            dport: port(2).to_be(),
            proto,
            family: if v4 { FAMILY_V4 } else { FAMILY_V6 },
            _pad: [0; 2],
        };
        flow_hash(&key, false)
    }

    /// The Ethernet frame the dataplane would send for the inner packet
    /// `inner` (an IP packet from `source`, this host's address in the
    /// VIP's family, to the VIP).
    pub fn frame(&self, source: IpAddr, inner: &[u8]) -> Vec<u8> {
        let p = &self.policy;
        let inner_type = if self.vip.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        let mut f = Vec::with_capacity(14 + 40 + inner.len());
        if self.mode == fwd::L2_DSR {
            f.extend_from_slice(&self.backend_mac);
            f.extend_from_slice(&p.source_mac);
            f.extend_from_slice(&inner_type.to_be_bytes());
            f.extend_from_slice(inner);
            return f;
        }
        f.extend_from_slice(&p.gateway_mac);
        f.extend_from_slice(&p.source_mac);
        let inner_proto = if self.vip.is_ipv4() {
            IPPROTO_IPIP
        } else {
            IPPROTO_IPV6
        };
        let ttl = p.outer_ttl as u8;
        let hash = self.hash(source, inner);
        match self.backend {
            IpAddr::V4(dst) => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let mut h = vec![0x45, inner[1], 0, 0, 0, 0, 0x40, 0, ttl, inner_proto, 0, 0];
                h[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
                h.extend_from_slice(&p.outer_source_v4(hash));
                h.extend_from_slice(&dst.octets());
                let sum = checksum(&[&h]);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            IpAddr::V6(dst) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let first = (6u32 << 28) | (hash & 0x000f_ffff);
                f.extend_from_slice(&first.to_be_bytes());
                f.extend_from_slice(&(inner.len() as u16).to_be_bytes());
                f.extend_from_slice(&[inner_proto, ttl]);
                f.extend_from_slice(&p.outer_source_v6(hash));
                f.extend_from_slice(&dst.octets());
            }
        }
        f.extend_from_slice(inner);
        f
    }
}

/// A packet socket on no protocol: it sends whole frames and receives
/// nothing. Needs CAP_NET_RAW.
pub struct FrameSocket(std::os::fd::OwnedFd);

impl FrameSocket {
    pub fn open() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned it.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Send `frame` out of interface `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sendto from a buffer we own to an address of the size given.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                libc::MSG_DONTWAIT,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(mode: u32, backend: &str, vip: &str) -> Tunnel {
        let mut policy = xdp_common::Config {
            gateway_mac: [2, 0, 0, 0, 0, 0xfe],
            source_mac: [2, 0, 0, 0, 0, 1],
            outer_ttl: 61,
            ..xdp_common::Config::default()
        };
        policy.source_v4 = [198, 18, 200, 0];
        policy.source_v4_host_mask = 0xff;
        let vip: SocketAddr = vip.parse().unwrap();
        Tunnel {
            ifindex: 1,
            mode,
            backend: backend.parse().unwrap(),
            backend_mac: [2, 0, 0, 0, 0, 9],
            policy,
            vip,
        }
    }

    fn source(t: &Tunnel) -> IpAddr {
        if t.vip.is_ipv4() {
            "198.18.40.2".parse().unwrap()
        } else {
            "2001:db8:28::2".parse().unwrap()
        }
    }

    #[test]
    fn an_ipip_check_frame_is_the_dataplanes() {
        let t = tunnel(fwd::ENCAP, "198.18.64.2", "198.18.0.10:80");
        let inner = udp_packet("198.18.40.2:40000".parse().unwrap(), t.vip, b"ping");
        let f = t.frame(source(&t), &inner);
        assert_eq!(&f[..6], &t.policy.gateway_mac);
        assert_eq!(&f[6..12], &t.policy.source_mac);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let outer = &f[14..34];
        assert_eq!((outer[8], outer[9]), (61, IPPROTO_IPIP));
        assert_eq!(checksum(&[outer]), 0, "outer header checksum");
        assert_eq!(&outer[16..20], &[198, 18, 64, 2]);
        // The outer source is the policy's, with the flow's host bits.
        assert_eq!(&outer[12..15], &[198, 18, 200]);
        assert_eq!(outer[15], t.hash(source(&t), &inner) as u8);
        assert_eq!(&f[34..], &inner[..]);
        assert_eq!(checksum(&[&inner[..20]]), 0, "inner header checksum");
        // The UDP checksum verifies over its pseudo-header.
        let udp = &inner[20..];
        let src: IpAddr = "198.18.40.2".parse().unwrap();
        assert_eq!(checksum(&[&pseudo(src, t.vip.ip(), 17, udp.len()), udp]), 0);
    }

    #[test]
    fn ip6ip6_ip4ip6_and_l2_dsr_frames() {
        let t = tunnel(fwd::ENCAP, "2001:db8:40::2", "[2001:db8::10]:53");
        let inner = udp_packet("[2001:db8:28::2]:40000".parse().unwrap(), t.vip, b"ping");
        let f = t.frame(source(&t), &inner);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!((f[14 + 6], f[14 + 7]), (IPPROTO_IPV6, 61));
        assert_eq!(&f[14 + 24..14 + 40], &addr_bytes(t.backend));
        assert_eq!(&f[54..], &inner[..]);

        let t = tunnel(fwd::ENCAP, "2001:db8:40::2", "198.18.0.10:53");
        let inner = udp_packet("198.18.40.2:40000".parse().unwrap(), t.vip, b"ping");
        let f = t.frame(source(&t), &inner);
        assert_eq!((&f[12..14], f[14 + 6]), (&[0x86, 0xdd][..], IPPROTO_IPIP));

        let t = tunnel(fwd::L2_DSR, "198.18.40.9", "198.18.0.10:53");
        let f = t.frame(source(&t), &inner);
        assert_eq!(&f[..6], &t.backend_mac);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..], &inner[..]);
    }
}
