//! Project tasks: `cargo xtask setup` installs what the build and tests need;
//! `cargo xtask test` runs every check CI runs.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod vm;

/// bpf-linker release the eBPF build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-deb release that builds the Debian package.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages the build and the privileged tests use (the command, or
/// a file, each provides).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    // The load test's kernel-forwarding baseline.
    ("iptables", "iptables"),
    // The HA tests: a BGP router and LB hosts, and an active-standby pair.
    ("bird2", "bird"),
    ("frr", "vtysh"),
    ("keepalived", "keepalived"),
    // The VM tests: QEMU and the guest's userland.
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("socat", "socat"),
    // The VM bed's LB shares its NIC with xdp-filter (libxdp's dispatcher).
    ("xdp-tools", "xdp-filter"),
    // The operator's host in the VM bed: a Debian root with systemd.
    ("mmdebstrap", "mmdebstrap"),
    // The packaging tests: alert rules, dashboard queries, the unit.
    ("prometheus", "promtool"),
    ("systemd", "systemd-analyze"),
    // Building the etcd client (its gRPC code is generated from etcd's
    // .proto files, which import protobuf's own).
    ("protobuf-compiler", "protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    // The fleet tests: a three-member etcd cluster, TLS certificates.
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("openssl", "openssl"),
];

#[derive(Parser)]
#[command(about = "xdplb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: rust-src, bpf-linker (against the
    /// toolchain's own LLVM), Debian packages the tests use.
    Setup,
    /// Setup, then the demo: a network of namespaces, `xdplb run`, real
    /// connections, a backend killed and revived. Needs root.
    Demo {
        /// Leave the network and daemon up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Setup, then the benchmarks (release build), each figure beside its
    /// baseline. Needs root.
    Bench {
        /// Only these sections (comma-separated: dataplane, maglev, ring,
        /// detection, health, storm, flows).
        #[arg(long)]
        only: Option<String>,
        /// Measure another balancer beside xdp_lb: `katran=DIR`, the root
        /// of a Katran checkout (its balancer is built with clang and
        /// loaded with bpftool, which are installed if missing).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Setup, then the load test: live-frames generator -> LB -> sink for
    /// 1, 1k and 1M flows, beside an XDP MAC swap and iptables DNAT. Needs root.
    Loadtest,
    /// Setup, then the Debian package (cargo deb): the release binary, its
    /// man pages and completions, the systemd unit, the example configs.
    /// Prints the .deb's path.
    Package,
    /// Setup, then boot Debian's 6.1 and 6.12 kernels under QEMU and check
    /// in each that the verifier accepts every program and xdplb attaches
    /// natively to virtio_net. Needs root.
    Vmtest,
    /// Setup, then fmt, clippy (workspace and eBPF crate), unit tests and the
    /// privileged tests. Needs root.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only run privileged tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup().map(|_| ()),
        Task::Test { no_lint, filter } => test(no_lint, filter.as_deref()),
        Task::Demo { keep } => demo(keep),
        Task::Bench { only, peer } => bench_with(only.as_deref(), peer.as_deref()),
        Task::Loadtest => bench(&["--loadtest"]),
        Task::Package => package(),
        Task::Vmtest => vmtest(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Run a command that must succeed, with its output shown.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Output of a command, if it ran and succeeded.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The toolchain that builds the eBPF object (the same choice `xdp-user/build.rs`
/// makes): nightly where installed, else stable with RUSTC_BOOTSTRAP=1.
struct EbpfToolchain {
    name: String,
    bootstrap: bool,
}

impl EbpfToolchain {
    fn detect() -> Result<Self> {
        if let Ok(name) = env::var("XDPLB_EBPF_TOOLCHAIN") {
            let bootstrap = name != "nightly";
            return Ok(Self { name, bootstrap });
        }
        if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_some() {
            return Ok(Self {
                name: "nightly".into(),
                bootstrap: false,
            });
        }
        output(Command::new("rustup").args(["run", "stable", "rustc", "--version"]))
            .ok_or_else(|| anyhow!("neither a nightly nor a stable toolchain is installed with rustup; install one: rustup toolchain install nightly"))?;
        Ok(Self {
            name: "stable".into(),
            bootstrap: true,
        })
    }

    fn cargo(&self) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &self.name, "cargo"]);
        if self.bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd
    }

    fn rustc_output(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new("rustup")
                .args(["run", &self.name, "rustc"])
                .args(args),
        )
        .ok_or_else(|| anyhow!("rustc {args:?} failed on toolchain {}", self.name))
    }
}

