//! The admin API (JSON over a root-only Unix socket: one request line, one
//! response line) and the read-only HTTP listener (`/metrics` in Prometheus
//! text format, `/healthz`). Both only talk to the controller's task through
//! a channel; neither holds state.

use std::{fmt::Write as _, net::IpAddr, path::Path, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::{debug, warn};
use xdp_common::reason;

use crate::{
    config::{BackendConfig, Change, Vip},
    controller::Controller,
    health::Health,
};

/// Longest request line the admin socket accepts.
const MAX_REQUEST: usize = 1 << 20;

/// An admin API request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Stats {},
    Reload {},
    VipList {},
    VipAdd {
        vip: Vip,
    },
    VipDel {
        name: String,
    },
    BackendAdd {
        vip: String,
        backend: BackendConfig,
    },
    BackendDel {
        vip: String,
        address: IpAddr,
    },
    BackendDrain {
        vip: String,
        address: IpAddr,
    },
    BackendUndrain {
        vip: String,
        address: IpAddr,
    },
    BackendWeight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(data: Option<serde_json::Value>) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            data: None,
        }
    }
}

/// What the listeners ask the controller's task.
pub enum Query {
    Api(Box<Request>, oneshot::Sender<Response>),
    Metrics(oneshot::Sender<String>),
    Healthz(oneshot::Sender<(bool, String)>),
}

impl Request {
    /// The change a mutating request asks for; None for queries and reload.
    pub fn change(&self) -> Option<Change> {
        Some(match self.clone() {
            Self::VipAdd { vip } => Change::VipAdd(vip),
            Self::VipDel { name } => Change::VipDel(name),
            Self::BackendAdd { vip, backend } => Change::BackendAdd(vip, backend),
            Self::BackendDel { vip, address } => Change::BackendDel(vip, address),
            Self::BackendDrain { vip, address } => Change::BackendDrain(vip, address, true),
            Self::BackendUndrain { vip, address } => Change::BackendDrain(vip, address, false),
            Self::BackendWeight {
                vip,
                address,
                weight,
            } => Change::BackendWeight(vip, address, weight),
            Self::Status {} | Self::Stats {} | Self::Reload {} | Self::VipList {} => return None,
        })
    }
}

/// Answer one request. Changes are planned whole against the tables,
/// written back to the config file, then applied; a refused change leaves
/// everything as it was.
pub fn handle(ctl: &mut Controller, request: Request) -> Response {
    let result: Result<Option<serde_json::Value>> = (|| match &request {
        Request::Status {} => Ok(Some(serde_json::to_value(ctl.status())?)),
        Request::Stats {} => Ok(Some(serde_json::to_value(stats(ctl)?)?)),
        Request::VipList {} => Ok(Some(serde_json::to_value(&ctl.config().vips)?)),
        Request::Reload {} => ctl.reload().map(|()| None),
        other => {
            let change = other.change().ok_or_else(|| anyhow!("not a change"))?;
            ctl.change(&change).map(|()| None)
        }
    })();
    match result {
        Ok(data) => Response::ok(data),
        Err(e) => Response::error(format!("{e:#}")),
    }
}

/// Raw cumulative counters; `xdplb stats --watch` turns them into rates.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub reasons: std::collections::BTreeMap<String, u64>,
    pub vips: Vec<(String, crate::controller::Traffic)>,
    pub backends: Vec<(String, IpAddr, crate::controller::Traffic)>,
}

