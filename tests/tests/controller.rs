//! The reconcile path against a loaded dataplane: rings follow health and
//! config, writes are idempotent, and bad changes are refused whole.

use std::{net::IpAddr, time::Duration};

use integration_tests::require_root;
use xdp_common::{backend_state, NO_BACKEND};
use xdp_user::{
    config::{BackendConfig, Config, InitialState},
    controller::{vip_key, Controller},
    dataplane::Dataplane,
    health::{CheckKey, CheckResult},
    maglev::{self, RingBackend},
};

const RING: u32 = 251;

fn config() -> Config {
    Config::parse(&format!(
        r#"
interface = "lb0"
[tables]
max_vips = 4
max_backends = 16
ring_size = {RING}
max_flows = 1024
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
health = {{ kind = "tcp", rise = 2, fall = 2, init_state = "up" }}
[[vip.backend]]
address = "198.18.1.1"
[[vip.backend]]
address = "198.18.1.2"
[[vip.backend]]
address = "198.18.1.3"
weight = 200
[[vip]]
name = "dns"
address = "2001:db8::53"
port = 53
protocol = "udp"
forwarding = "ip6ip6"
health = {{ kind = "none" }}
[[vip.backend]]
address = "2001:db8:1::1"
"#
    ))
    .expect("valid test config")
}

fn controller() -> Controller {
    let c = config();
    let dp = Dataplane::load(c.tables.sizes()).expect("load");
    let mut ctl = Controller::new(c, None, dp).unwrap();
    ctl.reconcile().expect("first reconcile");
    ctl
}

/// The ring Maglev gives the VIP's usable backends, in addresses.
fn expected_ring(usable: &[(&str, u32)]) -> Vec<Option<IpAddr>> {
    let members: Vec<RingBackend> = usable
        .iter()
        .enumerate()
        .map(|(i, (a, w))| RingBackend {
            identity: match a.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v) => v.octets().to_vec(),
                IpAddr::V6(v) => v.octets().to_vec(),
            },
            weight: *w,
            id: i as u32,
        })
        .collect();
    maglev::populate(&members, RING)
        .into_iter()
        .map(|i| (i != NO_BACKEND).then(|| usable[i as usize].0.parse().unwrap()))
        .collect()
}

/// The VIP's live ring, in addresses.
fn live_ring(ctl: &Controller, vip: &str) -> Vec<Option<IpAddr>> {
    let v = ctl.config().vip(vip).unwrap();
    let dp = ctl.dataplane();
    dp.ring(&vip_key(v))
        .unwrap()
        .into_iter()
        .map(|id| {
            (id != NO_BACKEND).then(|| {
                let b = dp.backend(id).unwrap();
                if b.family == 4 {
                    IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
                } else {
                    IpAddr::from(b.addr)
                }
            })
        })
        .collect()
}

fn active_half(ctl: &Controller, vip: &str) -> u32 {
    let v = ctl.config().vip(vip).unwrap();
    ctl.dataplane()
        .vip(&vip_key(v))
        .unwrap()
        .unwrap()
        .active_ring
}

fn check(ctl: &mut Controller, vip: &str, backend: &str, ok: bool) {
    integration_tests::check_result(ctl, vip, backend.parse().unwrap(), ok);
}

fn state_of(ctl: &mut Controller, vip: &str, backend: &str) -> &'static str {
    let status = ctl.status();
    let v = status.vips.into_iter().find(|v| v.name == vip).unwrap();
    v.backends
        .into_iter()
        .find(|b| b.address == backend.parse::<IpAddr>().unwrap())
        .unwrap()
        .dataplane_state
}

#[test]
fn rings_follow_config_and_weights_and_reconcile_is_idempotent() {
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[
            ("198.18.1.1", 100),
            ("198.18.1.2", 100),
            ("198.18.1.3", 200)
        ])
    );
    assert_eq!(
        live_ring(&ctl, "dns"),
        expected_ring(&[("2001:db8:1::1", 100)])
    );
    let halves = (active_half(&ctl, "web"), active_half(&ctl, "dns"));
    ctl.reconcile().unwrap();
    ctl.reconcile().unwrap();
    assert_eq!(
        (active_half(&ctl, "web"), active_half(&ctl, "dns")),
        halves,
        "no ring rewritten"
    );
    assert!(ctl.in_sync());
}

