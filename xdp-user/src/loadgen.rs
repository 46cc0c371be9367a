//! `xdplb loadgen`: a packet generator for load tests. BPF_PROG_TEST_RUN in
//! live-frames mode runs `xdp_gen` over a template packet `repeat` times;
//! each run stamps the frame with one of `flows` flows and transmits it out
//! of the interface (XDP_TX), without the socket layer in the way. Always
//! bounded by a packet count and a duration.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};

use crate::{
    config::Protocol,
    dataplane::{AuxProgram, GEN_PROGRAM},
};

/// Frames per BPF_PROG_TEST_RUN call: small enough to check the clock and
/// the rate often, large enough that the syscall is amortised.
const CHUNK: u64 = 250_000;

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub interface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub protocol: Protocol,
    /// Distinct flows (source port, then source address low bits).
    pub flows: u32,
    /// Frame size in bytes (without FCS).
    pub size: usize,
    /// Stop after this many packets...
    pub count: u64,
    /// ...or this long, whichever comes first.
    pub duration: Duration,
    /// Packets per second; None: as fast as possible.
    pub rate: Option<f64>,
    /// Frames per live-frames batch (kernel maximum 256).
    pub batch: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    pub sent: u64,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn mpps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The template frame: Ethernet, IPv4 or IPv6, TCP SYN or UDP, padded to
/// `size`. IP header checksum valid; L4 checksum left zero.
pub fn template(spec: &LoadSpec) -> Result<Vec<u8>> {
    let l4_len = match spec.protocol {
        Protocol::Tcp => 20,
        Protocol::Udp => 8,
    };
    let (ethertype, l3_len) = match (spec.src, spec.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (0x0800u16, 20),
        (IpAddr::V6(_), IpAddr::V6(_)) => (0x86dd, 40),
        _ => bail!("source and destination must be the same address family"),
    };
    let min = 14 + l3_len + l4_len;
    if spec.size < min.max(60) || spec.size > 1514 {
        bail!(
            "frame size {} out of range {}..=1514",
            spec.size,
            min.max(60)
        );
    }
    let mut f = Vec::with_capacity(spec.size);
    f.extend_from_slice(&spec.dst_mac);
    f.extend_from_slice(&spec.src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    let ip_len = spec.size - 14;
    let proto = spec.protocol.number();
    match (spec.src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            h[6] = 0x40;
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = [0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&h);
        }
        _ => unreachable!("checked above"),
    }
    let l4_total = spec.size - f.len();
    f.extend_from_slice(&1024u16.to_be_bytes());
    f.extend_from_slice(&spec.dport.to_be_bytes());
    match spec.protocol {
        Protocol::Tcp => {
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        Protocol::Udp => {
            f.extend_from_slice(&(l4_total as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
    }
    f.resize(spec.size, 0);
    Ok(f)
}

/// The interface's MAC address, in the calling thread's network namespace
/// (sysfs would show the namespace /sys was mounted in).
pub fn interface_mac(iface: &str) -> Result<[u8; 6]> {
    if iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} too long");
    }
    // SAFETY: a plain datagram socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd was just returned by socket(2).
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we own.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {iface} in this network namespace"));
    }
    // SAFETY: the kernel filled the hwaddr member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// A loaded generator for one spec; [`Generator::send`] can be called
/// repeatedly (warm-up, then measurement).
pub struct Generator {
    program: AuxProgram,
    frame: Vec<u8>,
    ctx: [u8; 24],
    batch: u32,
}

impl Generator {
    pub fn new(spec: &LoadSpec) -> Result<Self> {
        if !(1..=256).contains(&spec.batch) {
            bail!("batch {} out of range 1..=256", spec.batch);
        }
        let frame = template(spec)?;
        let ctx = crate::dataplane::test_run_ctx(
            frame.len(),
            crate::iface::require(&spec.interface)?.index,
        );
        Ok(Self {
            program: AuxProgram::generator(spec.flows, &frame)?,
            frame,
            ctx,
            batch: spec.batch,
        })
    }

    /// Send up to `count` frames for at most `duration`, at `rate` if given.
    pub fn send(&self, count: u64, duration: Duration, rate: Option<f64>) -> Result<LoadReport> {
        let program = self.program.program()?;
        let started = Instant::now();
        let mut sent = 0u64;
        // With a rate, send 10 ms worth per call: one call of CHUNK frames
        // would leave as a single burst whatever the average, and overflow
        // the queues downstream.
        let per_call = rate.map_or(CHUNK, |pps| ((pps / 100.0) as u64).clamp(1, CHUNK));
        while sent < count && started.elapsed() < duration {
            let chunk = (count - sent).min(per_call);
            program
                .test_run(TestRunOptions {
                    data_in: Some(&self.frame),
                    ctx_in: Some(&self.ctx),
                    repeat: chunk as u32,
                    attrs: TestRunAttrs::new().xdp_live_frames(self.batch),
                    ..TestRunOptions::default()
                })
                .with_context(|| format!("BPF_PROG_TEST_RUN live frames ({GEN_PROGRAM})"))?;
            sent += chunk;
            if let Some(pps) = rate {
                let due = Duration::from_secs_f64(sent as f64 / pps);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead.min(duration.saturating_sub(started.elapsed())));
                }
            }
        }
        Ok(LoadReport {
            sent,
            elapsed: started.elapsed(),
        })
    }
}

