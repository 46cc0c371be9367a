//! The operator's host: a Debian 12 root with systemd 252, built from
//! Debian's packages by mmdebstrap (cached under target/vm), with the
//! guest kernel's modules, booted from a virtio disk. A unit in it runs
//! `operator.sh`: the .deb installed, enabled and started under systemd,
//! the watchdog, reloads refused and accepted, the journal's lines, an
//! upgrade to a rebuilt package under a client's traffic, remove and
//! purge. Two backends and a client (the initramfs guests) share its
//! network bed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{result_lines, sh, Bed, Guest, Nic};

/// What the root holds besides Debian's essential packages.
const PACKAGES: &str = "systemd,systemd-sysv,udev,kmod,iproute2,procps,socat";

/// The suite the root is built from: Debian 12, as the operator ran.
const SUITE: &str = "bookworm";

/// The unit that runs the operator's steps once the system is up.
const UNIT: &str = "\
[Unit]
Description=xdplb vmtest: the operator's steps
After=multi-user.target systemd-journald.service
Wants=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh /xdplb-test/operator.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=default.target
";

/// The operator's steps (a shell script run by the unit above).
const STEPS: &str = include_str!("operator.sh");

/// Longest the operator's guest may run.
const LIMIT: Duration = Duration::from_secs(720);

/// The Debian root for the kernel extracted at `kroot` (built once, then
/// reused while its stamp matches).
fn debian_root(cache: &Path, kroot: &Path) -> Result<PathBuf> {
    let root = cache.join("debian-root");
    let stamp = format!("{SUITE} {PACKAGES} {}\n", kroot.display());
    if std::fs::read_to_string(cache.join("debian-root.stamp")).ok() == Some(stamp.clone()) {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    println!("vmtest: building a Debian {SUITE} root with systemd (mmdebstrap)");
    sh(Command::new("mmdebstrap")
        .args(["--variant=apt", "--mode=root", "--quiet"])
        .arg(format!("--include={PACKAGES}"))
        .arg(SUITE)
        .arg(&root)
        .arg("http://deb.debian.org/debian"))
    .context("mmdebstrap (Debian's mirror must be reachable)")?;
    // The kernel's modules, as its package installs them, and their index.
    let modules = kroot.join("lib/modules");
    sh(Command::new("cp")
        .arg("-a")
        .arg(&modules)
        .arg(root.join("lib/")))?;
    for release in std::fs::read_dir(&modules)?.flatten() {
        sh(Command::new("chroot").arg(&root).args([
            "depmod",
            "-a",
            &release.file_name().to_string_lossy(),
        ]))?;
    }
    std::fs::write(root.join("etc/hostname"), "lb\n")?;
    std::fs::write(
        root.join("etc/fstab"),
        "/dev/vda / ext4 defaults 0 1\nbpffs /sys/fs/bpf bpf defaults 0 0\n",
    )?;
    // The console is the test's: no login prompt on it.
    for unit in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        std::os::unix::fs::symlink("/dev/null", root.join("etc/systemd/system").join(unit))?;
    }
    std::fs::write(
        root.join("etc/systemd/system/xdplb-vmtest.service"),
        UNIT.as_bytes(),
    )?;
    let wants = root.join("etc/systemd/system/default.target.wants");
    std::fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/xdplb-vmtest.service",
        wants.join("xdplb-vmtest.service"),
    )?;
    std::fs::write(cache.join("debian-root.stamp"), stamp)?;
    Ok(root)
}

/// The root's disk image with the packages and the steps in /xdplb-test.
fn disk(root: &Path, debs: &[PathBuf], out: &Path) -> Result<()> {
    let test = root.join("xdplb-test");
    let _ = std::fs::remove_dir_all(&test);
    std::fs::create_dir_all(&test)?;
    std::fs::write(test.join("operator.sh"), STEPS)?;
    for (i, deb) in debs.iter().enumerate() {
        std::fs::copy(deb, test.join(format!("xdplb_{}.deb", i + 1)))
            .with_context(|| format!("copying {}", deb.display()))?;
    }
    let _ = std::fs::remove_file(out);
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(root)
        .arg(out)
        .arg("2G"))?;
    Ok(())
}

/// Boot the operator's host beside two backends and a client; the
/// result lines of every guest and whether the operator's steps passed.
pub fn run(
    cache: &Path,
    kroot: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    debs: &[PathBuf],
) -> Result<(bool, Vec<String>)> {
    let root = debian_root(cache, kroot)?;
    let image = cache.join("operator.img");
    disk(&root, debs, &image)?;
    let bed = Bed::create(&["tap-client", "tap-lb", "tap-b1", "tap-b2"])?;
    let boot = |role: &str, mac: &str, tap: &str, disk: Option<&Path>| {
        Guest::boot_with(
            vmlinuz,
            initrd,
            role,
            &[(mac, Nic::Tap(tap.into()))],
            Some(&bed.netns),
            disk,
        )
    };
    let operator = boot("disk", "52:54:00:00:01:02", "tap-lb", Some(&image))?;
    let others = [
        (
            "backend",
            boot("backend", "52:54:00:00:01:03", "tap-b1", None)?,
        ),
        (
            "backend",
            boot("backend", "52:54:00:00:01:04", "tap-b2", None)?,
        ),
        (
            "steady",
            boot("steady", "52:54:00:00:01:01", "tap-client", None)?,
        ),
    ];
    let (console, took) = operator.finish(LIMIT);
    let mut lines = result_lines(&console, "operator");
    let passed = lines.iter().any(|l| l.ends_with("XDPLB-VM: PASS"));
    let mut consoles = vec![("operator", console)];
    for (role, guest) in others {
        let (c, _) = guest.finish(Duration::ZERO);
        lines.extend(result_lines(&c, role));
        consoles.push((role, c));
    }
    drop(bed);
    if !passed {
        for (role, c) in &consoles {
            println!("--- {role}\n{c}");
        }
    }
    lines.push(format!("operator's host ran {:.0} s", took.as_secs_f64()));
    Ok((passed, lines))
}
