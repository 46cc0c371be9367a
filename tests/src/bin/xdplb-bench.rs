//! `cargo xtask bench`: every figure beside a baseline measured in the same
//! run, on this machine.
//!
//! Dataplane: BPF_PROG_TEST_RUN of `xdp_lb` per path behind the harness
//! `xdp_bench`, next to the empty `xdp_pass` behind it. The kernel does not
//! restore the buffer between repeats (an encapsulating path would
//! encapsulate its own output) and single calls carry a large fixed cost at
//! 10 ns granularity, so the harness restores the frame on each of a million
//! runs per call and tail-calls the program under test.
//!
//! Control plane: Maglev population, ring writes, detection-to-dataplane
//! latency, and health-check CPU for 1,000 and 10,000 backends.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use integration_tests::{
    lab::{Lab, CLIENT4, CLIENT6, DNS4, DSR, MIXED, WEB4, WEB6},
    netns::Netns,
    packet, PinDir,
};
use xdp_user::{
    config::{CheckKind, Config, HealthCheck},
    controller::Controller,
    dataplane::{AuxProgram, Dataplane, Sizes, PASS_PROGRAM},
    health::{CheckKey, CheckResult, CheckSpec, Checks},
    loadgen::LoadSpec,
    maglev::{measure_population, populate, RingBackend},
};

const SIZES: Sizes = Sizes {
    max_vips: 8,
    max_backends: 64,
    ring_size: 65537,
    max_flows: 1 << 20,
};
const RUNS: usize = 11;
/// Runs per harness call, calls per round, rounds (each round measures the
/// baseline and xdp_lb once).
const HARNESS_REPEAT: u32 = 100_000;
const HARNESS_CALLS: usize = 10;
const HARNESS_ROUNDS: usize = 5;

fn min_f(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MAX, f64::min)
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Mean ns per run of `target` behind the harness (`xdp_bench`), which
/// restores `frame` before every run, over HARNESS_REPEAT runs per call:
/// one sample per call, HARNESS_CALLS calls.
fn harnessed(target: &Xdp, frame: &[u8], flows: u32, want_action: u32) -> Result<Vec<f64>> {
    let bench = AuxProgram::bench(flows, frame, target)?;
    let prog = bench.program()?;
    let mut out = vec![0u8; frame.len() + 256];
    let mut samples = Vec::new();
    for _ in 0..HARNESS_CALLS {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: HARNESS_REPEAT,
            ..TestRunOptions::default()
        })?;
        if r.return_value != want_action {
            bail!("expected action {want_action}, got {}", r.return_value);
        }
        samples.push(r.duration.as_nanos() as f64);
    }
    Ok(samples)
}

