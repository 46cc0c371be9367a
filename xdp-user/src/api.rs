//! The admin API: JSON over a root-only Unix socket, one request line, one
//! response line; connections, request size, request memory and time are
//! bounded. Like the HTTP listener (`http.rs`) it only talks to the
//! controller's task through a channel and holds no state.

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
    time::timeout,
};
use tracing::debug;

use crate::{
    config::{BackendConfig, Change, Vip},
    controller::Controller,
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
    /// The operator's withdrawal of this host's announcements (`true`), or
    /// its end.
    AnnounceWithdraw {
        withdraw: bool,
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
    /// A request, who sent it (for the change log), where the answer goes.
    Api(
        Box<Request>,
        crate::daemon::audit::Asker,
        oneshot::Sender<Response>,
    ),
    Metrics(crate::metrics::Format, oneshot::Sender<String>),
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
            Self::Status {}
            | Self::Stats {}
            | Self::Reload {}
            | Self::VipList {}
            | Self::AnnounceWithdraw { .. } => return None,
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
        Request::AnnounceWithdraw { withdraw } => ctl.set_withdrawn(*withdraw).map(|()| None),
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
    if let Some(why) = ctl.transmit_problem() {
        return (false, format!("not forwarding: {why}\n"));
    }
    match &ctl.last_error {
        None => (true, "ok: dataplane attached, maps in sync\n".into()),
        Some(e) => (false, format!("out of sync: {e}\n")),
    }
}

/// Admin connections served at once; more are told the daemon is busy.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;
/// Request bytes all admin connections may hold at once: many large
/// requests in flight wait for each other instead of growing memory.
pub const REQUEST_MEMORY: usize = 8 << 20;
/// A request line must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve admin connections: each sends one JSON request line. Beyond the
/// connection cap a client is told the daemon is busy at once, never left
/// waiting behind slow ones.
pub async fn serve_admin(listener: UnixListener, queries: mpsc::Sender<Query>) {
    let connections = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let memory = Arc::new(Semaphore::new(REQUEST_MEMORY >> 10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "admin socket cannot accept; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(reply_busy(
                stream,
                format!(
                    "the daemon is busy: {MAX_ADMIN_CONNECTIONS} admin connections are open; retry"
                ),
            ));
            continue;
        };
        let (queries, memory) = (queries.clone(), memory.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = admin_connection(stream, queries, memory).await {
                debug!(error = %format!("{e:#}"), "admin connection");
            }
        });
    }
}

async fn reply_busy(mut stream: UnixStream, why: String) {
    if let Ok(mut text) = serde_json::to_string(&Response::error(why)) {
        text.push('\n');
        let _ = timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
    }
}

/// Read one request line of at most [`MAX_REQUEST`] bytes, holding a share
/// of the request memory budget (1 KiB permits) for what it has read; a
/// request that would exceed the budget is refused, not queued.
async fn read_request(
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    memory: &Arc<Semaphore>,
) -> Result<std::result::Result<(Vec<u8>, tokio::sync::OwnedSemaphorePermit), String>> {
    let busy = || {
        format!(
            "the daemon is busy: other requests hold its {} MiB of request memory; retry",
            REQUEST_MEMORY >> 20
        )
    };
    let mut line = Vec::new();
    let Ok(mut held) = memory.clone().try_acquire_many_owned(1) else {
        return Ok(Err(busy()));
    };
    let mut chunk = [0u8; 8192];
    loop {
        let n = read.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(if line.is_empty() {
                "empty request".to_owned()
            } else {
                "request not terminated by a newline".to_owned()
            }));
        }
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        let take = end.unwrap_or(n);
        if line.len() + take > MAX_REQUEST {
            return Ok(Err(format!(
                "request longer than {MAX_REQUEST} bytes (the admin API's limit)"
            )));
        }
        let need = ((line.len() + take) >> 10) as u32 + 1;
        let have = held.num_permits() as u32;
        if need > have {
            let Ok(more) = memory.clone().try_acquire_many_owned(need - have) else {
                return Ok(Err(busy()));
            };
            held.merge(more);
        }
        line.extend_from_slice(&chunk[..take]);
        if end.is_some() {
            return Ok(Ok((line, held)));
        }
    }
}

async fn admin_connection(
    stream: UnixStream,
    queries: mpsc::Sender<Query>,
    memory: Arc<Semaphore>,
) -> Result<()> {
    let asker = crate::daemon::audit::Asker::of(&stream);
    let (mut read, mut write) = stream.into_split();
    let request = timeout(REQUEST_TIMEOUT, read_request(&mut read, &memory))
        .await
        .map_err(|_| anyhow!("request timed out after {REQUEST_TIMEOUT:?}"));
    let response = match request {
        Err(e) => Response::error(e),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(Err(e))) => Response::error(e),
        Ok(Ok(Ok((line, held)))) => {
            let parsed = serde_json::from_slice::<Request>(&line);
            drop(line);
            drop(held);
            match parsed {
                Err(e) => Response::error(format!("bad request: {e}")),
                Ok(request) => {
                    let (tx, rx) = oneshot::channel();
                    queries
                        .send(Query::Api(Box::new(request), asker, tx))
                        .await
                        .map_err(|_| anyhow!("daemon shutting down"))?;
                    rx.await
                        .unwrap_or_else(|_| Response::error("daemon shutting down"))
                }
            }
        }
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Client side: send one request to the daemon at `socket`.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the xdplb daemon at {} (is `xdplb run` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    exchange(stream, request)
}

/// Send `request` on `stream` and read the answer. A daemon that refuses
/// the connection (busy) answers and closes at once, maybe before the
/// request is written: its answer, not the broken pipe, is what counts.
fn exchange(mut stream: std::os::unix::net::UnixStream, request: &Request) -> Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    let written = stream.write_all(text.as_bytes());
    let mut line = String::new();
    let read = std::io::BufReader::new(stream).read_line(&mut line);
    if line.trim().is_empty() {
        written.context("sending the request to the daemon")?;
        read.context("reading the daemon's answer")?;
        bail!("the daemon closed the connection without an answer");
    }
    serde_json::from_str(&line).with_context(|| format!("bad response from the daemon: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, InitialState};

    /// efc012d wrote first and gave up on EPIPE: the CLI printed "Broken
    /// pipe" where the daemon had said why it refused.
    #[test]
    fn a_refusal_sent_before_the_request_is_read_is_the_answer() {
        use std::io::Write as _;
        let (client, mut daemon) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut busy =
            serde_json::to_string(&Response::error("the daemon is busy: retry")).unwrap();
        busy.push('\n');
        daemon.write_all(busy.as_bytes()).unwrap();
        drop(daemon);
        let r = exchange(client, &Request::Status {}).expect("the answer, not EPIPE");
        assert_eq!(r.error.as_deref(), Some("the daemon is busy: retry"));
        let (client, daemon) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(daemon);
        let e = format!("{:#}", exchange(client, &Request::Status {}).unwrap_err());
        assert!(e.contains("sending the request"), "{e}");
    }

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
                    server_id: None,
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
                        server_id: None,
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
