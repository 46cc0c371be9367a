//! One health check of one backend.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::{timeout, Instant},
};

use super::tunnel::Tunnel;
use crate::config::{CheckKind, HealthCheck};

/// What to check, resolved from the config for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub target: SocketAddr,
    pub timeout: Duration,
    pub interval: Duration,
    pub jitter: Duration,
    pub path: String,
    pub host: String,
    pub expect_status: u16,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
    /// TCP: a half-open SYN probe where the prober can send one.
    pub half_open: bool,
    /// Through the tunnel: to the VIP, wrapped as the dataplane wraps the
    /// VIP's packets to this backend (TCP and UDP checks).
    pub tunnel: Option<super::tunnel::Tunnel>,
}

impl CheckSpec {
    pub fn new(h: &HealthCheck, target: SocketAddr) -> Self {
        Self {
            kind: h.kind,
            target,
            timeout: Duration::from_millis(h.timeout_ms),
            interval: Duration::from_millis(h.interval_ms),
            jitter: Duration::from_millis(h.jitter_ms),
            path: h.path.clone(),
            host: h.host.clone().unwrap_or_else(|| target.ip().to_string()),
            expect_status: h.expect_status,
            send: h.send.clone().unwrap_or_default().into_bytes(),
            expect: h.expect.clone().unwrap_or_default().into_bytes(),
            half_open: h.half_open,
            tunnel: None,
        }
    }
}

/// Why a check did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckError {
    pub reason: String,
    /// Set when the check could not run for a reason of this host's (out
    /// of descriptors or buffers, no route): never the backend's fault.
    pub local: Option<&'static str>,
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl From<String> for CheckError {
    fn from(reason: String) -> Self {
        Self {
            reason,
            local: None,
        }
    }
}

impl From<&str> for CheckError {
    fn from(reason: &str) -> Self {
        reason.to_owned().into()
    }
}

/// Every kind of local error, as `local_kind` names them.
pub const LOCAL_ERROR_KINDS: [&str; 7] = [
    "emfile",
    "enfile",
    "enobufs",
    "enomem",
    "no_route",
    "eaddrnotavail",
    "eperm",
];

/// The kind of a local error, if `e` is one: this host refused to make the
/// check without sending anything, whatever the backend's health. An
/// unreachable network or host may be either: see [`io_error_to`].
pub fn local_kind(e: &std::io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::EMFILE => Some("emfile"),
        libc::ENFILE => Some("enfile"),
        libc::ENOBUFS => Some("enobufs"),
        libc::ENOMEM => Some("enomem"),
        libc::ENETUNREACH => Some("no_route"),
        libc::EADDRNOTAVAIL => Some("eaddrnotavail"),
        // A local firewall rule (an OUTPUT drop answers EPERM).
        libc::EPERM => Some("eperm"),
        _ => None,
    }
}

/// Whether this host's own routing refuses `target`: a UDP socket's
/// connect looks the route up and sends nothing.
fn no_local_route(target: std::net::SocketAddr) -> bool {
    let any: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(any).is_ok_and(|s| s.connect(target).is_err())
}

/// An I/O error of step `what` towards `target`, classified. "Network" or
/// "host unreachable" is local only when this host has no route to the
/// backend; with a route, it is an answer from the path (a router's ICMP
/// unreachable) and fails the check, as any answer from elsewhere does.
fn io_error_to(what: &str, e: std::io::Error, target: std::net::SocketAddr) -> CheckError {
    let unreachable = matches!(
        e.raw_os_error(),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
    );
    if !unreachable {
        return io_error(what, e);
    }
    if no_local_route(target) {
        CheckError {
            reason: format!("{what}: {e} (no route from this host)"),
            local: Some("no_route"),
        }
    } else {
        CheckError {
            reason: format!("{what}: {e} (answered by the path: this host has a route)"),
            local: None,
        }
    }
}

/// An I/O error of step `what`, classified.
fn io_error(what: &str, e: std::io::Error) -> CheckError {
    CheckError {
        reason: format!("{what}: {e}"),
        local: local_kind(&e),
    }
}

/// Run one check: Ok(latency) or why not.
pub async fn run_check(spec: &CheckSpec) -> Result<Duration, CheckError> {
    run_check_with(spec, None).await
}

/// How long a route's source address is trusted before it is looked up
/// again (also after any failed probe, so a route change costs at most one
/// failed check).
const SOURCE_TTL: Duration = Duration::from_secs(300);

/// One backend's half-open probing: the shared prober and the source
/// address towards this backend.
pub struct HalfOpen {
    pub prober: std::sync::Arc<super::probe::Prober>,
    source: Option<(std::net::IpAddr, Instant)>,
}