#[test]
fn health_transitions_move_backends_in_and_out_of_the_ring() {
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    check(&mut ctl, "web", "198.18.1.2", false);
    assert_eq!(
        state_of(&mut ctl, "web", "198.18.1.2"),
        "up",
        "one failure is below fall=2"
    );
    check(&mut ctl, "web", "198.18.1.2", false);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.2"), "down");
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[("198.18.1.1", 100), ("198.18.1.3", 200)])
    );
    check(&mut ctl, "web", "198.18.1.2", true);
    assert_eq!(
        state_of(&mut ctl, "web", "198.18.1.2"),
        "down",
        "one success is below rise=2"
    );
    check(&mut ctl, "web", "198.18.1.2", true);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.2"), "up");
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[
            ("198.18.1.1", 100),
            ("198.18.1.2", 100),
            ("198.18.1.3", 200)
        ])
    );
    // Every backend down: an empty ring, packets dropped as no_backend.
    for b in ["198.18.1.1", "198.18.1.2", "198.18.1.3"] {
        check(&mut ctl, "web", b, false);
        check(&mut ctl, "web", b, false);
    }
    assert!(live_ring(&ctl, "web").iter().all(Option::is_none));
}

#[test]
fn config_changes_drain_weight_add_remove() {
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    let mut c = ctl.config().clone();
    // Drain .1: state draining, out of the ring.
    c.vips[0].backends[0].state = InitialState::Drain;
    // Weight of .3 to 0: up but out of the ring.
    c.vips[0].backends[2].weight = 0;
    // Add .4.
    c.vips[0].backends.push(BackendConfig {
        address: "198.18.1.4".parse().unwrap(),
        weight: 100,
        mac: None,
        state: InitialState::Up,
        server_id: None,
    });
    ctl.apply(c.clone()).unwrap();
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "draining");
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.3"), "up");
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[("198.18.1.2", 100), ("198.18.1.4", 100)])
    );
    // Remove .2 and the dns VIP.
    c.vips[0].backends.remove(1);
    let dns_key = vip_key(&c.vips[1]);
    c.vips.remove(1);
    ctl.apply(c.clone()).unwrap();
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[("198.18.1.4", 100)])
    );
    assert!(
        ctl.dataplane().vip(&dns_key).unwrap().is_none(),
        "dns VIP removed"
    );
    let used: Vec<_> = ctl.dataplane().backends().unwrap();
    assert_eq!(used.len(), 3, "removed backends cleared: {used:?}");
    assert!(used.iter().any(|(_, b)| b.state == backend_state::DRAINING));
}

#[test]
fn invalid_or_restart_only_changes_are_refused_and_change_nothing() {
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    let before = live_ring(&ctl, "web");
    let mut bad = ctl.config().clone();
    bad.vips[0].backends[0].weight = 1_000_000;
    bad.vips[0].backends[1].state = InitialState::Drain;
    let err = ctl.apply(bad).unwrap_err();
    assert!(
        format!("{err:#}").contains("weight 1000000 out of range"),
        "{err:#}"
    );
    let mut resize = ctl.config().clone();
    resize.tables = xdp_user::config::Tables {
        max_flows: 2048,
        ..resize.tables.clone()
    };
    assert!(format!("{:#}", ctl.apply(resize).unwrap_err()).contains("table sizes"));
    assert_eq!(live_ring(&ctl, "web"), before);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.2"), "up");
}

