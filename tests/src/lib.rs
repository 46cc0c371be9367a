//! Shared helpers of the privileged tests: running XDP programs through
//! BPF_PROG_TEST_RUN and building packets.

pub mod daemon;
pub mod e2e;
pub mod fleet;
pub mod ha;
pub mod katran;
pub mod netns;
pub mod ops;
pub mod packet;
pub mod prometheus;
pub mod topology;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// Room the output buffer leaves for encapsulation growth.
pub const HEADROOM_GROWTH: usize = 256;

/// What one BPF_PROG_TEST_RUN of an XDP program returned.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
}

/// Run `program` once on `packet`.
pub fn run(program: &Xdp, packet: &[u8]) -> Result<Run> {
    run_on(program, packet, 0)
}

/// Run `program` once on `packet` arriving on interface `ingress` (its
/// index; 0: none).
pub fn run_on(program: &Xdp, packet: &[u8], ingress: u32) -> Result<Run> {
    let mut out = vec![0u8; packet.len() + HEADROOM_GROWTH];
    let ctx = xdp_user::dataplane::test_run_ctx(packet.len(), ingress);
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: (ingress != 0).then_some(&ctx[..]),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(Run {
        action: result.return_value,
        output: out,
    })
}

/// Keep the calling thread on CPU 0, for tests of what the dataplane keeps
/// per CPU (rate limits, conntrack's LRU lists).
pub fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU 0"
        );
    }
}

/// Skip (with a message, not silently) when not root: BPF needs CAP_BPF.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (CAP_BPF, CAP_NET_ADMIN); run `cargo xtask test`");
    }
    root
}

pub mod lab;

use xdp_common::reason;

/// One row of a dataplane table test.
pub struct Case {
    pub name: String,
    pub input: Vec<u8>,
    pub action: u32,
    pub output: Vec<u8>,
    /// Global counters expected to move, and by how much; every other
    /// counter must stay put.
    pub counters: Vec<(u32, u64)>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n    ")
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    }
}

/// Run one case on `lab`'s balancer; on mismatch, a report with the input,
/// the expectation and what happened.
pub fn check(lab: &lab::Lab, case: &Case) -> Result<(), String> {
    let before = lab.stats();
    let result = run(lab.dp.program().map_err(|e| e.to_string())?, &case.input)
        .map_err(|e| format!("{}: {e:#}", case.name))?;
    let after = lab.stats();
    let mut problems = Vec::new();
    if result.action != case.action {
        problems.push(format!(
            "action: expected {}, got {}",
            action_name(case.action),
            action_name(result.action)
        ));
    }
    if result.output != case.output {
        problems.push(format!(
            "output bytes differ\n  expected:\n    {}\n  actual:\n    {}",
            hex(&case.output),
            hex(&result.output)
        ));
    }
    for (i, name) in reason::NAMES.iter().enumerate() {
        let moved = after[i] - before[i];
        let expected = case
            .counters
            .iter()
            .find(|(r, _)| *r as usize == i)
            .map_or(0, |(_, n)| *n);
        if moved != expected {
            problems.push(format!(
                "counter {name}: expected +{expected}, got +{moved}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "case {:?}:\n  input:\n    {}\n  {}",
            case.name,
            hex(&case.input),
            problems.join("\n  ")
        ))
    }
}

/// Run every case, in order, and fail with all mismatches at once.
pub fn check_all(lab: &lab::Lab, cases: &[Case]) {
    let failures: Vec<String> = cases.iter().filter_map(|c| check(lab, c).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    println!("{} cases passed", cases.len());
}

/// A unique directory on bpffs for a test's pins; whatever is pinned there
/// is detached and removed on drop, also when the test panics.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = xdp_user::dataplane::detach(&self.0);
        let _ = xdp_user::announce::set_withdrawn(&self.0, false);
    }
}

/// A scratch directory (configs, sockets, logs), removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("xdplb-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a scratch directory");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Hand `ctl` one health check result of `backend` of VIP `vip`: passed
/// (1 ms) or refused.
pub fn check_result(
    ctl: &mut xdp_user::controller::Controller,
    vip: &str,
    backend: std::net::IpAddr,
    ok: bool,
) {
    ctl.on_check(xdp_user::health::CheckResult {
        key: xdp_user::health::CheckKey {
            vip: vip.into(),
            backend,
        }
        .into(),
        result: if ok {
            Ok(std::time::Duration::from_millis(1))
        } else {
            Err("connect: refused".into())
        },
    });
}
