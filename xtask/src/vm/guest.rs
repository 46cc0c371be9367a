//! A guest: QEMU (KVM where it works, else TCG) with virtio NICs, and
//! its console.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

/// The accelerator the guests run on, chosen once (see [`probe_accel`]).
pub(super) static ACCEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

pub(super) fn accel() -> &'static str {
    ACCEL.get().copied().unwrap_or("tcg")
}

/// KVM where it runs this kernel, else TCG: boot `vmlinuz` under KVM with
/// no root file system for at most 20 s; a kernel that gets as far as
/// panicking for want of one proves KVM works. (On the machines seen here
/// QEMU aborts at once: "failed to set MSR".) XDPLB_VM_ACCEL=tcg|kvm
/// decides instead.
pub(super) fn probe_accel(vmlinuz: &Path) -> &'static str {
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
pub(super) enum Nic {
    /// A QEMU hub of its own: frames go nowhere.
    Hub(u8),
    /// A multiqueue tap device in the bed's namespace.
    Tap(String),
}

/// Queue pairs of a tap NIC: twice the guest's CPUs, so virtio_net has
/// queues of its own for XDP_TX.
pub(super) const TAP_QUEUES: u32 = 4;
pub(super) const GUEST_CPUS: u32 = 2;

/// A running guest: its QEMU and its console, read on a thread.
pub(super) struct Guest {
    child: std::process::Child,
    console: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl Guest {
    /// Boot `vmlinuz` with `initrd` as `role`, with `nics`; QEMU runs in
    /// the network namespace `netns` when given (taps live there).
    pub(super) fn boot(
        vmlinuz: &Path,
        initrd: &Path,
        role: &str,
        nics: &[(&str, Nic)],
        netns: Option<&str>,
    ) -> Result<Self> {
        Self::boot_with(vmlinuz, initrd, role, nics, netns, None)
    }

    /// As [`Guest::boot`], with a raw disk image as the first virtio disk.
    pub(super) fn boot_with(
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
    pub(super) fn finish(mut self, limit: Duration) -> (String, Duration) {
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

    pub(super) fn stop(&mut self) {
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
