//! Another XDP program on the balancer's interface, chained by a tail call
//! (`chain.pass_to`): it gets every packet the balancer passes, VIP
//! traffic is still balanced, the chain survives a restart of the
//! balancer, and a program the kernel cannot chain is refused with the
//! reason.

use std::net::Ipv4Addr;

use integration_tests::{
    lab::{Lab, CLIENT4, WEB4},
    packet, require_root, run, PinDir,
};
use xdp_common::{XDP_DROP, XDP_PASS, XDP_TX};
use xdp_user::{
    config::Config,
    controller::Controller,
    dataplane::{AuxProgram, Dataplane, SINK_FRAGS_PROGRAM, SINK_PROGRAM},
};

/// A frame for no VIP, and one for WEB4.
fn frames() -> (Vec<u8>, Vec<u8>) {
    let other = packet::tcp4(CLIENT4, Ipv4Addr::new(198, 18, 7, 7), 40000, 22, b"ssh");
    let web = packet::tcp4(
        CLIENT4,
        Ipv4Addr::new(198, 18, 0, 10),
        40000,
        WEB4.port,
        b"GET",
    );
    (other, web)
}

/// A bpffs directory for the other programs' pins, removed on drop.
struct ProgDir(PinDir);

impl Drop for ProgDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0 .0);
    }
}

/// `program` pinned at `<dir>/<name>`.
fn pinned(dir: &ProgDir, name: &str, program: &mut AuxProgram) -> std::path::PathBuf {
    let dir = &dir.0;
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join(name);
    program.pin(&path).unwrap();
    path
}

#[test]
fn packets_the_balancer_passes_go_to_the_chained_program() {
    if !require_root() {
        return;
    }
    let dir = ProgDir(PinDir::new("chain-progs"));
    let mut filter = AuxProgram::load(SINK_FRAGS_PROGRAM).unwrap();
    let filter_pin = pinned(&dir, "filter", &mut filter);
    let mut lab = Lab::new().unwrap();
    let (other, web) = frames();
    let action = |lab: &Lab, f: &[u8]| run(lab.dp.program().unwrap(), f).unwrap().action;
    assert_eq!(action(&lab, &other), XDP_PASS, "nothing chained yet");

    lab.dp.set_pass_to(Some(&filter_pin)).unwrap();
    assert_eq!(
        action(&lab, &other),
        XDP_DROP,
        "the chained filter drops it"
    );
    assert_eq!(filter.counter("SINK_COUNTER").unwrap(), 1);
    assert_eq!(
        action(&lab, &web),
        XDP_TX,
        "VIP traffic is balanced as before"
    );
    assert_eq!(filter.counter("SINK_COUNTER").unwrap(), 1);

    // A program without the balancer's multi-buffer flag, something not
    // pinned, something not a program: refused, the chain kept.
    let mut plain = AuxProgram::load(SINK_PROGRAM).unwrap();
    let plain_pin = pinned(&dir, "plain", &mut plain);
    let e = format!("{:#}", lab.dp.set_pass_to(Some(&plain_pin)).unwrap_err());
    assert!(e.contains("loaded as xdp.frags"), "{e}");
    let e = format!(
        "{:#}",
        lab.dp
            .set_pass_to(Some(&dir.0 .0.join("none")))
            .unwrap_err()
    );
    assert!(e.contains("is not a pinned program"), "{e}");
    assert_eq!(action(&lab, &other), XDP_DROP, "the chain is kept");

    lab.dp.set_pass_to(None).unwrap();
    assert_eq!(action(&lab, &other), XDP_PASS, "unchained");
    lab.dp.set_pass_to(None).unwrap();
}

#[test]
fn the_chain_survives_a_restart_of_the_balancer() {
    if !require_root() {
        return;
    }
    let progs = ProgDir(PinDir::new("chain-restart-progs"));
    let pins = PinDir::new("chain-restart");
    let mut filter = AuxProgram::load(SINK_FRAGS_PROGRAM).unwrap();
    let filter_pin = pinned(&progs, "filter", &mut filter);
    let sizes = integration_tests::lab::SIZES;
    let (other, _) = frames();
    {
        let mut dp = Dataplane::open(sizes, &pins.0).unwrap();
        dp.set_pass_to(Some(&filter_pin)).unwrap();
        assert_eq!(run(dp.program().unwrap(), &other).unwrap().action, XDP_DROP);
    }
    // A new process's program adopts the pinned chain as it is.
    let dp = Dataplane::open(sizes, &pins.0).unwrap();
    assert_eq!(run(dp.program().unwrap(), &other).unwrap().action, XDP_DROP);
}

#[test]
fn a_config_chaining_what_is_not_an_xdp_program_is_refused_whole() {
    if !require_root() {
        return;
    }
    let text = "interface = \"lb0\"\n[tables]\nmax_vips = 2\nmax_backends = 4\nring_size = 13\nmax_flows = 64\n";
    let c = Config::parse(text).unwrap();
    let dp = Dataplane::load(c.tables.sizes()).unwrap();
    let mut ctl = Controller::new(c.clone(), None, dp).unwrap();
    let dir = PinDir::new("chain-refused");
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut bad = c.clone();
    bad.chain.pass_to = Some(dir.0.join("missing"));
    let e = format!("{:#}", ctl.apply(bad).unwrap_err());
    assert!(
        e.contains("chain.pass_to: cannot chain") && e.contains("is not a pinned program"),
        "{e}"
    );
    assert_eq!(
        ctl.config().chain.pass_to,
        None,
        "the running config is kept"
    );
}
