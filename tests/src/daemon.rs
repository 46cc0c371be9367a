//! Running the real `xdplb` binary in a test namespace, and the backend
//! servers (HTTP, UDP) it health-checks.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// The `xdplb` binary, built once per test process. `XDPLB_BIN` points the
/// tests at another build instead (e.g. an older one, to show a test fails
/// on it).
pub fn xdplb_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("XDPLB_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "--package",
                "xdp-user",
                "--bin",
                "xdplb",
            ])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building xdplb failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("xdplb")
    })
}

/// Run `xdplb ARGS` (a client command, its socket from `$XDPLB_SOCKET`)
/// and return its output.
pub fn xdplb(socket: &Path, args: &[&str]) -> Output {
    Command::new(xdplb_bin())
        .env("XDPLB_SOCKET", socket)
        .args(args)
        .output()
        .expect("running xdplb")
}

/// An `xdplb` command that will run in `ns` (see [`Netns::command`]).
pub fn in_netns(ns: &Netns) -> Result<(Command, std::fs::File)> {
    ns.command(xdplb_bin())
}

/// Run `xdplb ARGS` in `ns` to completion, killed after `limit`.
pub fn run_in(ns: &Netns, args: &[&str], limit: Duration) -> Result<Output> {
    let (mut cmd, netns) = in_netns(ns)?;
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(netns);
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("xdplb {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// A running `xdplb run` inside a namespace; stopped (SIGTERM) on drop.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

/// How a test starts the daemon.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// RLIMIT_NOFILE (soft, hard), as a service manager would set it.
    pub nofile: Option<(u64, u64)>,
    /// A command the daemon runs under (`setpriv ...`, `unshare ...`); the
    /// binary and its arguments follow it.
    pub wrapper: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Start `xdplb run` in `ns`. Only the network namespace is entered:
    /// `ip netns exec` would also give the daemon a private mount namespace
    /// with its own /sys, hence its own bpffs, and its pins would be
    /// invisible to the host and lost on restart.
    pub fn start(ns: &Netns, config: &Path, socket: &Path, log: PathBuf) -> Result<Self> {
        Self::start_with_nofile(ns, config, socket, log, None)
    }

    /// [`Daemon::start`] with RLIMIT_NOFILE set to (soft, hard) first, as a
    /// service manager would.
    pub fn start_with_nofile(
        ns: &Netns,
        config: &Path,
        socket: &Path,
        log: PathBuf,
        nofile: Option<(u64, u64)>,
    ) -> Result<Self> {
        Self::start_with(
            ns,
            config,
            socket,
            log,
            &Launch {
                nofile,
                ..Launch::default()
            },
        )
    }

    /// [`Daemon::start`] as `launch` describes (a wrapper command, its
    /// environment, resource limits).
    pub fn start_with(
        ns: &Netns,
        config: &Path,
        socket: &Path,
        log: PathBuf,
        launch: &Launch,
    ) -> Result<Self> {
        let mut daemon = Self::spawn(ns, config, log, launch)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("xdplb run exited early ({status}):\n{}", daemon.log_text());
            }
            if xdplb(socket, &["status", "--json"]).status.success() {
                return Ok(daemon);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "xdplb run did not answer within 20 s:\n{}",
            daemon.log_text()
        )
    }

    /// Start `xdplb run` as `launch` describes without waiting for it.
    pub fn spawn(ns: &Netns, config: &Path, log: PathBuf, launch: &Launch) -> Result<Self> {
        let nofile = launch.nofile;
        let log_file = std::fs::File::create(&log)?;
        let (mut cmd, netns) = match &launch.wrapper {
            Some(argv) => {
                let (mut cmd, netns) = ns.command(Path::new(&argv[0]))?;
                cmd.args(&argv[1..]).arg(xdplb_bin());
                (cmd, netns)
            }
            None => in_netns(ns)?,
        };
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; runs in the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting xdplb run")?;
        drop(netns);
        Ok(Self { child, log })
    }

    /// Wait up to `limit` for the daemon to exit; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of /proc/<pid>/status, e.g. `VmRSS` (kB) or `Threads`.
    pub fn proc_status(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// CPU time (user + system) the daemon has used.
    pub fn cpu_time(&self) -> Duration {
        let text =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name's closing parenthesis; utime and
        // stime are the 12th and 13th of those, in clock ticks.
        let rest = text.rsplit(')').next().unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Open descriptors of the daemon.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM and wait; the daemon must exit cleanly.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("xdplb exited with {status}:\n{}", self.log_text());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("xdplb ignored SIGTERM for 10 s")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
    }
}

/// A server thread that can be stopped (the backend "dies") and whose
/// socket is closed when it stops.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Server {
    /// An HTTP/1.0 server answering every request with `200 OK` and the
    /// body `backend <name>` (so clients can tell who answered). The calling
    /// thread must be in the namespace the socket belongs to.
    pub fn http(addr: SocketAddr) -> Result<Self> {
        Self::http_named(addr, &addr.to_string())
    }

    pub fn http_named(addr: SocketAddr, name: &str) -> Result<Self> {
        let body = format!("backend {name}\n");
        Self::tcp(
            addr,
            move |mut s: std::net::TcpStream, _stop: &AtomicBool| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            },
        )
    }

    /// A line server for long-lived connections: every line in gets
    /// `<name>\n` back, until the client closes or the server stops (which
    /// closes every connection, as a dead backend would).
    pub fn echo(addr: SocketAddr, name: &str) -> Result<Self> {
        let reply = format!("{name}\n");
        Self::tcp(
            addr,
            move |mut s: std::net::TcpStream, stop: &AtomicBool| {
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                                if s.write_all(reply.as_bytes()).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            },
        )
    }

    /// A TCP server running `serve` on a thread per connection.
    fn tcp<F>(addr: SocketAddr, serve: F) -> Result<Self>
    where
        F: Fn(std::net::TcpStream, &AtomicBool) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let serve = Arc::new(serve);
        let thread = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let (serve, flag) = (serve.clone(), flag.clone());
                        connections.push(std::thread::spawn(move || serve(s, &flag)));
                        connections.retain(|c: &JoinHandle<()>| !c.is_finished());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            drop(listener);
            for c in connections {
                let _ = c.join();
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            addr,
        })
    }

    /// A UDP responder: `ping` gets `pong from <addr>`.
    pub fn udp(addr: SocketAddr) -> Result<Self> {
        Self::udp_named(addr, &addr.to_string())
    }

    /// A UDP responder: `ping` gets `pong from <name>`. Bind it to the
    /// address replies must come from (a wildcard socket would answer from
    /// the interface's address, not the VIP's).
    pub fn udp_named(addr: SocketAddr, name: &str) -> Result<Self> {
        let reply = format!("pong from {name}");
        let socket = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    if buf[..n].starts_with(b"ping") {
                        let _ = socket.send_to(reply.as_bytes(), from);
                    }
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            addr,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Poll `f` every 50 ms until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
