//! Half-open TCP checks: a SYN sent from a raw socket. A SYN-ACK means the
//! backend's port accepts connections (this host's kernel answers it with a
//! reset, since no socket owns the connection); a reset means it does not;
//! silence means the check times out. No socket, connect, epoll
//! registration or close per check, and no connection on the backend: the
//! cheapest check that still proves the backend's kernel listens on the
//! port. Needs CAP_NET_RAW; without it checks fall back to `connect()`.
//!
//! Replies are matched by (backend address, backend port, our port) and the
//! acknowledgement number. Our ports are a block of ports held by bound TCP
//! sockets that never listen, so no connection of this host uses them, and
//! a socket filter on the raw socket passes only SYN-ACKs and resets sent to
//! them.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

use tokio::{io::unix::AsyncFd, sync::oneshot};

use super::{
    check::CheckError,
    tunnel::{ip_packet, FrameSocket, Tunnel},
};

/// Source ports reserved for probes: in-flight probes to one backend port.
const PORTS: u16 = 32;

/// (backend address, backend port, our port, the acknowledgement a reply
/// carries): a probe through the tunnel is answered from the VIP, which
/// all the VIP's backends share, so the sequence tells their probes apart.
type Key = (IpAddr, u16, u16, u32);

/// What a probe's reply said, or that none came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Open,
    Reset,
    Timeout,
}

struct Pending {
    reply: oneshot::Sender<Reply>,
    deadline: tokio::time::Instant,
}

/// How often probes without a reply are expired: one sweep instead of a
/// timer per probe.
const SWEEP: std::time::Duration = std::time::Duration::from_millis(10);

/// One address family's raw socket and its probes in flight.
struct Family {
    socket: AsyncFd<OwnedFd>,
    v6: bool,
    base: u16,
    /// Bound, never-listening TCP sockets holding ports `base..base+PORTS`.
    _reserved: Vec<socket2::Socket>,
    pending: Mutex<HashMap<Key, Pending>>,
    next: AtomicU32,
}

/// Half-open TCP prober for IPv4 and IPv6.
pub struct Prober {
    v4: Option<Arc<Family>>,
    v6: Option<Arc<Family>>,
    /// Sends probes through the tunnel.
    frames: Option<FrameSocket>,
}

