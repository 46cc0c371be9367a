//! Flows keep their backend: the controller and the live program driven
//! together, packets checked against a model of the README's rules.
//!
//! The rule: a flow keeps the backend that placed it while that backend
//! (the same one: not removed and added again since) is up or draining
//! and serves the VIP the packet matches; otherwise the VIP's current ring
//! places it; an empty ring drops it. A backend is down when configured
//! down or when its checks fail, draining when configured so, else up; it
//! is in the ring when up with a weight above 0.
//!
//! Before backend generations (efc012d) conntrack remembered a backend by
//! id alone, and an id freed by a removal went to the next backend added:
//! `a_recycled_id_does_not_inherit_flows` and
//! `a_port_move_and_back_does_not_swap_flows` failed there (20 of 20 flows
//! on the draining newcomer; 40 of 40 flows swapped), and so did the
//! random walk within its first steps. `state = "down"` by reload reached
//! no dataplane and `down, drain, undrain` left a backend down there:
//! `every_state_transition_reaches_the_dataplane` failed on both.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use integration_tests::{check_result, packet, pin_to_cpu0, require_root, run};
use xdp_common::{flow_hash, FlowKey, NO_BACKEND, XDP_DROP, XDP_PASS, XDP_TX};
use xdp_user::{
    config::{BackendConfig, Change, CheckKind, Config, InitialState, Vip},
    controller::{state_name, Controller},
    dataplane::addr_bytes,
    dataplane::Dataplane,
    maglev::{self, RingBackend},
};

const RING: u32 = 13;

fn base_config() -> Config {
    Config::parse(&format!(
        r#"
interface = "lb0"
[tables]
max_vips = 4
max_backends = 8
ring_size = {RING}
max_flows = 65536
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
conntrack_rate = 0
"#
    ))
    .expect("valid test config")
}

/// The VIPs the walk adds and removes: two share 198.18.0.1 (one with a
/// port, one port-less), two share 198.18.0.2; the first two are checked.
fn vip_template(n: usize) -> Vip {
    let (address, port, checked) = match n {
        0 => ("198.18.0.1", Some(80), true),
        1 => ("198.18.0.1", None, true),
        2 => ("198.18.0.2", Some(80), false),
        _ => ("198.18.0.2", None, false),
    };
    let health = if checked {
        r#"{ kind = "tcp", port = 80, rise = 1, fall = 1, init_state = "up" }"#
    } else {
        r#"{ kind = "none" }"#
    };
    let port = port.map_or(String::new(), |p| format!("port = {p}"));
    let c = Config::parse(&format!(
        r#"
interface = "lb0"
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
[[vip]]
name = "v{n}"
address = "{address}"
{port}
protocol = "tcp"
forwarding = "ipip"
health = {health}
"#
    ))
    .expect("valid VIP");
    c.vips[0].clone()
}

/// What the model knows beyond the config: the health checks said, and
/// which backend (by incarnation) placed each flow.
struct Model {
    config: Config,
    /// Backends whose last check failed, by (VIP name, address).
    failed: BTreeSet<(String, IpAddr)>,
    /// Incarnation of each backend, by (VIP key, address): a new number
    /// whenever the backend appears (added, or its VIP appears anew).
    incarnation: HashMap<(IpAddr, Option<u16>, IpAddr), u64>,
    next_incarnation: u64,
    /// The backend incarnation and address that placed each flow.
    placed: HashMap<usize, (u64, IpAddr)>,
}

impl Model {
    fn new(config: Config) -> Self {
        let mut m = Self {
            config: base_config(),
            failed: BTreeSet::new(),
            incarnation: HashMap::new(),
            next_incarnation: 0,
            placed: HashMap::new(),
        };
        m.accept(config);
        m
    }