/// What `xdplb trace` costs an established packet: off (the default: one
/// map lookup and a branch), and on for another client (the filter is
/// checked, nothing is sent), interleaved rounds.
fn trace_cost(lab: &mut Lab, empty: &Xdp, frame: &[u8]) -> Result<()> {
    let other_client = xdp_common::TraceFilter {
        enabled: 1,
        vip_id: xdp_common::TRACE_ANY_VIP,
        client: xdp_user::dataplane::addr_bytes(IpAddr::V4(Ipv4Addr::new(198, 18, 99, 0))).0,
        client_family: u32::from(xdp_common::FAMILY_V4),
        client_len: 24,
        ..Default::default()
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut base = Vec::new();
    let tx = xdp_common::XDP_TX;
    for _ in 0..HARNESS_ROUNDS {
        base.extend(harnessed(empty, frame, 1, xdp_common::XDP_PASS)?);
        lab.dp
            .set_trace_filter(&xdp_common::TraceFilter::default())?;
        off.extend(harnessed(lab.dp.program()?, frame, 1, tx)?);
        lab.dp.set_trace_filter(&other_client)?;
        on.extend(harnessed(lab.dp.program()?, frame, 1, tx)?);
    }
    lab.dp
        .set_trace_filter(&xdp_common::TraceFilter::default())?;
    let (off, on, base) = (min_f(&off), min_f(&on), min_f(&base));
    println!("\n`xdplb trace`, IPv4 TCP established, IPIP (ns, xdp_lb's own):\n");
    println!("| trace | ns | difference |\n|---|---:|---:|");
    println!("| off (the default) | {:.1} | |", off - base);
    println!(
        "| on, for another client (filter checked, no event) | {:.1} | {:+.1} |",
        on - base,
        on - off
    );
    println!(
        "\nWhile off, the check is one array lookup and a branch: below the clock's \
         resolution here, so it is folded into every figure above."
    );
    Ok(())
}

/// Program sizes as the kernel holds them: translated and JIT-compiled.
fn sizes(prog: &Xdp) -> Result<(u32, u32)> {
    let info = prog.info()?;
    Ok((info.size_translated().unwrap_or(0), info.size_jitted()))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// One path of the dataplane bench: a frame, how many flows the harness
/// cycles through (u32::MAX: a new one every run), the verdict, and
/// whether the peer balancer has it too.
#[derive(Clone)]
struct Path {
    name: &'static str,
    frame: Vec<u8>,
    flows: u32,
    action: u32,
    peer: bool,
    /// Each call in a second of its own: new flows at a rate a new-flow
    /// limit (Katran's 125,000 a second per CPU, xdp_lb's conntrack_rate)
    /// lets through, so they are placed and tracked, not waved through
    /// as a flood.
    paced: bool,
    /// The interface the frames arrive on (xdp_md's ingress_ifindex); 0:
    /// none.
    ingress: u32,
}

/// Calls per round of a paced path (each waits for a new second).
const PACED_CALLS: usize = 3;

/// Harness calls before measuring: enough runs to visit every flow once
/// (and fill a 1M-entry table for new flows).
fn warm_up_calls(flows: u32) -> usize {
    let runs = if flows == u32::MAX {
        1_200_000
    } else {
        u64::from(flows)
    };
    (runs.div_ceil(u64::from(HARNESS_REPEAT)) as usize).max(1)
}

/// A harness kept across rounds, so a round-robin walks on where the last
/// call stopped.
struct Harnessed {
    bench: AuxProgram,
    frame: Vec<u8>,
    action: u32,
    paced: bool,
    ingress: u32,
}

impl Harnessed {
    fn new(target: &Xdp, plain: bool, path: &Path) -> Result<Self> {
        let bench = if plain {
            AuxProgram::bench_plain(path.flows, &path.frame, target)?
        } else {
            AuxProgram::bench(path.flows, &path.frame, target)?
        };
        Ok(Self {
            bench,
            frame: path.frame.clone(),
            action: path.action,
            paced: path.paced,
            ingress: path.ingress,
        })
    }

    /// ns per run of each of `calls` calls.
    fn calls(&self, calls: usize) -> Result<Vec<f64>> {
        let prog = self.bench.program()?;
        let mut out = vec![0u8; self.frame.len() + 256];
        let ctx = xdp_user::dataplane::test_run_ctx(self.frame.len(), self.ingress);
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            if self.paced {
                std::thread::sleep(Duration::from_millis(1050));
            }
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&self.frame),
                data_out: Some(&mut out),
                ctx_in: (self.ingress != 0).then_some(&ctx[..]),
                repeat: HARNESS_REPEAT,
                ..TestRunOptions::default()
            })?;
            if r.return_value != self.action {
                bail!("expected action {}, got {}", self.action, r.return_value);
            }
            samples.push(r.duration.as_nanos() as f64);
        }
        Ok(samples)
    }

    fn median(&self) -> Result<f64> {
        let mut v = self.calls(if self.paced {
            PACED_CALLS
        } else {
            HARNESS_CALLS
        })?;
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each program's own ns on `path` (its harness minus the empty program's,
/// per round), the median over interleaved rounds.
fn own_ns(empty: &Xdp, subjects: &[(&Xdp, bool)], path: &Path) -> Result<Vec<f64>> {
    let base = Harnessed::new(
        empty,
        false,
        &Path {
            action: xdp_common::XDP_PASS,
            paced: false,
            ingress: 0,
            ..path.clone()
        },
    )?;
    let under: Vec<Harnessed> = subjects
        .iter()
        .map(|&(prog, plain)| Harnessed::new(prog, plain, path))
        .collect::<Result<_>>()?;
    for h in &under {
        h.calls(warm_up_calls(path.flows))?;
    }
    let mut own = vec![Vec::new(); under.len()];
    for _ in 0..HARNESS_ROUNDS {
        let b = base.median()?;
        for (i, h) in under.iter().enumerate() {
            own[i].push(h.median()? - b);
        }
    }
    Ok(own.into_iter().map(median_f).collect())
}

/// Katran beside xdp_lb, when `--peer katran=DIR` names a checkout.
struct Peer {
    katran: integration_tests::katran::Katran,
    commit: String,
}

fn katran_peer(dir: &std::path::Path) -> Result<Peer> {
    use integration_tests::katran::{build, commit, Katran};
    let out = std::env::temp_dir().join(format!("xdplb-bench-katran-{}", std::process::id()));
    let object = build(dir, &out)?;
    let mut katran = Katran::load(&object)?;
    let _ = std::fs::remove_dir_all(&out);
    let ring_of = |n: usize| -> Vec<u32> {
        let members: Vec<RingBackend> = (0..n as u32)
            .map(|id| RingBackend {
                identity: id.to_be_bytes().to_vec(),
                weight: 1,
                id,
            })
            .collect();
        populate(&members, integration_tests::katran::RING_SIZE)
    };
    let gateway = integration_tests::packet::GATEWAY_MAC;
    let addrs = |v: &integration_tests::lab::LabVip| -> Vec<IpAddr> {
        v.backends
            .iter()
            .map(|&id| integration_tests::lab::backend_addr(id))
            .collect()
    };
    katran.add_vip(
        0,
        (WEB4.addr, WEB4.port, WEB4.proto),
        &addrs(&WEB4),
        1,
        &ring_of(3),
        gateway,
    )?;
    katran.add_vip(
        1,
        (WEB6.addr, WEB6.port, WEB6.proto),
        &addrs(&WEB6),
        4,
        &ring_of(2),
        gateway,
    )?;
    Ok(Peer {
        katran,
        commit: commit(dir),
    })
}

fn dataplane(path_filter: Option<&str>, peer_dir: Option<&std::path::Path>) -> Result<()> {
    println!(
        "\n## Dataplane: ns per packet, harness method ({HARNESS_ROUNDS} rounds of {HARNESS_CALLS} calls of {HARNESS_REPEAT} runs, each run on a restored frame; medians)"
    );
    let mut lab = Lab::with_sizes(SIZES)?;
    let pass = AuxProgram::load(PASS_PROGRAM)?;
    let empty = pass.program()?;
    let peer = peer_dir.map(katran_peer).transpose()?;
    let vip4 = |v: &integration_tests::lab::LabVip| match v.addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let vip6 = match WEB6.addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!(),
    };
    // 64 bytes of payload: every frame is longer than the harness template.
    let payload = [b'x'; 64];
    let web4 = vip4(&WEB4);
    let ack = |f: Vec<u8>| packet::with_tcp_flags(f, packet::TCP_ACK);
    let established = ack(packet::tcp4(CLIENT4, web4, 40000, 80, &payload));
    let syn = packet::with_tcp_flags(
        packet::tcp4(CLIENT4, web4, 40000, 80, &payload),
        packet::TCP_SYN,
    );
    let tcp6 = ack(packet::tcp6(CLIENT6, vip6, 40000, 443, &payload));
    let syn6 = packet::with_tcp_flags(
        packet::tcp6(CLIENT6, vip6, 40000, 443, &payload),
        packet::TCP_SYN,
    );
    let (pass_action, tx) = (xdp_common::XDP_PASS, xdp_common::XDP_TX);
    let path = |name, frame: &Vec<u8>, flows, action, peer| Path {
        name,
        frame: frame.clone(),
        flows,
        action,
        peer,
        paced: false,
        ingress: 0,
    };
    let paced = |p: Path| Path { paced: true, ..p };
    let mut paths = vec![
        path(
            "not for a VIP (pass)",
            &packet::tcp4(CLIENT4, Ipv4Addr::new(198, 18, 0, 99), 40000, 80, &payload),
            1,
            pass_action,
            true,
        ),
        path(
            "IPv4 TCP established, one flow repeated",
            &established,
            1,
            tx,
            true,
        ),
        path(
            "IPv6 TCP established, one flow repeated",
            &tcp6,
            1,
            tx,
            true,
        ),
        path(
            "IPv4 TCP established, 1,000 flows round-robin",
            &established,
            1_000,
            tx,
            true,
        ),
        path(
            "IPv4 TCP established, 100,000 flows round-robin",
            &established,
            100_000,
            tx,
            true,
        ),
        path(
            "IPv4 TCP established, 1,000,000 flows round-robin",
            &established,
            1_000_000,
            tx,
            true,
        ),
        path(
            "IPv6 TCP established, 100,000 flows round-robin",
            &tcp6,
            100_000,
            tx,
            true,
        ),
        paced(path(
            "new flow (SYN, a new 5-tuple each), IPv4, full table, 100,000 a second",
            &syn,
            u32::MAX,
            tx,
            true,
        )),
        paced(path(
            "new flow (SYN, a new 5-tuple each), IPv6, full table, 100,000 a second",
            &syn6,
            u32::MAX,
            tx,
            true,
        )),
        path(
            "SYN flood (a new source every run, back to back), IPv4",
            &syn,
            u32::MAX,
            tx,
            true,
        ),
        path(
            "IPv4 TCP established, IPv4-in-IPv6",
            &packet::tcp4(CLIENT4, vip4(&MIXED), 40000, 80, &payload),
            1,
            tx,
            false,
        ),
        path(
            "IPv4 UDP, port-less VIP, IPIP",
            &packet::udp4(CLIENT4, vip4(&DNS4), 41000, 53, &payload),
            1,
            tx,
            false,
        ),
        path(
            "IPv4 TCP established, L2 DSR",
            &packet::tcp4(CLIENT4, vip4(&DSR), 40000, 80, &payload),
            1,
            tx,
            false,
        ),
        path(
            "IPv4 TCP established, 8954-byte jumbo frame (multi-buffer), IPIP",
            &ack(packet::tcp4(CLIENT4, web4, 40001, 80, &[b'j'; 8900])),
            1,
            tx,
            false,
        ),
    ];
    paths.retain(|p| path_filter.is_none_or(|f| p.name.contains(f)));
    match &peer {
        Some(p) => {
            println!("\nKatran: `balancer.bpf.c` at {}, built here with clang; one 1M-entry LRU per CPU.\n", p.commit);
            println!("| path | xdp_lb ns | Katran ns | xdp_lb / Katran |\n|---|---:|---:|---:|");
        }
        None => println!("\n| path | xdp_lb ns |\n|---|---:|"),
    }
    for p in &paths {
        match (&peer, p.peer) {
            (Some(peer), true) => {
                let ns = own_ns(
                    empty,
                    &[(lab.dp.program()?, false), (peer.katran.program(), true)],
                    p,
                )?;
                println!(
                    "| {} | {:.0} | {:.0} | {:.2} |",
                    p.name,
                    ns[0],
                    ns[1],
                    ns[0] / ns[1].max(1.0)
                );
            }
            (Some(_), false) => {
                let ns = own_ns(empty, &[(lab.dp.program()?, false)], p)?;
                println!("| {} | {:.0} | | |", p.name, ns[0]);
            }
            (None, _) => {
                let ns = own_ns(empty, &[(lab.dp.program()?, false)], p)?;
                println!("| {} | {:.0} |", p.name, ns[0]);
            }
        }
    }
    if path_filter.is_some() {
        return Ok(());
    }
    // Where the ring changed, xdp_lb tracks flows as conntrack does: the
    // cost of a slot while it is marked, measured with every slot tracked.
    lab.dp.add_vip(
        &WEB4.key(),
        WEB4.vip_id,
        xdp_common::VIP_F_TRACK_ALL,
        WEB4.mode,
    )?;
    println!(
        "\nxdp_lb where conntrack is in use (every slot of the VIP tracked, `VIP_F_TRACK_ALL`):\n"
    );
    println!("| path | xdp_lb ns |\n|---|---:|");
    for (name, frame, flows) in [
        (
            "IPv4 TCP established, 100,000 flows round-robin, tracked",
            &established,
            100_000,
        ),
        (
            "new flow (SYN, a new 5-tuple each), IPv4, tracked",
            &syn,
            u32::MAX,
        ),
    ] {
        let ns = own_ns(
            empty,
            &[(lab.dp.program()?, false)],
            &path(name, frame, flows, tx, false),
        )?;
        println!("| {name} | {:.0} |", ns[0]);
    }
    lab.dp
        .add_vip(&WEB4.key(), WEB4.vip_id, WEB4.flags, WEB4.mode)?;
    features(&mut lab, empty, &established)?;
    trace_cost(&mut lab, empty, &established)?;
    let (lb_x, lb_j) = sizes(lab.dp.program()?)?;
    let (pass_x, pass_j) = sizes(empty)?;
    println!("\n| program | xlated bytes | jited bytes |\n|---|---:|---:|");
    println!("| xdp_lb | {lb_x} | {lb_j} |\n| xdp_pass | {pass_x} | {pass_j} |");
    if let Some(p) = &peer {
        let (k_x, k_j) = sizes(p.katran.program())?;
        println!("| Katran | {k_x} | {k_j} |");
    }
    memory(peer.as_ref())?;
    println!(
        "\nThe harness restores the frame (packet start, first {} bytes, the flow's source) and \
         tail-calls the program; each program's own ns is its figure behind the harness minus \
         the empty program's behind it, per round.",
        xdp_common::GEN_HEADER_LEN
    );
    Ok(())
}

