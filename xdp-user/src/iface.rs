//! What the kernel says about a network interface in this process's network
//! namespace: the XDP program attached to it and in which mode (rtnetlink),
//! its kind and veth peer, and the driver's XDP error counters (ethtool).
//! Nothing here touches aya: these are the facts the dataplane self-check
//! and the loss warnings compare against.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use anyhow::{anyhow, bail, Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// How an XDP program is attached (`IFLA_XDP_ATTACHED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Driver,
    Generic,
    Offload,
    Multiple,
}

/// As `ip link` and the config say it: `native` (driver), `generic`,
/// `offload`, `multiple`.
impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Driver => "native",
            Self::Generic => "generic",
            Self::Offload => "offload",
            Self::Multiple => "multiple",
        })
    }
}

/// One interface as rtnetlink reports it.
#[derive(Clone, Debug, Default)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// The XDP program attached, if any: its id and mode.
    pub xdp: Option<(u32, XdpMode)>,
    /// `veth`, `bridge`, ...; None for physical NICs.
    pub kind: Option<String>,
    /// For a veth: its peer's index, when the peer is in this namespace.
    pub peer_here: Option<u32>,
    /// For a veth: the peer is in another network namespace.
    pub peer_elsewhere: bool,
    /// Packets the interface received and transmitted (XDP frames
    /// included, as drivers count them), from `IFLA_STATS64`.
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// The hardware address, for an Ethernet-like interface.
    pub mac: Option<[u8; 6]>,
    /// The bond or bridge this interface is a port of.
    pub master: Option<u32>,
}

impl Interface {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_NAME: usize = 15;

/// Why `name` cannot be an interface name, if it cannot (the kernel's
/// `dev_valid_name`).
pub fn invalid_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must name a network interface".into());
    }
    if name.len() > MAX_NAME {
        return Some(format!(
            "{name:?} is {} bytes long; interface names have at most {MAX_NAME}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("{name:?} is not an interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Some(format!(
            "{name:?} contains {c:?}; interface names have no '/', ':', spaces or control characters"
        ));
    }
    None
}

fn netlink_socket() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding the rtnetlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the rtnetlink socket")?;
    Ok(socket)
}

/// Send one request and collect the replies up to the ack or the end of a
/// dump (or the one answer of a get). A kernel error is returned as an
/// io::Error.
pub fn transact(
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<RouteNetlinkMessage>, std::io::Error> {
    let socket = netlink_socket().map_err(std::io::Error::other)?;
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = NLM_F_REQUEST | flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let reply: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[offset..size])
                    .map_err(|e| std::io::Error::other(format!("bad rtnetlink reply: {e}")))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        // An ack.
                        None => Ok(out),
                        Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if flags & (NLM_F_ACK | NLM_F_DUMP) == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn parse(message: &LinkMessage) -> Interface {
    let mut iface = Interface {
        index: message.header.index,
        ..Interface::default()
    };
    let mut attached = None;
    let mut prog_id = None;
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(n) => iface.name = n.clone(),
            LinkAttribute::Address(a) => iface.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Link(peer) => iface.peer_here = Some(*peer),
            LinkAttribute::Controller(m) => iface.master = Some(*m),
            LinkAttribute::LinkNetNsId(_) => iface.peer_elsewhere = true,
            LinkAttribute::Stats64(s) => {
                iface.rx_packets = s.rx_packets;
                iface.tx_packets = s.tx_packets;
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        iface.kind = Some(match kind {
                            InfoKind::Veth => "veth".to_owned(),
                            other => format!("{other:?}").to_lowercase(),
                        });
                    }
                }
            }
            LinkAttribute::Xdp(xdp) => {
                for x in xdp {
                    match x {
                        LinkXdp::Attached(a) => attached = Some(*a),
                        LinkXdp::ProgId(id) => prog_id = Some(*id),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if iface.peer_elsewhere || iface.peer_here == Some(iface.index) || iface.peer_here == Some(0) {
        iface.peer_here = None;
    }
    let mode = match attached {
        Some(XdpAttached::Driver) => Some(XdpMode::Driver),
        Some(XdpAttached::SocketBuffer) => Some(XdpMode::Generic),
        Some(XdpAttached::Hardware) => Some(XdpMode::Offload),
        Some(XdpAttached::Multiple) => Some(XdpMode::Multiple),
        _ => None,
    };
    iface.xdp = mode.map(|m| (prog_id.unwrap_or(0), m));
    iface
}

/// The interface named `name`, or None if this namespace has none.
pub fn by_name(name: &str) -> Result<Option<Interface>> {
    if let Some(why) = invalid_name(name) {
        bail!("interface {why}");
    }
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    get(message).with_context(|| format!("asking the kernel about interface {name}"))
}

/// The indexes of the ports of bond (or bridge) `index`: XDP on a bond
/// runs on its ports, so their frames arrive with the port's index.
pub fn ports_of(index: u32) -> Result<Vec<u32>> {
    let replies = transact(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        netlink_packet_core::NLM_F_DUMP,
    )
    .context("listing interfaces")?;
    Ok(replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(parse(link)),
            _ => None,
        })
        .filter(|i| i.master == Some(index))
        .map(|i| i.index)
        .collect())
}