fn raw_socket(v6: bool) -> std::io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` is a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Hold `PORTS` consecutive ports with bound TCP sockets.
fn reserve_ports(v6: bool) -> std::io::Result<(u16, Vec<socket2::Socket>)> {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    // Start from a port the kernel picks, then take the block after it.
    for _ in 0..32 {
        let first = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        first.bind(&SocketAddr::new(any, 0).into())?;
        let base = first.local_addr()?.as_socket().map_or(0, |a| a.port());
        if base == 0 || base > u16::MAX - PORTS {
            continue;
        }
        let mut held = vec![first];
        for p in base + 1..base + PORTS {
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            if s.bind(&SocketAddr::new(any, p).into()).is_err() {
                break;
            }
            held.push(s);
        }
        if held.len() == PORTS as usize {
            return Ok((base, held));
        }
    }
    Err(std::io::Error::other("no free block of probe ports"))
}

/// A classic BPF filter passing TCP segments to `base..base+PORTS` that are
/// resets or SYN-ACKs. IPv4 raw sockets see the IP header; IPv6 ones do not.
fn attach_filter(fd: &OwnedFd, v6: bool, base: u16) -> std::io::Result<()> {
    const LD_H_IND: u16 = 0x48;
    const LD_B_IND: u16 = 0x50;
    const LDX_B_MSH: u16 = 0xb1;
    const LDX_IMM: u16 = 0x01;
    const JGE: u16 = 0x35;
    const JGT: u16 = 0x25;
    const JSET: u16 = 0x45;
    const ALU_AND: u16 = 0x54;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let lo = u32::from(base);
    let hi = u32::from(base + PORTS - 1);
    let prologue = if v6 {
        // X = 0: the TCP header starts the packet.
        ins(LDX_IMM, 0, 0, 0)
    } else {
        // X = IHL * 4.
        ins(LDX_B_MSH, 0, 0, 0)
    };
    let program = [
        prologue,
        ins(LD_H_IND, 0, 0, 2),   // 1: A = destination port
        ins(JGE, 0, 6, lo),       // 2: < lo: drop
        ins(JGT, 5, 0, hi),       // 3: > hi: drop
        ins(LD_B_IND, 0, 0, 13),  // 4: A = flags
        ins(JSET, 2, 0, 0x04),    // 5: RST: accept
        ins(ALU_AND, 0, 0, 0x12), // 6: A &= SYN|ACK
        ins(JEQ, 0, 1, 0x12),     // 7: SYN-ACK: accept, else drop
        ins(RET, 0, 0, 0xffff),   // 8: accept
        ins(RET, 0, 0, 0),        // 9: drop
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

/// Internet checksum over `parts`.
pub(super) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A SYN from `sport` to `dport` with sequence `seq` and an MSS option.
pub(super) fn syn(sport: u16, dport: u16, seq: u32) -> [u8; 24] {
    let mut t = [0u8; 24];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 6 << 4; // 24-byte header
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    t
}

impl Family {
    fn open(v6: bool) -> std::io::Result<Arc<Self>> {
        let socket = raw_socket(v6)?;
        let (base, reserved) = reserve_ports(v6)?;
        attach_filter(&socket, v6, base)?;
        if v6 {
            // The kernel fills in the TCP checksum (offset 16).
            setsockopt(&socket, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, &16i32)?;
        } else {
            // We write the IPv4 header, so the source address is ours to
            // choose and the TCP checksum can cover it.
            setsockopt(&socket, libc::IPPROTO_IP, libc::IP_HDRINCL, &1i32)?;
        }
        // SAFETY: an OwnedFd's descriptor is valid, open and the same for
        // as long as the AsyncFd owns it.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Arc::new(Self {
            socket,
            v6,
            base,
            _reserved: reserved,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU32::new(0),
        }))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pending>> {
        // A poisoned map is still a map of probes in flight.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time out probes whose deadline passed.
    async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let mut pending = self.pending();
            let expired: Vec<Key> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            for key in expired {
                if let Some(p) = pending.remove(&key) {
                    let _ = p.reply.send(Reply::Timeout);
                }
            }
        }
    }

    /// Read replies, up to `BATCH` per call, until the socket is drained;
    /// wake their probes.
    async fn receive(self: Arc<Self>) {
        const BATCH: usize = 32;
        const LEN: usize = 128;
        let mut bufs = vec![[0u8; LEN]; BATCH];
        // SAFETY: all-zero sockaddr_in6 values are valid.
        let mut froms: Vec<libc::sockaddr_in6> = vec![unsafe { std::mem::zeroed() }; BATCH];
        loop {
            let Ok(mut ready) = self.socket.readable().await else {
                return;
            };
            loop {
                let mut iovs: Vec<libc::iovec> = bufs
                    .iter_mut()
                    .map(|b| libc::iovec {
                        iov_base: b.as_mut_ptr() as *mut libc::c_void,
                        iov_len: LEN,
                    })
                    .collect();
                let mut msgs: Vec<libc::mmsghdr> = iovs
                    .iter_mut()
                    .zip(froms.iter_mut())
                    .map(|(iov, from)| {
                        // SAFETY: an all-zero mmsghdr is valid; its pointers
                        // are set to buffers that outlive the call.
                        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                        m.msg_hdr.msg_name = from as *mut libc::sockaddr_in6 as *mut libc::c_void;
                        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
                        m.msg_hdr.msg_iov = iov;
                        m.msg_hdr.msg_iovlen = 1;
                        m
                    })
                    .collect();
                // SAFETY: recvmmsg into the headers built above.
                let n = unsafe {
                    libc::recvmmsg(
                        self.socket.get_ref().as_raw_fd(),
                        msgs.as_mut_ptr(),
                        BATCH as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n <= 0 {
                    ready.clear_ready();
                    break;
                }
                for (i, m) in msgs.iter().take(n as usize).enumerate() {
                    let len = (m.msg_len as usize).min(LEN);
                    self.deliver(&bufs[i][..len], &froms[i]);
                }
                if (n as usize) < BATCH {
                    // Drained (a reply racing in is not lost: the readiness
                    // is cleared only if no event came since it was read).
                    ready.clear_ready();
                    break;
                }
            }
        }
    }

    fn deliver(&self, packet: &[u8], from: &libc::sockaddr_in6) {
        let (src, tcp): (IpAddr, &[u8]) = if self.v6 {
            (Ipv6Addr::from(from.sin6_addr.s6_addr).into(), packet)
        } else {
            let Some(&first) = packet.first() else {
                return;
            };
            let ihl = usize::from(first & 0x0f) * 4;
            if packet.len() < ihl.max(20) {
                return;
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            (src.into(), &packet[ihl..])
        };
        if tcp.len() < 20 {
            return;
        }
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let flags = tcp[13];
        let reply = if flags & 0x04 != 0 {
            Reply::Reset
        } else if flags & 0x12 == 0x12 {
            Reply::Open
        } else {
            return;
        };
        if let Some(p) = self.pending().remove(&(src, sport, dport, ack)) {
            let _ = p.reply.send(reply);
        }
    }

    fn send(
        &self,
        source: IpAddr,
        target: SocketAddr,
        sport: u16,
        seq: u32,
    ) -> std::io::Result<()> {
        let mut tcp = syn(sport, target.port(), seq);
        // IPv4: our own header before the segment (IP_HDRINCL); IPv6: the
        // segment alone (the kernel adds the header and the checksum).
        let mut packet = [0u8; 44];
        let len = match (source, target.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let (s, d) = (s.octets(), d.octets());
                let tail = [0, libc::IPPROTO_TCP as u8, 0, tcp.len() as u8];
                let sum = checksum(&[&s, &d, &tail, &tcp]);
                tcp[16..18].copy_from_slice(&sum.to_be_bytes());
                // Version/IHL, TOS, length and id (the kernel fills both),
                // DF, TTL 64, TCP, checksum (the kernel fills it), addresses.
                packet[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0]);
                packet[12..16].copy_from_slice(&s);
                packet[16..20].copy_from_slice(&d);
                packet[20..].copy_from_slice(&tcp);
                packet.len()
            }
            (_, IpAddr::V6(_)) => {
                packet[..tcp.len()].copy_from_slice(&tcp);
                tcp.len()
            }
            _ => return Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        };
        let to = socket2::SockAddr::from(SocketAddr::new(target.ip(), 0));
        // SAFETY: sendto from a buffer we own to a socket address of the
        // length it states.
        let rc = unsafe {
            libc::sendto(
                self.socket.get_ref().as_raw_fd(),
                packet.as_ptr() as *const libc::c_void,
                len,
                0,
                to.as_ptr() as *const libc::sockaddr,
                to.len(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The address this host sends from towards `target` (the route's source).
pub fn source_for(target: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(target)?;
    Ok(s.local_addr()?.ip())
}

impl Prober {
    /// Open the raw sockets (on the current tokio runtime); None without
    /// CAP_NET_RAW or where raw TCP sockets are not allowed.
    pub fn open() -> Option<Arc<Self>> {
        let v4 = Family::open(false).ok();
        let v6 = Family::open(true).ok();
        if v4.is_none() && v6.is_none() {
            return None;
        }
        for family in v4.iter().chain(v6.iter()) {
            tokio::spawn(family.clone().receive());
            tokio::spawn(family.clone().sweep());
        }
        let frames = FrameSocket::open().ok();
        Some(Arc::new(Self { v4, v6, frames }))
    }

    /// Whether targets of this family can be probed.
    pub fn handles(&self, target: SocketAddr) -> bool {
        if target.is_ipv4() {
            self.v4.is_some()
        } else {
            self.v6.is_some()
        }
    }

    /// Probe `target` from `source`: Ok when it answers with a SYN-ACK
    /// within `timeout`, a failure on a reset or silence.
    pub async fn probe(
        &self,
        source: IpAddr,
        target: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<(), CheckError> {
        self.probe_with(target, timeout, |family, sport, seq| {
            family.send(source, target, sport, seq)
        })
        .await
    }

    /// Probe `tunnel`'s VIP port through the tunnel to its backend: the
    /// SYN goes to the VIP, wrapped as the dataplane wraps the VIP's
    /// packets, and the backend's SYN-ACK comes from the VIP.
    pub async fn probe_tunnel(
        &self,
        source: IpAddr,
        tunnel: &Tunnel,
        timeout: std::time::Duration,
    ) -> Result<(), CheckError> {
        self.probe_with(tunnel.vip, timeout, |_, sport, seq| {
            let segment = syn(sport, tunnel.vip.port(), seq).to_vec();
            let tcp = libc::IPPROTO_TCP as u8;
            let inner = ip_packet(source, tunnel.vip.ip(), tcp, segment, 16);
            self.send_frame(tunnel.ifindex, &tunnel.frame(source, &inner))
        })
        .await
    }

    /// Send a whole frame out of interface `ifindex` (checks through the
    /// tunnel).
    pub fn send_frame(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        match &self.frames {
            Some(frames) => frames.send(ifindex, frame),
            None => Err(std::io::Error::from_raw_os_error(libc::EPERM)),
        }
    }

    /// Register a probe of `target`, `send` its SYN (our port, sequence),
    /// and wait for the answer.
    async fn probe_with(
        &self,
        target: SocketAddr,
        timeout: std::time::Duration,
        send: impl FnOnce(&Family, u16, u32) -> std::io::Result<()>,
    ) -> Result<(), CheckError> {
        let family = if target.is_ipv4() { &self.v4 } else { &self.v6 };
        let family = family
            .as_ref()
            .ok_or_else(|| CheckError::from("no raw socket for this address family"))?;
        let (tx, rx) = oneshot::channel();
        let seq = rand_u32();
        let ack = seq.wrapping_add(1);
        let sport = {
            let mut pending = family.pending();
            let start = family.next.fetch_add(1, Ordering::Relaxed);
            let free = (0..u32::from(PORTS))
                .map(|i| family.base + ((start + i) % u32::from(PORTS)) as u16)
                .find(|p| !pending.contains_key(&(target.ip(), target.port(), *p, ack)));
            let Some(sport) = free else {
                return Err(CheckError {
                    reason: format!("{PORTS} probes to {target} already in flight"),
                    local: Some("enobufs"),
                });
            };
            pending.insert(
                (target.ip(), target.port(), sport, ack),
                Pending {
                    reply: tx,
                    deadline: tokio::time::Instant::now() + timeout,
                },
            );
            sport
        };
        /// Removes the probe from the table however the wait ends.
        struct Forget<'a>(&'a Family, Key);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending().remove(&self.1);
            }
        }
        let _forget = Forget(family, (target.ip(), target.port(), sport, ack));
        send(family, sport, seq).map_err(|e| CheckError {
            reason: format!("sending SYN: {e}"),
            local: super::check::local_kind(&e),
        })?;
        match rx.await {
            Ok(Reply::Open) => Ok(()),
            Ok(Reply::Reset) => Err("connection refused (reset)".into()),
            Ok(Reply::Timeout) => Err(format!("timed out after {timeout:?}").into()),
            Err(_) => Err("probe abandoned".into()),
        }
    }
}

/// A random sequence number (xorshift seeded from the clock and a counter).
fn rand_u32() -> u32 {
    static STATE: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = STATE.fetch_add(0x6d2b_79f5, Ordering::Relaxed) ^ nanos;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_checksum_of_a_known_segment() {
        // RFC 1071 example words sum to 0xddf2; the checksum is its
        // complement.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        // An odd length pads with a zero byte.
        assert_eq!(checksum(&[&[0x01]]), !0x0100);
    }

    #[test]
    fn a_syn_has_the_flags_and_options_of_one() {
        let s = syn(40000, 80, 7);
        assert_eq!(&s[0..4], &[0x9c, 0x40, 0, 80]);
        assert_eq!(s[13], 0x02);
        assert_eq!(s[12] >> 4, 6);
    }
}