/// A counter the generator reads before and after sending, to report what
/// arrived (`--count-at`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountAt {
    /// Packets of every VIP of the xdplb daemon on this admin socket.
    Socket(std::path::PathBuf),
    /// Packets received by an interface in this network namespace (a
    /// sink's, or the LB's own).
    Rx(String),
}

impl std::str::FromStr for CountAt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("socket", path)) if !path.is_empty() => Ok(Self::Socket(path.into())),
            Some(("rx", iface)) if crate::iface::invalid_name(iface).is_none() => {
                Ok(Self::Rx(iface.into()))
            }
            _ => Err(format!(
                "{s:?}: expected socket:PATH (an xdplb daemon's VIP packets) or rx:INTERFACE"
            )),
        }
    }
}

impl std::fmt::Display for CountAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "socket:{}", p.display()),
            Self::Rx(i) => write!(f, "rx:{i}"),
        }
    }
}

impl CountAt {
    fn read(&self) -> Result<u64> {
        match self {
            Self::Socket(path) => {
                let response = crate::api::call(path, &crate::api::Request::Stats {})?;
                let stats: crate::api::Stats = serde_json::from_value(
                    response
                        .data
                        .with_context(|| format!("no stats from {}", path.display()))?,
                )?;
                Ok(stats.vips.iter().map(|(_, t)| t.packets).sum())
            }
            Self::Rx(iface) => Ok(crate::iface::require(iface)?.rx_packets),
        }
    }
}

/// What a run did, counted where it can be: frames the program produced,
/// frames that left the interface, frames that arrived.
#[derive(Clone, Debug)]
pub struct Accounting {
    pub report: LoadReport,
    /// Frames the driver queued for transmission meanwhile (its XDP
    /// transmit counters, or the interface's TX packets with any other
    /// traffic on it).
    pub transmitted: u64,
    /// The driver's XDP transmit errors meanwhile.
    pub driver_errors: u64,
    /// Packets the `--count-at` counter gained.
    pub arrived: Option<u64>,
    /// Why the figures above may fall short of `report.sent`.
    pub warnings: Vec<String>,
}

impl Accounting {
    /// Rate of frames that left the interface, in Mpps.
    pub fn transmitted_mpps(&self) -> f64 {
        self.transmitted.min(self.report.sent) as f64 / self.report.elapsed.as_secs_f64() / 1e6
    }
}

/// Frames still in flight are counted if they land within this long.
const SETTLE: Duration = Duration::from_millis(200);