/// The interface with index `index`, or None.
pub fn by_index(index: u32) -> Result<Option<Interface>> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    get(message).with_context(|| format!("asking the kernel about interface index {index}"))
}

fn get(message: LinkMessage) -> Result<Option<Interface>> {
    match transact(RouteNetlinkMessage::GetLink(message), 0) {
        Ok(replies) => Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(parse(link)),
            _ => None,
        })),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Remove the XDP program attached through netlink (not through a bpf_link:
/// the kernel refuses that) in `mode`.
pub fn detach_netlink_xdp(index: u32, mode: XdpMode) -> Result<()> {
    set_netlink_xdp(index, None, None, mode)
        .with_context(|| format!("removing the XDP program of interface index {index}"))
}

/// Attach `prog` (None: nothing) to the interface `index` through netlink,
/// in `mode`. With `expected`, only in place of that program, atomically
/// (`XDP_FLAGS_REPLACE`: the kernel answers EEXIST if another program
/// took its place); without, attaching `prog` needs a bare interface.
pub fn set_netlink_xdp(
    index: u32,
    prog: Option<BorrowedFd<'_>>,
    expected: Option<BorrowedFd<'_>>,
    mode: XdpMode,
) -> std::io::Result<()> {
    const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1;
    const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
    const XDP_FLAGS_REPLACE: u32 = 1 << 4;
    let mut flags = match mode {
        XdpMode::Driver => XDP_FLAGS_DRV_MODE,
        XdpMode::Generic => XDP_FLAGS_SKB_MODE,
        XdpMode::Offload => XDP_FLAGS_HW_MODE,
        XdpMode::Multiple => {
            return Err(std::io::Error::other(
                "several XDP programs are attached; remove them by hand",
            ))
        }
    };
    let mut xdp = vec![LinkXdp::Fd(prog.map_or(-1, |p| p.as_raw_fd()))];
    match expected {
        Some(old) => {
            flags |= XDP_FLAGS_REPLACE;
            xdp.push(LinkXdp::ExpectedFd(old.as_raw_fd() as u32));
        }
        None if prog.is_some() => flags |= XDP_FLAGS_UPDATE_IF_NOEXIST,
        None => {}
    }
    xdp.push(LinkXdp::Flags(flags));
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.attributes.push(LinkAttribute::Xdp(xdp));
    transact(RouteNetlinkMessage::SetLink(message), NLM_F_ACK).map(drop)
}

/// `SIOCETHTOOL` and the commands used here (linux/ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;
/// Offset of `n_stats` in `struct ethtool_drvinfo`.
const DRVINFO_N_STATS: usize = 4 + 5 * 32 + 12 + 4;
const DRVINFO_LEN: usize = DRVINFO_N_STATS + 4 * 4;

/// One SIOCETHTOOL call on `iface` with `data` as the command buffer.
fn ethtool(socket: &OwnedFd, iface: &str, data: &mut [u8]) -> std::io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut u8,
        _pad: [u8; 16],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: data.as_mut_ptr(),
        _pad: [0; 16],
    };
    let bytes = iface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: the request names a NUL-terminated interface and points at a
    // buffer sized for the command it holds (the callers size it from the
    // kernel's own counts).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The native-endian `u32` at byte `off` of a buffer the kernel filled
/// (ethtool's, bpf(2)'s info structures, a map value).
pub(crate) fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

