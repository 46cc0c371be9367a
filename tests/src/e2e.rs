//! A whole system for end-to-end tests and the demo: the topology, one
//! `xdplb run` per LB host, and HTTP (port 80) and line-echo (port 7)
//! servers on every backend, answering with the backend's name.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    daemon::{wait_for, Daemon, Server},
    topology::{in_ns, Spec, Topology},
    PinDir, Scratch,
};

/// Health check used by the end-to-end runs: HTTP every 200 ms, down after
/// 3 failures, up after 2 successes.
pub const HEALTH: &str = r#"{ kind = "http", port = 80, path = "/", interval_ms = 200, timeout_ms = 150, jitter_ms = 20, rise = 2, fall = 3 }"#;
pub const CHECK_INTERVAL: Duration = Duration::from_millis(200);
pub const CHECK_FALL: u32 = 3;

pub struct System {
    // Drop order: daemons, servers, then the network, then pins and files.
    pub daemons: Vec<Option<Daemon>>,
    pub servers: Vec<Vec<Server>>,
    pub topo: Topology,
    pub pins: Vec<PinDir>,
    pub configs: Vec<PathBuf>,
    pub sockets: Vec<PathBuf>,
    pub scratch: Scratch,
}

/// Name of backend `i` in replies.
pub fn backend_name(i: usize) -> String {
    format!("b{i}")
}

impl System {
    /// LB hosts, backends and one client; per VIP address a port-less TCP
    /// VIP and a UDP VIP on port 53.
    pub fn start(
        tag: &str,
        lbs: usize,
        backends: usize,
        vips: Vec<IpAddr>,
        weights: &[u32],
    ) -> Result<Self> {
        Self::start_with(tag, lbs, backends, vips, weights, true)
    }

    /// [`System::start`], with or without the UDP VIPs.
    pub fn start_with(
        tag: &str,
        lbs: usize,
        backends: usize,
        vips: Vec<IpAddr>,
        weights: &[u32],
        udp: bool,
    ) -> Result<Self> {
        let spec = Spec {
            tag: tag.into(),
            lbs,
            backends,
            clients: 1,
            vips,
            lb_segment: false,
        };
        Self::start_spec(&spec, |topo, j, pins, socket| {
            topo.lb_config(j, pins, socket, HEALTH, weights, udp)
        })
    }

    /// The network `spec` describes, servers on every backend and one
    /// daemon per LB host, LB `j` running the config `config(topology, j,
    /// pin_dir, socket)`.
    pub fn start_spec(
        spec: &Spec,
        config: impl Fn(&Topology, usize, &std::path::Path, &std::path::Path) -> String,
    ) -> Result<Self> {
        let (tag, lbs, backends) = (spec.tag.as_str(), spec.lbs, spec.backends);
        let topo = Topology::build(spec)?;
        let scratch = Scratch::new(tag);
        let mut sys = Self {
            daemons: Vec::new(),
            servers: Vec::new(),
            pins: (0..lbs)
                .map(|j| PinDir::new(&format!("{tag}-lb{j}")))
                .collect(),
            configs: Vec::new(),
            sockets: Vec::new(),
            topo,
            scratch,
        };
        for i in 0..backends {
            let servers = sys.serve(i)?;
            sys.servers.push(servers);
        }
        for j in 0..lbs {
            let socket = sys.scratch.0.join(format!("lb{j}.sock"));
            let path = sys.scratch.0.join(format!("lb{j}.toml"));
            std::fs::write(&path, config(&sys.topo, j, &sys.pins[j].0, &socket))?;
            sys.configs.push(path);
            sys.sockets.push(socket);
            sys.daemons.push(None);
            sys.start_daemon(j)?;
        }
        Ok(sys)
    }

    fn serve(&self, i: usize) -> Result<Vec<Server>> {
        let name = backend_name(i);
        let b = &self.topo.backends[i];
        let mut udp_addrs: Vec<IpAddr> = self.topo.vips.clone();
        udp_addrs.extend([IpAddr::V4(b.v4), IpAddr::V6(b.v6)]);
        in_ns(&b.ns, || -> Result<Vec<Server>> {
            // TCP on [::] with v6only off: the VIPs and the backend's own
            // address (health checks), IPv4 and IPv6. UDP per address, so
            // replies leave from the address the query went to.
            let mut servers = vec![
                Server::http_named(SocketAddr::from(([0u16; 8], 80)), &name)?,
                Server::echo(SocketAddr::from(([0u16; 8], 7)), &name)?,
            ];
            for a in &udp_addrs {
                servers.push(Server::udp_named(SocketAddr::new(*a, 53), &name)?);
            }
            Ok(servers)
        })?
    }

    /// Stop backend `i`'s servers: its checks fail, its connections close.
    pub fn kill_backend(&mut self, i: usize) {
        self.servers[i].clear();
    }

    pub fn revive_backend(&mut self, i: usize) -> Result<()> {
        self.servers[i] = self.serve(i)?;
        Ok(())
    }

    pub fn start_daemon(&mut self, j: usize) -> Result<()> {
        let log = self
            .scratch
            .0
            .join(format!("lb{j}-{}.log", self.daemons.len()));
        let d = Daemon::start(
            &self.topo.lbs[j].ns,
            &self.configs[j],
            &self.sockets[j],
            log,
        )?;
        self.daemons[j] = Some(d);
        Ok(())
    }

    pub fn stop_daemon(&mut self, j: usize) -> Result<()> {
        match self.daemons[j].take() {
            Some(d) => d.stop(),
            None => Ok(()),
        }
    }