    /// Take `config` as the desired state: backends that appear get new
    /// incarnations, health of backends that go is forgotten.
    fn accept(&mut self, config: Config) {
        let old: BTreeSet<(IpAddr, Option<u16>, IpAddr)> = self
            .config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| (v.address, v.port, b.address)))
            .collect();
        let mut live = BTreeSet::new();
        for v in &config.vips {
            for b in &v.backends {
                let k = (v.address, v.port, b.address);
                if !old.contains(&k) {
                    self.next_incarnation += 1;
                    self.incarnation.insert(k, self.next_incarnation);
                }
                live.insert(k);
            }
        }
        self.incarnation.retain(|k, _| live.contains(k));
        self.failed.retain(|(name, a)| {
            config.vip(name).is_some_and(|v| {
                v.health.kind != CheckKind::None && v.backends.iter().any(|b| b.address == *a)
            })
        });
        self.config = config;
    }

    fn state(&self, vip: &Vip, b: &BackendConfig) -> u32 {
        use xdp_common::backend_state::*;
        let failed = self.failed.contains(&(vip.name.clone(), b.address));
        match b.state {
            InitialState::Down => DOWN,
            _ if failed => DOWN,
            InitialState::Drain => DRAINING,
            InitialState::Up => UP,
        }
    }

    /// The VIP a packet to `dst:dport` matches: the one with its port,
    /// else the address's port-less one.
    fn matched(&self, dst: IpAddr, dport: u16) -> Option<&Vip> {
        let vips = &self.config.vips;
        vips.iter()
            .find(|v| v.address == dst && v.port == Some(dport))
            .or_else(|| vips.iter().find(|v| v.address == dst && v.port.is_none()))
    }

    /// Where the next packet of flow `i` goes: Some(backend), None for a
    /// drop, Err(()) for a pass (no VIP).
    fn predict(
        &self,
        i: usize,
        key: &FlowKey,
        dst: IpAddr,
        dport: u16,
    ) -> Result<Option<IpAddr>, ()> {
        use xdp_common::backend_state::*;
        let vip = self.matched(dst, dport).ok_or(())?;
        if let Some(&(inc, addr)) = self.placed.get(&i) {
            if let Some(b) = vip.backends.iter().find(|b| b.address == addr) {
                let same = self.incarnation.get(&(vip.address, vip.port, addr)) == Some(&inc);
                if same && matches!(self.state(vip, b), UP | DRAINING) {
                    return Ok(Some(addr));
                }
            }
        }
        let usable: Vec<&BackendConfig> = vip
            .backends
            .iter()
            .filter(|b| self.state(vip, b) == UP && b.weight > 0)
            .collect();
        let members: Vec<RingBackend> = (0..)
            .zip(&usable)
            .map(|(id, b)| RingBackend {
                identity: match b.address {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                },
                weight: b.weight,
                id,
            })
            .collect();
        let ring = maglev::populate(&members, RING);
        let id = ring[(flow_hash(key, false) % RING) as usize];
        Ok((id != NO_BACKEND).then(|| usable[id as usize].address))
    }

    fn placed_on(&mut self, i: usize, dst: IpAddr, dport: u16, backend: IpAddr) {
        let vip = self.matched(dst, dport).expect("a VIP forwarded it");
        let inc = self.incarnation[&(vip.address, vip.port, backend)];
        self.placed.insert(i, (inc, backend));
    }
}

/// One client flow: source, source port, VIP address and port.
#[derive(Clone, Copy, Debug)]
struct Flow {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
}

impl Flow {
    fn key(&self) -> FlowKey {
        let (src, family) = addr_bytes(IpAddr::V4(self.src));
        let (dst, _) = addr_bytes(IpAddr::V4(self.dst));
        FlowKey {
            src,
            dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: xdp_common::PROTO_TCP,
            family,
            _pad: [0; 2],
        }
    }
}

/// Send one established-flow packet (ACK, no SYN) of `flow`: the backend
/// it was encapsulated to, None when dropped, Err when passed.
fn send(ctl: &Controller, flow: &Flow) -> Result<Option<IpAddr>, ()> {
    let frame = packet::tcp4(flow.src, flow.dst, flow.sport, flow.dport, b"data");
    let prog = ctl.dataplane().program().expect("program");
    let out = run(prog, &frame).expect("test run");
    match out.action {
        XDP_TX => {
            let d = &out.output[30..34];
            Ok(Some(IpAddr::from([d[0], d[1], d[2], d[3]])))
        }
        XDP_DROP => Ok(None),
        XDP_PASS => Err(()),
        other => panic!("unexpected action {other}"),
    }
}

