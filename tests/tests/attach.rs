//! Attaching the programs to real interfaces (veth, inside a namespace of
//! the test's own), in each XDP mode.

use integration_tests::{netns::Netns, require_root};
use xdp_user::dataplane::{AttachMode, Dataplane, Decap, Sizes};

const SMALL: Sizes = Sizes {
    max_vips: 4,
    max_backends: 16,
    ring_size: 13,
    max_flows: 1024,
};

fn xdp_prog_on(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-d", "link", "show", dev]).unwrap();
    out.lines()
        .find(|l| l.trim_start().starts_with("prog/xdp"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn attaches_natively_and_generically_and_explains_refusals() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("attach").unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    {
        let _inside = ns.enter().unwrap();
        let mut dp = Dataplane::load(SMALL).unwrap();
        dp.attach("lb0", AttachMode::Native)
            .expect("veth supports native XDP");
        assert!(
            xdp_prog_on(&ns, "lb0").contains("prog/xdp"),
            "program attached to lb0"
        );

        let mut decap = Decap::load(4).unwrap();
        decap
            .attach("lb1", AttachMode::Generic)
            .expect("generic XDP works everywhere");
        assert!(!xdp_prog_on(&ns, "lb1").is_empty(), "decap attached to lb1");

        let err = Dataplane::load(SMALL)
            .unwrap()
            .attach("lb1", AttachMode::Offload)
            .expect_err("veth cannot offload");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("lb1") && msg.contains("Offload"),
            "error names interface and mode: {msg}"
        );

        let err = dp
            .attach("nosuchdev0", AttachMode::Native)
            .expect_err("no such interface");
        assert!(format!("{err:#}").contains("nosuchdev0"), "{err:#}");
        drop(dp);
        drop(decap);
    }
    // Dropping the loader detached the programs (the daemon pins to keep them).
    assert!(
        xdp_prog_on(&ns, "lb0").is_empty(),
        "lb0 detached: {}",
        xdp_prog_on(&ns, "lb0")
    );
    assert!(xdp_prog_on(&ns, "lb1").is_empty(), "lb1 detached");
}