/// xdp_lb on VIPs that use a feature each (a VIP without it pays one flag
/// test, which the rows above include): a hash choice, QUIC routing, a
/// source route to a subset, and a program chained after the balancer.
fn features(lab: &mut Lab, empty: &Xdp, established: &[u8]) -> Result<()> {
    println!("\nxdp_lb on VIPs that use a feature:\n");
    println!("| path | xdp_lb ns |\n|---|---:|");
    let row_on = |lab: &Lab, name: &'static str, frame: Vec<u8>, action: u32, ingress: u32| {
        let p = Path {
            name,
            frame,
            flows: 1,
            action,
            peer: false,
            paced: false,
            ingress,
        };
        let ns = own_ns(empty, &[(lab.dp.program()?, false)], &p)?;
        println!("| {name} | {:.0} |", ns[0]);
        Ok::<_, anyhow::Error>(())
    };
    let row = |lab: &Lab, name: &'static str, frame: Vec<u8>, action: u32| {
        row_on(lab, name, frame, action, 0)
    };
    let payload = [b'x'; 64];
    let (tx, pass) = (xdp_common::XDP_TX, xdp_common::XDP_PASS);
    let vip4 = |a: IpAddr| match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    // hash = "source_port" on WEB4.
    let flags = xdp_common::VIP_F_HASH_SOURCE_PORT;
    lab.dp.add_vip(&WEB4.key(), WEB4.vip_id, flags, WEB4.mode)?;
    row(
        lab,
        "IPv4 TCP established, hash = source_port",
        established.to_vec(),
        tx,
    )?;
    // QUIC on DNS4: a short header whose connection ID names backend 7.
    let quic = xdp_common::VIP_F_QUIC | (2 << xdp_common::quic::SERVER_ID_LEN_SHIFT);
    lab.dp.add_vip(&DNS4.key(), DNS4.vip_id, quic, DNS4.mode)?;
    let server = xdp_common::QuicServerKey {
        vip_id: DNS4.vip_id,
        server_id: 0x0102,
    };
    lab.dp.sync_quic_servers(&[(server, 7)].into(), false)?;
    let mut short = vec![0x41, 0x00, 0x01, 0x02];
    short.extend_from_slice(&payload);
    let frame = packet::udp4(CLIENT4, vip4(DNS4.addr), 41000, 443, &short);
    row(
        lab,
        "IPv4 UDP, QUIC VIP, short header routed by its connection ID",
        frame,
        tx,
    )?;
    lab.dp
        .add_vip(&DNS4.key(), DNS4.vip_id, DNS4.flags, DNS4.mode)?;
    lab.dp.sync_quic_servers(&Default::default(), false)?;
    // A source route: WEB4's clients in 198.18.100.0/24 (the lab client's)
    // to a subset holding one backend, in EMPTY's VIP slot.
    lab.dp.remove_vip(&integration_tests::lab::EMPTY.key())?;
    let subset = WEB4.key().subset(0);
    let subset_id = integration_tests::lab::EMPTY.vip_id;
    let mut entry = lab.dp.backend(0)?;
    entry.vip_id = subset_id;
    lab.dp.set_backend(SIZES.max_backends - 1, &entry)?;
    lab.dp.add_vip(&subset, subset_id, 0, WEB4.mode)?;
    lab.dp.write_ring(
        &subset,
        &vec![SIZES.max_backends - 1; SIZES.ring_size as usize],
    )?;
    let route = (WEB4.vip_id, IpAddr::V4(Ipv4Addr::new(198, 18, 100, 0)), 24);
    lab.dp
        .sync_source_routes(&[(route, subset)].into(), false)?;
    let routed = xdp_common::VIP_F_SOURCE_ROUTES;
    lab.dp
        .add_vip(&WEB4.key(), WEB4.vip_id, routed, WEB4.mode)?;
    row(
        lab,
        "IPv4 TCP established, source route to a subset",
        established.to_vec(),
        tx,
    )?;
    lab.dp
        .add_vip(&WEB4.key(), WEB4.vip_id, WEB4.flags, WEB4.mode)?;
    lab.dp.sync_source_routes(&Default::default(), false)?;
    // A program chained after the balancer: what passes goes on to it.
    let pins = PinDir::new("bench-chain");
    std::fs::create_dir_all(&pins.0)?;
    let mut next = AuxProgram::load(PASS_PROGRAM)?;
    next.pin(&pins.0.join("next"))?;
    lab.dp.set_pass_to(Some(&pins.0.join("next")))?;
    let other = packet::tcp4(CLIENT4, Ipv4Addr::new(198, 18, 0, 99), 40000, 80, &payload);
    row(
        lab,
        "not for a VIP (pass), then a chained program (xdp_pass)",
        other,
        pass,
    )?;
    lab.dp.set_pass_to(None)?;
    let _ = std::fs::remove_dir_all(&pins.0);
    // Two uplinks: the frames arrive on an extra one (loopback stands in),
    // whose next hop and MAC come from UPLINKS.
    let lo = xdp_user::iface::require("lo")?.index;
    lab.dp
        .set_uplinks(&[("lo".to_owned(), [2, 0, 0, 0, 0x30, 1])])?;
    row_on(
        lab,
        "IPv4 TCP established, arrived on an extra uplink",
        established.to_vec(),
        tx,
        lo,
    )?;
    lab.dp.set_uplinks(&[])?;
    Ok(())
}

