//! A pinned dataplane outlives its process: a new load adopts the maps (VIPs,
//! rings, conntrack), swaps its program into the pinned link, and `detach`
//! removes everything.

use integration_tests::{
    lab::{backend_addr, client_flow_frame, lab_config, ring_of, SIZES, WEB4},
    netns::Netns,
    ops::xdp_prog,
    require_root, run, PinDir,
};
use xdp_common::{backend_state, Backend, FlowState, XDP_TX};
use xdp_user::dataplane::{self, addr_bytes, AttachMode, Dataplane};

/// The lab's policy, and backends 0..3 of WEB4, up.
fn three_backends(dp: &mut Dataplane) {
    dp.set_config(&lab_config()).unwrap();
    for id in 0..3 {
        let (addr, family) = addr_bytes(backend_addr(id));
        dp.set_backend(
            id,
            &Backend {
                addr,
                family: u32::from(family),
                state: backend_state::UP,
                vip_id: WEB4.vip_id,
                ..Backend::default()
            },
        )
        .unwrap();
    }
}

#[test]
fn a_pinned_dataplane_survives_its_process_and_detach_removes_it() {
    if !require_root() {
        return;
    }
    let pins = PinDir::new("pin");
    let ns = Netns::new("pin").unwrap();
    ns.ip(&["link", "add", "lb0", "type", "veth", "peer", "name", "lb1"])
        .unwrap();
    ns.ip(&["link", "set", "lb0", "up"]).unwrap();
    let _inside = ns.enter().unwrap();

    let (frame, key) = client_flow_frame(40001);
    let first_prog;
    {
        let mut dp = Dataplane::open(SIZES, &pins.0).unwrap();
        assert!(!dp.adopted());
        assert!(
            !dp.attach_pinned("lb0", AttachMode::Native, false).unwrap(),
            "new link"
        );
        three_backends(&mut dp);
        // Tracking every flow, so the flow has an entry to survive.
        dp.add_vip(&WEB4.key(), 0, xdp_common::VIP_F_TRACK_ALL, 0)
            .unwrap();
        dp.write_ring(&WEB4.key(), &ring_of(&[0, 1, 2])).unwrap();
        assert_eq!(run(dp.program().unwrap(), &frame).unwrap().action, XDP_TX);
        assert!(dp.flow(&key).unwrap().is_some());
        first_prog = xdp_prog(&ns, "lb0").expect("attached");
    }
    // The process's handles are gone; the program is still attached.
    assert_eq!(
        xdp_prog(&ns, "lb0").as_deref(),
        Some(first_prog.as_str()),
        "still attached after drop"
    );

    // An older build pinned no VIP address filter: the new load builds
    // one from the adopted VIPs before its program runs, or every VIP
    // packet would pass as "not for a VIP". Nor a flow cache generation:
    // the new load pins one, so later daemons retire the cache it fills.
    std::fs::remove_file(pins.0.join("VIP_FILTER")).unwrap();
    std::fs::remove_file(pins.0.join("FLOW_CACHE_GEN")).unwrap();
    {
        let mut dp = Dataplane::open(SIZES, &pins.0).unwrap();
        assert!(dp.adopted());
        assert!(pins.0.join("FLOW_CACHE_GEN").exists());
        assert!(
            dp.attach_pinned("lb0", AttachMode::Native, false).unwrap(),
            "adopted the link"
        );
        let now = xdp_prog(&ns, "lb0").expect("still attached");
        assert_ne!(
            now, first_prog,
            "the new program replaced the old one in the link"
        );
        assert!(dp.flow(&key).unwrap().is_some(), "conntrack survived");
        assert_eq!(dp.vips().unwrap().len(), 1);
        assert_eq!(dp.backends().unwrap().len(), 3);
        assert_eq!(dp.ring(&WEB4.key()).unwrap(), ring_of(&[0, 1, 2]));
        // The flow's packets keep going to the same backend.
        let before = dp.flow(&key).unwrap().unwrap().backend_id;
        assert_eq!(run(dp.program().unwrap(), &frame).unwrap().action, XDP_TX);
        assert_eq!(dp.flow(&key).unwrap().unwrap().backend_id, before);
    }

    // Nor can the interface: the pinned link stays where it is.
    ns.ip(&["link", "add", "lb2", "type", "veth", "peer", "name", "lb3"])
        .unwrap();
    let err = Dataplane::open(SIZES, &pins.0)
        .unwrap()
        .attach_pinned("lb2", AttachMode::Native, false)
        .expect_err("moving a pinned dataplane to another interface is refused");
    assert!(format!("{err:#}").contains("not to lb2"), "{err:#}");
    assert!(xdp_prog(&ns, "lb2").is_none());

    // A map left by an incompatible build (here: STATS pinned as VIP_DROPS,
    // 8-byte values where VIP_DROPS has 16) is refused, not adopted.
    {
        let drops_pin = pins.0.join("VIP_DROPS");
        // Hold the real map by fd while its pin is swapped (bpffs has no
        // rename).
        let real = aya::maps::MapData::from_pin(&drops_pin).unwrap();
        std::fs::remove_file(&drops_pin).unwrap();
        aya::maps::MapData::from_pin(pins.0.join("STATS"))
            .unwrap()
            .pin(&drops_pin)
            .unwrap();
        let err = Dataplane::open(SIZES, &pins.0)
            .err()
            .expect("incompatible map refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("VIP_DROPS") && msg.contains("incompatible"),
            "{msg}"
        );
        std::fs::remove_file(&drops_pin).unwrap();
        real.pin(&drops_pin).unwrap();
    }

    // Sizes cannot change under a pinned dataplane.
    let err = Dataplane::open(
        xdp_user::dataplane::Sizes {
            max_flows: 2048,
            ..SIZES
        },
        &pins.0,
    )
    .err()
    .expect("size mismatch refused");
    assert!(format!("{err:#}").contains("FLOWS"), "{err:#}");

    assert!(dataplane::detach(&pins.0).unwrap());
    assert_eq!(xdp_prog(&ns, "lb0"), None, "detach removed the program");
    assert!(!pins.0.exists());
}

