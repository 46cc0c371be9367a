//! `cargo xtask vmtest`: boot Debian's own kernels (6.1 and 6.12, from
//! their packages, extracted, never installed) under QEMU with an
//! initramfs of busybox-static, the `xdplb` binary and the libraries and
//! modules it needs (`image`), and run the guest checks in `vm/checks.sh`:
//! the verifier accepts every program, the balancer attaches in native
//! mode to virtio_net, the decapsulator too, and the load generator says
//! what left the NIC. Then the network bed (`bed`: client, LB, backends
//! that follow the README's ipip steps, generator), and the operator's
//! host (`operator`: Debian 12 with systemd, the .deb installed, upgraded
//! and removed). Nothing is fetched but Debian packages.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

mod bed;
mod guest;
mod image;
mod operator;

use bed::*;
use guest::*;
use image::*;

/// The guest kernels: a name and the package-name pattern whose newest
/// match is booted.
const KERNELS: &[(&str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64$"),
    ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"),
];

/// The kernel the operator's host boots (Debian 12's newest).
const OPERATOR_KERNEL: &str = "6.12";

/// Modules the guest loads (with their dependencies, from modules.dep).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "ipip",
    "ip6_tunnel",
    "pktgen",
    "veth",
    "bridge",
    // The LB guest's two NICs form a bond.
    "bonding",
    // The operator's host boots from a disk (ext4 checksums its metadata
    // with crc32c, a soft dependency modules.dep does not name).
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// Host programs the guests get (host path, guest path).
const HOST_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/ip", "usr/sbin/ip"),
    ("/usr/sbin/sysctl", "usr/sbin/sysctl"),
    ("/bin/dash", "usr/bin/dash"),
    ("/usr/bin/socat", "usr/bin/socat"),
    ("/usr/sbin/ethtool", "usr/sbin/ethtool"),
    // Debian's xdp-tools: the program the LB's NIC is shared with
    // through libxdp's dispatcher, and its status.
    ("/usr/sbin/xdp-filter", "usr/sbin/xdp-filter"),
    ("/usr/sbin/xdp-loader", "usr/sbin/xdp-loader"),
];

/// Where libxdp (and so xdp-filter, and xdplb's `[libxdp]`) finds its BPF
/// objects: the dispatcher and the filter's programs, copied as they are.
const LIBXDP_OBJECTS: &str = "/usr/lib/x86_64-linux-gnu/bpf";

/// Longest a guest may run before it is killed.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

/// The guest's /init: mounts, modules, then /roles/<role>.sh, the role
/// named by `role=` on the kernel command line.
const INIT: &str = include_str!("vm/init.sh");
/// Long-lived and new connections through a failover (client roles).
const TRAFFIC: &str = include_str!("vm/traffic.sh");

/// What each guest does.
const ROLES: &[(&str, &str)] = &[
    ("checks", include_str!("vm/checks.sh")),
    ("lb", include_str!("vm/lb.sh")),
    ("backend", include_str!("vm/backend.sh")),
    ("client", include_str!("vm/client.sh")),
    ("gen", include_str!("vm/gen.sh")),
    ("disk", include_str!("vm/disk.sh")),
    ("steady", include_str!("vm/steady.sh")),
];

/// The README's commands for an ipip backend (the first `sh` block of its
/// "Deploying with real ipip backends" section): the backend guest runs
/// them as they are.
fn readme_backend_steps(root: &Path) -> Result<String> {
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let section = readme
        .split("## Deploying with real ipip backends")
        .nth(1)
        .ok_or_else(|| anyhow!("README.md has no \"Deploying with real ipip backends\" section"))?;
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .ok_or_else(|| anyhow!("the deploy section has no sh block"))?;
    Ok(block.to_owned())
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One kernel's result.
pub struct Outcome {
    pub kernel: String,
    pub package: String,
    pub passed: bool,
    pub seconds: f64,
    pub lines: Vec<String>,
}

/// XDPLB-VM lines of a console.
fn result_lines(console: &str, role: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| l.starts_with("XDPLB-VM"))
        .map(|l| format!("{role}: {l}"))
        .collect()
}

