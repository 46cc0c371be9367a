//! One health check of one backend.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::{timeout, Instant},
};

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
        }
    }
}

/// Run one check: Ok(latency) or Err(reason).
pub async fn run_check(spec: &CheckSpec) -> Result<Duration, String> {
    let started = Instant::now();
    let result = match timeout(spec.timeout, attempt(spec)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", spec.timeout)),
    };
    result.map(|()| started.elapsed())
}

async fn attempt(spec: &CheckSpec) -> Result<(), String> {
    match spec.kind {
        CheckKind::Tcp => TcpStream::connect(spec.target)
            .await
            .map(drop)
            .map_err(|e| format!("connect: {e}")),
        CheckKind::Http => http(spec).await,
        CheckKind::Udp => udp(spec).await,
        CheckKind::None => Ok(()),
    }
}

async fn http(spec: &CheckSpec) -> Result<(), String> {
    let mut stream = TcpStream::connect(spec.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n",
        spec.path, spec.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending request: {e}"))?;
    // The status line fits in the first read of any sane server; read until
    // it is complete or the server closes.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading response: {e}"))?;
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
        Err(format!(
            "HTTP status {status}, expected {}",
            spec.expect_status
        ))
    }
}

async fn udp(spec: &CheckSpec) -> Result<(), String> {
    let bind: SocketAddr = if spec.target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("bind: {e}"))?;
    socket
        .connect(spec.target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    socket
        .send(&spec.send)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let n = socket
        .recv(&mut buf)
        .await
        .map_err(|e| format!("no reply: {e}"))?;
    if buf[..n].starts_with(&spec.expect) {
        Ok(())
    } else {
        Err(format!(
            "reply {:?} does not start with {:?}",
            String::from_utf8_lossy(&buf[..n.min(64)]),
            String::from_utf8_lossy(&spec.expect)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(err.contains("connect"), "{err}");
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
        assert!(err.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts (kernel backlog) but never answers.
        let err = run_check(&spec(CheckKind::Http, addr)).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
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
        assert!(err.contains("does not start with"), "{err}");
        let err = run_check(&spec(CheckKind::Udp, addr)).await.unwrap_err();
        assert!(
            err.contains("timed out") || err.contains("no reply"),
            "{err}"
        );
    }
}