#[test]
fn an_older_builds_reshaped_config_and_counters_are_carried_over() {
    if !require_root() {
        return;
    }
    let pins = PinDir::new("pin-up");
    let older = PinDir::new("pin-older");
    // The older build's STATS had fewer reasons: the decap program's
    // three-slot per-CPU counters stand in for it, with counts in them.
    let decap = dataplane::Decap::open(1, &older.0).unwrap();
    let prog = decap.program().unwrap();
    for _ in 0..5 {
        run(prog, &integration_tests::packet::arp()).unwrap();
    }
    let old_counts = decap.stats().unwrap();
    assert_eq!(old_counts.iter().sum::<u64>(), 5);
    drop(Dataplane::open(SIZES, &pins.0).unwrap());
    let older_stats = older.0.join("DECAP_STATS");
    for name in ["STATS", "CONFIG"] {
        let pin = pins.0.join(name);
        std::fs::remove_file(&pin).unwrap();
        // Its CONFIG: a value of another size (8 bytes).
        aya::maps::MapData::from_pin(&older_stats)
            .unwrap()
            .pin(&pin)
            .unwrap();
    }
    let dp = Dataplane::open(SIZES, &pins.0).expect("an upgrade carries reshaped maps over");
    assert!(dp.adopted());
    let stats = dp.stats().unwrap();
    assert_eq!(stats[..3], old_counts, "counters never go back");
    assert_eq!(stats[3..].iter().sum::<u64>(), 0);
    let config = aya::maps::MapData::from_pin(pins.0.join("CONFIG"))
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(
        config.value_size() as usize,
        std::mem::size_of::<xdp_common::Config>(),
        "CONFIG pinned in this build's shape"
    );
    drop(dp);
    assert!(dataplane::detach(&pins.0).unwrap());
}