/// What setup found or did, for its report.
struct Report {
    installed: Vec<String>,
}

fn setup() -> Result<EbpfToolchain> {
    let started = Instant::now();
    let toolchain = EbpfToolchain::detect()?;
    let mut report = Report {
        installed: Vec::new(),
    };
    println!(
        "setup: eBPF toolchain: {}{}",
        toolchain.name,
        if toolchain.bootstrap {
            " (with RUSTC_BOOTSTRAP=1)"
        } else {
            ""
        }
    );
    ensure_components(&toolchain, &mut report)?;
    ensure_bpf_linker(&toolchain, &mut report)?;
    ensure_cargo_deb(&mut report)?;
    ensure_debian_packages(DEBIAN_PACKAGES, &mut report)?;
    ensure_python_packages(&mut report)?;
    if report.installed.is_empty() {
        println!(
            "setup: everything already in place ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "setup: installed {} ({:.1}s)",
            report.installed.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(toolchain)
}

/// rust-src (for `-Z build-std=core`) and clippy (for the eBPF crate's lint)
/// on the eBPF toolchain.
fn ensure_components(toolchain: &EbpfToolchain, report: &mut Report) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &toolchain.name,
    ]))
    .unwrap_or_default();
    for component in ["rust-src", "clippy"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        println!("setup: installing {component} for {}", toolchain.name);
        run(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            &toolchain.name,
        ]))
        .with_context(|| {
            format!("installing {component} failed; check network access to static.rust-lang.org")
        })?;
        report
            .installed
            .push(format!("{component} ({})", toolchain.name));
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
}

/// bpf-linker must use the LLVM rustc uses. No such LLVM is packaged, so it
/// is built against the toolchain's own libLLVM, exposed through a prefix
/// directory of symlinks that stays in place (the binary links to it).
fn ensure_bpf_linker(toolchain: &EbpfToolchain, report: &mut Report) -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    let verbose = toolchain.rustc_output(&["-vV"])?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or_else(|| anyhow!("rustc -vV does not name its LLVM version"))?
        .to_owned();
    let sysroot = PathBuf::from(toolchain.rustc_output(&["--print", "sysroot"])?.trim());
    let libdir = sysroot.join("lib");
    let lib_name = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM.so.* in {}: the toolchain ships no shared LLVM",
                libdir.display()
            )
        })?;
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    let prefix = cargo_home.join("xdplb-llvm").join(&lib_name);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", lib_name.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(libdir.join(&lib_name), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {lib_name} (LLVM {llvm_major}); about a minute"
    );
    run(toolchain
        .cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed (see cargo's output above); it needs network access to crates.io and a C toolchain")?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?");
    }
    report
        .installed
        .push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

/// `cargo build --release` of the xdplb binary; its path.
fn build_release_xdplb(root: &Path) -> Result<PathBuf> {
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "xdp-user",
        "--bin",
        "xdplb",
    ]))?;
    Ok(root.join("target/release/xdplb"))
}

