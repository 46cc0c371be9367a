//! Network namespaces for privileged tests: uniquely named, removed on drop
//! (also when the test panics), never connected to the host's network.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `xdplb-<tag>-<pid>-<n>`.
pub struct Netns {
    pub name: String,
}

/// Run `cmd` and return its stdout; a failure carries its stderr.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!(
            "xdplb-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv))
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["ip"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// Move the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Result<NsGuard> {
        enter(&self.name)
    }

    /// A command that will run in this namespace (network namespace only:
    /// `ip netns exec` would also give it a private mount namespace with its
    /// own /sys, hence its own bpffs). Keep the returned file open until the
    /// command has started.
    pub fn command(&self, program: &std::path::Path) -> Result<(Command, File)> {
        use std::os::unix::process::CommandExt as _;
        let netns = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((cmd, netns))
    }
}

/// Move the calling thread into the namespace named `name` until the guard
/// drops (for threads that only know the name).
pub fn enter(name: &str) -> Result<NsGuard> {
    let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
    let target = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening netns {name}"))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(NsGuard { original })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Returns the thread to its original namespace on drop.
pub struct NsGuard {
    original: File,
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; the fd is the thread's original namespace.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}
