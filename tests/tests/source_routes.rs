//! Source routing (`[[vip.subset]]`): clients in a subset's prefixes, by
//! longest match over all of the VIP's prefixes, go to that subset of the
//! VIP's backends; everyone else to all of them. Checked on the packets
//! the controller's dataplane sends, through reloads and health changes.

use std::{collections::BTreeSet, net::Ipv4Addr};

use integration_tests::{packet, require_root, run};
use xdp_common::{XDP_DROP, XDP_TX};
use xdp_user::{config::Config, controller::Controller, dataplane::Dataplane};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

fn config(subsets: &str) -> Config {
    Config::parse(&format!(
        r#"
interface = "lb0"
[tables]
max_vips = 8
max_backends = 32
ring_size = 251
max_flows = 1024
[forwarding]
gateway_mac = "02:00:00:00:00:fe"
[[vip]]
name = "web"
address = "{VIP}"
port = 80
protocol = "tcp"
forwarding = "ipip"
health = {{ kind = "tcp", rise = 1, fall = 1, init_state = "up" }}
{subsets}
[[vip.backend]]
address = "198.18.1.1"
[[vip.backend]]
address = "198.18.1.2"
[[vip.backend]]
address = "198.18.1.3"
"#
    ))
    .expect("valid test config")
}

/// A canary subset for 198.18.100.0/24, and within it 198.18.100.128/25
/// to another.
const SUBSETS: &str = r#"
[[vip.subset]]
name = "canary"
backends = ["198.18.1.3"]
sources = ["198.18.100.0/24"]
[[vip.subset]]
name = "lab"
backends = ["198.18.1.1", "198.18.1.2"]
sources = ["198.18.100.128/25", "198.18.200.0/24"]
"#;

/// Where the dataplane sends 20 connections from `client` (its last
/// octet's range) to the VIP: the backends' last octets, or None if
/// dropped.
fn sent_to(ctl: &Controller, third: u8, hosts: std::ops::Range<u8>) -> BTreeSet<Option<u8>> {
    let program = ctl.dataplane().program().unwrap();
    let mut out = BTreeSet::new();
    for host in hosts {
        for port in 0..4u16 {
            let src = Ipv4Addr::new(198, 18, third, host);
            let f = packet::tcp4(src, VIP, 40000 + port, 80, b"GET");
            let r = run(program, &f).unwrap();
            out.insert(match r.action {
                // The outer header's destination: the backend.
                XDP_TX => Some(r.output[14 + 19]),
                XDP_DROP => None,
                other => panic!("action {other}"),
            });
        }
    }
    out
}

fn set(v: &[Option<u8>]) -> BTreeSet<Option<u8>> {
    v.iter().copied().collect()
}

fn check(ctl: &mut Controller, backend: &str, ok: bool) {
    integration_tests::check_result(ctl, "web", backend.parse().unwrap(), ok);
    ctl.reconcile().unwrap();
}

#[test]
fn clients_in_a_subsets_prefixes_go_to_its_backends_by_longest_match() {
    if !require_root() {
        return;
    }
    let c = config(SUBSETS);
    let dp = Dataplane::load(c.tables.sizes()).unwrap();
    let mut ctl = Controller::new(c, None, dp).unwrap();
    ctl.reconcile().unwrap();
    let all = set(&[Some(1), Some(2), Some(3)]);

    assert_eq!(
        sent_to(&ctl, 100, 1..100),
        set(&[Some(3)]),
        "/24: the canary"
    );
    assert_eq!(
        sent_to(&ctl, 100, 130..200),
        set(&[Some(1), Some(2)]),
        "/25 inside it: lab"
    );
    assert_eq!(
        sent_to(&ctl, 200, 1..100),
        set(&[Some(1), Some(2)]),
        "lab's other prefix"
    );
    assert_eq!(
        sent_to(&ctl, 50, 1..100),
        all,
        "everyone else: every backend"
    );

    // A subset's backend that fails its check leaves the subset too; a
    // subset without a usable backend drops its clients (it does not
    // spill onto the rest of the VIP).
    check(&mut ctl, "198.18.1.1", false);
    assert_eq!(sent_to(&ctl, 100, 130..200), set(&[Some(2)]));
    assert_eq!(sent_to(&ctl, 50, 1..100), set(&[Some(2), Some(3)]));
    check(&mut ctl, "198.18.1.3", false);
    assert_eq!(
        sent_to(&ctl, 100, 1..100),
        set(&[None]),
        "the canary has no backend"
    );
    check(&mut ctl, "198.18.1.1", true);
    check(&mut ctl, "198.18.1.3", true);
    assert_eq!(sent_to(&ctl, 100, 1..100), set(&[Some(3)]));

    // The status counts the subsets' traffic in the VIP's.
    let status = ctl.status();
    let web = &status.vips[0];
    let subsets: u64 = web.subsets.iter().map(|s| s.counters.packets).sum();
    assert!(
        subsets > 0 && web.counters.packets >= subsets,
        "{subsets} of {}",
        web.counters.packets
    );

    // Without the subsets (a reload), every client reaches every backend,
    // and the routes and subset entries are gone.
    ctl.apply(config("")).unwrap();
    assert_eq!(sent_to(&ctl, 100, 1..100), all);
    assert!(ctl.dataplane().source_routes().unwrap().is_empty());
    assert_eq!(ctl.dataplane().vips().unwrap().len(), 1);
}

#[test]
fn subsets_that_cannot_work_are_refused_with_the_reason() {
    let refused = |subsets: &str, reason: &str| {
        let text = format!(
            "interface = \"lb0\"\n[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\
             forwarding = \"ipip\"\n{subsets}\n[[vip.backend]]\naddress = \"198.18.1.1\"\n"
        );
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains(reason), "{reason:?} not in {e}");
    };
    let subset = |backends: &str, sources: &str| {
        format!("[[vip.subset]]\nname = \"s\"\nbackends = [{backends}]\nsources = [{sources}]\n")
    };
    refused(
        &subset("\"198.18.1.9\"", "\"198.18.100.0/24\""),
        "198.18.1.9 is not a backend of this VIP",
    );
    refused(
        &subset("\"198.18.1.1\"", "\"198.18.100.1/24\""),
        "has host bits set; write 198.18.100.0/24",
    );
    refused(
        &subset("\"198.18.1.1\"", "\"2001:db8::/32\""),
        "is not of the VIP's address family",
    );
    refused(&subset("\"198.18.1.1\"", "\"bogus\""), "is not a prefix");
    refused(&subset("\"198.18.1.1\"", ""), "sources is empty");
    refused(&subset("", "\"198.18.100.0/24\""), "backends is empty");
    let twice = format!(
        "{}{}",
        subset("\"198.18.1.1\"", "\"198.18.100.0/24\""),
        subset("\"198.18.1.1\"", "\"198.18.100.0/24\"").replace("\"s\"", "\"t\"")
    );
    refused(&twice, "198.18.100.0/24 is also subset \"s\"'s");
}
