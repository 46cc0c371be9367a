//! Attaching the programs to real interfaces (veth, inside a namespace of
//! the test's own), in each XDP mode.

use integration_tests::{netns::Netns, require_root, PinDir, Scratch};
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
            msg.contains("lb1") && msg.contains("offload mode"),
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

#[test]
fn decap_cli_attaches_pinned_updates_and_detaches() {
    use integration_tests::{daemon::run_in, lab::Lab, packet, run, PinDir};
    if !require_root() {
        return;
    }
    let pins = PinDir::new("decapcli");
    let pin_arg = pins.0.to_str().unwrap().to_owned();
    let ns = Netns::new("decapcli").unwrap();
    ns.ip(&["link", "add", "be0", "type", "veth", "peer", "name", "be1"])
        .unwrap();
    ns.ip(&["link", "set", "be0", "up"]).unwrap();
    let cli = |args: &[&str]| run_in(&ns, args, std::time::Duration::from_secs(20)).unwrap();

    let out = cli(&[
        "decap",
        "attach",
        "--interface",
        "be0",
        "--vip",
        "198.18.0.99",
        "--pin-dir",
        &pin_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("attached"));
    assert!(
        xdp_prog_on(&ns, "be0").contains("decap"),
        "{}",
        xdp_prog_on(&ns, "be0")
    );

    // A second run replaces the VIP set in place.
    let out = cli(&[
        "decap",
        "attach",
        "--interface",
        "be0",
        "--vip",
        "198.18.0.10",
        "--vip",
        "2001:db8::10",
        "--pin-dir",
        &pin_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("updated"));

    // The pinned VIP set is live: a tunnel packet for 198.18.0.10 is ended,
    // one for the dropped 198.18.0.99 is not.
    let lab = Lab::new().unwrap();
    let frame = packet::tcp4(
        integration_tests::lab::CLIENT4,
        "198.18.0.10".parse().unwrap(),
        40000,
        80,
        b"x",
    );
    let enc = run(lab.dp.program().unwrap(), &frame).unwrap().output;
    let decap = xdp_user::dataplane::Decap::open(64, &pins.0).unwrap();
    let before = decap.stats().unwrap()[xdp_common::decap_reason::DECAPSULATED as usize];
    let r = run(decap.program().unwrap(), &enc).unwrap();
    assert_eq!(
        &r.output[12..],
        &frame[12..],
        "decapsulated by the pinned VIP set"
    );
    assert_eq!(
        decap.stats().unwrap()[xdp_common::decap_reason::DECAPSULATED as usize],
        before + 1
    );
    drop(decap);

    // Bad input, precise errors.
    let out = cli(&[
        "decap",
        "attach",
        "--interface",
        "be0",
        "--vip",
        "not-an-ip",
        "--pin-dir",
        &pin_arg,
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not-an-ip"));
    let out = cli(&[
        "decap",
        "attach",
        "--interface",
        "be1",
        "--vip",
        "198.18.0.10",
        "--pin-dir",
        &pin_arg,
    ]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not to be1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&["decap", "detach", "--pin-dir", &pin_arg]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("detached"));
    assert!(xdp_prog_on(&ns, "be0").is_empty(), "detached");
}

#[test]
fn jumbo_mtu_interfaces_carry_the_programs_and_frames_leave_from_their_mac() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("jumbo").unwrap();
    ns.ip(&[
        "link",
        "add",
        "lb0",
        "mtu",
        "9000",
        "address",
        "02:00:00:00:90:01",
        "type",
        "veth",
        "peer",
        "name",
        "lb1",
        "mtu",
        "9000",
    ])
    .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    let _inside = ns.enter().unwrap();
    // The old build's programs were not frags-aware: the kernel refused
    // them on a veth whose MTU exceeds a page.
    let mut dp = Dataplane::load(SMALL).unwrap();
    dp.attach("lb0", AttachMode::Native)
        .expect("the balancer on an MTU 9000 veth");
    let mut decap = Decap::load(4).unwrap();
    decap
        .attach("lb1", AttachMode::Native)
        .expect("decap on an MTU 9000 veth");
    assert!(xdp_prog_on(&ns, "lb0").contains("prog/xdp"));
    assert!(xdp_prog_on(&ns, "lb1").contains("prog/xdp"));
    assert_eq!(
        dp.config().unwrap().source_mac,
        [0x02, 0, 0, 0, 0x90, 0x01],
        "attaching takes the interface's MAC as the frames' source"
    );
}

/// `[libxdp]` where the kernel refuses extension programs (this host's
/// 6.18: EPERM), so libxdp's dispatcher cannot share the interface: the
/// start is refused naming the cause and the alternative, and leaves
/// nothing behind (no program, no dispatcher pins, no xdplb pins). Where
/// the kernel allows them, the balancer is in a dispatcher there instead
/// (the VM bed tests that beside xdp-filter).
#[test]
fn libxdp_sharing_where_extensions_are_refused_says_why_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let dispatcher = std::path::Path::new("/usr/lib/x86_64-linux-gnu/bpf/xdp-dispatcher.o");
    assert!(
        dispatcher.is_file(),
        "libxdp1's xdp-dispatcher.o is missing (cargo xtask setup installs xdp-tools)"
    );
    let ns = Netns::new("libxdp").unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    ns.ip(&["link", "set", "lb1", "up"]).unwrap();
    let scratch = Scratch::new("libxdp");
    let pins = PinDir::new("libxdp");
    let pin_dir = pins.0.display().to_string();
    let config = scratch.0.join("xdplb.toml");
    std::fs::write(
        &config,
        format!(
            "interface = \"lb0\"\n\
             [daemon]\npin_dir = \"{pin_dir}\"\n\
             [api]\nsocket = \"{}\"\n\
             [libxdp]\nrun_priority = 60\ndispatcher = \"{}\"\n\
             [forwarding]\ngateway_mac = \"02:00:00:00:00:fe\"\n\
             [[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nprotocol = \"tcp\"\n\
             forwarding = \"ipip\"\nhealth = {{ kind = \"none\" }}\n\
             [[vip.backend]]\naddress = \"198.18.210.3\"\n",
            scratch.0.join("api.sock").display(),
            dispatcher.display()
        ),
    )
    .unwrap();
    let out = integration_tests::daemon::run_in(
        &ns,
        &["run", "--config", config.to_str().unwrap()],
        std::time::Duration::from_secs(60),
    );
    let index = ns.ip(&["-o", "link", "show", "lb0"]).unwrap();
    let index = index.split(':').next().unwrap().trim().to_owned();
    let dispatcher_pins = std::fs::read_dir("/sys/fs/bpf/xdp")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("dispatch-{index}-"))
        })
        .count();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            // Extension programs allowed: the daemon runs, in a dispatcher.
            let prog = xdp_prog_on(&ns, "lb0");
            panic!(
                "the daemon kept running ({e:#}); lb0: {prog}, dispatcher pins {dispatcher_pins}"
            );
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the start must be refused: {stderr}");
    assert!(
        stderr.contains("refuses extension programs") && stderr.contains("[chain] pass_to"),
        "the refusal names the cause and the alternative: {stderr}"
    );
    assert_eq!(
        xdp_prog_on(&ns, "lb0"),
        "",
        "lb0 runs nothing after the refusal"
    );
    assert_eq!(dispatcher_pins, 0, "no dispatcher pinned for lb0");
    let left: Vec<_> = std::fs::read_dir(&pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the refused start left pins in {pin_dir}: {left:?}"
    );
}