/// Configured state, health and the dataplane agree for every backend.
fn assert_states_agree(ctl: &mut Controller, model: &Model, context: &str) {
    let status = ctl.status();
    for vip in &model.config.vips {
        let vs = status
            .vips
            .iter()
            .find(|v| v.name == vip.name)
            .unwrap_or_else(|| panic!("{context}: VIP {} missing from status", vip.name));
        for b in &vip.backends {
            let bs = vs
                .backends
                .iter()
                .find(|s| s.address == b.address)
                .unwrap_or_else(|| panic!("{context}: backend {} missing", b.address));
            assert_eq!(
                (bs.configured, bs.dataplane_state),
                (b.state, state_name(model.state(vip, b))),
                "{context}: VIP {} backend {} (health {:?})",
                vip.name,
                b.address,
                bs.health
            );
        }
    }
}

/// A controller on private maps, with `config` applied.
fn controller(config: Config) -> Controller {
    let dp = Dataplane::load(config.tables.sizes()).expect("load");
    let mut ctl = Controller::new(config, None, dp).expect("controller");
    ctl.reconcile().expect("first reconcile");
    ctl
}

fn with_vip(mut c: Config, n: usize, backends: &[(&str, InitialState)]) -> Config {
    let mut v = vip_template(n);
    v.backends = backends
        .iter()
        .map(|(a, s)| BackendConfig {
            address: a.parse().unwrap(),
            weight: 100,
            mac: None,
            state: *s,
            server_id: None,
        })
        .collect();
    c.vips.push(v);
    c
}

fn backend(address: &str, state: InitialState) -> BackendConfig {
    BackendConfig {
        address: address.parse().unwrap(),
        weight: 100,
        mac: None,
        state,
        server_id: None,
    }
}

/// Flows 198.18.10.1:40000.. to 198.18.0.2:80 (VIP v2, unchecked).
fn flows(n: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| Flow {
            src: Ipv4Addr::new(198, 18, 10, 1 + (i % 200) as u8),
            sport: 40000 + i,
            dst: Ipv4Addr::new(198, 18, 0, 2),
            dport: 80,
        })
        .collect()
}

#[test]
fn a_recycled_id_does_not_inherit_flows() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    use InitialState::*;
    // One backend, 20 flows; deleted; a draining one added takes its id.
    let mut ctl = controller(with_vip(base_config(), 2, &[("198.18.1.1", Up)]));
    let fs = flows(20);
    for f in &fs {
        assert_eq!(send(&ctl, f), Ok(Some("198.18.1.1".parse().unwrap())));
    }
    ctl.change(&Change::BackendDel(
        "v2".into(),
        "198.18.1.1".parse().unwrap(),
    ))
    .unwrap();
    ctl.change(&Change::BackendAdd(
        "v2".into(),
        backend("198.18.1.9", Drain),
    ))
    .unwrap();
    let moved = fs.iter().filter(|f| send(&ctl, f) != Ok(None)).count();
    assert_eq!(
        moved, 0,
        "flows of a removed backend went to a draining newcomer"
    );

    // Two backends; .1 deleted, .3 added drained: .1's flows go to .2.
    let mut ctl = controller(with_vip(
        base_config(),
        2,
        &[("198.18.1.1", Up), ("198.18.1.2", Up)],
    ));
    let fs = flows(40);
    let on_1: Vec<&Flow> = fs
        .iter()
        .filter(|f| send(&ctl, f) == Ok(Some("198.18.1.1".parse().unwrap())))
        .collect();
    assert!(on_1.len() >= 10, "{} of 40 flows on .1", on_1.len());
    ctl.change(&Change::BackendDel(
        "v2".into(),
        "198.18.1.1".parse().unwrap(),
    ))
    .unwrap();
    ctl.change(&Change::BackendAdd(
        "v2".into(),
        backend("198.18.1.3", Drain),
    ))
    .unwrap();
    for f in on_1 {
        assert_eq!(
            send(&ctl, f),
            Ok(Some("198.18.1.2".parse().unwrap())),
            "a flow of the removed .1"
        );
    }
}