#[test]
fn a_new_controller_adopts_ids_and_health_from_pinned_maps() {
    if !require_root() {
        return;
    }
    let pins = integration_tests::PinDir::new("ctl");
    let c = config();
    let (ring, ids) = {
        let dp = Dataplane::open(c.tables.sizes(), &pins.0).unwrap();
        let mut first = Controller::new(c.clone(), None, dp).unwrap();
        first.reconcile().unwrap();
        check(&mut first, "web", "198.18.1.1", false);
        check(&mut first, "web", "198.18.1.1", false);
        let ids: Vec<_> = first.status().vips[0]
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        (live_ring(&first, "web"), ids)
    };
    let dp = Dataplane::open(c.tables.sizes(), &pins.0).unwrap();
    assert!(dp.adopted());
    let mut second = Controller::new(c, None, dp).unwrap();
    let half = active_half(&second, "web");
    second.reconcile().unwrap();
    let status = second.status();
    let web = &status.vips[0];
    assert_eq!(
        web.backends.iter().map(|b| b.id).collect::<Vec<_>>(),
        ids,
        "same backend ids"
    );
    assert_eq!(
        web.backends[0].dataplane_state, "down",
        "health adopted from the maps"
    );
    assert_eq!(web.backends[0].health, Some(xdp_user::health::Health::Down));
    assert_eq!(live_ring(&second, "web"), ring, "same ring");
    // The restart rewrote the ring once (same content), flipping halves.
    assert_ne!(active_half(&second, "web"), half);
}

#[test]
fn a_failed_reconcile_is_reported_and_the_next_one_recovers() {
    if !require_root() {
        return;
    }
    // A dataplane with room for 3 backends under a config that wants 4:
    // the fourth id cannot be allocated.
    let c = config();
    let small = xdp_user::dataplane::Sizes {
        max_backends: 3,
        ..c.tables.sizes()
    };
    let dp = Dataplane::load(small).unwrap();
    let mut ctl = Controller::new(c.clone(), None, dp).unwrap();
    let err = ctl.reconcile().expect_err("no slot for the fourth backend");
    assert!(
        format!("{err:#}").contains("needs 4 backend slots, the table has 3"),
        "{err:#}"
    );
    assert!(!ctl.in_sync());
    assert!(ctl
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("needs 4 backend slots, the table has 3"));
    assert_eq!(ctl.reconcile_failures, 1);
    let (healthy, text) = xdp_user::api::healthz(&ctl);
    assert!(!healthy && text.contains("out of sync"), "{text}");
    // Retrying changes nothing while the cause remains...
    assert!(ctl.reconcile().is_err());
    // ...and once it is gone (the dns VIP removed), the next reconcile
    // completes and the web VIP's ring is whole.
    let mut fixed = c.clone();
    fixed.vips.truncate(1);
    ctl.apply(fixed).unwrap();
    assert!(ctl.in_sync());
    assert_eq!(
        live_ring(&ctl, "web"),
        expected_ring(&[
            ("198.18.1.1", 100),
            ("198.18.1.2", 100),
            ("198.18.1.3", 200)
        ])
    );
    assert!(xdp_user::api::healthz(&ctl).0);
}

