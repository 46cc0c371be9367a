//! QUIC connection-ID routing end to end, with a real QUIC stack (aioquic,
//! `tests/quic/peer.py`): a client connects through the LB host, then
//! moves to another address and port, as after a NAT rebinding or a change
//! of network, to one the 5-tuple hash gives the other backend. With
//! `[vip.quic]` its packets still reach the server holding the connection,
//! by the server id in their connection ID; without it they reach the
//! other backend, which does not know the connection.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData};
use integration_tests::{
    e2e::{backend_name, System, HEALTH},
    netns::Netns,
    require_root,
    topology::Spec,
};
use xdp_common::{
    flow_hash, ring_hash, Backend, FlowKey, VipKey, VipMeta, FAMILY_V4, PROTO_UDP, SLOT_CHANGED,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const PORT: u16 = 443;
/// The ring size `Topology::lb_config` gives the LB.
const RING_SIZE: u32 = 4093;

/// Where aioquic is (`cargo xtask setup` installs it; `cargo xtask test`
/// says where).
fn python_path() -> PathBuf {
    std::env::var_os("XDPLB_PYTHONPATH")
        .map(PathBuf::from)
        .expect(
            "XDPLB_PYTHONPATH is not set: run this through `cargo xtask test`, or set it to the \
         directory `cargo xtask setup` installs aioquic into (target/python)",
        )
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("quic/peer.py")
}

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `peer.py` with `args` in `ns`.
fn peer(ns: &Netns, args: &[&str]) -> Child {
    let (mut cmd, _netns) = ns.command(Path::new("python3")).unwrap();
    cmd.env("PYTHONPATH", python_path())
        .arg(peer_script())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first line `child` prints, within `limit`.
fn first_line(child: &mut Child, limit: Duration) -> Option<String> {
    let out = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

/// The LB's config: the topology's TCP VIP, and a UDP VIP on port 443
/// served by both backends, with QUIC routing (server ids 1 and 2) or not.
fn config(
    sys_topo: &integration_tests::topology::Topology,
    pins: &Path,
    socket: &Path,
    quic: bool,
) -> String {
    let mut out = sys_topo.lb_config(0, pins, socket, HEALTH, &[], false);
    out += &format!(
        "\n[[vip]]\nname = \"h3\"\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"udp\"\nforwarding = \"ipip\"\n\
         health = {{ kind = \"tcp\", port = 80, interval_ms = 200, timeout_ms = 150, rise = 1 }}\n"
    );
    if quic {
        out += "\n[vip.quic]\nserver_id_bytes = 2\n";
    }
    for (i, b) in sys_topo.backends.iter().enumerate() {
        out += &format!("\n[[vip.backend]]\naddress = \"{}\"\n", b.v4);
        if quic {
            out += &format!("server_id = {}\n", i + 1);
        }
    }
    out
}

fn pinned(pins: &Path, name: &str) -> MapData {
    MapData::from_pin(pins.join(name)).unwrap()
}

/// The backend address the LB's ring (read from its pinned maps) gives a
/// UDP flow from `client` to the QUIC VIP.
fn ring_backend(pins: &Path, client: (Ipv4Addr, u16)) -> Ipv4Addr {
    let mut key = VipKey {
        port: PORT.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        ..VipKey::default()
    };
    key.addr[..4].copy_from_slice(&VIP.octets());
    let vips = Map::HashMap(pinned(pins, "VIPS"));
    let vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(&vips).unwrap();
    let meta = vips.get(&key, 0).unwrap();
    let mut flow = FlowKey {
        sport: client.1.to_be(),
        dport: PORT.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    flow.src[..4].copy_from_slice(&client.0.octets());
    flow.dst[..4].copy_from_slice(&VIP.octets());
    let slot = ring_hash(&flow, meta.flags, flow_hash(&flow, false)) % RING_SIZE;
    let half = meta.vip_id * 2 + (meta.active_ring & 1);
    let rings = Map::Array(pinned(pins, "RINGS"));
    let rings: Array<_, u64> = Array::try_from(&rings).unwrap();
    let owner = (rings.get(&(half * RING_SIZE + slot), 0).unwrap() as u32) & !SLOT_CHANGED;
    let backends = Map::Array(pinned(pins, "BACKENDS"));
    let backends: Array<_, Backend> = Array::try_from(&backends).unwrap();
    let b = backends.get(&owner, 0).unwrap();
    Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3])
}

struct Moved {
    /// The backend names answering before and after the move (None: no
    /// answer), and the client's error.
    first: Option<String>,
    then: Option<String>,
    error: Option<String>,
    /// Which backend the hash gives the client's first and second 5-tuple.
    hashed: (String, String),
    routed: u64,
}

/// A QUIC client through LB 0 that moves to an address and port the hash
/// gives the other backend.
fn moving_client(tag: &str, quic: bool) -> Moved {
    let spec = Spec {
        tag: tag.into(),
        lbs: 1,
        backends: 2,
        clients: 1,
        vips: vec![IpAddr::V4(VIP)],
        lb_segment: false,
    };
    let sys = System::start_spec(&spec, |topo, _, pins, socket| {
        config(topo, pins, socket, quic)
    })
    .unwrap();
    sys.wait_checked(Duration::from_secs(10)).unwrap();
    let servers: Vec<Running> = sys
        .topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let id = (i + 1).to_string();
            let name = backend_name(i);
            let mut child = peer(
                &b.ns,
                &[
                    "server",
                    "--bind",
                    &VIP.to_string(),
                    "--port",
                    &PORT.to_string(),
                    "--server-id",
                    &id,
                    "--name",
                    &name,
                ],
            );
            let ready = first_line(&mut child, Duration::from_secs(20));
            assert_eq!(
                ready.as_deref().map(str::trim),
                Some("ready"),
                "QUIC server {name}"
            );
            Running(child)
        })
        .collect();

    let client = &sys.topo.clients[0];
    let moved_to = Ipv4Addr::from(u32::from(client.v4) + 1);
    client
        .ns
        .ip(&["addr", "add", &format!("{moved_to}/24"), "dev", "eth0"])
        .unwrap();
    let name_of = |addr: Ipv4Addr| {
        let i = sys.topo.backends.iter().position(|b| b.v4 == addr).unwrap();
        backend_name(i)
    };
    let pins = &sys.pins[0].0;
    let first = (client.v4, 40000);
    let first_backend = ring_backend(pins, first);
    let then = (41000..)
        .map(|p| (moved_to, p))
        .find(|&t| ring_backend(pins, t) != first_backend)
        .unwrap();
    let hashed = (name_of(first_backend), name_of(ring_backend(pins, then)));

    let endpoint = |(a, p): (Ipv4Addr, u16)| format!("{a}:{p}");
    let mut child = peer(
        &client.ns,
        &[
            "client",
            "--vip",
            &endpoint((VIP, PORT)),
            "--first",
            &endpoint(first),
            "--then",
            &endpoint(then),
        ],
    );
    let line = first_line(&mut child, Duration::from_secs(30)).expect("the QUIC client's answer");
    let _client = Running(child);
    drop(servers);
    println!("{tag}: {}", line.trim());
    let out: serde_json::Value = serde_json::from_str(&line).unwrap();
    let text = |k: &str| out[k].as_str().map(str::to_owned);
    let status = sys.status(0).unwrap();
    Moved {
        first: text("first"),
        then: text("then"),
        error: text("error"),
        hashed,
        routed: status["reasons"]["quic_routed"].as_u64().unwrap_or(0),
    }
}

#[test]
fn a_quic_client_that_moves_keeps_its_server_only_with_quic_routing() {
    if !require_root() {
        return;
    }
    let routed = moving_client("quic-on", true);
    assert_ne!(routed.hashed.0, routed.hashed.1);
    assert_eq!(routed.first.as_deref(), Some(routed.hashed.0.as_str()));
    assert_eq!(
        (routed.then.as_deref(), routed.error.as_deref()),
        (Some(routed.hashed.0.as_str()), None),
        "the moved client stays on its server"
    );
    assert!(
        routed.routed > 0,
        "packets were routed by their connection ID"
    );

    let hashed = moving_client("quic-off", false);
    assert_ne!(hashed.hashed.0, hashed.hashed.1);
    assert_eq!(hashed.first.as_deref(), Some(hashed.hashed.0.as_str()));
    assert_eq!(
        hashed.then, None,
        "without QUIC routing the move breaks the connection"
    );
    assert!(hashed
        .error
        .is_some_and(|e| e.contains("no answer after moving")));
    assert_eq!(hashed.routed, 0);
}
