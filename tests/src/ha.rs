//! High availability across LB hosts, end to end: the LB hosts share one
//! segment with the router, each runs `xdplb` with `examples/ha/xdplb.toml`
//! and, for ECMP, BIRD with `examples/ha/bird-lb.conf`; the router runs
//! BIRD with `examples/ha/bird-router.conf` (BGP multipath and BFD); for
//! active-standby the LB hosts run keepalived with
//! `examples/ha/keepalived.conf` instead. Clients keep long-lived TCP
//! connections open and open new ones every few milliseconds while faults
//! are injected; [`Traffic`] counts what broke.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    daemon::wait_for,
    e2e::{http_get, Conn, System},
    netns::Netns,
    topology::{Spec, Topology},
};

/// The VIP of the HA examples.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The VIPs' next hop that VRRP moves (`examples/ha/keepalived.conf`).
pub const VRRP_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 100);

/// A file of `examples/ha/`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("examples/ha")
        .join(name)
}

/// `examples/ha/xdplb.toml` with this test host's pin directory and socket
/// (the only lines a test host changes).
pub fn lb_config(pin_dir: &Path, socket: &Path) -> String {
    let text = std::fs::read_to_string(example("xdplb.toml")).expect("examples/ha/xdplb.toml");
    assert!(
        !text.contains("[daemon]") && !text.contains("[api]"),
        "the example sets neither the pin directory nor the socket"
    );
    format!(
        "{text}\n[daemon]\npin_dir = \"{}\"\n\n[api]\nsocket = \"{}\"\n",
        pin_dir.display(),
        socket.display()
    )
}

