//! `cargo xtask vmtest`: boot Debian's own kernels (6.1 and 6.12, from
//! their packages, extracted, never installed) under QEMU with an
//! initramfs of busybox-static, the `xdplb` binary and the libraries and
//! modules it needs, and run the guest checks in `vm-init.sh`: the verifier
//! accepts every program, the balancer attaches in native mode to
//! virtio_net, the decapsulator too, and the load generator says what left
//! the NIC. Nothing is fetched but Debian packages.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

mod operator;

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
];

/// Longest a guest may run before it is killed.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

/// The guest's /init: mounts, modules, then /roles/<role>.sh, the role
/// named by `role=` on the kernel command line.
const INIT: &str = include_str!("vm/init.sh");

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

/// Numbers in a package name, for ordering versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest package whose name matches `pattern`.
fn newest(pattern: &str) -> Result<String> {
    let list = sh(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version_key(n))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no package matches {pattern} (apt-get update?)"))
}

/// The package `name` downloaded and extracted under `cache` (reused).
fn fetch(name: &str, cache: &Path) -> Result<PathBuf> {
    let root = cache.join(name);
    if root.join("boot").is_dir() {
        return Ok(root);
    }
    std::fs::create_dir_all(cache)?;
    sh(Command::new("apt-get")
        .current_dir(cache)
        .args(["download", name]))
    .with_context(|| format!("downloading {name}"))?;
    let deb = std::fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
        })
        .ok_or_else(|| anyhow!("apt-get download left no .deb for {name}"))?;
    let partial = cache.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &root)?;
    std::fs::remove_file(&deb)?;
    Ok(root)
}

/// A module file's contents, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("xz")?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        Ok(out.stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// The modules a module needs: its `.modinfo` `depends=` entry.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `modules` and what they depend on, dependencies first: (file name,
/// decompressed contents). Modules built into the kernel are skipped.
/// (The package ships no modules.dep: depmod runs at install.)
fn module_order(moddir: &Path, modules: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|f| f.to_str()) {
                if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
                    files.insert(stem.replace('-', "_"), path.clone());
                }
            }
        }
    }
    fn visit(
        name: &str,
        files: &std::collections::BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        let Some(path) = files.get(&name) else {
            return Ok(()); // built in
        };
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        let data = module_bytes(path)?;
        for dep in depends(&data) {
            visit(&dep, files, seen, out)?;
        }
        out.push((format!("{name}.ko"), data));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in modules {
        visit(m, &files, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// A newc cpio archive of `files` (archive path, contents, mode).
fn cpio(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, data: &[u8], mode: u32, ino: usize| {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    // Directories first, each once.
    let mut dirs = BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut ino = 1;
    for d in &dirs {
        entry(d, &[], 0o040755, ino);
        ino += 1;
    }
    for (path, data, mode) in files {
        entry(path, data, 0o100000 | mode, ino);
        ino += 1;
    }
    entry("TRAILER!!!", &[], 0, 0);
    out
}

/// The guest's initramfs for the kernel extracted at `kroot`, with
/// `extra` files (path, contents) besides the roles.
fn initramfs(kroot: &Path, xdplb: &Path, extra: &[(&str, String)], out: &Path) -> Result<()> {
    let release = std::fs::read_dir(kroot.join("lib/modules"))?
        .flatten()
        .next()
        .ok_or_else(|| anyhow!("no modules in {}", kroot.display()))?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let moddir = kroot.join("lib/modules").join(&release);
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        ("init".into(), INIT.as_bytes().to_vec(), 0o755),
        (
            "bin/busybox".into(),
            std::fs::read("/bin/busybox").context("busybox-static")?,
            0o755,
        ),
        ("bin/xdplb".into(), std::fs::read(xdplb)?, 0o755),
    ];
    for (role, script) in ROLES {
        files.push((
            format!("roles/{role}.sh"),
            script.as_bytes().to_vec(),
            0o755,
        ));
    }
    for (path, text) in extra {
        files.push(((*path).to_owned(), text.as_bytes().to_vec(), 0o755));
    }
    // iproute2, procps and dash as operators have them: the README's steps
    // run under dash (Debian's /bin/sh) with the real `ip` and `sysctl`
    // (busybox's ip lacks options they use, and busybox's shell prefers
    // its own applets to PATH).
    for (host, guest) in HOST_TOOLS {
        files.push((guest.to_string(), std::fs::read(host)?, 0o755));
    }
    // The libraries the binaries link, at the paths the loader looks in.
    let mut libs = BTreeSet::new();
    for binary in std::iter::once(xdplb).chain(HOST_TOOLS.iter().map(|(h, _)| Path::new(*h))) {
        for line in sh(Command::new("ldd").arg(binary))?.lines() {
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                libs.insert(path.to_owned());
            }
        }
    }
    for path in libs {
        let data = std::fs::read(&path)?;
        files.push((path.trim_start_matches('/').to_owned(), data, 0o755));
    }
    let mut order = String::new();
    for (name, data) in module_order(&moddir, MODULES)? {
        order += &format!("{name}\n");
        files.push((format!("lib/modules/{name}"), data, 0o644));
    }
    files.push(("lib/modules/order".into(), order.into_bytes(), 0o644));
    let mut gz = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()?;
    gz.stdin
        .take()
        .ok_or_else(|| anyhow!("gzip stdin"))?
        .write_all(&cpio(&files))?;
    if !gz.wait()?.success() {
        bail!("gzip failed");
    }
    Ok(())
}

/// The accelerator the guests run on, chosen once (see [`probe_accel`]).
static ACCEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn accel() -> &'static str {
    ACCEL.get().copied().unwrap_or("tcg")
}

/// KVM where it runs this kernel, else TCG: boot `vmlinuz` under KVM with
/// no root file system for at most 20 s; a kernel that gets as far as
/// panicking for want of one proves KVM works. (On the machines seen here
/// QEMU aborts at once: "failed to set MSR".) XDPLB_VM_ACCEL=tcg|kvm
/// decides instead.
fn probe_accel(vmlinuz: &Path) -> &'static str {
    ACCEL.get_or_init(|| {
        match std::env::var("XDPLB_VM_ACCEL").as_deref() {
            Ok("kvm") => return "kvm",
            Ok("tcg") => return "tcg",
            _ => {}
        }
        if !Path::new("/dev/kvm").exists() {
            return "tcg";
        }
        let Ok(mut child) = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-cpu", "max", "-m", "256", "-nographic"])
            .args(["-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel"])
            .arg(vmlinuz)
            .args(["-append", "console=ttyS0 panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            return "tcg";
        };
        let mut stdout = child.stdout.take();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(out) = stdout.as_mut() {
                let _ = std::io::Read::read_to_string(out, &mut text);
            }
            text
        });
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let console = reader.join().unwrap_or_default();
        if console.contains("Kernel panic") || console.contains("VFS:") {
            "kvm"
        } else {
            "tcg"
        }
    })
}