/// Kernel memory of the maps for a million active flows: this build at its
/// default sizes, the build before ring-first placement (whose conntrack
/// needed an entry per active flow), and Katran.
fn memory(peer: Option<&Peer>) -> Result<()> {
    let defaults = Sizes::default();
    let dp = Dataplane::load(defaults)?;
    let maps = dp.memory()?;
    let total: u64 = maps.iter().map(|(_, b)| b).sum();
    let flows = maps
        .iter()
        .find(|(n, _)| *n == xdp_common::map_names::FLOWS)
        .map_or(0, |m| m.1);
    // The build before: the same maps but for FLOWS of 1M entries with
    // 12-byte values, and without SEEN and VIP_SERIALS.
    let new_only: u64 = maps
        .iter()
        .filter(|(n, _)| {
            [
                xdp_common::map_names::SEEN,
                xdp_common::map_names::VIP_SERIALS,
            ]
            .contains(n)
        })
        .map(|m| m.1)
        .sum();
    let old_flows = xdp_user::dataplane::lru_memory(40, 12, 1 << 20)?;
    let before = total - flows - new_only + old_flows;
    println!("\nKernel memory (memlock) for 1,000,000 active flows, default sizes ({} VIPs, ring {}, {} conntrack entries):\n", defaults.max_vips, defaults.ring_size, defaults.max_flows);
    println!("| dataplane | MiB | of which conntrack |\n|---|---:|---:|");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("| xdp_lb now | {:.1} | {:.1} |", mib(total), mib(flows));
    println!(
        "| xdp_lb before ring-first placement (1M entries) | {:.1} | {:.1} |",
        mib(before),
        mib(old_flows)
    );
    if let Some(p) = peer {
        println!(
            "| Katran (512 VIPs' rings, an LRU of 1M per CPU) | {:.1} | |",
            mib(p.katran.memory()?)
        );
    }
    Ok(())
}

fn maglev() {
    println!(
        "\n## Maglev population, {} slots (median of {RUNS})",
        SIZES.ring_size
    );
    println!("| backends | maglev ms | baseline: round-robin fill ms | ratio |");
    println!("|---:|---:|---:|---:|");
    for n in [10u32, 100, 1000] {
        let (m, b) = measure_population(n, SIZES.ring_size, RUNS);
        println!(
            "| {n} | {:.3} | {:.3} | {:.0}x |",
            m.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            m.as_secs_f64() / b.as_secs_f64()
        );
    }
}