#[test]
fn a_port_move_and_back_does_not_swap_flows() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    use InitialState::*;
    let first = with_vip(
        base_config(),
        2,
        &[("198.18.1.1", Up), ("198.18.1.2", Drain)],
    );
    let mut ctl = controller(first.clone());
    // Placed while both were up, then .2 drained: its flows stay on it.
    let mut both = first.clone();
    both.vips[0].backends[1].state = Up;
    ctl.apply(both.clone()).unwrap();
    let fs = flows(40);
    let before: Vec<_> = fs.iter().map(|f| send(&ctl, f)).collect();
    ctl.apply(first.clone()).unwrap();
    assert_eq!(fs.iter().map(|f| send(&ctl, f)).collect::<Vec<_>>(), before);

    // To port 81 and back, the backends listed the other way round: every
    // backend is new, so every flow is placed again by the ring: all on
    // the one up backend.
    let mut moved = first.clone();
    moved.vips[0].port = Some(81);
    moved.vips[0].backends.reverse();
    ctl.apply(moved.clone()).unwrap();
    moved.vips[0].port = Some(80);
    ctl.apply(moved).unwrap();
    for (f, was) in fs.iter().zip(&before) {
        assert_eq!(
            send(&ctl, f),
            Ok(Some("198.18.1.1".parse().unwrap())),
            "flow {f:?} (was on {was:?})"
        );
    }
}

#[test]
fn every_state_transition_reaches_the_dataplane() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    use InitialState::*;
    let states = [Up, Down, Drain];
    let addr: IpAddr = "198.18.1.1".parse().unwrap();
    for checked in [false, true] {
        let n = if checked { 0 } else { 2 };
        for from in states {
            for to in states {
                for by_reload in [false, true] {
                    let cfg = with_vip(base_config(), n, &[("198.18.1.1", from)]);
                    let mut ctl = controller(cfg.clone());
                    let mut model = Model::new(cfg.clone());
                    let ctx = format!(
                        "checked {checked}, {from:?} -> {to:?} by {}",
                        if by_reload { "reload" } else { "API" }
                    );
                    assert_states_agree(&mut ctl, &model, &ctx);
                    if by_reload {
                        let mut c = cfg.clone();
                        c.vips[0].backends[0].state = to;
                        ctl.apply(c.clone()).unwrap();
                        model.accept(c);
                    } else {
                        // The API's verbs: drain, undrain; down by re-adding.
                        let name = cfg.vips[0].name.clone();
                        let change = match to {
                            Drain => Change::BackendDrain(name, addr, true),
                            Up => Change::BackendDrain(name, addr, false),
                            Down => {
                                ctl.change(&Change::BackendDel(name.clone(), addr)).unwrap();
                                Change::BackendAdd(name, backend("198.18.1.1", Down))
                            }
                        };
                        ctl.change(&change).unwrap();
                        model.accept(ctl.config().clone());
                    }
                    assert_states_agree(&mut ctl, &model, &ctx);
                    if checked {
                        for ok in [false, true] {
                            check_result(&mut ctl, "v0", addr, ok);
                            if ok {
                                model.failed.remove(&("v0".into(), addr));
                            } else {
                                model.failed.insert(("v0".into(), addr));
                            }
                            assert_states_agree(&mut ctl, &model, &format!("{ctx}, check {ok}"));
                        }
                    }
                    // And the packets follow: a new flow goes to the
                    // backend only when it is up.
                    let f = flows(1)[0];
                    let f = Flow {
                        dst: if checked {
                            Ipv4Addr::new(198, 18, 0, 1)
                        } else {
                            f.dst
                        },
                        ..f
                    };
                    let want = (model
                        .state(&model.config.vips[0], &model.config.vips[0].backends[0])
                        == xdp_common::backend_state::UP)
                        .then_some(addr);
                    assert_eq!(send(&ctl, &f), Ok(want), "{ctx}");
                }
            }
        }
    }
}