/// A small xorshift generator: the property test is reproducible from its
/// seed, printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random API changes, reloads and health events against a model, with the
/// tables at capacity (3 VIPs, 6 backend slots): after every step the
/// controller holds exactly the model's config (refused steps change
/// nothing), stays in sync, every VIP's live ring holds exactly its usable
/// backends, and no backend slot is leaked.
#[test]
fn random_changes_at_capacity_match_the_model() {
    use xdp_user::config::Change;
    if !require_root() {
        return;
    }
    let base = Config::parse(
        r#"
interface = "lb0"
[tables]
max_vips = 3
max_backends = 6
ring_size = 13
max_flows = 1024
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
[[vip]]
name = "v0"
address = "198.18.0.1"
port = 80
protocol = "tcp"
forwarding = "ipip"
health = { kind = "tcp", rise = 1, fall = 1, init_state = "up" }
"#,
    )
    .unwrap();
    let template = base.vips[0].clone();
    let dp = Dataplane::load(base.tables.sizes()).unwrap();
    let mut ctl = Controller::new(base.clone(), None, dp).unwrap();
    ctl.reconcile().unwrap();
    let mut model = base;
    let mut down: std::collections::BTreeSet<(String, IpAddr)> = Default::default();
    let seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rng = Rng(seed);
    let (mut accepted, mut refused_full) = (0, 0);

    for step in 0..1500 {
        let names: Vec<String> = model.vips.iter().map(|v| v.name.clone()).collect();
        let pick_vip = |rng: &mut Rng| names.get(rng.below(names.len().max(1))).cloned();
        let addr: IpAddr = format!("198.18.1.{}", 1 + rng.below(8)).parse().unwrap();
        let what = rng.below(9);
        let change = match (what, pick_vip(&mut rng)) {
            (0 | 1, Some(v)) => Some(Change::BackendAdd(
                v,
                BackendConfig {
                    address: addr,
                    weight: rng.below(3) as u32,
                    mac: None,
                    state: InitialState::Up,
                    server_id: None,
                },
            )),
            (2, Some(v)) => Some(Change::BackendDel(v, addr)),
            (3, Some(v)) => Some(Change::BackendDrain(v, addr, rng.below(2) == 0)),
            (4, Some(v)) => Some(Change::BackendWeight(v, addr, rng.below(3) as u32)),
            (5, _) => {
                let mut vip = template.clone();
                let n = rng.below(4);
                vip.name = format!("v{n}");
                vip.address = format!("198.18.0.{}", 1 + n).parse().unwrap();
                Some(Change::VipAdd(vip))
            }
            (6, Some(v)) => Some(Change::VipDel(v)),
            _ => None,
        };
        let before = ctl.config().clone();
        match (what, change) {
            (_, Some(change)) => {
                let expected = change
                    .apply_to(&model)
                    .ok()
                    .filter(|c| c.validate().is_ok());
                let result = ctl.change(&change);
                match (&expected, &result) {
                    (Some(c), Ok(())) => {
                        model = c.clone();
                        accepted += 1;
                    }
                    (None, Err(e)) => {
                        if format!("{e:#}").contains("slots") {
                            refused_full += 1;
                        }
                    }
                    _ => panic!(
                        "seed {seed:#x} step {step}: {change:?} expected {} got {result:?}",
                        if expected.is_some() { "ok" } else { "refusal" }
                    ),
                }
            }
            (7, None) => {
                // A reload that moves a VIP to another port: every one of
                // its backends needs new ids.
                if let Some(i) = (!model.vips.is_empty()).then(|| rng.below(model.vips.len())) {
                    let mut c = model.clone();
                    c.vips[i].port = Some(if c.vips[i].port == Some(80) { 81 } else { 80 });
                    ctl.apply(c.clone()).unwrap_or_else(|e| {
                        panic!("seed {seed:#x} step {step}: port move refused: {e:#}")
                    });
                    model = c;
                }
            }
            _ => {
                // A health check result.
                if let Some(vip) = model.vips.get(rng.below(model.vips.len().max(1))) {
                    if let Some(b) = vip.backends.get(rng.below(vip.backends.len().max(1))) {
                        let ok = rng.below(2) == 0;
                        ctl.on_check(CheckResult {
                            key: CheckKey {
                                vip: vip.name.clone(),
                                backend: b.address,
                            }
                            .into(),
                            result: if ok {
                                Ok(Duration::from_millis(1))
                            } else {
                                Err("refused".into())
                            },
                        });
                        if ok {
                            down.remove(&(vip.name.clone(), b.address));
                        } else {
                            down.insert((vip.name.clone(), b.address));
                        }
                    }
                }
            }
        }
        if ctl.config() != &model {
            panic!(
                "seed {seed:#x} step {step}: config {:?} != model (before {:?})",
                ctl.config(),
                before
            );
        }
        // Health of removed backends is forgotten, as the controller does.
        down.retain(|(v, a)| {
            model
                .vip(v)
                .is_some_and(|vip| vip.backends.iter().any(|b| b.address == *a))
        });
        assert!(
            ctl.in_sync(),
            "seed {seed:#x} step {step}: {:?}",
            ctl.last_error
        );

        let dp = ctl.dataplane();
        let used = dp.backends().unwrap();
        let pairs: usize = model.vips.iter().map(|v| v.backends.len()).sum();
        assert_eq!(
            used.len(),
            pairs,
            "seed {seed:#x} step {step}: leaked slots {used:?}"
        );
        assert_eq!(dp.vips().unwrap().len(), model.vips.len());
        for vip in &model.vips {
            let key = vip_key(vip);
            let vip_id = dp.vip(&key).unwrap().expect("VIP in the map").vip_id;
            let live: std::collections::BTreeSet<IpAddr> = dp
                .ring(&key)
                .unwrap()
                .into_iter()
                .filter(|&id| id != NO_BACKEND)
                .map(|id| {
                    let b = dp.backend(id).unwrap();
                    assert_eq!(
                        b.state,
                        backend_state::UP,
                        "seed {seed:#x} step {step}: ring names a non-up backend"
                    );
                    assert_eq!(
                        b.vip_id, vip_id,
                        "seed {seed:#x} step {step}: ring names another VIP's backend"
                    );
                    IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
                })
                .collect();
            let usable: std::collections::BTreeSet<IpAddr> = vip
                .backends
                .iter()
                .filter(|b| {
                    b.weight > 0
                        && b.state != InitialState::Drain
                        && !down.contains(&(vip.name.clone(), b.address))
                })
                .map(|b| b.address)
                .collect();
            assert_eq!(live, usable, "seed {seed:#x} step {step}: VIP {}", vip.name);
        }
    }
    println!("{accepted} changes accepted, {refused_full} refused for lack of slots");
    assert!(
        accepted > 100 && refused_full > 10,
        "the walk reached capacity"
    );
}