    /// The daemon's status of LB `j`.
    pub fn status(&self, j: usize) -> Result<serde_json::Value> {
        let r = xdp_user::api::call(&self.sockets[j], &xdp_user::api::Request::Status {})?;
        r.data.ok_or_else(|| anyhow!("no status: {:?}", r.error))
    }

    /// Dataplane state of backend `i` for every VIP of LB `j`.
    pub fn backend_states(&self, j: usize, i: usize) -> Result<Vec<String>> {
        let s = self.status(j)?;
        let b = &self.topo.backends[i];
        let mut out = Vec::new();
        for vip in s["vips"].as_array().context("vips")? {
            for be in vip["backends"].as_array().context("backends")? {
                let addr: IpAddr = be["address"].as_str().unwrap_or("").parse()?;
                if addr == IpAddr::V4(b.v4) || addr == IpAddr::V6(b.v6) {
                    out.push(be["dataplane_state"].as_str().unwrap_or("?").to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Wait until backend `i` is `state` for every VIP on LB `j`.
    pub fn wait_backend(
        &self,
        j: usize,
        i: usize,
        state: &str,
        limit: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        wait_for(limit, || {
            self.backend_states(j, i)
                .ok()
                .filter(|s| !s.is_empty() && s.iter().all(|x| x == state))
        })
        .ok_or_else(|| {
            anyhow!(
                "backend {i} not {state} on LB {j} within {limit:?}: {:?}",
                self.backend_states(j, i)
            )
        })?;
        Ok(started.elapsed())
    }

    /// Wait until every backend has passed a real check on every LB.
    pub fn wait_checked(&self, limit: Duration) -> Result<()> {
        for j in 0..self.daemons.len() {
            wait_for(limit, || {
                let s = self.status(j).ok()?;
                s["vips"]
                    .as_array()?
                    .iter()
                    .all(|v| {
                        v["backends"].as_array().is_some_and(|bs| {
                            bs.iter().all(|b| {
                                b["last_check_ms"].as_f64().is_some()
                                    && b["dataplane_state"] == "up"
                            })
                        })
                    })
                    .then_some(())
            })
            .ok_or_else(|| anyhow!("LB {j}: not every backend checked and up within {limit:?}"))?;
        }
        Ok(())
    }

    /// Run `f` in client `c`'s namespace.
    pub fn from_client<T: Send>(&self, c: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_ns(&self.topo.clients[c].ns, f)
    }
}

/// Answers per backend name and failures of `n` calls of `query`, stopping
/// after 10 failures (a broken path fails fast, not after n timeouts).
pub fn tally(
    n: usize,
    mut query: impl FnMut() -> Result<String>,
) -> (std::collections::BTreeMap<String, usize>, usize) {
    let mut counts = std::collections::BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match query() {
            Ok(b) => *counts.entry(b).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
        if failed >= 10 {
            break;
        }
    }
    (counts, failed)
}

/// One HTTP request on a new connection; the answering backend's name.
pub fn http_get(vip: IpAddr) -> Result<String> {
    let addr = SocketAddr::new(vip, 80);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    body.trim()
        .strip_prefix("backend ")
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("unexpected reply {text:?}"))
}

/// One UDP query to `vip:53` from a fresh socket (new source port); the
/// answering backend's name.
pub fn udp_query(vip: IpAddr) -> Result<String> {
    let bind: SocketAddr = if vip.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(SocketAddr::new(vip, 53))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.send(b"ping")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).context("no UDP reply")?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.strip_prefix("pong from ")
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("unexpected reply {text:?}"))
}

/// A long-lived connection to the echo service behind a VIP. Create it
/// inside the client's namespace; use it from anywhere.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The backend that answered the first line.
    pub backend: String,
}

impl Conn {
    pub fn open(vip: IpAddr) -> Result<Self> {
        let addr = SocketAddr::new(vip, 7);
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut c = Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            backend: String::new(),
        };
        c.backend = c.ask()?;
        Ok(c)
    }

    /// Send a line and wait up to `limit` for the answer (a stall while
    /// routes converge is not a failure; a reset or close is).
    pub fn ask_within(&mut self, limit: Duration) -> Result<String> {
        self.send_within(b"ping", limit)
    }

    /// Send `line` (and a newline), waiting up to `limit` for the answer.
    pub fn send_within(&mut self, line: &[u8], limit: Duration) -> Result<String> {
        // A path that drops big segments stalls the write itself.
        self.writer.set_write_timeout(Some(limit))?;
        self.writer.write_all(line)?;
        self.writer.write_all(b"\n")?;
        let deadline = Instant::now() + limit;
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => bail!("connection closed"),
                Ok(_) => return Ok(line.trim().to_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && Instant::now() < deadline => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Send a line; the name of the backend that answered.
    pub fn ask(&mut self) -> Result<String> {
        self.writer.write_all(b"ping\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_owned())
    }
}

/// One request of a [`Load`]: when it started, and the answering backend or
/// the error.
pub type Outcome = (Instant, Result<String, String>);

/// Back-to-back HTTP requests on new connections from client 0, on a
/// thread, until stopped (bounded by `limit` in any case).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub fn start(sys: &System, vip: IpAddr, limit: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let ns = sys.topo.clients[0].ns.name.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let Ok(_inside) = crate::netns::enter(&ns) else {
                return out;
            };
            let deadline = Instant::now() + limit;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let at = Instant::now();
                out.push((at, http_get(vip).map_err(|e| format!("{e:#}"))));
            }
            out
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; every request with its start time and outcome.
    pub fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
