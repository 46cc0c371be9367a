//! Operating a real daemon in a test namespace: its files, a config
//! written the way an operator writes one, the LB's veth pair, backend
//! servers, and reading its CLI, status and metrics.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::Value;

use crate::{
    daemon::{xdplb, Server},
    netns::Netns,
    PinDir, Scratch,
};

/// Files of one test: scratch dir (config, socket, logs) and pin dir.
pub struct Files {
    pub scratch: Scratch,
    pub pins: PinDir,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl Files {
    pub fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        Self {
            pins: PinDir::new(tag),
            socket: scratch.0.join("run").join("admin.sock"),
            config: scratch.0.join("xdplb.toml"),
            scratch,
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.scratch.0.join(name)
    }
}

/// A config with one VIP (ipip, TCP checks every 100 ms, rise/fall 1).
pub struct Cfg<'a> {
    pub pins: &'a Path,
    pub socket: &'a Path,
    pub interface: &'a str,
    pub max_backends: u32,
    pub ring_size: u32,
    pub port: u16,
    pub backends: Vec<&'a str>,
    pub metrics: &'a str,
    pub mode: &'a str,
    /// The web VIP's health table (inline TOML).
    pub health: String,
    /// Appended to the file (more VIPs).
    pub extra: String,
}

impl<'a> Cfg<'a> {
    pub fn new(files: &'a Files) -> Self {
        Self {
            pins: &files.pins.0,
            socket: &files.socket,
            interface: "lb0",
            max_backends: 16,
            ring_size: 13,
            port: 80,
            backends: vec!["198.18.1.1", "198.18.1.2"],
            metrics: "127.0.0.1:9477",
            mode: "native",
            health: "{ kind = \"tcp\", port = 80, interval_ms = 100, timeout_ms = 80, jitter_ms = 10, rise = 1, fall = 1 }".into(),
            extra: String::new(),
        }
    }

    pub fn text(&self) -> String {
        let mut t = format!(
            r#"# Edge LB, rack 7 (the operator's notes)
interface = "{iface}"   # uplink
xdp_mode = "{mode}"

[tables]
max_vips = 4
max_backends = {max_backends}
ring_size = {ring_size}
max_flows = 4096

[forwarding]
gateway_mac = "02:00:00:00:00:fe"

[api]
socket = "{socket}"
metrics = "{metrics}"

[daemon]
pin_dir = "{pins}"

# The web tier.
[[vip]]
name = "web"
address = "198.18.0.10"
port = {port}
protocol = "tcp"
forwarding = "ipip"
health = {health}
"#,
            iface = self.interface,
            mode = self.mode,
            max_backends = self.max_backends,
            ring_size = self.ring_size,
            health = self.health,
            socket = self.socket.display(),
            metrics = self.metrics,
            pins = self.pins.display(),
            port = self.port,
        );
        for b in &self.backends {
            t.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{b}\"   # backend {b}\n"
            ));
        }
        t.push_str(&self.extra);
        t
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.text()).unwrap();
    }
}

/// A namespace with the LB's veth pair (lb0, lb1) and backend addresses
/// 198.18.1.1-8 on loopback; lb1 runs an XDP program, as it must for
/// lb0's XDP_TX frames to arrive (`tests/tests/veth_tx.rs`).
pub fn topology(tag: &str) -> Netns {
    let ns = topology_bare(tag);
    peer_xdp(&ns, "lb1");
    ns
}

/// Attach `xdp_pass` to `dev` in `ns` for the rest of the test process
/// (the namespace's removal takes the device and the attachment with it).
pub fn peer_xdp(ns: &Netns, dev: &str) {
    let _inside = ns.enter().unwrap();
    let mut pass =
        xdp_user::dataplane::AuxProgram::load(xdp_user::dataplane::PASS_PROGRAM).unwrap();
    pass.attach(dev, xdp_user::dataplane::AttachMode::Native)
        .unwrap();
    std::mem::forget(pass);
}

/// [`topology`] without the program on lb1: every XDP_TX frame of lb0 is
/// lost there.
pub fn topology_bare(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    veth(&ns);
    for i in 1..=8 {
        ns.ip(&["addr", "add", &format!("198.18.1.{i}/32"), "dev", "lo"])
            .unwrap();
    }
    ns
}

pub fn veth(ns: &Netns) {
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
}

/// TCP backends (health checks pass) on the given addresses, port 80.
pub fn servers(ns: &Netns, addrs: &[&str]) -> Vec<Server> {
    let _inside = ns.enter().unwrap();
    addrs
        .iter()
        .map(|a| Server::http(SocketAddr::new(a.parse().unwrap(), 80)).unwrap())
        .collect()
}

/// A MAC address as the CLI takes it: `02:00:00:00:00:01`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The id of the XDP program attached to `dev` in `ns`, if any.
pub fn xdp_prog(ns: &Netns, dev: &str) -> Option<String> {
    let out = ns.ip(&["-d", "link", "show", dev]).ok()?;
    out.lines()
        .find(|l| l.trim_start().starts_with("prog/xdp"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .map(str::to_owned)
        })
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

pub fn fails(out: &Output, message: &str) {
    assert!(
        !out.status.success(),
        "expected failure, got success: {}{}",
        stdout(out),
        stderr(out)
    );
    assert!(
        stderr(out).contains(message),
        "stderr {:?} should mention {message:?}",
        stderr(out)
    );
}

/// `GET path` on the metrics listener inside `ns`: (status line, body).
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> (String, String) {
    let _inside = ns.enter().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

pub fn metric(ns: &Netns, name: &str) -> Option<f64> {
    let (_, body) = http_get(ns, "127.0.0.1:9477", "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn status(socket: &Path) -> Value {
    let out = xdplb(socket, &["status", "--json"]);
    serde_json::from_str(&ok(&out)).unwrap()
}

pub fn ring_of(socket: &Path) -> Vec<String> {
    let s = status(socket);
    let mut up: Vec<String> = s["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["dataplane_state"] == "up")
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect();
    up.sort();
    up
}

/// The id of the map pinned at `path` (bpftool-free: through aya).
pub fn pinned_map_id(path: &Path) -> Option<u32> {
    aya::maps::MapData::from_pin(path)
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.id())
}