/// Boot the guest kernels and run the checks in each; a table of results.
fn vmtest() -> Result<()> {
    setup()?;
    let root = workspace_root();
    // The release binary: a tenth of the debug one's size in the initramfs.
    let xdplb = build_release_xdplb(&root)?;
    // The operator's host installs the package, then upgrades to a rebuild.
    // (Each copied at once: cargo deb clears its output directory.)
    let debs = [1, 2]
        .into_iter()
        .map(|revision| {
            let kept = root.join(format!("target/vm/xdplb_{revision}.deb"));
            std::fs::create_dir_all(root.join("target/vm"))?;
            std::fs::copy(build_deb(&root, &xdplb, Some(revision))?, &kept)?;
            Ok(kept)
        })
        .collect::<Result<Vec<_>>>()?;
    let outcomes = vm::run(&root, &xdplb, &debs)?;
    println!("\nvmtest:");
    for o in &outcomes {
        println!(
            "  {:<6} {:<40} {:>5}  {:>6.1}s",
            o.kernel,
            o.package,
            if o.passed { "ok" } else { "FAIL" },
            o.seconds
        );
        for line in &o.lines {
            println!("         {line}");
        }
    }
    // The failures once more, last: a log cut to its tail keeps them.
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| {
            let why: Vec<&str> = o
                .lines
                .iter()
                .map(String::as_str)
                .filter(|l| l.contains("FAIL"))
                .collect();
            format!(
                "the guest with kernel {} failed: {}",
                o.package,
                if why.is_empty() {
                    "no role said why".to_string()
                } else {
                    why.join("; ")
                }
            )
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(anyhow!("{}", failed.join("\n")))
}

fn ensure_cargo_deb(report: &mut Report) -> Result<()> {
    let installed = output(Command::new("cargo").args(["deb", "--version"]))
        .is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_DEB_VERSION));
    if installed {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        &format!("={CARGO_DEB_VERSION}"),
    ]))
    .context("installing cargo-deb failed (it needs network access to crates.io)")?;
    report
        .installed
        .push(format!("cargo-deb {CARGO_DEB_VERSION}"));
    Ok(())
}

/// Python packages the tests run, from PyPI: aioquic, the QUIC stack of
/// the QUIC routing test (server and moving client).
const PYTHON_PACKAGES: &[&str] = &["aioquic==1.7.2"];

/// Where [`PYTHON_PACKAGES`] are installed (`pip install --target`), for
/// the tests' `PYTHONPATH` (`XDPLB_PYTHONPATH`).
fn python_packages_dir() -> PathBuf {
    workspace_root().join("target").join("python")
}

fn ensure_python_packages(report: &mut Report) -> Result<()> {
    let dir = python_packages_dir();
    let stamp = dir.join(".installed");
    let wanted = PYTHON_PACKAGES.join(" ");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    println!("setup: installing {wanted} into {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore", "--target"])
        .arg(&dir)
        .args(PYTHON_PACKAGES))
    .context("installing Python packages failed (python3 with pip, and network access to PyPI, are needed)")?;
    std::fs::write(&stamp, &wanted)?;
    report.installed.push(wanted);
    Ok(())
}

/// The Debian package: release binary, generated man pages and
/// completions (`xdplb generate`), then `cargo deb` with the assets listed
/// in xdp-user/Cargo.toml.
fn package() -> Result<()> {
    setup()?;
    let root = workspace_root();
    let xdplb = build_release_xdplb(&root)?;
    println!("{}", build_deb(&root, &xdplb, None)?.display());
    Ok(())
}

/// `cargo deb` of the release binary `xdplb` (built), with revision
/// `revision` when given (the VM bed's upgrade); the .deb's path.
fn build_deb(root: &Path, xdplb: &Path, revision: Option<u32>) -> Result<PathBuf> {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if target != root.join("target") {
        bail!("the package's assets are listed under target/; unset CARGO_TARGET_DIR");
    }
    let assets = target.join("xdplb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    run(Command::new(xdplb).arg("__generate").arg(&assets))?;
    let mut deb = Command::new("cargo");
    deb.current_dir(root)
        .args(["deb", "--package", "xdp-user", "--no-build"]);
    if let Some(r) = revision {
        deb.args(["--deb-revision", &r.to_string()]);
    }
    let out = output(&mut deb).ok_or_else(|| {
        anyhow!("cargo deb failed; run `cargo deb -p xdp-user --no-build` to see why")
    })?;
    let path = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .ok_or_else(|| anyhow!("cargo deb named no .deb: {out}"))?;
    Ok(root.join(path))
}

fn ensure_debian_packages(packages: &[(&str, &str)], report: &mut Report) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, provides)| {
            // A command, or a file the package installs.
            let probe = if provides.starts_with('/') {
                format!("test -e {provides}")
            } else {
                format!("command -v {provides}")
            };
            !Command::new("sh")
                .args(["-c", &probe])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; install them as root (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update failed")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed")?;
    report
        .installed
        .extend(missing.iter().map(|p| p.to_string()));
    Ok(())
}