impl HalfOpen {
    pub fn new(prober: std::sync::Arc<super::probe::Prober>) -> Self {
        Self {
            prober,
            source: None,
        }
    }

    /// This host's address towards `target`, and since when it is known.
    /// Taken out while the probe runs: a probe that fails or times out
    /// (and is dropped) leaves it to be looked up again.
    fn take_source(
        &mut self,
        target: std::net::SocketAddr,
    ) -> Result<(std::net::IpAddr, Instant), CheckError> {
        match self.source.take() {
            Some((s, at)) if at.elapsed() < SOURCE_TTL => Ok((s, at)),
            _ => Ok((
                super::probe::source_for(target).map_err(|e| io_error("route", e))?,
                Instant::now(),
            )),
        }
    }

    async fn check(
        &mut self,
        target: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<(), CheckError> {
        let (source, at) = self.take_source(target)?;
        let result = self.prober.probe(source, target, timeout).await;
        if result.is_ok() {
            self.source = Some((source, at));
        }
        result
    }

    /// A check through the tunnel `t`, from this host's address towards the
    /// VIP: a SYN probe (TCP) or the UDP request.
    async fn through(&mut self, spec: &CheckSpec, t: &Tunnel) -> Result<(), CheckError> {
        let (source, at) = self.take_source(t.vip)?;
        let result = if spec.kind == CheckKind::Udp {
            match timeout(spec.timeout, udp_through(spec, t, source, &self.prober)).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {:?}", spec.timeout).into()),
            }
        } else {
            self.prober.probe_tunnel(source, t, spec.timeout).await
        };
        if result.is_ok() {
            self.source = Some((source, at));
        }
        result
    }
}

/// A UDP check through the tunnel: the request from a socket of ours to
/// the VIP, wrapped and sent as a frame; the reply comes from the VIP.
async fn udp_through(
    spec: &CheckSpec,
    t: &Tunnel,
    source: std::net::IpAddr,
    prober: &super::probe::Prober,
) -> Result<(), CheckError> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0))
        .await
        .map_err(|e| io_error("bind", e))?;
    let local = socket.local_addr().map_err(|e| io_error("bind", e))?;
    let inner = super::tunnel::udp_packet(local, t.vip, &spec.send);
    prober
        .send_frame(t.ifindex, &t.frame(source, &inner))
        .map_err(|e| io_error("send", e))?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket
            .recv_from(&mut buf)
            .await
            .map_err(|e| io_error("no reply", e))?;
        if from == t.vip {
            return expect_reply(spec, &buf[..n]);
        }
    }
}

/// Run one check, a TCP one as a half-open probe where `half_open` can.
pub async fn run_check_with(
    spec: &CheckSpec,
    half_open: Option<&mut HalfOpen>,
) -> Result<Duration, CheckError> {
    let started = Instant::now();
    if let Some(t) = &spec.tunnel {
        let Some(h) = half_open else {
            return Err(CheckError {
                reason: "checks through the tunnel need CAP_NET_RAW (a raw and a packet socket)"
                    .into(),
                local: Some("eperm"),
            });
        };
        return h.through(spec, t).await.map(|()| started.elapsed());
    }
    let result = match half_open {
        // The prober bounds the wait itself (one sweep, not a timer each).
        Some(h)
            if spec.kind == CheckKind::Tcp && spec.half_open && h.prober.handles(spec.target) =>
        {
            h.check(spec.target, spec.timeout).await
        }
        _ => match timeout(spec.timeout, attempt(spec)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", spec.timeout).into()),
        },
    };
    result.map(|()| started.elapsed())
}

/// Connect, with the socket set to close by reset: a check connection
/// leaves no TIME_WAIT behind and costs the backend no FIN exchange (as
/// HAProxy's checks do).
async fn connect(target: std::net::SocketAddr) -> Result<TcpStream, CheckError> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| io_error_to("connect", e, target))?;
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    Ok(stream)
}

async fn attempt(spec: &CheckSpec) -> Result<(), CheckError> {
    match spec.kind {
        CheckKind::Tcp => connect(spec.target).await.map(drop),
        CheckKind::Http => http(spec).await,
        CheckKind::Udp => udp(spec).await,
        CheckKind::None => Ok(()),
    }
}

async fn http(spec: &CheckSpec) -> Result<(), CheckError> {
    let mut stream = connect(spec.target).await?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n",
        spec.path, spec.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_error_to("sending request", e, spec.target))?;
    // The status line fits in the first read of any sane server; read until
    // it is complete or the server closes.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| io_error_to("reading response", e, spec.target))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let status = line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if status == spec.expect_status {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {}", spec.expect_status).into())
    }
}