/// `bpf(2)` for the older build's maps this test makes by hand.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> i64 {
    // SAFETY: each caller passes the bpf_attr member `cmd` expects, whose
    // pointers reference live buffers of the sizes it states.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
}

/// A map shaped as an older build made it, pinned at `path`, holding
/// `entries`.
fn pin_older_map(
    path: &std::path::Path,
    kind: u32,
    flags: u32,
    max: u32,
    entries: &[(Vec<u8>, Vec<u8>)],
) {
    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Update {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let (k, v) = (entries[0].0.len() as u32, entries[0].1.len() as u32);
    let fd = bpf(
        0,
        &mut Create {
            map_type: kind,
            key_size: k,
            value_size: v,
            max_entries: max,
            map_flags: flags,
        },
    );
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    for (key, value) in entries {
        let rc = bpf(
            2,
            &mut Update {
                map_fd: fd as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_ptr() as u64,
                flags: 0,
            },
        );
        assert_eq!(
            rc,
            0,
            "BPF_MAP_UPDATE_ELEM: {}",
            std::io::Error::last_os_error()
        );
    }
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let rc = bpf(
        6,
        &mut Pin {
            pathname: c.as_ptr() as u64,
            bpf_fd: fd as u32,
            file_flags: 0,
        },
    );
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn an_older_builds_backends_and_conntrack_are_carried_over() {
    if !require_root() {
        return;
    }
    let pins = PinDir::new("pin-gen");
    {
        let mut dp = Dataplane::open(SIZES, &pins.0).unwrap();
        dp.add_vip(&WEB4.key(), WEB4.vip_id, 0, 0).unwrap();
        dp.write_ring(&WEB4.key(), &ring_of(&[0, 1, 2])).unwrap();
    }
    // Before generations: 36-byte backends, 8-byte conntrack values; the
    // flow is on backend 3, which the ring does not name, so its entry is
    // kept.
    let backend = Backend {
        addr: addr_bytes(backend_addr(3)).0,
        family: 4,
        state: backend_state::DRAINING,
        vip_id: WEB4.vip_id,
        ..Backend::default()
    };
    let old_backend = bytemuck::bytes_of(&backend)[..36].to_vec();
    let (_, flow) = client_flow_frame(40001);
    let old_flow = [3u32.to_ne_bytes(), 77u32.to_ne_bytes()].concat();
    for name in ["BACKENDS", "FLOWS"] {
        std::fs::remove_file(pins.0.join(name)).unwrap();
    }
    pin_older_map(
        &pins.0.join("BACKENDS"),
        2, // BPF_MAP_TYPE_ARRAY
        0,
        SIZES.max_backends,
        &[(3u32.to_ne_bytes().to_vec(), old_backend)],
    );
    pin_older_map(
        &pins.0.join("FLOWS"),
        9, // BPF_MAP_TYPE_LRU_HASH
        2, // BPF_F_NO_COMMON_LRU
        SIZES.max_flows,
        &[(bytemuck::bytes_of(&flow).to_vec(), old_flow)],
    );
    let dp = Dataplane::open(SIZES, &pins.0).expect("an upgrade carries the older maps over");
    assert_eq!(
        dp.backend(3).unwrap(),
        Backend {
            generation: 0,
            ..backend
        }
    );
    let carried = dp.flow(&flow).unwrap().expect("conntrack carried over");
    assert_eq!(
        (carried.backend_id, carried.generation, carried.vip_serial),
        (3, 0, 0),
        "conntrack carried over, on the backend's generation"
    );
    assert!(carried.last_seen > 0, "carried as seen now");
    drop(dp);
    assert!(dataplane::detach(&pins.0).unwrap());
}

/// The release before ring-first placement (85c6d68) tracked every flow,
/// with 12-byte conntrack values. An upgrade keeps the entries of flows the
/// ring now places on another backend (they were placed before a ring
/// change) and marks their slots, so they keep their backend; the rest the
/// ring places as their entries did, without state.
#[test]
fn the_previous_releases_conntrack_keeps_every_flow_on_its_backend() {
    if !require_root() {
        return;
    }
    let pins = PinDir::new("pin-ringfirst");
    let ring = ring_of(&[0, 1, 2]);
    let generations = {
        let mut dp = Dataplane::open(SIZES, &pins.0).unwrap();
        three_backends(&mut dp);
        dp.add_vip(&WEB4.key(), WEB4.vip_id, 0, 0).unwrap();
        dp.write_ring(&WEB4.key(), &ring).unwrap();
        (0..3)
            .map(|id| dp.backend(id).unwrap().generation)
            .collect::<Vec<_>>()
    };
    // Flow `a` on a backend its ring slot does not name now; flow `b` on
    // the one it does.
    let owner = |port| {
        let (_, k) = client_flow_frame(port);
        integration_tests::lab::predicted_backend(&WEB4, &ring, &k)
    };
    let (fa, a) = client_flow_frame(40001);
    let (fb, b) = client_flow_frame(40002);
    let a_on = (owner(40001) + 1) % 3;
    let b_on = owner(40002);
    let old = |backend: u32| {
        [backend, 0x1234_5678, generations[backend as usize]]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect::<Vec<u8>>()
    };
    std::fs::remove_file(pins.0.join("FLOWS")).unwrap();
    pin_older_map(
        &pins.0.join("FLOWS"),
        9, // BPF_MAP_TYPE_LRU_HASH
        2, // BPF_F_NO_COMMON_LRU
        1 << 20,
        &[
            (bytemuck::bytes_of(&a).to_vec(), old(a_on)),
            (bytemuck::bytes_of(&b).to_vec(), old(b_on)),
        ],
    );
    // Its rings had 4-byte entries: the VIP's live half (written once, so
    // half 1) as backend ids.
    let live_half = 1;
    std::fs::remove_file(pins.0.join("RINGS")).unwrap();
    let base = (WEB4.vip_id * 2 + live_half) * SIZES.ring_size;
    pin_older_map(
        &pins.0.join("RINGS"),
        2, // BPF_MAP_TYPE_ARRAY
        0,
        SIZES.max_vips * 2 * SIZES.ring_size,
        &(0u32..)
            .zip(&ring)
            .map(|(i, id)| ((base + i).to_ne_bytes().to_vec(), id.to_ne_bytes().to_vec()))
            .collect::<Vec<_>>(),
    );
    let dp = Dataplane::open(SIZES, &pins.0).expect("the upgrade carries conntrack over");
    let kept: Option<FlowState> = dp.flow(&a).unwrap();
    assert_eq!(
        kept.map(|s| s.backend_id),
        Some(a_on),
        "the flow off the ring kept its entry"
    );
    assert_eq!(
        dp.flow(&b).unwrap(),
        None,
        "the ring places the other as its entry did"
    );
    assert!(
        !dp.marks().unwrap().is_empty(),
        "the kept flow's slot is marked"
    );
    let to = |frame: &[u8]| -> u32 {
        let out = run(dp.program().unwrap(), frame).unwrap();
        assert_eq!(out.action, XDP_TX);
        let dst = IpAddrOut(&out.output).v4();
        (0..3)
            .find(|&id| backend_addr(id) == std::net::IpAddr::V4(dst))
            .expect("a backend")
    };
    assert_eq!(to(&fa), a_on, "kept its backend across the upgrade");
    assert_eq!(to(&fb), b_on);
    drop(dp);
    assert!(dataplane::detach(&pins.0).unwrap());
}

/// The outer destination of an encapsulated IPv4 frame.
struct IpAddrOut<'a>(&'a [u8]);

impl IpAddrOut<'_> {
    fn v4(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(self.0[30], self.0[31], self.0[32], self.0[33])
    }
}