#[test]
fn removing_a_backend_keeps_the_backends_adding_up_to_their_vip() {
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    let prog_packets = |ctl: &Controller| {
        let prog = ctl.dataplane().program().unwrap();
        for sport in 1000..1300u16 {
            let frame = integration_tests::packet::tcp4(
                "198.18.100.1".parse().unwrap(),
                "198.18.0.10".parse().unwrap(),
                sport,
                80,
                b"x",
            );
            integration_tests::run(prog, &frame).unwrap();
        }
    };
    prog_packets(&ctl);
    let mut c = ctl.config().clone();
    c.vips[0].backends.remove(0);
    ctl.apply(c).unwrap();
    prog_packets(&ctl);
    let status = ctl.status();
    let web = status.vips.iter().find(|v| v.name == "web").unwrap();
    let backends: u64 = web.backends.iter().map(|b| b.counters.packets).sum();
    assert_eq!(web.counters.packets, 600);
    assert!(
        web.removed_backends.packets > 0,
        "the removed backend had traffic"
    );
    assert_eq!(
        backends + web.removed_backends.packets,
        web.counters.packets,
        "backends (with the removed one) add up to the VIP"
    );
    let text = xdp_user::metrics::render(&mut ctl, xdp_user::metrics::Format::Prometheus);
    let removed = format!(
        "xdplb_backend_packets_total{{vip=\"web\",backend=\"removed\"}} {}",
        web.removed_backends.packets
    );
    assert!(text.contains(&removed), "metrics carry {removed}");
}

