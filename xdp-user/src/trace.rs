//! `xdplb trace`: "why doesn't it forward?" Turns on the balancer's
//! decision events for the packets asked for (a VIP, a client prefix),
//! prints one line per packet (VIP, flow, verdict and its reason, how
//! the flow was placed, the backend) until stopped or `--count` lines, and turns
//! the events off again on the way out, Ctrl-C and SIGTERM included. Off,
//! the dataplane pays one map lookup per packet.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{anyhow, bail, Context as _, Result};
use xdp_common::{reason, TraceFilter, NO_BACKEND, TRACE_ANY_VIP};

use crate::{
    config::{parse_prefix, Config},
    controller::{ip_of, vip_key},
    dataplane::trace::{logger, Pinned},
};

/// What to trace.
pub struct Request<'a> {
    pub config: &'a Path,
    pub vip: Option<&'a str>,
    pub client: Option<&'a str>,
    pub count: Option<u64>,
}

/// Set by SIGINT and SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// A client prefix: an address, or address/length.
fn client_filter(text: &str) -> Result<([u8; 16], u32, u32)> {
    let (addr, len) = if text.contains('/') {
        parse_prefix(text)
            .ok_or_else(|| anyhow!("--client {text:?} is not an address or prefix"))?
    } else {
        let a: IpAddr = text
            .parse()
            .map_err(|_| anyhow!("--client {text:?} is not an address or prefix"))?;
        (a, if a.is_ipv4() { 32 } else { 128 })
    };
    let (bytes, family) = crate::dataplane::addr_bytes(addr);
    Ok((bytes, u32::from(family), u32::from(len)))
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Names for the codes of an event.
struct Names {
    vips: BTreeMap<u32, String>,
    backends: BTreeMap<u32, IpAddr>,
}

/// Prints each event of its session as one line and counts them, up to
/// `limit`.
struct Printer {
    names: Names,
    /// The filter's [`TraceFilter::session`]: events tagged otherwise were
    /// left in the ring by an earlier trace and are not printed.
    session: u32,
    printed: Arc<AtomicU64>,
    limit: Option<u64>,
}

/// The value of `key=` in an event; "?" when it has none.
fn field<'a>(message: &'a str, key: &str) -> &'a str {
    message
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("?")
}

/// A tag no recent trace used: the process id and the clock.
fn new_session() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (std::process::id().rotate_left(16) ^ nanos).max(1)
}

impl Printer {
    /// Whether `message` belongs to this trace. An event without a tag
    /// comes from a program older than tags, which only this trace turned on.
    fn ours(&self, message: &str) -> bool {
        field(message, "session")
            .parse::<u32>()
            .map_or(true, |s| s == self.session)
    }

    fn line(&self, message: &str) -> String {
        let field = |key: &str| field(message, key);
        let number = |key: &str| field(key).parse::<u32>().ok();
        let vip = match number("vip") {
            Some(TRACE_ANY_VIP) => "(no VIP)".to_owned(),
            Some(id) => self
                .names
                .vips
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("VIP #{id}")),
            None => "?".to_owned(),
        };
        // Addresses come in their 16-byte form (printed as IPv6); an IPv4
        // one is in the first 4 bytes.
        let v4 = number("family") == Some(u32::from(xdp_common::FAMILY_V4));
        let endpoint = |addr: &str, port: &str| match addr.parse::<std::net::Ipv6Addr>() {
            Ok(a) if v4 => {
                let o = a.octets();
                format!("{}:{port}", std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]))
            }
            Ok(a) => format!("[{a}]:{port}"),
            Err(_) => format!("{addr}:{port}"),
        };
        let proto = match number("proto") {
            Some(6) => "tcp".to_owned(),
            Some(17) => "udp".to_owned(),
            other => format!("proto {other:?}"),
        };
        let verdict = match number("action") {
            Some(xdp_common::XDP_TX) => "TX",
            Some(xdp_common::XDP_PASS) => "PASS",
            Some(xdp_common::XDP_DROP) => "DROP",
            _ => "?",
        };
        let name = |code: Option<u32>| {
            code.and_then(|c| reason::NAMES.get(c as usize).copied())
                .unwrap_or("-")
        };
        let mut out = format!(
            "{vip} {} > {} {proto}: {verdict} {}",
            endpoint(field("src"), field("sport")),
            endpoint(field("dst"), field("dport")),
            name(number("reason")),
        );
        if let Some(c) = number("conntrack").filter(|&c| c != 0) {
            out.push_str(&format!(", placed {}", name(Some(c))));
        }
        match number("backend") {
            Some(NO_BACKEND) | None => {}
            Some(id) => match self.names.backends.get(&id) {
                Some(addr) => out.push_str(&format!(", backend {addr} (#{id})")),
                None => out.push_str(&format!(", backend #{id}")),
            },
        }
        out
    }
}

impl log::Log for Printer {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // One read of the ring can hold more events than are still wanted.
        if self
            .limit
            .is_some_and(|n| self.printed.load(Ordering::Relaxed) >= n)
        {
            return;
        }
        let message = record.args().to_string();
        if !self.ours(&message) {
            return;
        }
        let line = self.line(&message);
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`| head`): stop as on a signal.
            STOP.store(true, Ordering::Relaxed);
        }
        self.printed.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self) {}
}