fn stats(ctl: &mut Controller) -> Result<Stats> {
    let status = ctl.status();
    Ok(Stats {
        reasons: status.reasons,
        vips: status
            .vips
            .iter()
            .map(|v| (v.name.clone(), v.counters))
            .collect(),
        backends: status
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(|b| (v.name.clone(), b.address, b.counters))
            })
            .collect(),
    })
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of everything the controller knows.
pub fn metrics(ctl: &mut Controller) -> String {
    let status = ctl.status();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let mut o = String::new();
    let _ = writeln!(o, "# HELP xdplb_packets_total Packets by what the balancer did with them.\n# TYPE xdplb_packets_total counter");
    for name in reason::NAMES.iter().take(reason::ACTION_COUNT as usize) {
        let _ = writeln!(
            o,
            "xdplb_packets_total{{reason=\"{name}\"}} {}",
            status.reasons.get(*name).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(o, "# HELP xdplb_events_total Conntrack and parsing events.\n# TYPE xdplb_events_total counter");
    for name in reason::NAMES.iter().skip(reason::ACTION_COUNT as usize) {
        let _ = writeln!(
            o,
            "xdplb_events_total{{event=\"{name}\"}} {}",
            status.reasons.get(*name).copied().unwrap_or(0)
        );
    }
    for (metric, help) in [
        ("xdplb_vip_packets_total", "Packets forwarded per VIP."),
        ("xdplb_vip_bytes_total", "Bytes forwarded per VIP."),
        ("xdplb_vip_new_flows_total", "Flows assigned per VIP."),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for v in &status.vips {
            let value = match metric {
                "xdplb_vip_packets_total" => v.counters.packets,
                "xdplb_vip_bytes_total" => v.counters.bytes,
                _ => v.counters.new_flows,
            };
            let _ = writeln!(
                o,
                "{metric}{{vip=\"{}\",endpoint=\"{}\"}} {value}",
                escape(&v.name),
                escape(&v.endpoint)
            );
        }
    }
    for (metric, help) in [
        (
            "xdplb_backend_packets_total",
            "Packets forwarded per backend.",
        ),
        ("xdplb_backend_bytes_total", "Bytes forwarded per backend."),
        (
            "xdplb_backend_new_flows_total",
            "Flows assigned per backend.",
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for v in &status.vips {
            for b in &v.backends {
                let value = match metric {
                    "xdplb_backend_packets_total" => b.counters.packets,
                    "xdplb_backend_bytes_total" => b.counters.bytes,
                    _ => b.counters.new_flows,
                };
                let _ = writeln!(
                    o,
                    "{metric}{{vip=\"{}\",backend=\"{}\"}} {value}",
                    escape(&v.name),
                    b.address
                );
            }
        }
    }
    let _ = writeln!(o, "# HELP xdplb_backend_up Whether the backend passes its health checks (1) or not (0).\n# TYPE xdplb_backend_up gauge");
    let _ = writeln!(o, "# HELP xdplb_backend_state Dataplane state of the backend (1 for the current state).\n# TYPE xdplb_backend_state gauge");
    for v in &status.vips {
        for b in &v.backends {
            let up = u8::from(b.health != Some(Health::Down));
            let _ = writeln!(
                o,
                "xdplb_backend_up{{vip=\"{}\",backend=\"{}\"}} {up}",
                escape(&v.name),
                b.address
            );
            let _ = writeln!(
                o,
                "xdplb_backend_state{{vip=\"{}\",backend=\"{}\",state=\"{}\"}} 1",
                escape(&v.name),
                b.address,
                b.dataplane_state
            );
        }
    }
    let _ = writeln!(o, "# HELP xdplb_health_check_latency_seconds Latency of the last passing check.\n# TYPE xdplb_health_check_latency_seconds gauge");
    let _ = writeln!(o, "# HELP xdplb_health_checks_total Health checks run, by result.\n# TYPE xdplb_health_checks_total counter");
    let _ = writeln!(o, "# HELP xdplb_health_transitions_total Health state changes.\n# TYPE xdplb_health_transitions_total counter");
    for (key, h) in ctl.health() {
        let labels = format!("vip=\"{}\",backend=\"{}\"", escape(&key.vip), key.backend);
        if let Some(l) = h.last_latency {
            let _ = writeln!(
                o,
                "xdplb_health_check_latency_seconds{{{labels}}} {}",
                l.as_secs_f64()
            );
        }
        let _ = writeln!(
            o,
            "xdplb_health_checks_total{{{labels},result=\"ok\"}} {}",
            h.checks_ok
        );
        let _ = writeln!(
            o,
            "xdplb_health_checks_total{{{labels},result=\"failed\"}} {}",
            h.checks_failed
        );
        let _ = writeln!(
            o,
            "xdplb_health_transitions_total{{{labels}}} {}",
            h.transitions
        );
    }
    let _ = writeln!(o, "# HELP xdplb_flows Conntrack entries in use (refreshed at most every 2 s).\n# TYPE xdplb_flows gauge\nxdplb_flows {}", status.flows);
    let _ = writeln!(o, "# HELP xdplb_flows_max Conntrack capacity.\n# TYPE xdplb_flows_max gauge\nxdplb_flows_max {}", status.max_flows);
    let _ = writeln!(o, "# HELP xdplb_dataplane_in_sync Whether the last reconcile succeeded.\n# TYPE xdplb_dataplane_in_sync gauge\nxdplb_dataplane_in_sync {}", u8::from(status.in_sync));
    let _ = writeln!(o, "# HELP xdplb_dataplane_attached Whether the self-check passes: the program is attached through the daemon's pinned link and the pins are its maps.\n# TYPE xdplb_dataplane_attached gauge\nxdplb_dataplane_attached {}", u8::from(status.attached));
    let (losses, repairs) = ctl.self_check_counts();
    let _ = writeln!(o, "# HELP xdplb_dataplane_losses_total Times the self-check found the dataplane not as the daemon left it.\n# TYPE xdplb_dataplane_losses_total counter\nxdplb_dataplane_losses_total {losses}");
    let _ = writeln!(o, "# HELP xdplb_dataplane_repairs_total Re-attachments and re-pinnings the daemon carried out.\n# TYPE xdplb_dataplane_repairs_total counter\nxdplb_dataplane_repairs_total {repairs}");
    let _ = writeln!(o, "# HELP xdplb_driver_xdp_errors_total XDP frames the NIC driver failed to transmit or redirect (ethtool statistics).\n# TYPE xdplb_driver_xdp_errors_total counter");
    for (name, v) in &status.driver_xdp_errors {
        let _ = writeln!(
            o,
            "xdplb_driver_xdp_errors_total{{counter=\"{}\"}} {v}",
            escape(name)
        );
    }
    let _ = writeln!(o, "# HELP xdplb_reconcile_failures_total Failed reconciles (each is retried).\n# TYPE xdplb_reconcile_failures_total counter\nxdplb_reconcile_failures_total {}", ctl.reconcile_failures);
    if let Ok((run_time, run_count)) = ctl.dataplane().program_stats() {
        let _ = writeln!(o, "# HELP xdplb_program_run_seconds_total Time spent in the XDP program (needs sysctl kernel.bpf_stats_enabled=1).\n# TYPE xdplb_program_run_seconds_total counter\nxdplb_program_run_seconds_total {}", run_time.as_secs_f64());
        let _ = writeln!(o, "# HELP xdplb_program_runs_total Runs of the XDP program (needs sysctl kernel.bpf_stats_enabled=1).\n# TYPE xdplb_program_runs_total counter\nxdplb_program_runs_total {run_count}");
    }
    o
}

/// `/healthz`: the self-check passes (program attached through the
/// daemon's pinned link, pins are its maps) and the last reconcile
/// succeeded.
pub fn healthz(ctl: &Controller) -> (bool, String) {
    let problems = ctl.self_check_problems();
    if !problems.is_empty() {
        return (
            false,
            format!(
                "dataplane not attached as configured: {}\n",
                problems.join("; ")
            ),
        );
    }
    match &ctl.last_error {
        None => (true, "ok: dataplane attached, maps in sync\n".into()),
        Some(e) => (false, format!("out of sync: {e}\n")),
    }
}

/// Serve admin connections: each sends one JSON request line.
pub async fn serve_admin(listener: UnixListener, queries: mpsc::Sender<Query>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let queries = queries.clone();
        tokio::spawn(async move {
            if let Err(e) = admin_connection(stream, queries).await {
                debug!(error = %format!("{e:#}"), "admin connection");
            }
        });
    }
}

async fn admin_connection(stream: UnixStream, queries: mpsc::Sender<Query>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let n = timeout(
        Duration::from_secs(10),
        BufReader::new(read.take(MAX_REQUEST as u64)).read_line(&mut line),
    )
    .await
    .context("request timed out")??;
    let response = if n == 0 {
        Response::error("empty request")
    } else if !line.ends_with('\n') && n >= MAX_REQUEST {
        Response::error(format!("request longer than {MAX_REQUEST} bytes"))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                queries
                    .send(Query::Api(Box::new(request), tx))
                    .await
                    .map_err(|_| anyhow!("daemon shutting down"))?;
                rx.await
                    .unwrap_or_else(|_| Response::error("daemon shutting down"))
            }
        }
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Serve `/metrics` and `/healthz` over plain HTTP/1.0.
pub async fn serve_http(listener: TcpListener, queries: mpsc::Sender<Query>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let queries = queries.clone();
        tokio::spawn(async move {
            if let Err(e) = http_connection(stream, queries).await {
                debug!(error = %format!("{e:#}"), "metrics connection");
            }
        });
    }
}

async fn http_connection(
    mut stream: tokio::net::TcpStream,
    queries: mpsc::Sender<Query>,
) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    timeout(Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .context("request timed out")??;
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let (tx, rx) = oneshot::channel();
            queries
                .send(Query::Metrics(tx))
                .await
                .map_err(|_| anyhow!("shutting down"))?;
            (
                "200 OK",
                "text/plain; version=0.0.4",
                rx.await.unwrap_or_default(),
            )
        }
        ("GET", "/healthz") => {
            let (tx, rx) = oneshot::channel();
            queries
                .send(Query::Healthz(tx))
                .await
                .map_err(|_| anyhow!("shutting down"))?;
            let (ok, text) = rx.await.unwrap_or((false, "shutting down\n".into()));
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "text/plain",
                text,
            )
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if status.starts_with('5') {
        warn!("healthz reported unhealthy");
    }
    Ok(())
}