/// A tiny deterministic generator (splitmix64), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn random_operations_keep_flows_on_their_backends() {
    if !require_root() {
        return;
    }
    pin_to_cpu0();
    let seed = std::env::var("XDPLB_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("seed {seed:#x} (XDPLB_SEED={seed:x} replays it)");
    let mut rng = Rng(seed);
    let mut ctl = controller(base_config());
    let mut model = Model::new(base_config());
    let mut flows: Vec<Flow> = Vec::new();
    let mut seen = HashSet::new();
    let mut log: Vec<(usize, String)> = Vec::new();
    let mut last_sent: HashMap<usize, usize> = HashMap::new();
    let states = [
        InitialState::Up,
        InitialState::Up,
        InitialState::Down,
        InitialState::Drain,
    ];
    let (mut sent, mut kept, mut replaced, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let (mut dropped, mut passed) = (0u64, 0u64);

    for step in 0..5000 {
        let names: Vec<String> = model.config.vips.iter().map(|v| v.name.clone()).collect();
        let vip = (!names.is_empty()).then(|| names[rng.below(names.len())].clone());
        let addr: IpAddr = format!("198.18.1.{}", 1 + rng.below(6)).parse().unwrap();
        let state = states[rng.below(states.len())];
        let what = rng.below(12);
        // A reload: the whole config, changed as an operator's edit would.
        let reload = |rng: &mut Rng, c: &Config| -> Option<(String, Config)> {
            let mut c = c.clone();
            let i = rng.below(c.vips.len().max(1));
            let v = c.vips.get_mut(i)?;
            let name = v.name.clone();
            match rng.below(3) {
                0 if v.port.is_some() => {
                    v.port = Some(if v.port == Some(80) { 81 } else { 80 });
                    v.backends.reverse();
                    Some((format!("reload: {name} to port {:?}, reordered", v.port), c))
                }
                1 => {
                    v.backends.reverse();
                    Some((format!("reload: {name} reordered"), c))
                }
                _ => {
                    let j = rng.below(v.backends.len().max(1));
                    let b = v.backends.get_mut(j)?;
                    b.state = states[rng.below(states.len())];
                    Some((format!("reload: {name} {} {:?}", b.address, b.state), c))
                }
            }
        };
        // An operator's change through the API, or else a reload or a check.
        let change = match (what, &vip) {
            (0 | 1, Some(v)) => Some(Change::BackendAdd(
                v.clone(),
                BackendConfig {
                    address: addr,
                    weight: rng.below(3) as u32,
                    mac: None,
                    state,
                    server_id: None,
                },
            )),
            (2, Some(v)) => Some(Change::BackendDel(v.clone(), addr)),
            (3, Some(v)) => Some(Change::BackendDrain(v.clone(), addr, rng.below(2) == 0)),
            (4, Some(v)) => Some(Change::BackendWeight(v.clone(), addr, rng.below(3) as u32)),
            (5, _) => {
                let mut v = vip_template(rng.below(4));
                if rng.below(2) == 0 {
                    v.backends.push(backend("198.18.1.1", InitialState::Up));
                }
                Some(Change::VipAdd(v))
            }
            (6, Some(v)) if rng.below(3) == 0 => Some(Change::VipDel(v.clone())),
            _ => None,
        };
        let op: Option<(String, Result<(), String>)> = match (what, vip) {
            _ if change.is_some() => change.map(|c| {
                let result = ctl.change(&c).map_err(|e| format!("{e:#}"));
                (format!("{c:?}"), result)
            }),
            (7 | 8, _) => reload(&mut rng, &model.config)
                .map(|(what, c)| (what, ctl.apply(c).map_err(|e| format!("{e:#}")))),
            (_, Some(v)) => {
                let vip = model.config.vip(&v).expect("named VIP");
                if vip.health.kind == CheckKind::None || vip.backends.is_empty() {
                    None
                } else {
                    let b = vip.backends[rng.below(vip.backends.len())].address;
                    let ok = rng.below(3) != 0;
                    check_result(&mut ctl, &v, b, ok);
                    if ok {
                        model.failed.remove(&(v.clone(), b));
                    } else {
                        model.failed.insert((v.clone(), b));
                    }
                    Some((format!("check {v} {b} ok={ok}"), Ok(())))
                }
            }
            _ => None,
        };
        if let Some((what, result)) = op {
            match result {
                Ok(()) => model.accept(ctl.config().clone()),
                Err(e) => {
                    refused += 1;
                    assert_eq!(
                        ctl.config(),
                        &model.config,
                        "seed {seed:#x} step {step}: refused {what} ({e}) but changed the config"
                    );
                }
            }
            log.push((step, what));
        }
        assert!(
            ctl.in_sync(),
            "seed {seed:#x} step {step}: {:?}",
            ctl.last_error
        );
        let context = format!("seed {seed:#x} step {step}");
        assert_states_agree(&mut ctl, &model, &context);

        // New flows, then packets of some established ones.
        while flows.len() < 2 * (step + 1) {
            let f = Flow {
                src: Ipv4Addr::new(198, 18, 10, 1 + rng.below(250) as u8),
                sport: 1024 + rng.below(60000) as u16,
                dst: Ipv4Addr::new(198, 18, 0, 1 + rng.below(2) as u8),
                dport: [80, 80, 80, 81, 443][rng.below(5)],
            };
            // One model entry per 5-tuple, as conntrack has.
            if seen.insert((f.src, f.sport, f.dst, f.dport)) {
                flows.push(f);
            }
        }
        let n = flows.len();
        let mut picks: Vec<usize> = (0..8).map(|_| rng.below(n)).collect();
        picks.extend([n - 2, n - 1]);
        for i in picks {
            let f = flows[i];
            let key = f.key();
            let had = model.placed.get(&i).copied();
            let want = model.predict(i, &key, IpAddr::V4(f.dst), f.dport);
            let got = send(&ctl, &f);
            if got != want {
                // Every operation since the flow was last forwarded.
                let since = last_sent.get(&i).copied().unwrap_or(0);
                let tail = log
                    .iter()
                    .filter(|(s, _)| *s >= since)
                    .map(|(s, w)| format!("{s}: {w}"))
                    .collect::<Vec<_>>()
                    .join("\n  ");
                let dp = ctl.dataplane();
                let tracked = dp.flow(&key).ok().flatten();
                let slot = tracked.map(|t| dp.backend(t.backend_id));
                let vips = dp.vips();
                panic!(
                    "{context}: flow {i} {f:?} (placed {had:?}) went to {got:?}, the model says {want:?}\n\
                     conntrack: {tracked:?}, that slot: {slot:?}, VIPs: {vips:?}\n\
                     operations since it was last sent (step {since}):\n  {tail}\nconfig: {:#?}\nfailed checks: {:?}",
                    model.config.vips, model.failed
                );
            }
            sent += 1;
            last_sent.insert(i, step);
            dropped += u64::from(got == Ok(None));
            passed += u64::from(got.is_err());
            if let Ok(Some(b)) = got {
                if had.is_some_and(|(_, a)| a == b) {
                    kept += 1;
                } else if had.is_some() {
                    replaced += 1;
                }
                model.placed_on(i, IpAddr::V4(f.dst), f.dport, b);
            }
        }
    }
    println!(
        "seed {seed:#x}: {sent} packets as the model said ({kept} kept their backend, \
         {replaced} placed again, {dropped} dropped, {passed} for no VIP), {} operations, \
         {refused} refused",
        log.len()
    );
    assert!(
        kept > 1000 && replaced > 50,
        "the walk moved flows both ways"
    );
}