/// A virtio NIC of a guest: its MAC and where its frames go.
enum Nic {
    /// A QEMU hub of its own: frames go nowhere.
    Hub(u8),
    /// A multiqueue tap device in the bed's namespace.
    Tap(String),
}

/// Queue pairs of a tap NIC: twice the guest's CPUs, so virtio_net has
/// queues of its own for XDP_TX.
const TAP_QUEUES: u32 = 4;
const GUEST_CPUS: u32 = 2;

/// A running guest: its QEMU and its console, read on a thread.
struct Guest {
    child: std::process::Child,
    console: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl Guest {
    /// Boot `vmlinuz` with `initrd` as `role`, with `nics`; QEMU runs in
    /// the network namespace `netns` when given (taps live there).
    fn boot(
        vmlinuz: &Path,
        initrd: &Path,
        role: &str,
        nics: &[(&str, Nic)],
        netns: Option<&str>,
    ) -> Result<Self> {
        Self::boot_with(vmlinuz, initrd, role, nics, netns, None)
    }

    /// As [`Guest::boot`], with a raw disk image as the first virtio disk.
    fn boot_with(
        vmlinuz: &Path,
        initrd: &Path,
        role: &str,
        nics: &[(&str, Nic)],
        netns: Option<&str>,
        disk: Option<&Path>,
    ) -> Result<Self> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(["-accel", accel(), "-cpu", "max", "-m", "1024"])
            .args(["-smp", &GUEST_CPUS.to_string()])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                &format!("console=ttyS0 panic=-1 quiet net.ifnames=0 role={role}"),
            ]);
        if let Some(disk) = disk {
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", disk.display()));
        }
        for (i, (mac, nic)) in nics.iter().enumerate() {
            match nic {
                Nic::Hub(hub) => {
                    cmd.args(["-netdev", &format!("hubport,id=n{i},hubid={hub}")]);
                    cmd.args(["-device", &format!("virtio-net-pci,netdev=n{i},mac={mac}")]);
                }
                Nic::Tap(tap) => {
                    cmd.args([
                        "-netdev",
                        &format!(
                            "tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off,queues={TAP_QUEUES}"
                        ),
                    ]);
                    // Offloads off: XDP forwards frames as they are, so
                    // they must carry full checksums, as from a real NIC.
                    cmd.args([
                        "-device",
                        &format!(
                            "virtio-net-pci,netdev=n{i},mac={mac},mq=on,vectors={},csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,host_tso4=off,host_tso6=off",
                            2 * TAP_QUEUES + 2
                        ),
                    ]);
                }
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("qemu stdout"))?;
        let console = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        Ok(Self {
            child,
            console: Some(console),
            started: Instant::now(),
        })
    }

    /// Wait for the guest to power off (at most `limit`), or kill it; its
    /// console output and how long it ran.
    fn finish(mut self, limit: Duration) -> (String, Duration) {
        while self.started.elapsed() < limit {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = self.started.elapsed();
        self.stop();
        let text = self
            .console
            .take()
            .and_then(|c| c.join().ok())
            .unwrap_or_default();
        (text, took)
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The guests' network: a bridge and multiqueue taps in a namespace of
/// its own, removed on drop (nothing reaches the host's network).
struct Bed {
    netns: String,
}

impl Bed {
    fn create(taps: &[&str]) -> Result<Self> {
        let netns = format!("xdplb-vm-{}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &netns]))?;
        let bed = Self { netns };
        let ip = |args: &[&str]| sh(Command::new("ip").args(["-n", &bed.netns]).args(args));
        ip(&["link", "set", "lo", "up"])?;
        // The bridge is also the segment's router (198.18.210.254, a
        // fixed MAC the LB's gateway_mac names): tunnel packets to each
        // backend go through it, as through a real router.
        ip(&[
            "link",
            "add",
            "br0",
            "address",
            "52:54:00:00:01:fe",
            "mtu",
            "1600",
            "type",
            "bridge",
        ])?;
        ip(&["addr", "add", "198.18.210.254/24", "dev", "br0"])?;
        ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:d2::fe/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["link", "set", "br0", "up"])?;
        sh(Command::new("ip")
            .args(["netns", "exec", &bed.netns, "sysctl", "-q", "-w"])
            .args([
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.br0.send_redirects=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.br0.rp_filter=0",
            ]))?;
        // The clients' segment, behind the router, with a narrower link
        // (MTU 1400) than the client's own (1500): a backend's full-size
        // replies get "fragmentation needed" from the router, sent to the
        // VIP, which only the LB can hand to the right backend.
        ip(&["link", "add", "br1", "type", "bridge"])?;
        ip(&["addr", "add", "198.18.211.254/24", "dev", "br1"])?;
        ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:d3::fe/64",
            "dev",
            "br1",
            "nodad",
        ])?;
        // The VIPs live behind the LB.
        ip(&["route", "add", "198.18.0.10/32", "via", "198.18.210.2"])?;
        ip(&[
            "-6",
            "route",
            "add",
            "2001:db8::53/128",
            "via",
            "2001:db8:d2::2",
        ])?;
        for tap in taps {
            let (bridge, mtu) = if tap.contains("client") {
                ("br1", "1500")
            } else {
                ("br0", "1600")
            };
            ip(&["tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"])?;
            ip(&["link", "set", tap, "mtu", mtu, "master", bridge, "up"])?;
        }
        ip(&["link", "set", "br1", "mtu", "1400", "up"])?;
        Ok(bed)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
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

/// Boot the network bed's guests (LB, two backends, generator, client) on
/// a bridge of taps; their consoles, once the client and the generator are
/// done.
fn run_bed(vmlinuz: &Path, initrd: &Path) -> Result<Vec<(&'static str, String)>> {
    let bed = Bed::create(&["tap-client", "tap-lb", "tap-b1", "tap-b2", "tap-gen"])?;
    let guests = [
        ("lb", "52:54:00:00:01:02", "tap-lb"),
        ("backend", "52:54:00:00:01:03", "tap-b1"),
        ("backend", "52:54:00:00:01:04", "tap-b2"),
        ("gen", "52:54:00:00:01:05", "tap-gen"),
        ("client", "52:54:00:00:01:01", "tap-client"),
    ]
    .into_iter()
    .map(|(role, mac, tap)| {
        Guest::boot(
            vmlinuz,
            initrd,
            role,
            &[(mac, Nic::Tap(tap.into()))],
            Some(&bed.netns),
        )
        .map(|g| (role, g))
    })
    .collect::<Result<Vec<_>>>()?;
    // The client and the generator decide: each powers off when done.
    let mut consoles = Vec::new();
    let mut rest = Vec::new();
    for (role, guest) in guests {
        if role == "client" || role == "gen" {
            consoles.push((role, guest.finish(GUEST_LIMIT).0));
        } else {
            rest.push((role, guest));
        }
    }
    for (role, guest) in rest {
        consoles.push((role, guest.finish(Duration::ZERO).0));
    }
    drop(bed);
    Ok(consoles)
}

/// A guest whose kernel panicked for QEMU TCG's sake, not the project's:
/// before /init started its role, or at any time on an `int3` oops outside
/// any BPF program (TCG racing the kernel's live text patching: seen with
/// Debian's 6.12 in `sched_clock_cpu` while booting and in
/// `secure_tcpv6_seq_and_ts_off` on a backend guest that runs no XDP).
fn panicked_for_tcg(consoles: &[(&'static str, String)]) -> Option<&'static str> {
    consoles
        .iter()
        .find(|(_, c)| {
            c.contains("Kernel panic")
                && (!c.contains("XDPLB-VM: kernel ")
                    || (c.contains("Oops: int3") && !c.contains("bpf_prog_")))
        })
        .map(|(role, _)| *role)
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
            &[("deploy-backend.sh", deploy.clone())],
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