fn ring_write() -> Result<()> {
    println!(
        "\n## Writing one ring of {} slots atomically (median of {RUNS})",
        SIZES.ring_size
    );
    let pins = PinDir::new("bench");
    let mut dp = Dataplane::open(SIZES, &pins.0)?;
    dp.add_vip(&WEB4.key(), 0, 0, xdp_common::fwd::ENCAP)?;
    let ring: Vec<u32> = (0..SIZES.ring_size).map(|i| i % 3).collect();
    let batch = median_d(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                dp.write_ring(&WEB4.key(), &ring).map(|()| t.elapsed())
            })
            .collect::<Result<Vec<_>>>()?,
    );
    // Baseline: the same slots written one map update (syscall) at a time.
    let map = aya::maps::MapData::from_pin(pins.0.join("RINGS"))?;
    let mut rings: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map))?;
    let per_slot = median_d(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                for (slot, id) in (2 * SIZES.ring_size..).zip(&ring) {
                    rings.set(slot, id, 0)?;
                }
                Ok(t.elapsed())
            })
            .collect::<Result<Vec<_>>>()?,
    );
    println!("| method | ms | ratio |");
    println!("|---|---:|---:|");
    println!(
        "| BPF_MAP_UPDATE_BATCH + flip (xdplb) | {:.3} | 1x |",
        batch.as_secs_f64() * 1e3
    );
    println!(
        "| baseline: one update per slot | {:.3} | {:.1}x slower |",
        per_slot.as_secs_f64() * 1e3,
        per_slot.as_secs_f64() / batch.as_secs_f64()
    );
    Ok(())
}

fn detection_to_dataplane() -> Result<()> {
    let n = 100;
    println!(
        "\n## Health change to dataplane: one VIP, {n} backends, {} slots (median of 21)",
        SIZES.ring_size
    );
    let mut text = String::from(
        "interface = \"lo\"\n[tables]\nmax_vips = 8\nmax_backends = 256\nring_size = 65537\nmax_flows = 1024\n\
         [forwarding]\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n\
         health = { kind = \"tcp\", rise = 1, fall = 1, init_state = \"up\" }\n",
    );
    for i in 0..n {
        text += &format!(
            "[[vip.backend]]\naddress = \"198.18.{}.{}\"\n",
            64 + i / 200,
            1 + i % 200
        );
    }
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dp = Dataplane::load(config.tables.sizes())?;
    let mut ctl = Controller::new(config, None, dp)?;
    ctl.reconcile()?;
    let key = CheckKey {
        vip: "web".into(),
        backend: "198.18.64.7".parse()?,
    };
    let mut samples = Vec::new();
    for i in 0..21 {
        let result = if i % 2 == 0 {
            Err("down".into())
        } else {
            Ok(Duration::from_millis(1))
        };
        let t = Instant::now();
        ctl.on_check(CheckResult {
            key: key.clone().into(),
            result,
        });
        samples.push(t.elapsed());
    }
    let latency = median_d(samples);
    let members: Vec<RingBackend> = (0..n)
        .map(|i| RingBackend {
            identity: vec![198, 18, 64 + (i / 200) as u8, 1 + (i % 200) as u8],
            weight: 100,
            id: i,
        })
        .collect();
    let maglev = median_d(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(populate(&members, SIZES.ring_size));
                t.elapsed()
            })
            .collect(),
    );
    println!("| step | ms |");
    println!("|---|---:|");
    println!(
        "| check result -> ring rewritten, state written (xdplb) | {:.3} |",
        latency.as_secs_f64() * 1e3
    );
    println!(
        "| of which Maglev population alone (baseline) | {:.3} |",
        maglev.as_secs_f64() * 1e3
    );
    println!(
        "Detection itself is interval x fall of the check (e.g. 1 s x 3); this is what follows it."
    );
    Ok(())
}

/// CPU seconds this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Ports the health-check benchmark's checks go to (any answer SYNs).
const CHECK_PORTS: u16 = 32;
const CHECK_PORT_BASE: u16 = 20000;

/// CPU % of one core this process used while `work` ran for `window`.
async fn cpu_percent_during<F: std::future::Future<Output = ()>>(window: Duration, work: F) -> f64 {
    let (c0, t0) = (cpu_time(), Instant::now());
    let _ = tokio::time::timeout(window, work).await;
    (cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0
}

fn health_cpu() -> Result<()> {
    use xdp_user::dataplane::{AttachMode, SYNACK_PROGRAM};
    let window = Duration::from_secs(5);
    println!("\n## Health-check CPU, TCP checks every 1 s, over {window:?}");
    println!(
        "The checker runs in one namespace; its backends are one address behind a veth pair, answered by \
         `xdp_synack` (an XDP program that replies to every SYN with a SYN-ACK, as a remote host's kernel \
         would, at almost no cost), so the figure is the checker's own side of each check. Baselines in the \
         same run: the same checks as full connects closed with FIN (xdplb's checks before), and the same \
         timers without I/O."
    );
    let (ns, servers) =
        integration_tests::topology::veth_pair("bench-hc-c", "c0", "bench-hc-s", "s0")?;
    ns.ip(&["addr", "add", "198.18.70.1/24", "dev", "c0"])?;
    servers.ip(&["addr", "add", "198.18.70.2/24", "dev", "s0"])?;
    // Generic mode: its XDP_TX goes out as an ordinary frame, so the
    // checker's side needs no XDP program and no page copies (native XDP on
    // veth copies every frame, a cost no real NIC has).
    let _responder = integration_tests::topology::in_ns(&servers, || -> Result<AuxProgram> {
        let mut p = AuxProgram::load(SYNACK_PROGRAM)?;
        p.attach("s0", AttachMode::Generic)?;
        Ok(p)
    })??;
    let _inside = ns.enter()?;
    println!("| backends | xdplb half-open checks: CPU % of one core | checks ok/s | baseline: connect + FIN close: CPU % | baseline: timers, no I/O: CPU % |");
    println!("|---:|---:|---:|---:|---:|");
    let target = |i: usize| {
        SocketAddr::from((
            [198, 18, 70, 2],
            CHECK_PORT_BASE + (i % CHECK_PORTS as usize) as u16,
        ))
    };
    let result = (|| -> Result<()> {
        for n in [1000usize, 10_000] {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (checks_cpu, ok_rate) = rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel(65536);
                let mut checks = Checks::new(tx);
                let h = HealthCheck {
                    kind: CheckKind::Tcp,
                    interval_ms: 1000,
                    timeout_ms: 900,
                    jitter_ms: 100,
                    ..HealthCheck::default()
                };
                let wanted: HashMap<CheckKey, CheckSpec> = (0..n)
                    .map(|i| {
                        let key = CheckKey {
                            vip: format!("v{i}"),
                            backend: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                        };
                        (key, CheckSpec::new(&h, target(i)))
                    })
                    .collect();
                // Warm up one interval, then measure.
                checks.sync(wanted);
                let warm = Instant::now() + Duration::from_millis(1200);
                while Instant::now() < warm {
                    let _ = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
                }
                let mut ok = 0u64;
                let cpu = cpu_percent_during(window, async {
                    while let Some(r) = rx.recv().await {
                        ok += u64::from(r.result.is_ok());
                    }
                })
                .await;
                (cpu, ok as f64 / window.as_secs_f64())
            });
            drop(rt);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let fin_cpu = rt.block_on(async {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let to = target(i);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis((i % 1000) as u64)).await;
                            loop {
                                if let Ok(Ok(s)) = tokio::time::timeout(
                                    Duration::from_millis(900),
                                    tokio::net::TcpStream::connect(to),
                                )
                                .await
                                {
                                    drop(s);
                                }
                                tokio::time::sleep(Duration::from_millis(1000 + (i % 100) as u64))
                                    .await;
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let cpu = cpu_percent_during(window, std::future::pending()).await;
                for t in tasks {
                    t.abort();
                }
                cpu
            });
            drop(rt);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let timers_cpu = rt.block_on(async {
                let tasks: Vec<_> = (0..n)
                    .map(|_| {
                        tokio::spawn(async {
                            loop {
                                tokio::time::sleep(Duration::from_millis(1000)).await;
                            }
                        })
                    })
                    .collect();
                let cpu = cpu_percent_during(window, std::future::pending()).await;
                for t in tasks {
                    t.abort();
                }
                cpu
            });
            println!("| {n} | {checks_cpu:.1} | {ok_rate:.0} | {fin_cpu:.1} | {timers_cpu:.1} |");
        }
        Ok(())
    })();
    result
}