/// Trace until stopped or `count` events were printed.
pub fn run(req: &Request<'_>) -> Result<()> {
    let config = Config::load(req.config)?;
    let pinned = Pinned::new(&config.daemon.pin_dir);
    let program = pinned.program_id()?;
    let in_dataplane: BTreeMap<_, _> = pinned.vips()?.into_iter().collect();
    let mut names = Names {
        vips: BTreeMap::new(),
        backends: pinned
            .backends()?
            .into_iter()
            .map(|(id, b)| (id, ip_of(b.addr, b.family)))
            .collect(),
    };
    for vip in &config.vips {
        if let Some(&id) = in_dataplane.get(&vip_key(vip)) {
            names.vips.insert(id, vip.name.clone());
        }
    }
    let mut filter = TraceFilter {
        enabled: 1,
        vip_id: TRACE_ANY_VIP,
        owner_pid: std::process::id(),
        session: new_session(),
        ..TraceFilter::default()
    };
    if let Some(name) = req.vip {
        let vip = config
            .vips
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| anyhow!("no VIP named {name:?} in {}", req.config.display()))?;
        filter.vip_id = *in_dataplane.get(&vip_key(vip)).ok_or_else(|| {
            anyhow!("VIP {name:?} is not in the dataplane (has the daemon applied this config?)")
        })?;
    }
    if let Some(text) = req.client {
        (filter.client, filter.client_family, filter.client_len) = client_filter(text)?;
    }
    let current = pinned.trace_filter()?;
    if current.enabled != 0 && alive(current.owner_pid) && current.owner_pid != filter.owner_pid {
        bail!(
            "another `xdplb trace` (pid {}) is tracing this dataplane; stop it first",
            current.owner_pid
        );
    }
    let printed = Arc::new(AtomicU64::new(0));
    let mut events = logger(
        program,
        Printer {
            names,
            session: filter.session,
            printed: printed.clone(),
            limit: req.count,
        },
    )?;
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    pinned.set_trace_filter(&filter)?;
    eprintln!(
        "tracing {} (program {program}); Ctrl-C stops",
        match (req.vip, req.client) {
            (Some(v), Some(c)) => format!("VIP {v} from {c}"),
            (Some(v), None) => format!("VIP {v}"),
            (None, Some(c)) => format!("packets from {c}"),
            (None, None) => "every TCP and UDP packet".to_owned(),
        }
    );
    let result = follow(&mut events, &printed, req.count);
    // Off again whatever happened; a trace left on would cost every packet.
    let off = pinned
        .set_trace_filter(&TraceFilter::default())
        .context("turning tracing off");
    result.and(off)
}

fn follow(
    events: &mut aya_log::EbpfLogger<Printer>,
    printed: &AtomicU64,
    count: Option<u64>,
) -> Result<()> {
    let done = || {
        STOP.load(Ordering::Relaxed) || count.is_some_and(|n| printed.load(Ordering::Relaxed) >= n)
    };
    while !done() {
        let mut fd = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a signal interrupts the wait.
        let ready = unsafe { libc::poll(&mut fd, 1, 200) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("waiting for trace events");
            }
        }
        events.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_operators_speak() {
        let p = Printer {
            names: Names {
                vips: [(0, "web".to_owned())].into(),
                backends: [(3, "198.18.64.2".parse().unwrap())].into(),
            },
            session: 7,
            printed: Arc::default(),
            limit: None,
        };
        assert_eq!(
            p.line("vip=0 family=4 src=c612:a02:: sport=40000 dst=c612:a:: dport=80 proto=6 action=3 reason=5 conntrack=9 backend=3"),
            "web 198.18.10.2:40000 > 198.18.0.10:80 tcp: TX tx_encap, placed flow_new, backend 198.18.64.2 (#3)"
        );
        assert_eq!(
            p.line(&format!("vip={TRACE_ANY_VIP} family=6 src=2001:db8::1 sport=5 dst=2001:db8::9 dport=53 proto=17 action=2 reason=0 conntrack=0 backend={NO_BACKEND}")),
            "(no VIP) [2001:db8::1]:5 > [2001:db8::9]:53 udp: PASS pass_not_vip"
        );
    }

    #[test]
    fn no_more_lines_than_asked_for_whatever_one_read_brings() {
        use log::Log as _;
        let p = Printer {
            names: Names {
                vips: BTreeMap::new(),
                backends: BTreeMap::new(),
            },
            session: 7,
            printed: Arc::default(),
            limit: Some(2),
        };
        let log = |message: &str| {
            p.log(
                &log::Record::builder()
                    .args(format_args!("{message}"))
                    .build(),
            )
        };
        // Left in the ring by an earlier trace: not this one's.
        log("session=6 vip=0 family=4 proto=6");
        assert_eq!(p.printed.load(Ordering::Relaxed), 0);
        for _ in 0..5 {
            log("session=7 vip=0 family=4 proto=6");
        }
        assert_eq!(p.printed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn client_prefixes_are_checked() {
        assert_eq!(client_filter("198.18.0.0/16").unwrap().2, 16);
        assert_eq!(client_filter("2001:db8::1").unwrap().2, 128);
        assert!(client_filter("198.18.0.0/33").is_err());
        assert!(client_filter("nonsense").is_err());
    }
}