/// A program of a Debian package (BIRD, keepalived) running in a namespace
/// through `ip netns exec`; killed on drop.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Service {
    pub fn start(ns: &Netns, argv: &[&str], log: PathBuf) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {argv:?} in {}", ns.name))?;
        Ok(Self {
            child: Some(child),
            log,
            name: argv[0].to_owned(),
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send `signal`, then wait for the exit (SIGKILL after 5 s).
    pub fn stop_with(&mut self, signal: i32) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// The logs of `services`, one after the other.
pub fn logs(services: &[Service]) -> String {
    services
        .iter()
        .map(|s| format!("--- {}\n{}", s.name, s.log_text()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_with(libc::SIGKILL);
    }
}

/// BIRD in `ns` with `config`, its control socket and log in `dir`.
pub fn bird(ns: &Netns, config: &Path, dir: &Path, name: &str) -> Result<(Service, PathBuf)> {
    let ctl = dir.join(format!("{name}.ctl"));
    let pid = dir.join(format!("{name}.pid"));
    let service = Service::start(
        ns,
        &[
            "bird",
            "-f",
            "-c",
            &config.to_string_lossy(),
            "-s",
            &ctl.to_string_lossy(),
            "-P",
            &pid.to_string_lossy(),
        ],
        dir.join(format!("{name}.log")),
    )?;
    Ok((service, ctl))
}

/// `birdc` on the control socket `ctl`.
pub fn birdc(ctl: &Path, args: &[&str]) -> Result<String> {
    crate::netns::sh(Command::new("birdc").arg("-s").arg(ctl).args(args))
}

/// The next hops of the router's route to `dest` in its main table (empty:
/// no route), read through rtnetlink by a thread inside the namespace.
pub fn next_hops(dest: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
    use netlink_packet_core::NLM_F_DUMP;
    use netlink_packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage},
        AddressFamily, RouteNetlinkMessage,
    };
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    let replies = xdp_user::iface::transact(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    let mut out = BTreeSet::new();
    for reply in replies {
        let RouteNetlinkMessage::NewRoute(r) = reply else {
            continue;
        };
        if r.header.destination_prefix_length != 32
            || !r
                .attributes
                .contains(&RouteAttribute::Destination(RouteAddress::Inet(dest)))
        {
            continue;
        }
        for a in &r.attributes {
            match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => {
                    out.insert(*g);
                }
                RouteAttribute::MultiPath(hops) => {
                    for hop in hops {
                        for ha in &hop.attributes {
                            if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = ha {
                                out.insert(*g);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// A set of next hops and when the router took it.
pub type HopsAt = (Instant, BTreeSet<Ipv4Addr>);

/// Every change of the router's next hops for the VIP, timestamped, from a
/// thread polling rtnetlink every millisecond inside the router's namespace.
pub struct RouteWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<HopsAt>>>,
    thread: Option<JoinHandle<()>>,
}

impl RouteWatch {
    pub fn start(router: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), changes.clone());
        let ns = router.name.clone();
        let thread = std::thread::spawn(move || {
            let Ok(_inside) = crate::netns::enter(&ns) else {
                return;
            };
            let mut last = None;
            // Bounded: an hour at most, whatever the test does.
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(hops) = next_hops(VIP) {
                    if last.as_ref() != Some(&hops) {
                        last = Some(hops.clone());
                        log.lock().expect("route log").push((Instant::now(), hops));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    /// The next hops now.
    pub fn current(&self) -> BTreeSet<Ipv4Addr> {
        self.changes
            .lock()
            .expect("route log")
            .last()
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    }

    /// Every change after `since`.
    pub fn changes_since(&self, since: Instant) -> Vec<HopsAt> {
        self.changes
            .lock()
            .expect("route log")
            .iter()
            .filter(|(at, _)| *at >= since)
            .cloned()
            .collect()
    }

    /// Wait until `check` holds for the next hops; how long after `since`
    /// the first change that satisfied it happened.
    pub fn wait(
        &self,
        since: Instant,
        limit: Duration,
        check: impl Fn(&BTreeSet<Ipv4Addr>) -> bool,
    ) -> Result<Duration> {
        wait_for(limit, || {
            let log = self.changes.lock().expect("route log");
            let (at, hops) = log.last()?;
            if !check(hops) {
                return None;
            }
            Some(at.saturating_duration_since(since))
        })
        .ok_or_else(|| {
            anyhow!(
                "the router's next hops did not change as expected within {limit:?}: now {:?}",
                self.current()
            )
        })
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An established connection that broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    /// The backend it was on.
    pub backend: String,
    /// When it was opened.
    pub opened: Instant,
}

/// What the traffic saw in one interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// New connections that completed a request.
    pub new_ok: u64,
    /// New connections that failed (connect timeout, reset).
    pub new_failed: u64,
    /// When each of them failed, and why (the first error in the chain).
    pub new_errors: Vec<(Instant, String)>,
    /// Established connections that broke (reset or closed), by the backend
    /// they were on.
    pub broken: Vec<Broken>,
    /// Requests on established connections that were answered.
    pub answered: u64,
    /// Longest wait for an answer on an established connection.
    pub longest_stall: Duration,
}

impl Tally {
    fn minus(&self, before: &Tally) -> Tally {
        Tally {
            new_ok: self.new_ok - before.new_ok,
            new_failed: self.new_failed - before.new_failed,
            new_errors: self.new_errors[before.new_errors.len()..].to_vec(),
            broken: self.broken[before.broken.len()..].to_vec(),
            answered: self.answered - before.answered,
            longest_stall: self.longest_stall,
        }
    }
}

/// Continuous traffic from client 0 to the VIP: `conns` long-lived echo
/// connections asking every 20 ms (a broken one is counted and replaced)
/// and a new HTTP connection every 5 ms.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    /// The backend of every long-lived connection now.
    pub backends: Arc<Mutex<Vec<String>>>,
    /// When each long-lived connection last got an answer (or was found
    /// broken and replaced).
    heard: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<JoinHandle<()>>,
}

/// How long an established connection may wait for an answer before it
/// counts as broken (a route change stalls it for a TCP retransmission).
const STALL_LIMIT: Duration = Duration::from_secs(10);

impl Traffic {
    pub fn start(sys: &System, conns: usize, limit: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let backends = Arc::new(Mutex::new(vec![String::new(); conns]));
        let heard = Arc::new(Mutex::new(vec![Instant::now(); conns]));
        let ns = sys.topo.clients[0].ns.name.clone();
        let deadline = Instant::now() + limit;
        let mut threads = Vec::new();
        for i in 0..conns {
            let (stop, tally, backends, heard, ns) = (
                stop.clone(),
                tally.clone(),
                backends.clone(),
                heard.clone(),
                ns.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let Ok(_inside) = crate::netns::enter(&ns) else {
                    return;
                };
                let mut conn: Option<(Conn, Instant)> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Some((c, opened)) = conn.as_mut() else {
                        let opened = Instant::now();
                        if let Ok(c) = Conn::open(IpAddr::V4(VIP)) {
                            backends.lock().expect("backends")[i] = c.backend.clone();
                            conn = Some((c, opened));
                        } else {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        continue;
                    };
                    let asked = Instant::now();
                    let answer = c.ask_within(STALL_LIMIT);
                    let waited = asked.elapsed();
                    let mut t = tally.lock().expect("tally");
                    t.longest_stall = t.longest_stall.max(waited);
                    match answer {
                        Ok(b) if b == c.backend => t.answered += 1,
                        _ => {
                            t.broken.push(Broken {
                                backend: c.backend.clone(),
                                opened: *opened,
                            });
                            conn = None;
                        }
                    }
                    drop(t);
                    heard.lock().expect("heard")[i] = Instant::now();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        let (flag, t) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let Ok(_inside) = crate::netns::enter(&ns) else {
                return;
            };
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let got = http_get(IpAddr::V4(VIP));
                let mut t = t.lock().expect("tally");
                match got {
                    Ok(_) => t.new_ok += 1,
                    Err(e) => {
                        t.new_failed += 1;
                        t.new_errors.push((Instant::now(), format!("{e:#}")));
                    }
                }
                drop(t);
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
        let traffic = Self {
            stop,
            tally,
            backends,
            heard,
            threads,
        };
        // Every long-lived connection is open before faults start.
        wait_for(Duration::from_secs(10), || {
            traffic
                .backends
                .lock()
                .expect("backends")
                .iter()
                .all(|b| !b.is_empty())
                .then_some(())
        })
        .context("long-lived connections did not all open within 10 s")?;
        Ok(traffic)
    }

    /// Wait until every long-lived connection has been heard from again
    /// (answered, or found broken): stalled ones have retransmitted, so
    /// what a fault did to them is counted.
    pub fn settle(&self, limit: Duration) -> Result<()> {
        let since = Instant::now();
        wait_for(limit, || {
            self.heard
                .lock()
                .expect("heard")
                .iter()
                .all(|at| *at > since)
                .then_some(())
        })
        .with_context(|| format!("a long-lived connection stayed silent for {limit:?}"))
    }

    /// Everything counted so far; reset the longest stall.
    pub fn snapshot(&self) -> Tally {
        let mut t = self.tally.lock().expect("tally");
        let out = t.clone();
        t.longest_stall = Duration::ZERO;
        out
    }

    /// What happened since `before` (a snapshot).
    pub fn since(&self, before: &Tally) -> Tally {
        self.snapshot().minus(before)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The routing daemon of an LB host in the ECMP bed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    /// BIRD with `examples/ha/bird-lb.conf`.
    Bird,
    /// FRR (zebra, bfdd, bgpd) with `examples/ha/frr-lb.conf`.
    Frr,
}

/// The ECMP bed: router with BIRD, LB hosts each with xdplb and BIRD or
/// FRR, three backends, one client. Fields drop in order: routing daemons
/// first.
pub struct Ecmp {
    /// Per LB host, its BIRD and control socket when it runs BIRD.
    pub birds: Vec<Option<(Service, PathBuf)>>,
    /// The FRR daemons of the hosts that run FRR.
    pub frr: Vec<Service>,
    pub router_bird: (Service, PathBuf),
    pub sys: System,
}

/// FRR's zebra, bfdd and bgpd in `ns`, their sockets, pid files and logs
/// in a directory of `dir` that FRR's user owns, then `config` applied by
/// vtysh as `vtysh -b` applies /etc/frr/frr.conf at boot (each daemon
/// reading the integrated file itself would stop at the others' commands).
pub fn frr(ns: &Netns, config: &Path, dir: &Path, name: &str) -> Result<Vec<Service>> {
    let run = dir.join(format!("{name}-frr"));
    std::fs::create_dir_all(&run)?;
    crate::netns::sh(Command::new("chown").args(["-R", "frr:frr"]).arg(&run))?;
    let path = |file: &str| run.join(file).to_string_lossy().into_owned();
    let mut daemons = Vec::new();
    for daemon in ["zebra", "bfdd", "bgpd"] {
        let program = format!("/usr/lib/frr/{daemon}");
        daemons.push(Service::start(
            ns,
            &[
                &program,
                "-u",
                "frr",
                "-g",
                "frr",
                "-f",
                "/dev/null",
                "-i",
                &path(&format!("{daemon}.pid")),
                "--vty_socket",
                &path(""),
                "-z",
                &path("zserv.api"),
            ],
            run.join(format!("{daemon}.log")),
        )?);
        if daemon == "zebra" {
            // The others connect to zebra's socket.
            wait_for(Duration::from_secs(5), || {
                run.join("zserv.api").exists().then_some(())
            })
            .context("zebra did not open its socket")?;
        }
    }
    // vtysh skips, quietly, a daemon whose vty socket is not there yet:
    // bgpd would then run without `router bgp` and refuse the router.
    for daemon in ["zebra", "bfdd", "bgpd"] {
        let socket = run.join(format!("{daemon}.vty"));
        wait_for(Duration::from_secs(10), || socket.exists().then_some(()))
            .with_context(|| format!("FRR {daemon} did not open {}", socket.display()))?;
    }
    let vty = run.to_string_lossy().into_owned();
    let check = |dry: bool| {
        let mut cmd = Command::new("vtysh");
        if dry {
            cmd.arg("-C");
        }
        crate::netns::sh(cmd.args(["--vty_socket", &vty, "-f"]).arg(config))
    };
    check(true).context("vtysh -C refuses the FRR config")?;
    check(false).context("vtysh could not apply the FRR config")?;
    let bgp = crate::netns::sh(Command::new("vtysh").args([
        "--vty_socket",
        &vty,
        "-d",
        "bgpd",
        "-c",
        "show running-config",
    ]))?;
    if !bgp.contains("router bgp") {
        bail!("FRR bgpd did not take the config's `router bgp`:\n{bgp}");
    }
    Ok(daemons)
}

/// The LB host address on the segment of LB `j`.
pub fn lb_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 40, 2 + j as u8)
}

/// The network both HA beds share: LBs on one segment, three backends.
pub fn system(tag: &str, lbs: usize) -> Result<System> {
    system_with(
        tag,
        lbs,
        |_, pins, socket| lb_config(pins, socket),
        |_| Ok(()),
    )
    .map(|(s, ())| s)
}

/// [`system`] with LB `j` running `config(j, pin_dir, socket)`, and
/// `ready` run once the daemons started, before every backend must be
/// checked up (e.g. to give a fleet its store).
pub fn system_with<T>(
    tag: &str,
    lbs: usize,
    config: impl Fn(usize, &Path, &Path) -> String,
    ready: impl FnOnce(&System) -> Result<T>,
) -> Result<(System, T)> {
    let spec = Spec {
        tag: tag.into(),
        lbs,
        backends: 3,
        clients: 1,
        vips: vec![IpAddr::V4(VIP)],
        lb_segment: true,
    };
    let sys = System::start_spec(&spec, |_topo: &Topology, j, pins, socket| {
        config(j, pins, socket)
    })?;
    let made = ready(&sys)?;
    sys.wait_checked(Duration::from_secs(10))?;
    Ok((sys, made))
}

/// A routing config of `examples/ha/`, as it is or with BFD turned off
/// (written to `dir`).
fn routing_config(name: &str, bfd: bool, dir: &Path) -> Result<PathBuf> {
    if bfd {
        return Ok(example(name));
    }
    let text = std::fs::read_to_string(example(name))?;
    let (on, off) = if name.starts_with("frr") {
        (" neighbor 198.18.40.1 bfd profile fast\n", "")
    } else {
        ("bfd on;", "bfd off;")
    };
    if text.matches(on).count() != 1 {
        bail!("examples/ha/{name} should turn BFD on in one place ({on:?})");
    }
    let path = dir.join(format!("no-bfd-{name}"));
    std::fs::write(&path, text.replace(on, off))?;
    Ok(path)
}

impl Ecmp {
    /// The bed with the example configs, LB host `j` running
    /// `speakers[j]`; with `bfd` false, BGP alone (its hold time) notices
    /// dead peers.
    pub fn start(tag: &str, speakers: &[Speaker], bfd: bool) -> Result<Self> {
        Self::start_with(
            tag,
            speakers,
            bfd,
            |_, pins, socket| lb_config(pins, socket),
            |_| Ok(()),
        )
        .map(|(bed, ())| bed)
    }

    /// [`Ecmp::start`] with the LB hosts' configs and readiness of
    /// [`system_with`].
    pub fn start_with<T>(
        tag: &str,
        speakers: &[Speaker],
        bfd: bool,
        config: impl Fn(usize, &Path, &Path) -> String,
        ready: impl FnOnce(&System) -> Result<T>,
    ) -> Result<(Self, T)> {
        let lbs = speakers.len();
        let (sys, made) = system_with(tag, lbs, config, ready)?;
        sys.topo
            .router
            .exec(&["sysctl", "-q", "-w", "net.ipv4.fib_multipath_hash_policy=1"])?;
        let dir = sys.scratch.0.clone();
        let router_bird = bird(
            &sys.topo.router,
            &routing_config("bird-router.conf", bfd, &dir)?,
            &dir,
            "router",
        )?;
        let mut bed = Self {
            birds: Vec::new(),
            frr: Vec::new(),
            router_bird,
            sys,
        };
        for (j, speaker) in speakers.iter().enumerate() {
            let ns = &bed.sys.topo.lbs[j].ns;
            let name = format!("lb{j}");
            match speaker {
                Speaker::Bird => {
                    let conf = routing_config("bird-lb.conf", bfd, &dir)?;
                    bed.birds.push(Some(bird(ns, &conf, &dir, &name)?));
                }
                Speaker::Frr => {
                    let conf = routing_config("frr-lb.conf", bfd, &dir)?;
                    bed.birds.push(None);
                    bed.frr.extend(frr(ns, &conf, &dir, &name)?);
                }
            }
        }
        let all: BTreeSet<Ipv4Addr> = (0..lbs).map(lb_addr).collect();
        let converged = wait_for(Duration::from_secs(20), || {
            bed.sys
                .topo
                .router
                .enter()
                .ok()
                .and_then(|_inside| next_hops(VIP).ok())
                .filter(|h| *h == all)
        });
        if converged.is_none() {
            bail!(
                "the router has no ECMP route over all LB hosts within 20 s:\n{}\n{}",
                birdc(&bed.router_bird.1, &["show", "protocols", "all"]).unwrap_or_default(),
                logs(&bed.frr)
            );
        }
        Ok((bed, made))
    }
}

/// The active-standby bed: two LB hosts with xdplb and keepalived
/// (`examples/ha/keepalived.conf`), the router reaching the VIP on the
/// segment by ARP (VRRP moves the address). Fields drop in order.
pub struct Vrrp {
    pub keepaliveds: Vec<Service>,
    pub sys: System,
}

impl Vrrp {
    pub fn start(tag: &str) -> Result<Self> {
        let sys = system(tag, 2)?;
        sys.topo.router.ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &VRRP_ADDR.to_string(),
        ])?;
        let text = std::fs::read_to_string(example("keepalived.conf"))?;
        let mut keepaliveds = Vec::new();
        for j in 0..2 {
            // The example names the installed paths; point them at this
            // build and this host's config, and change nothing else.
            let dir = &sys.scratch.0;
            let conf = dir.join(format!("keepalived-lb{j}.conf"));
            let script = "/usr/sbin/xdplb announce check --config /etc/xdplb/xdplb.toml";
            if text.matches(script).count() != 1 {
                bail!("examples/ha/keepalived.conf no longer runs {script:?}");
            }
            let ours = format!(
                "{} announce check --config {}",
                crate::daemon::xdplb_bin().display(),
                sys.configs[j].display()
            );
            std::fs::write(&conf, text.replace(script, &ours))?;
            let path = |name: &str| dir.join(format!("keepalived-lb{j}.{name}"));
            keepaliveds.push(Service::start(
                &sys.topo.lbs[j].ns,
                &[
                    "keepalived",
                    "--dont-fork",
                    "--log-console",
                    "--log-detail",
                    "--vrrp",
                    "--use-file",
                    &conf.to_string_lossy(),
                    "--pid",
                    &path("pid").to_string_lossy(),
                    "--vrrp_pid",
                    &path("vrrp.pid").to_string_lossy(),
                ],
                path("log"),
            )?);
        }
        let bed = Self { keepaliveds, sys };
        if wait_for(Duration::from_secs(15), || bed.holder()).is_none() {
            bail!(
                "no LB host took the VIP within 15 s:\n{}",
                logs(&bed.keepaliveds)
            );
        }
        Ok(bed)
    }

    /// Whether LB `j` holds the VIPs' next hop (is the VRRP master).
    pub fn holds(&self, j: usize) -> bool {
        self.sys.topo.lbs[j]
            .ns
            .ip(&["-4", "addr", "show", "dev", "eth0"])
            .is_ok_and(|out| out.contains(&format!("{VRRP_ADDR}/32")))
    }

    /// The LB host holding the VIPs' next hop now.
    pub fn holder(&self) -> Option<usize> {
        (0..self.sys.topo.lbs.len()).find(|j| self.holds(*j))
    }
}

/// One fault's outcome, printed as a table row.
pub struct Row {
    pub fault: &'static str,
    pub withdrawn_after: Option<Duration>,
    pub back_after: Option<Duration>,
    pub tally: Tally,
}

/// Print the rows as a Markdown table on the real stderr (not captured by
/// the test harness: `cargo xtask test` shows the figures).
fn print_rows(title: &str, rows: &[Row]) {
    use std::io::Write as _;
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    let mut out = format!(
        "\n{title}\n\
         | fault | fault -> withdrawn | restore -> back | established broken | new ok | new failed | longest stall |\n\
         |---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} ms |\n",
            r.fault,
            ms(r.withdrawn_after),
            ms(r.back_after),
            r.tally.broken.len(),
            r.tally.new_ok,
            r.tally.new_failed,
            r.tally.longest_stall.as_millis()
        );
    }
    let _ = std::io::stderr().write_all(out.as_bytes());
}

/// Print the rows, then require of each fault: no established connection
/// broke, and traffic kept flowing.
pub fn report(title: &str, rows: &[Row]) {
    print_rows(title, rows);
    for r in rows {
        assert!(
            r.tally.broken.is_empty(),
            "{}: established connections broke: {:?}",
            r.fault,
            r.tally.broken
        );
        assert!(
            r.tally.new_ok > 0 && r.tally.answered > 0,
            "{}: no traffic",
            r.fault
        );
    }
}