/// A fleet member's controller (issue: one fleet): the rings follow the
/// fleet's verdict (rule `any`) built from this host's rise/fall verdicts
/// and a peer's; a disagreement is reported; past the lease TTL without
/// the store, the host's own checks decide; a bad revision changes
/// nothing.
#[test]
fn a_fleet_members_rings_follow_the_fleets_verdict() {
    use xdp_user::fleet::keys::{self, Entry, Verdicts};
    if !require_root() {
        return;
    }
    let mut ctl = controller();
    let fleet = xdp_user::config::Fleet {
        endpoints: vec!["http://198.18.80.2:2379".into()],
        prefix: "/t".into(),
        host: Some("here".into()),
        ca: None,
        cert: None,
        key: None,
        user: None,
        password_file: None,
        lease_ttl_s: 2,
        health_rule: xdp_user::config::HealthRule::Any,
        timeout_ms: 1000,
    };
    ctl.join_fleet(&fleet, None);
    let vips: Vec<Entry> = ctl
        .config()
        .vips
        .iter()
        .map(|v| Entry {
            key: keys::vip_key("/t", &v.name),
            value: keys::vip_value(v).unwrap().into_bytes(),
            mod_revision: 2,
        })
        .collect();
    let snapshot = |ctl: &mut Controller, rev: i64, peer: &[(&str, bool)]| {
        let mut v = Verdicts::new();
        for (addr, up) in peer {
            v.entry("web".into())
                .or_default()
                .insert(addr.parse().unwrap(), *up);
        }
        let mut entries = vips.clone();
        entries.push(Entry {
            key: keys::health_key("/t", "peer"),
            value: keys::verdicts_value(&v).into_bytes(),
            mod_revision: rev,
        });
        if ctl.fleet_snapshot(rev, &entries).verdicts {
            ctl.reconcile().unwrap();
        }
    };
    // Every host's checks pass first (rise 2, fall 2).
    for b in ["198.18.1.1", "198.18.1.2", "198.18.1.3"] {
        check(&mut ctl, "web", b, true);
    }
    snapshot(&mut ctl, 3, &[("198.18.1.1", false), ("198.18.1.2", true)]);
    // The peer sees 1.1 down, this host up: any host up keeps it.
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "up");
    // This host's checks fail on 1.2: one failure is not yet a verdict
    // (fall 2), two are; the peer still sees it up, so it stays.
    check(&mut ctl, "web", "198.18.1.2", false);
    assert!(ctl.own_verdicts()["web"][&"198.18.1.2".parse().unwrap()]);
    check(&mut ctl, "web", "198.18.1.2", false);
    assert!(!ctl.own_verdicts()["web"][&"198.18.1.2".parse().unwrap()]);
    ctl.reconcile().unwrap();
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.2"), "up");
    let status = ctl.fleet_status().unwrap();
    assert_eq!(status.disagreements.len(), 1, "{status:?}");
    assert_eq!(status.disagreements[0].backend.to_string(), "198.18.1.2");
    // Both judge 1.1 down once this host's checks fail twice too.
    check(&mut ctl, "web", "198.18.1.1", false);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "up");
    check(&mut ctl, "web", "198.18.1.1", false);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "down");
    // The peer changes its mind: 1.1 back in the ring at once.
    snapshot(&mut ctl, 4, &[("198.18.1.1", true), ("198.18.1.2", true)]);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "up");

    // A bad revision is refused whole, naming the key; nothing moves.
    let mut bad = vips.clone();
    bad.push(Entry {
        key: "/t/vips/oops".into(),
        value: b"not toml = ".to_vec(),
        mod_revision: 5,
    });
    ctl.fleet_snapshot(5, &bad);
    let status = ctl.fleet_status().unwrap();
    assert!(
        status
            .refused
            .as_deref()
            .is_some_and(|r| r.contains("/t/vips/oops")),
        "{status:?}"
    );
    assert_eq!(status.revision, 4);
    assert_eq!(ctl.config().vips.len(), 2);

    // The store lost: the peer's verdicts count for the lease TTL, then
    // this host's own checks decide (1.2 and 1.1 down here).
    ctl.fleet_lost("test".into());
    assert!(!ctl.fleet_fallback_changed());
    std::thread::sleep(Duration::from_millis(2100));
    assert!(ctl.fleet_fallback_changed());
    ctl.reconcile().unwrap();
    assert!(ctl.fleet_status().unwrap().local_health);
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.2"), "down");
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.1"), "down");
    assert_eq!(state_of(&mut ctl, "web", "198.18.1.3"), "up");
    assert!(ctl.fleet_refuses_changes().is_some());
}