async fn udp(spec: &CheckSpec) -> Result<(), CheckError> {
    let bind: SocketAddr = if spec.target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| io_error("bind", e))?;
    socket
        .connect(spec.target)
        .await
        .map_err(|e| io_error("connect", e))?;
    socket
        .send(&spec.send)
        .await
        .map_err(|e| io_error_to("send", e, spec.target))?;
    let mut buf = [0u8; 2048];
    let n = socket
        .recv(&mut buf)
        .await
        .map_err(|e| io_error_to("no reply", e, spec.target))?;
    expect_reply(spec, &buf[..n])
}

/// Whether a UDP check's `reply` is the one expected.
fn expect_reply(spec: &CheckSpec, reply: &[u8]) -> Result<(), CheckError> {
    if reply.starts_with(&spec.expect) {
        Ok(())
    } else {
        Err(format!(
            "reply {:?} does not start with {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(64)]),
            String::from_utf8_lossy(&spec.expect)
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errors_are_told_apart_from_backend_failures() {
        for (errno, kind) in [
            (libc::EMFILE, Some("emfile")),
            (libc::ENFILE, Some("enfile")),
            (libc::ENOBUFS, Some("enobufs")),
            (libc::ENETUNREACH, Some("no_route")),
            (libc::ECONNREFUSED, None),
            (libc::EHOSTUNREACH, None),
            (libc::ETIMEDOUT, None),
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(local_kind(&e), kind, "{e}");
        }
    }

    #[test]
    fn unreachable_with_a_route_is_the_backends_failure() {
        // Loopback always has a route: "network unreachable" towards it
        // can only have come from elsewhere.
        let target: SocketAddr = "127.0.0.1:80".parse().unwrap();
        for errno in [libc::ENETUNREACH, libc::EHOSTUNREACH] {
            let e = io_error_to("connect", std::io::Error::from_raw_os_error(errno), target);
            assert_eq!(e.local, None, "{}", e.reason);
            assert!(e.reason.contains("answered by the path"), "{}", e.reason);
        }
        let e = io_error_to(
            "connect",
            std::io::Error::from_raw_os_error(libc::EMFILE),
            target,
        );
        assert_eq!(e.local, Some("emfile"));
    }
    use tokio::net::TcpListener;

    fn spec(kind: CheckKind, target: SocketAddr) -> CheckSpec {
        let h = HealthCheck {
            kind,
            timeout_ms: 300,
            path: "/health".into(),
            send: Some("ping".into()),
            expect: Some("pong".into()),
            ..HealthCheck::default()
        };
        CheckSpec::new(&h, target)
    }

    /// A port nothing listens on: bind, note the port, close.
    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    async fn http_server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if req.starts_with("GET /health HTTP/1.0\r\n") {
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")
                } else {
                    "HTTP/1.1 400 Bad Request\r\n\r\n".into()
                };
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_check() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(run_check(&spec(CheckKind::Tcp, l.local_addr().unwrap()))
            .await
            .is_ok());
        let err = run_check(&spec(CheckKind::Tcp, closed_port().await))
            .await
            .unwrap_err();
        assert!(err.reason.contains("connect"), "{err}");
    }

    #[tokio::test]
    async fn http_check_wants_the_expected_status() {
        assert!(
            run_check(&spec(CheckKind::Http, http_server("200 OK").await))
                .await
                .is_ok()
        );
        let err = run_check(&spec(CheckKind::Http, http_server("503 Unavailable").await))
            .await
            .unwrap_err();
        assert!(err.reason.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts (kernel backlog) but never answers.
        let err = run_check(&spec(CheckKind::Http, addr)).await.unwrap_err();
        assert!(err.reason.contains("timed out"), "{err}");
        drop(l);
    }

    #[tokio::test]
    async fn udp_check_wants_the_expected_reply() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut replies = ["pong!".as_bytes(), b"nope"].into_iter();
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                if &buf[..n] == b"ping" {
                    if let Some(r) = replies.next() {
                        let _ = server.send_to(r, from).await;
                    }
                }
            }
        });
        assert!(run_check(&spec(CheckKind::Udp, addr)).await.is_ok());
        let err = run_check(&spec(CheckKind::Udp, addr)).await.unwrap_err();
        assert!(err.reason.contains("does not start with"), "{err}");
        let err = run_check(&spec(CheckKind::Udp, addr)).await.unwrap_err();
        assert!(
            err.reason.contains("timed out") || err.reason.contains("no reply"),
            "{err}"
        );
    }
}