fn cargo_in_root() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn demo(keep: bool) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and attaches XDP programs, which needs root; run it as root (sudo -E cargo xtask demo)");
    }
    setup()?;
    let mut cmd = cargo_in_root();
    cmd.args([
        "run",
        "--quiet",
        "--package",
        "integration-tests",
        "--bin",
        "xdplb-demo",
    ]);
    if keep {
        cmd.args(["--", "--keep"]);
    }
    run(&mut cmd).context("the demo failed")
}

/// The tools `--peer katran=DIR` builds and loads Katran with.
const PEER_PACKAGES: &[(&str, &str)] =
    &[("clang", "clang"), ("bpftool", "bpftool"), ("gcc", "gcc")];

fn bench_with(only: Option<&str>, peer: Option<&str>) -> Result<()> {
    let mut args = Vec::new();
    if let Some(o) = only {
        args.extend(["--only", o]);
    }
    if let Some(p) = peer {
        if !p.starts_with("katran=") {
            bail!("--peer takes katran=DIR (the root of a Katran checkout), not {p:?}");
        }
        let mut report = Report {
            installed: Vec::new(),
        };
        ensure_debian_packages(PEER_PACKAGES, &mut report)?;
        args.extend(["--peer", p]);
    }
    bench(&args)
}

fn bench(args: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks load XDP programs and build namespaces, which needs root; run as root"
        );
    }
    setup()?;
    run(cargo_in_root()
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "integration-tests",
            "--bin",
            "xdplb-bench",
            "--",
        ])
        .args(args))
    .context("the benchmarks failed")
}

/// One step of `cargo xtask test` and how it went.
struct Step {
    name: &'static str,
    ok: bool,
    seconds: f64,
}

fn test(no_lint: bool, filter: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask test runs BPF programs and network namespaces and needs root; run it as root (sudo -E cargo xtask test)");
    }
    let root = workspace_root();
    let toolchain = setup()?;
    let cargo = cargo_in_root;
    let mut steps: Vec<(&'static str, Command)> = Vec::new();
    if !no_lint {
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--check"]);
        steps.push(("cargo fmt --check", fmt));
        let mut clippy = cargo();
        clippy.args([
            "clippy",
            "--workspace",
            "--exclude",
            "xdp-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        steps.push(("clippy (workspace)", clippy));
        let mut clippy_ebpf = toolchain.cargo();
        clippy_ebpf.current_dir(&root).args([
            "clippy",
            "--package",
            "xdp-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
        steps.push(("clippy (eBPF crate)", clippy_ebpf));
    }
    let mut unit = cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "xdp-ebpf",
        "--exclude",
        "integration-tests",
    ]);
    steps.push(("unit tests", unit));
    // Privileged tests share kernel state (bpffs, namespaces): one at a time.
    let mut privileged = cargo();
    privileged
        .env("XDPLB_PYTHONPATH", python_packages_dir())
        .args(["test", "--package", "integration-tests", "--"]);
    if let Some(filter) = filter {
        privileged.arg(filter);
    }
    privileged.arg("--test-threads=1");
    steps.push(("privileged tests", privileged));
    // The guest kernels (Debian's 6.1 and 6.12 under QEMU): the verifier
    // and native XDP on virtio_net, where this machine's kernel proves
    // neither.
    if filter.is_none() {
        let mut vm = cargo();
        vm.args(["run", "--quiet", "--package", "xtask", "--", "vmtest"]);
        steps.push(("VM tests", vm));
    }

    let mut results = Vec::new();
    for (name, mut cmd) in steps {
        println!("\n==> {name}");
        let started = Instant::now();
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        results.push(Step {
            name,
            ok,
            seconds: started.elapsed().as_secs_f64(),
        });
        if !ok {
            break;
        }
    }
    println!("\nsummary:");
    for step in &results {
        println!(
            "  {:<22} {:>4}  {:>6.1}s",
            step.name,
            if step.ok { "ok" } else { "FAIL" },
            step.seconds
        );
    }
    match results.iter().find(|s| !s.ok) {
        Some(failed) => Err(anyhow!("{} failed", failed.name)),
        None => Ok(()),
    }
}
