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
health = {{ kind = "tcp", rise = 2, fall = 2 }}
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
    ctl.on_check(CheckResult {
        key: CheckKey {
            vip: vip.into(),
            backend: backend.parse().unwrap(),
        },
        result: if ok {
            Ok(Duration::from_millis(1))
        } else {
            Err("connect: refused".into())
        },
    });
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
