//! What a veth really delivers of the XDP_TX frames sent out of it, on the
//! running kernel, against what the daemon believes
//! (`iface::tx_delivers`): the README's and the attach warning's claims
//! are this test's table. An XDP program bounces every frame back out of
//! `lb0`; the peer `lb1` is set up each way an operator might, and what
//! arrives on it is counted.
//!
//! Before (efc012d) the daemon said GRO on the peer was enough; on 6.18 a
//! GRO peer that is a bridge port lost every frame (xdp_tx counted,
//! xdp_tx_errors 0), and the host kept reporting "forwarding".

use std::{net::UdpSocket, time::Duration};

use integration_tests::{netns::Netns, require_root};
use xdp_user::{
    dataplane::{AttachMode, AuxProgram, PASS_PROGRAM, SWAP_PROGRAM},
    iface,
};

const FRAMES: u64 = 200;

/// How the peer is set up.
#[derive(Clone, Copy, Debug)]
struct Peer {
    gro: bool,
    bridge_port: bool,
    /// An XDP program on the peer, and in which mode.
    xdp: Option<AttachMode>,
}

/// A packet socket on `dev` (in the calling thread's namespace): sees
/// every frame the device receives, whatever the stack does with it next.
fn tap(dev: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let index = iface::require(dev).unwrap().index;
    // SAFETY: a zeroed sockaddr_ll is valid; bind reads it.
    let rc = unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "binding the packet socket: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Frames received on the tap (not sent) that carry the test's payload.
fn received(tap: &std::os::fd::OwnedFd) -> u64 {
    let mut n = 0;
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: recvfrom into buffers we own, of the sizes given.
        let (len, kind) = unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            let mut sll_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let len = libc::recvfrom(
                std::os::fd::AsRawFd::as_raw_fd(tap),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut sll_len,
            );
            (len, sll.sll_pkttype)
        };
        if len <= 0 {
            return n;
        }
        let frame = &buf[..len as usize];
        if kind != libc::PACKET_OUTGOING && frame.windows(9).any(|w| w == b"bounce me") {
            n += 1;
        }
    }
}

/// Frames arrived on the peer of `setup`, of [`FRAMES`] bounced; and
/// whether the daemon predicts delivery.
fn measure(peer: Peer) -> (u64, bool, Vec<(String, u64)>) {
    let ns = Netns::new("veth-tx").unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    let sender = if peer.bridge_port {
        ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        ns.ip(&["link", "set", "lb1", "master", "br0"]).unwrap();
        ns.ip(&["link", "set", "br0", "up"]).unwrap();
        "br0"
    } else {
        "lb1"
    };
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    ns.exec(&[
        "ethtool",
        "-K",
        "lb1",
        "gro",
        if peer.gro { "on" } else { "off" },
    ])
    .unwrap();
    ns.ip(&["addr", "add", "198.18.5.1/24", "dev", sender])
        .unwrap();
    let _inside = ns.enter().unwrap();
    let lb0 = iface::require("lb0").unwrap();
    let mac = xdp_user::loadgen::interface_mac("lb0").unwrap();
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip(&["neigh", "add", "198.18.5.2", "lladdr", &mac, "dev", sender])
        .unwrap();
    let mut bounce = AuxProgram::load(SWAP_PROGRAM).unwrap();
    bounce.attach("lb0", AttachMode::Native).unwrap();
    let mut pass = AuxProgram::load(PASS_PROGRAM).unwrap();
    if let Some(mode) = peer.xdp {
        pass.attach("lb1", mode).unwrap();
    }
    let predicted = iface::tx_delivers(&iface::require("lb0").unwrap()).is_ok();
    let tap = tap("lb1");
    let socket = UdpSocket::bind("198.18.5.1:0").unwrap();
    // Read as they come, so the tap's buffer never overflows.
    let mut arrived = 0;
    for i in 0..FRAMES {
        socket.send_to(b"bounce me", "198.18.5.2:9").unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(2));
            arrived += received(&tap);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    arrived += received(&tap);
    let stats: Vec<(String, u64)> = iface::driver_stats("lb0")
        .unwrap_or_default()
        .into_iter()
        .filter(|(n, _)| n.contains("xdp_tx"))
        .collect();
    drop(lb0);
    (arrived, predicted, stats)
}

#[test]
fn what_a_veth_delivers_is_what_the_daemon_believes() {
    if !require_root() {
        return;
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut table = format!(
        "\nXDP_TX out of a veth, kernel {}: {FRAMES} frames bounced\n\
         | peer lb1 | arrived | daemon predicts | lb0's counters |\n|---|---:|---|---|\n",
        kernel.trim()
    );
    let mut wrong = Vec::new();
    for peer in [
        (false, false, None),
        (true, false, None),
        (true, true, None),
        (false, false, Some(AttachMode::Native)),
        (true, true, Some(AttachMode::Native)),
        (false, false, Some(AttachMode::Generic)),
        (true, false, Some(AttachMode::Generic)),
    ]
    .map(|(gro, bridge_port, xdp)| Peer {
        gro,
        bridge_port,
        xdp,
    }) {
        let (arrived, predicted, stats) = measure(peer);
        let delivered = arrived >= FRAMES * 9 / 10;
        table += &format!(
            "| {peer:?} | {arrived} | {} | {stats:?} |\n",
            if predicted { "delivers" } else { "drops" }
        );
        // The daemon may be cautious (say "drops" of a path that delivers)
        // but never claim delivery of one that loses frames.
        if predicted && !delivered {
            wrong.push(peer);
        }
    }
    eprintln!("{table}");
    assert!(
        wrong.is_empty(),
        "the daemon believes these deliver: {wrong:?}{table}"
    );
}