/// Run a spec once and count what left and what arrived: a driver that
/// drops XDP frames without a word (a veth whose peer has no XDP program,
/// a virtio NIC without one) shows up as frames that never left.
pub fn run(spec: &LoadSpec, count_at: Option<&CountAt>) -> Result<Accounting> {
    let generator = Generator::new(spec)?;
    let iface = crate::iface::require(&spec.interface)?;
    let errors = || -> u64 {
        crate::iface::xdp_errors(&spec.interface)
            .map(|v| v.iter().map(|(_, n)| n).sum())
            .unwrap_or(0)
    };
    // Frames the driver queued for transmission: its own XDP transmit
    // counters where it has them (veth's xdp_xmit, virtio_net's xdp_tx;
    // the interface's packet counter lags on virtio until completions are
    // reaped), else the interface's TX packets.
    let queued = |iface: &crate::iface::Interface| -> u64 {
        let xdp: Vec<u64> = crate::iface::driver_stats(&spec.interface)
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _)| name.ends_with("_xdp_xmit") || name.ends_with("_xdp_tx"))
            .map(|(_, n)| n)
            .collect();
        if xdp.is_empty() {
            iface.tx_packets
        } else {
            xdp.iter().sum()
        }
    };
    let queued_before = queued(&iface);
    let (errors_before, arrived_before) = (errors(), count_at.map(CountAt::read).transpose()?);
    let report = generator.send(spec.count, spec.duration, spec.rate)?;
    std::thread::sleep(SETTLE);
    let after = crate::iface::require(&spec.interface)?;
    let arrived = match (count_at, arrived_before) {
        (Some(c), Some(before)) => Some(c.read()?.saturating_sub(before)),
        _ => None,
    };
    let mut accounting = Accounting {
        report,
        transmitted: queued(&after).saturating_sub(queued_before),
        driver_errors: errors().saturating_sub(errors_before),
        arrived,
        warnings: Vec::new(),
    };
    let sent = report.sent;
    let short = |n: u64| (n as f64) < 0.99 * sent as f64;
    if short(accounting.transmitted) {
        let mut w = format!(
            "only {} of {sent} frames left {}: the driver dropped the rest{}",
            accounting.transmitted.min(sent),
            spec.interface,
            if accounting.driver_errors > 0 {
                format!(
                    " ({} counted as XDP transmit errors)",
                    accounting.driver_errors
                )
            } else {
                " without counting them".into()
            }
        );
        match (crate::iface::tx_loss_warning(&iface), iface.xdp) {
            (Some(why), _) => w += &format!("; {why}"),
            (None, None) => w += "; a NIC like virtio_net transmits XDP frames only while an XDP program is attached to it",
            (None, Some(_)) => w += "; the NIC's driver could not queue them (virtio_net needs spare queue pairs for XDP: more queues than CPUs, e.g. QEMU's mq=on and `ethtool -L <if> combined <n>`)",
        }
        accounting.warnings.push(w);
    }
    if let Some((_, crate::iface::XdpMode::Generic)) = iface.xdp {
        accounting.warnings.push(format!(
            "{} runs its XDP program in generic mode: frames take the kernel's slow path",
            spec.interface
        ));
    }
    if let (Some(n), Some(c)) = (accounting.arrived, count_at) {
        if short(n) {
            accounting
                .warnings
                .push(format!("only {n} of {sent} frames arrived at {c}",));
        }
    }
    Ok(accounting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(src: &str, dst: &str, protocol: Protocol, size: usize) -> LoadSpec {
        LoadSpec {
            interface: "lo".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            dport: 53,
            protocol,
            flows: 1,
            size,
            count: 1,
            duration: Duration::from_secs(1),
            rate: None,
            batch: 64,
        }
    }

    #[test]
    fn templates_are_well_formed() {
        let f = template(&spec("198.18.0.1", "198.18.0.10", Protocol::Udp, 64)).unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(checksum(&f[14..34]), 0, "valid IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50, "IPv4 total length");
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 30, "UDP length");
        let f = template(&spec("2001:db8::1", "2001:db8::10", Protocol::Tcp, 100)).unwrap();
        assert_eq!(f.len(), 100);
        assert_eq!(
            u16::from_be_bytes([f[18], f[19]]),
            100 - 54,
            "IPv6 payload length"
        );
        assert_eq!(f[20], 6);
        assert_eq!(f[54 + 13], 0x02, "SYN");
    }

    #[test]
    fn count_at_names_a_socket_or_an_interface() {
        assert_eq!(
            "socket:/run/xdplb/admin.sock".parse(),
            Ok(CountAt::Socket("/run/xdplb/admin.sock".into()))
        );
        assert_eq!("rx:eth0".parse(), Ok(CountAt::Rx("eth0".into())));
        for bad in ["eth0", "rx:", "rx:a/b", "socket:", "tx:eth0"] {
            let e = bad.parse::<CountAt>().unwrap_err();
            assert!(e.contains("expected socket:PATH"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(template(&spec("198.18.0.1", "2001:db8::10", Protocol::Udp, 64)).is_err());
        assert!(template(&spec("198.18.0.1", "198.18.0.10", Protocol::Udp, 20)).is_err());
        assert!(template(&spec("198.18.0.1", "198.18.0.10", Protocol::Udp, 9000)).is_err());
    }
}