/// Client side: send one request to the daemon at `socket`.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the xdplb daemon at {} (is `xdplb run` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad response from the daemon: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, InitialState};

    fn mutate(c: &Config, r: &Request) -> Result<Config> {
        r.change()
            .ok_or_else(|| anyhow!("not a change"))?
            .apply_to(c)
    }

    fn base() -> Config {
        Config::parse(
            r#"
interface = "eth0"
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
[[vip.backend]]
address = "198.18.1.1"
"#,
        )
        .unwrap()
    }

    #[test]
    fn mutations() {
        let c = base();
        let addr: IpAddr = "198.18.1.1".parse().unwrap();
        let d = mutate(
            &c,
            &Request::BackendDrain {
                vip: "web".into(),
                address: addr,
            },
        )
        .unwrap();
        assert_eq!(d.vips[0].backends[0].state, InitialState::Drain);
        let u = mutate(
            &d,
            &Request::BackendUndrain {
                vip: "web".into(),
                address: addr,
            },
        )
        .unwrap();
        assert_eq!(u.vips[0].backends[0].state, InitialState::Up);
        let w = mutate(
            &c,
            &Request::BackendWeight {
                vip: "web".into(),
                address: addr,
                weight: 7,
            },
        )
        .unwrap();
        assert_eq!(w.vips[0].backends[0].weight, 7);
        let a = mutate(
            &c,
            &Request::BackendAdd {
                vip: "web".into(),
                backend: BackendConfig {
                    address: "198.18.1.2".parse().unwrap(),
                    weight: 1,
                    mac: None,
                    state: InitialState::Up,
                },
            },
        )
        .unwrap();
        assert_eq!(a.vips[0].backends.len(), 2);
        let r = mutate(
            &a,
            &Request::BackendDel {
                vip: "web".into(),
                address: addr,
            },
        )
        .unwrap();
        assert_eq!(r.vips[0].backends.len(), 1);
        let v = mutate(&c, &Request::VipDel { name: "web".into() }).unwrap();
        assert!(v.vips.is_empty());
    }

    #[test]
    fn bad_mutations_name_the_problem() {
        let c = base();
        let addr: IpAddr = "198.18.1.9".parse().unwrap();
        for (req, msg) in [
            (
                Request::VipDel {
                    name: "nope".into(),
                },
                "no VIP named \"nope\"",
            ),
            (
                Request::BackendDrain {
                    vip: "web".into(),
                    address: addr,
                },
                "has no backend 198.18.1.9",
            ),
            (
                Request::BackendWeight {
                    vip: "web".into(),
                    address: "198.18.1.1".parse().unwrap(),
                    weight: 70000,
                },
                "out of range",
            ),
            (
                Request::VipAdd {
                    vip: c.vips[0].clone(),
                },
                "already exists",
            ),
            (
                Request::BackendAdd {
                    vip: "web".into(),
                    backend: BackendConfig {
                        address: "198.18.1.1".parse().unwrap(),
                        weight: 1,
                        mac: None,
                        state: InitialState::Up,
                    },
                },
                "already has backend",
            ),
        ] {
            let e = mutate(&c, &req).unwrap_err().to_string();
            assert!(e.contains(msg), "{req:?}: {e}");
        }
    }

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"vip_del"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"vip_del","name":"x","extra":1}"#).is_err()
        );
        for unknown in [
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"reload","force":true}"#,
            r#"{"cmd":"backend_add","vip":"web","backend":{"address":"198.18.1.1","color":"red"}}"#,
        ] {
            let e = serde_json::from_str::<Request>(unknown).expect_err(unknown);
            assert!(e.to_string().contains("unknown field"), "{unknown}: {e}");
        }
    }
}