/// Boot every kernel; in each, the single-guest checks, then the network
/// bed: a client, the LB and a backend that follows the README's ipip
/// steps, on a bridge of multiqueue taps. `xdplb` is the binary.
pub fn run(root: &Path, xdplb: &Path, debs: &[PathBuf]) -> Result<Vec<Outcome>> {
    let cache = root.join("target/vm");
    let deploy = readme_backend_steps(root)?;
    let mut outcomes = Vec::new();
    // XDPLB_VM_KERNELS=6.12 boots only that one, XDPLB_VM_PARTS=operator
    // only the operator's host, =bed only the checks and the bed
    // (debugging).
    let only = std::env::var("XDPLB_VM_KERNELS").ok();
    let parts = std::env::var("XDPLB_VM_PARTS").ok();
    let part = |p: &str| {
        parts
            .as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == p))
    };
    for (series, pattern) in KERNELS.iter().filter(|(s, _)| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == *s))
    }) {
        let package = newest(pattern)?;
        let kroot = fetch(&package, &cache)?;
        let vmlinuz = std::fs::read_dir(kroot.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("vmlinuz-"))
            })
            .ok_or_else(|| anyhow!("no vmlinuz in {package}"))?;
        let initrd = cache.join(format!("initrd-{series}.gz"));
        initramfs(
            &kroot,
            xdplb,
            &[
                ("deploy-backend.sh", deploy.clone()),
                ("traffic.sh", TRAFFIC.to_owned()),
            ],
            &initrd,
        )?;
        if *series == OPERATOR_KERNEL && part("operator") {
            println!(
                "vmtest: {package} ({}): the operator's host (Debian 12, systemd)",
                probe_accel(&vmlinuz)
            );
            let started = Instant::now();
            let (passed, lines) = operator::run(&cache, &kroot, &vmlinuz, &initrd, debs)?;
            outcomes.push(Outcome {
                kernel: format!("{series}+systemd"),
                package: package.clone(),
                passed,
                seconds: started.elapsed().as_secs_f64(),
                lines,
            });
        }
        if !part("bed") {
            continue;
        }
        println!("vmtest: {package} ({}): the checks", probe_accel(&vmlinuz));
        let started = Instant::now();
        let checks = Guest::boot(
            &vmlinuz,
            &initrd,
            "checks",
            &[
                ("52:54:00:00:00:01", Nic::Hub(0)),
                ("52:54:00:00:00:02", Nic::Hub(1)),
            ],
            None,
        )?;
        let (console, _) = checks.finish(GUEST_LIMIT);
        let mut lines = result_lines(&console, "checks");
        let mut passed = lines.iter().any(|l| l.ends_with("XDPLB-VM: PASS"));
        if !passed {
            println!("{console}");
        }

        println!("vmtest: {package}: client -> LB -> ipip backend");
        let mut consoles = run_bed(&vmlinuz, &initrd)?;
        if let Some(role) = panicked_for_tcg(&consoles) {
            // Not this project's fault (see `panicked_for_tcg`), so the bed
            // boots once more; any other panic is never retried.
            println!(
                "vmtest: {package}: the {role} guest's kernel panicked (an int3 oops outside BPF, or \
                 before its role started: QEMU TCG); booting the bed again"
            );
            consoles = run_bed(&vmlinuz, &initrd)?;
        }
        // The generators: what left the generator against what the LB
        // counted, for xdplb loadgen and for the kernel's pktgen.
        let last_number = |role: &str, prefix: &str| -> Option<u64> {
            consoles
                .iter()
                .filter(|(r, _)| *r == role)
                .flat_map(|(_, c)| c.lines())
                .filter_map(|l| l.strip_prefix(prefix))
                .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
                .next_back()
        };
        let counted = |vip: &str| -> Option<u64> {
            consoles
                .iter()
                .filter(|(r, _)| *r == "lb")
                .flat_map(|(_, c)| c.lines())
                .filter_map(|l| l.strip_prefix("XDPLB-VM: counted "))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{vip}="))?.parse().ok())
                })
                .next_back()
        };
        let mut generators_agree = true;
        for (tool, sent, vip) in [
            (
                "xdplb loadgen",
                last_number("gen", "XDPLB-VM: loadgen left "),
                "gen",
            ),
            (
                "pktgen",
                last_number("gen", "XDPLB-VM: pktgen sent "),
                "pktgen",
            ),
        ] {
            let arrived = counted(vip);
            let agree = matches!((sent, arrived), (Some(s), Some(a)) if s > 0 && a <= s && a * 100 >= s * 99);
            generators_agree &= agree;
            lines.push(format!(
                "generators: {tool}: {} sent, {} counted by the LB{}",
                sent.map_or("?".into(), |s| s.to_string()),
                arrived.map_or("?".into(), |a| a.to_string()),
                if agree { "" } else { "  MISMATCH" }
            ));
        }
        // The client's checks passed, and the path-MTU transfer went
        // through the LB's ICMP forwarding (not around it).
        let client_passed = consoles
            .iter()
            .any(|(role, c)| *role == "client" && c.lines().any(|l| l == "XDPLB-VM: PASS"))
            && consoles
                .iter()
                .any(|(role, c)| *role == "lb" && c.contains("ICMP errors to their backends"));
        for (role, console) in &consoles {
            lines.extend(result_lines(console, role));
            if !client_passed {
                println!("--- {role}\n{console}");
            }
        }
        passed &= client_passed && generators_agree;
        outcomes.push(Outcome {
            kernel: series.to_string(),
            package,
            passed,
            seconds: started.elapsed().as_secs_f64(),
            lines,
        });
    }
    Ok(outcomes)
}