/// A flap storm fed straight to the controller: 250 backends of one VIP
/// change state 600 times a second beside a calm VIP; rings computed per
/// second and controller CPU, reconciling at once per change (baseline)
/// or coalesced per 50 ms window (the daemon).
fn flap_storm() -> Result<()> {
    let window = Duration::from_secs(3);
    let rate = 600.0;
    println!("\n## Flap storm: 250 backends of one VIP (65537 slots) changing state {rate:.0} times/s beside a calm VIP, {window:?}");
    let mut text = String::from(
        "interface = \"lo\"\n[tables]\nmax_vips = 8\nmax_backends = 512\nring_size = 65537\nmax_flows = 1024\n\
         [forwarding]\ngateway_mac = \"02:00:00:00:00:fe\"\n\
         [[vip]]\nname = \"storm\"\naddress = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n\
         health = { kind = \"tcp\", rise = 1, fall = 1, init_state = \"up\" }\n",
    );
    for i in 0..250 {
        text += &format!("[[vip.backend]]\naddress = \"198.18.64.{}\"\n", 1 + i);
    }
    text += "[[vip]]\nname = \"calm\"\naddress = \"198.18.0.20\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n\
             health = { kind = \"tcp\", rise = 1, fall = 1, init_state = \"up\" }\n";
    for i in 0..100 {
        text += &format!("[[vip.backend]]\naddress = \"198.18.65.{}\"\n", 1 + i);
    }
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("| mode | changes applied/s | rings computed/s | controller CPU % of one core |");
    println!("|---|---:|---:|---:|");
    for coalesced in [false, true] {
        let dp = Dataplane::load(config.tables.sizes())?;
        let mut ctl = Controller::new(config.clone(), None, dp)?;
        ctl.reconcile()?;
        let rings0 = ctl.ring_rebuilds();
        let (c0, t0) = (cpu_time(), Instant::now());
        let mut sent = 0u64;
        let mut pending = false;
        let mut last = Instant::now();
        while t0.elapsed() < window {
            // Changes due by now, alternating down/up per backend.
            let due = (t0.elapsed().as_secs_f64() * rate) as u64;
            while sent < due {
                let i = sent % 250;
                let result = if (sent / 250).is_multiple_of(2) {
                    Err("refused".into())
                } else {
                    Ok(Duration::from_millis(1))
                };
                let key = CheckKey {
                    vip: "storm".into(),
                    backend: format!("198.18.64.{}", 1 + i).parse()?,
                };
                if coalesced {
                    pending |= ctl.record_check(CheckResult {
                        key: key.clone().into(),
                        result,
                    });
                } else {
                    ctl.on_check(CheckResult {
                        key: key.clone().into(),
                        result,
                    });
                }
                sent += 1;
            }
            if coalesced && pending && last.elapsed() >= Duration::from_millis(50) {
                ctl.reconcile()?;
                pending = false;
                last = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (cpu_time() - c0).as_secs_f64() / secs * 100.0;
        let rings = (ctl.ring_rebuilds() - rings0) as f64 / secs;
        println!(
            "| {} | {:.0} | {rings:.1} | {cpu:.0} |",
            if coalesced {
                "xdplb: coalesced, at most one reconcile per 50 ms"
            } else {
                "baseline: a reconcile per change"
            },
            sent as f64 / secs
        );
    }
    Ok(())
}

/// Counting a full conntrack table: one lookup per entry (before) against
/// batched lookups (what the daemon's background counter does).
fn flow_count() -> Result<()> {
    let n: u32 = 630_000;
    let mut dp = Dataplane::load(Sizes {
        max_flows: 1 << 20,
        ..SIZES
    })?;
    let keys: Vec<xdp_common::FlowKey> = (0..n)
        .map(|i| {
            let mut src = [0u8; 16];
            src[..4].copy_from_slice(&[198, 18, (i >> 16) as u8, (i >> 8) as u8]);
            let mut dst = [0u8; 16];
            dst[..4].copy_from_slice(&[198, 18, 0, 10]);
            xdp_common::FlowKey {
                src,
                dst,
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                family: 4,
                _pad: [0; 2],
            }
        })
        .collect();
    let states = vec![xdp_common::FlowState::default(); keys.len()];
    dp.set_flows(&keys, &states)?;
    let lab_fill = keys.len();
    let t = Instant::now();
    let walked = dp.flow_count_walk()?;
    let walk = t.elapsed();
    let t = Instant::now();
    let batched = dp.flow_count()?;
    let batch = t.elapsed();
    println!(
        "\n## Counting a 1M-entry conntrack table holding {walked} flows ({lab_fill} inserted from one \
         CPU; the per-CPU LRU lists keep that CPU's share)"
    );
    println!("| method | entries | ms |");
    println!("|---|---:|---:|");
    println!(
        "| baseline: one lookup per entry | {walked} | {:.0} |",
        walk.as_secs_f64() * 1e3
    );
    println!(
        "| xdplb: BPF_MAP_LOOKUP_BATCH, 4096 per call | {batched} | {:.0} |",
        batch.as_secs_f64() * 1e3
    );
    println!(
        "The daemon counts on a thread of its own every 2 s or more, never on the controller's."
    );
    Ok(())
}

/// One load-test configuration of the LB host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Forwarder {
    Xdplb,
    MacSwap,
    IptablesDnat,
}

impl Forwarder {
    fn label(self) -> &'static str {
        match self {
            Self::Xdplb => "xdplb (xdp_lb, IPIP)",
            Self::MacSwap => "baseline: XDP MAC swap + XDP_TX",
            Self::IptablesDnat => "baseline: kernel forwarding, iptables DNAT",
        }
    }
}