/// Every ethtool statistic of `iface` (`ethtool -S`), by name. Empty when
/// the driver has none.
pub fn driver_stats(iface: &str) -> Result<Vec<(String, u64)>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening an ethtool socket");
    }
    // SAFETY: the kernel just returned this fd.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = vec![0u8; DRVINFO_LEN];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    match ethtool(&socket, iface, &mut info) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("ethtool driver info of {iface}")),
    }
    let n = u32_at(&info, DRVINFO_N_STATS) as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > 1 << 16 {
        bail!("{iface}: the driver reports {n} statistics");
    }
    let mut strings = vec![0u8; 12 + n * ETH_GSTRING_LEN];
    strings[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
    strings[8..12].copy_from_slice(&(n as u32).to_ne_bytes());
    ethtool(&socket, iface, &mut strings)
        .with_context(|| format!("ethtool statistic names of {iface}"))?;
    let mut stats = vec![0u8; 8 + n * 8];
    stats[..4].copy_from_slice(&ETHTOOL_GSTATS.to_ne_bytes());
    stats[4..8].copy_from_slice(&(n as u32).to_ne_bytes());
    ethtool(&socket, iface, &mut stats)
        .with_context(|| format!("ethtool statistics of {iface}"))?;
    // The kernel may have reported fewer than asked.
    let got = (u32_at(&stats, 4) as usize).min(n);
    Ok((0..got)
        .map(|i| {
            let raw = &strings[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = String::from_utf8_lossy(&raw[..end]).into_owned();
            let off = 8 + i * 8;
            let mut v = [0u8; 8];
            v.copy_from_slice(&stats[off..off + 8]);
            (name, u64::from_ne_bytes(v))
        })
        .collect())
}

/// Whether a driver statistic counts XDP frames the driver failed to send
/// or redirect (veth `xdp_tx_errors` / `xdp_xmit_errors`, virtio
/// `xdp_tx_drops`, mlx5 `xdp_tx_err` / `xdp_tx_full`, ...). The program's own
/// XDP_DROP verdicts (`xdp_drops`) are not errors.
pub fn is_xdp_error(name: &str) -> bool {
    name.contains("xdp")
        && (name.contains("err") || name.contains("full") || name.ends_with("tx_drops"))
}

/// The driver's XDP TX/redirect error counters of `iface`, by name.
pub fn xdp_errors(iface: &str) -> Result<Vec<(String, u64)>> {
    Ok(driver_stats(iface)?
        .into_iter()
        .filter(|(n, _)| is_xdp_error(n))
        .collect())
}

/// Whether XDP_TX frames sent out of `iface` get anywhere, as far as this
/// host can tell: `Err(why)` for a veth whose peer (in this namespace) runs
/// no XDP program in the driver. Measured (`tests/tests/veth_tx.rs` on
/// 6.18, `cargo xtask vmtest` on 6.1 and 6.12): such a peer receives none
/// of them, GRO on or off, bridge port or not, and none with a program in
/// generic (skb) mode; only a native program on the peer delivers them.
/// The loss is mostly silent: the veth counts the frames as sent
/// (`xdp_tx`) and no error.
pub fn tx_delivers(iface: &Interface) -> std::result::Result<(), String> {
    if !iface.is_veth() {
        return Ok(());
    }
    let Some(peer) = iface.peer_here.and_then(|i| by_index(i).ok().flatten()) else {
        return Ok(());
    };
    let what = match peer.xdp {
        Some((_, XdpMode::Driver)) => return Ok(()),
        Some((_, mode)) => format!("runs its XDP program in {mode} mode, not in the driver"),
        None => "runs no XDP program".to_owned(),
    };
    Err(format!(
        "{} is a veth and its peer {} {what}: every XDP_TX frame is lost there (silently: \
         counted as sent); attach an XDP program to {} in native mode (e.g. `xdp-loader load \
         -m native {} xdp_pass.o`)",
        iface.name, peer.name, peer.name, peer.name
    ))
}

/// Why XDP_TX frames from `iface` may be lost where [`tx_delivers`]
/// cannot tell: a veth whose peer is in another namespace.
pub fn peer_unseen_warning(iface: &Interface) -> Option<String> {
    (iface.is_veth() && iface.peer_elsewhere).then(|| {
        format!(
            "{} is a veth whose peer is in another network namespace: XDP_TX frames arrive only if \
             the peer runs an XDP program in native mode; otherwise they are lost without an error counter",
            iface.name
        )
    })
}

/// Why XDP_TX frames from `iface` may be silently dropped, if they may:
/// what [`tx_delivers`] knows, and [`peer_unseen_warning`].
pub fn tx_loss_warning(iface: &Interface) -> Option<String> {
    peer_unseen_warning(iface).or_else(|| tx_delivers(iface).err())
}

/// The interface must exist, with this message when it does not.
pub fn require(name: &str) -> Result<Interface> {
    by_name(name)?.ok_or_else(|| anyhow!("no interface {name} in this network namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(invalid_name("eth0").is_none());
        assert!(invalid_name("enp3s0f1np1.100").is_none());
        assert!(invalid_name("").is_some());
        assert!(invalid_name("eth\u{0}x").unwrap().contains("control"));
        assert!(invalid_name("a/b").is_some());
        assert!(invalid_name("..").is_some());
        let long = invalid_name("abcdefghijklmnopqrst").unwrap();
        assert!(
            long.contains("20 bytes") && long.contains("at most 15"),
            "{long}"
        );
    }

    #[test]
    fn xdp_error_counters() {
        for name in [
            "rx_queue_0_xdp_tx_errors",
            "tx_queue_1_xdp_xmit_errors",
            "tx_xdp_tx_drops",
            "rx_xdp_tx_err",
            "rx_xdp_tx_full",
        ] {
            assert!(is_xdp_error(name), "{name}");
        }
        for name in ["rx_queue_0_xdp_drops", "rx_queue_0_xdp_tx", "tx_errors"] {
            assert!(!is_xdp_error(name), "{name}");
        }
    }
}