const LT_VIP: &str = "198.18.0.10";
const LT_BACKENDS: [&str; 3] = ["198.18.99.1", "198.18.99.2", "198.18.99.3"];

/// Generator -> LB host -> sink, two namespaces joined by one veth pair:
/// the LB's output goes back over the same link to a counting sink on the
/// generator's side (its MAC is the LB's next hop).
fn loadtest() -> Result<()> {
    use xdp_user::{
        dataplane::{AttachMode, SINK_PROGRAM},
        loadgen::interface_mac,
    };
    let window = Duration::from_secs(3);
    println!(
        "\n## Load test: live-frames generator -> LB host (native XDP on veth) -> counting sink"
    );
    println!(
        "64-byte UDP frames to {LT_VIP}:53, {window:?} per cell after a warm-up; generator, LB and sink share the \
         CPU that runs the generator (veth processes XDP_TX in the sender's softirq), so Mpps is per core."
    );
    let (gen, lb) = integration_tests::topology::veth_pair("lt-gen", "gen0", "lt-lb", "eth0")?;
    gen.ip(&["addr", "add", "198.18.50.1/24", "dev", "gen0"])?;
    lb.ip(&["addr", "add", "198.18.50.2/24", "dev", "eth0"])?;
    lb.ip(&["route", "add", "198.18.99.0/24", "via", "198.18.50.1"])?;
    let gen_mac = integration_tests::topology::in_ns(&gen, || interface_mac("gen0"))??;
    let lb_mac = integration_tests::topology::in_ns(&lb, || interface_mac("eth0"))??;
    // The kernel path answers ARP for the backends' next hop from here.
    gen.ip(&[
        "neigh",
        "replace",
        "198.18.50.2",
        "lladdr",
        &integration_tests::ops::mac_text(lb_mac),
        "dev",
        "gen0",
    ])?;
    lb.ip(&[
        "neigh",
        "replace",
        "198.18.50.1",
        "lladdr",
        &integration_tests::ops::mac_text(gen_mac),
        "dev",
        "eth0",
    ])?;
    let sink = integration_tests::topology::in_ns(&gen, || {
        let mut s = AuxProgram::load(SINK_PROGRAM)?;
        s.attach("gen0", AttachMode::Native)?;
        anyhow::Ok(s)
    })??;

    println!(
        "\n| flows | forwarder | sent Mpps | forwarded Mpps (best of {LT_ROUNDS}) | each round | dropped | vs xdplb |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|");
    let mut of_ceiling = Vec::new();
    for flows in [1u32, 1000, 1_000_000] {
        let spec = LoadSpec {
            interface: "gen0".into(),
            src_mac: gen_mac,
            dst_mac: lb_mac,
            src: "198.18.50.1".parse()?,
            dst: LT_VIP.parse()?,
            dport: 53,
            protocol: xdp_user::config::Protocol::Udp,
            flows,
            size: 64,
            count: u64::MAX,
            duration: window,
            rate: None,
            batch: 64,
        };
        // Interleaved rounds: a busy machine only slows a window down, so
        // each forwarder's best round is its figure, and drift hits all
        // three alike.
        let forwarders = [
            Forwarder::Xdplb,
            Forwarder::MacSwap,
            Forwarder::IptablesDnat,
        ];
        let mut best: [Option<LtCell>; 3] = [None, None, None];
        let mut rounds: [Vec<f64>; 3] = Default::default();
        for _ in 0..LT_ROUNDS {
            for (i, fwd) in forwarders.into_iter().enumerate() {
                let cell = lt_cell(&gen, &lb, &sink, fwd, gen_mac, &spec, window)?;
                rounds[i].push(cell.mpps);
                if best[i].as_ref().is_none_or(|b| cell.mpps > b.mpps) {
                    best[i] = Some(cell);
                }
            }
        }
        let xdplb_mpps = best[0].as_ref().map_or(0.0, |c| c.mpps);
        let swap_mpps = best[1].as_ref().map_or(0.0, |c| c.mpps);
        of_ceiling.push(format!(
            "{:.2} with {flows} flows",
            xdplb_mpps / swap_mpps.max(f64::MIN_POSITIVE)
        ));
        for (i, fwd) in forwarders.into_iter().enumerate() {
            let Some(cell) = &best[i] else { continue };
            let each: Vec<String> = rounds[i].iter().map(|m| format!("{m:.2}")).collect();
            println!(
                "| {flows} | {} | {:.2} | {:.2} | {} | {:.1}% | {:.2}x |",
                fwd.label(),
                cell.sent_mpps,
                cell.mpps,
                each.join(", "),
                cell.dropped_pct,
                cell.mpps / xdplb_mpps.max(f64::MIN_POSITIVE),
            );
        }
    }
    println!(
        "\nxdplb's share of the MAC-swap ceiling (best round each): {}.",
        of_ceiling.join(", ")
    );
    drop(sink);
    Ok(())
}

/// Interleaved rounds per load-test row.
const LT_ROUNDS: usize = 3;

/// One load-test window: what was sent, what the sink counted.
struct LtCell {
    sent_mpps: f64,
    mpps: f64,
    dropped_pct: f64,
}

/// Attach `fwd` on the LB, warm it up (every flow seen once, capped), then
/// send for `window` and count what reaches the sink.
fn lt_cell(
    gen: &Netns,
    lb: &Netns,
    sink: &AuxProgram,
    fwd: Forwarder,
    gen_mac: [u8; 6],
    spec: &LoadSpec,
    window: Duration,
) -> Result<LtCell> {
    use integration_tests::topology::in_ns;
    let setup = in_ns(lb, || lt_setup(lb, fwd, gen_mac))??;
    let generator = in_ns(gen, || xdp_user::loadgen::Generator::new(spec))??;
    let warm = (2 * u64::from(spec.flows)).clamp(100_000, 2_500_000);
    in_ns(gen, || generator.send(warm, Duration::from_secs(10), None))??;
    let before = sink.counter(xdp_common::map_names::SINK_COUNTER)?;
    let report = in_ns(gen, || generator.send(u64::MAX, window, None))??;
    let after = sink.counter(xdp_common::map_names::SINK_COUNTER)?;
    drop(setup);
    if fwd == Forwarder::IptablesDnat {
        lt_teardown_dnat(lb)?;
    }
    let forwarded = after - before;
    Ok(LtCell {
        sent_mpps: report.mpps(),
        mpps: forwarded as f64 / report.elapsed.as_secs_f64() / 1e6,
        dropped_pct: 100.0 * (report.sent.saturating_sub(forwarded)) as f64
            / report.sent.max(1) as f64,
    })
}

/// What keeps a forwarder attached on the LB's eth0 (dropped: detached).
enum LtSetup {
    Xdplb { _attached: Box<Dataplane> },
    Swap { _attached: AuxProgram },
    Dnat,
}

fn lt_setup(lb: &Netns, fwd: Forwarder, gen_mac: [u8; 6]) -> Result<LtSetup> {
    use xdp_user::dataplane::{addr_bytes, AttachMode, SWAP_PROGRAM};
    Ok(match fwd {
        Forwarder::Xdplb => {
            let sizes = Sizes {
                max_vips: 4,
                max_backends: 16,
                ring_size: 65537,
                max_flows: 2 << 20,
            };
            let mut dp = Dataplane::load(sizes)?;
            dp.set_config(&xdp_common::Config {
                gateway_mac: gen_mac,
                ..xdp_common::Config::default()
            })?;
            let mut ids = Vec::new();
            for (id, b) in (0u32..).zip(LT_BACKENDS) {
                let (addr, family) = addr_bytes(b.parse::<IpAddr>()?);
                dp.set_backend(
                    id,
                    &xdp_common::Backend {
                        addr,
                        family: u32::from(family),
                        state: xdp_common::backend_state::UP,
                        ..Default::default()
                    },
                )?;
                ids.push(RingBackend {
                    identity: addr[..4].to_vec(),
                    weight: 1,
                    id,
                });
            }
            let (vaddr, vfamily) = addr_bytes(LT_VIP.parse::<IpAddr>()?);
            let key = xdp_common::VipKey {
                addr: vaddr,
                port: 53u16.to_be(),
                proto: 17,
                family: vfamily,
            };
            dp.add_vip(&key, 0, 0, xdp_common::fwd::ENCAP)?;
            dp.write_ring(&key, &populate(&ids, sizes.ring_size))?;
            dp.attach("eth0", AttachMode::Native)?;
            LtSetup::Xdplb {
                _attached: Box::new(dp),
            }
        }
        Forwarder::MacSwap => {
            let mut s = AuxProgram::load(SWAP_PROGRAM)?;
            s.attach("eth0", AttachMode::Native)?;
            LtSetup::Swap { _attached: s }
        }
        Forwarder::IptablesDnat => {
            // No XDP program on eth0: GRO keeps veth's NAPI on, so the
            // generator's XDP_TX frames are received.
            lb.exec(&["ethtool", "-K", "eth0", "gro", "on"])?;
            lb.exec(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ])?;
            // Round-robin over three backends per new flow (conntrack keeps
            // the rest of each flow on its backend): the rule set users
            // write without XDP.
            let n = LT_BACKENDS.len();
            for (i, b) in LT_BACKENDS.iter().enumerate() {
                let mut rule = vec![
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    LT_VIP,
                    "-p",
                    "udp",
                    "--dport",
                    "53",
                ];
                let every = (n - i).to_string();
                if i + 1 < n {
                    rule.extend([
                        "-m",
                        "statistic",
                        "--mode",
                        "nth",
                        "--every",
                        &every,
                        "--packet",
                        "0",
                    ]);
                }
                rule.extend(["-j", "DNAT", "--to-destination", b]);
                lb.exec(&rule)?;
            }
            LtSetup::Dnat
        }
    })
}

fn lt_teardown_dnat(lb: &Netns) -> Result<()> {
    lb.exec(&["iptables", "-t", "nat", "-F"])?;
    lb.exec(&["ethtool", "-K", "eth0", "gro", "off"])?;
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--loadtest") {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the load test builds namespaces and attaches XDP programs: run it as root");
        }
        println!("# xdplb load test\n\nMachine: {}", machine());
        return loadtest();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks load XDP programs: run them as root");
    }
    // `--only a,b` runs only the named sections.
    let args: Vec<String> = std::env::args().collect();
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    // `--path TEXT` measures only the dataplane paths whose name holds it.
    let path_filter = args
        .iter()
        .position(|a| a == "--path")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    println!("# xdplb benchmarks\n\nMachine: {}", machine());
    // `--peer katran=DIR` measures Katran's balancer, built from the
    // checkout at DIR, beside xdp_lb.
    let peer = args
        .iter()
        .position(|a| a == "--peer")
        .and_then(|i| args.get(i + 1))
        .map(|p| match p.strip_prefix("katran=") {
            Some(dir) => Ok(std::path::PathBuf::from(dir)),
            None => Err(anyhow::anyhow!("--peer takes katran=DIR, not {p:?}")),
        })
        .transpose()?;
    if wanted("dataplane") {
        dataplane(path_filter, peer.as_deref())?;
    }
    if wanted("maglev") {
        maglev();
    }
    if wanted("ring") {
        ring_write()?;
    }
    if wanted("detection") {
        detection_to_dataplane()?;
    }
    if wanted("health") {
        health_cpu()?;
    }
    if wanted("storm") {
        flap_storm()?;
    }
    if wanted("flows") {
        flow_count()?;
    }
    Ok(())
}
