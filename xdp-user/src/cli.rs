//! The `xdplb` command line: `run` starts the daemon; everything else is a
//! thin client of its admin API (or, for `check-config` and `detach`, works
//! on files directly).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

mod fleet;
mod pinned;

use crate::{
    api::{self, Request, Response, Stats},
    config::{
        BackendConfig, CheckKind, Config, ForwardingMode, HealthCheck, InitialState, Protocol, Vip,
    },
};

const DEFAULT_SOCKET: &str = "/run/xdplb/admin.sock";
const DEFAULT_CONFIG: &str = "/etc/xdplb/xdplb.toml";

#[derive(Parser)]
#[command(name = "xdplb", version, about = "XDP layer-4 load balancer")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The options of commands that talk to the running daemon.
#[derive(Args, Clone, Debug, Default)]
struct Client {
    /// Admin socket of the running daemon (default: $XDPLB_SOCKET, else
    /// `api.socket` of /etc/xdplb/xdplb.toml, else /run/xdplb/admin.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// The admin socket a client command talks to: `--socket`, else
/// `$XDPLB_SOCKET`, else the default config's `api.socket`, else the
/// default path.
fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("XDPLB_SOCKET").map(PathBuf::from))
        .or_else(|| {
            Config::load(Path::new(DEFAULT_CONFIG))
                .ok()
                .map(|c| c.api.socket)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach (or adopt) the dataplane, health-check, serve the API.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Replace an XDP program already on the interface that this pin
        /// directory does not hold (never done without this flag).
        #[arg(long)]
        replace: bool,
    },
    /// Validate a config file and list every problem.
    CheckConfig { file: PathBuf },
    /// Load every XDP program into this kernel (nothing is attached) and
    /// report what the verifier says of each: does this kernel run xdplb?
    Verify,
    /// Remove the pinned dataplane: the program is detached, maps and conntrack
    /// freed. Refused while a daemon runs on the pin directory: stop it first.
    Detach {
        /// Read the pin directory from this config.
        #[arg(long, conflicts_with = "pin_dir")]
        config: Option<PathBuf>,
        /// Pin directory (default /sys/fs/bpf/xdplb).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Re-read the config file (same as SIGHUP).
    Reload {
        #[command(flatten)]
        client: Client,
    },
    /// VIPs, backends, health, weights, flows in use.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Counters; with --watch, rates per VIP and backend.
    Stats {
        #[arg(long)]
        watch: bool,
        /// Seconds between samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many samples (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Nagios-style check: exit 0 OK, 1 WARNING, 2 CRITICAL, one summary line.
    Check {
        #[command(flatten)]
        client: Client,
    },
    /// Generate packets from an interface with BPF_PROG_TEST_RUN live frames
    /// (load tests). Bounded by --count and --duration.
    Loadgen(LoadgenArgs),
    /// Backend side: end IPIP / IPv6-in-IPv6 / IPv4-in-IPv6 tunnels in XDP on
    /// hosts without ipip/ip6tnl devices (pinned: stays after the command).
    #[command(subcommand)]
    Decap(DecapCommand),
    /// VIPs: list, add, delete (written back to the config file, or for a
    /// fleet member to etcd with a compare-and-swap).
    Vip {
        #[command(flatten)]
        client: Client,
        #[command(subcommand)]
        cmd: VipCommand,
    },
    /// Backends of a VIP: add, delete, drain, weight.
    Backend {
        #[command(flatten)]
        client: Client,
        #[command(subcommand)]
        cmd: BackendCommand,
    },
    /// The fleet's desired state in etcd (`[fleet]` in the config): import
    /// a file's VIPs, export them, check what the store holds.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// This host's VIP announcements (routes a routing daemon or keepalived
    /// acts on; `[announce]` in the config).
    #[command(subcommand)]
    Announce(AnnounceCommand),
    /// Print the balancer's decision for each matching packet (VIP, flow,
    /// verdict and reason, conntrack, backend) until Ctrl-C or --count
    /// lines: "why doesn't it forward?". Off again when it ends.
    Trace {
        /// The daemon's config (pin directory, VIP names).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only this VIP's packets (default: every TCP and UDP packet,
        /// those for no VIP included).
        #[arg(long)]
        vip: Option<String>,
        /// Only clients in this prefix (an address, or address/length).
        #[arg(long)]
        client: Option<String>,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AnnounceCommand {
    /// Withdraw every VIP of this host (maintenance: routers send new flows
    /// to the other hosts; what still arrives is forwarded). Kept across
    /// daemon restarts until `restore`.
    Withdraw {
        /// The daemon's config (used when no daemon runs).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        client: Client,
    },
    /// End a withdrawal: VIPs are announced again while they are usable.
    Restore {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        client: Client,
    },
    /// Exit 0 if this host announces a VIP address now (any, or each
    /// --address), 1 if not: for keepalived's `track_script`. Reads the
    /// kernel's routes, so it holds while the daemon restarts.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// An address that must be announced (repeat for several).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
    },
}

#[derive(Args)]
struct LoadgenArgs {
    /// Interface to transmit from.
    #[arg(long)]
    interface: String,
    /// Destination MAC (the LB's interface).
    #[arg(long)]
    dst_mac: String,
    /// Source MAC (default: the interface's).
    #[arg(long)]
    src_mac: Option<String>,
    #[arg(long)]
    src: IpAddr,
    /// Destination (a VIP).
    #[arg(long)]
    dst: IpAddr,
    #[arg(long, default_value_t = 80)]
    dport: u16,
    #[arg(long, value_enum, default_value_t = Protocol::Udp)]
    protocol: Protocol,
    #[arg(long, default_value_t = 1)]
    flows: u32,
    /// Frame size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Packets to send at most.
    #[arg(long, default_value_t = 10_000_000)]
    count: u64,
    /// Seconds to send at most.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Packets per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Also count what arrived: socket:PATH (an xdplb daemon's VIP packets)
    /// or rx:INTERFACE (packets an interface here received).
    #[arg(long, value_name = "COUNTER")]
    count_at: Option<crate::loadgen::CountAt>,
}

const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/xdplb-decap";

#[derive(Subcommand)]
enum DecapCommand {
    /// Attach (or update) the decapsulator for these VIPs.
    Attach {
        #[arg(long)]
        interface: String,
        /// A VIP this backend serves (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        #[arg(long, value_enum, default_value_t = crate::config::XdpModeName::Native)]
        mode: crate::config::XdpModeName,
        #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value_t = 64)]
        max_vips: u32,
    },
    /// Remove it.
    Detach {
        #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    /// List the VIPs with their backends and settings.
    List,
    /// Add a VIP (written back to the config file, or to the fleet's store).
    Add(VipAdd),
    /// Delete a VIP: its flows end.
    Del { name: String },
}

#[derive(Args)]
struct VipAdd {
    #[arg(long)]
    name: String,
    #[arg(long)]
    address: IpAddr,
    /// Omit for a port-less VIP.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long, value_enum)]
    protocol: Protocol,
    #[arg(long, value_enum)]
    forwarding: ForwardingMode,
    #[arg(long)]
    source_hash: bool,
    #[arg(long, value_enum, default_value_t = CheckKind::Tcp)]
    check: CheckKind,
    #[arg(long)]
    check_port: Option<u16>,
    #[arg(long)]
    check_path: Option<String>,
    #[arg(long)]
    expect_status: Option<u16>,
    #[arg(long)]
    interval_ms: Option<u64>,
    #[arg(long)]
    timeout_ms: Option<u64>,
    #[arg(long)]
    rise: Option<u32>,
    #[arg(long)]
    fall: Option<u32>,
    #[arg(long)]
    send: Option<String>,
    #[arg(long)]
    expect: Option<String>,
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        vip: String,
        address: IpAddr,
        #[arg(long, default_value_t = 100)]
        weight: u32,
        #[arg(long)]
        mac: Option<String>,
        #[arg(long, value_enum, default_value_t = InitialState::Up)]
        state: InitialState,
    },
    /// Delete a backend of a VIP: its flows are placed again.
    Del { vip: String, address: IpAddr },
    /// Drain a backend: it keeps its flows and gets no new ones.
    Drain { vip: String, address: IpAddr },
    /// End a drain (or a `down` state): the backend's checks decide again.
    Undrain { vip: String, address: IpAddr },
    /// Set a backend's weight (0..=65535; 0 keeps it out of the ring).
    Weight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
}

fn request(socket: &Path, req: &Request) -> Result<Option<serde_json::Value>> {
    let Response { ok, error, data } = api::call(socket, req)?;
    if ok {
        Ok(data)
    } else {
        bail!(
            "{}",
            error.unwrap_or_else(|| "the daemon refused the request".into())
        )
    }
}

fn data<T: serde::de::DeserializeOwned>(value: Option<serde_json::Value>) -> Result<T> {
    serde_json::from_value(value.ok_or_else(|| anyhow!("the daemon sent no data"))?)
        .context("unexpected response from the daemon")
}

/// A config enum as the config file spells it (`ipip`, `http`, ...).
fn spelling<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn human_bytes(n: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn print_status(s: &serde_json::Value) -> Result<()> {
    let status: StatusView = serde_json::from_value(s.clone()).context("unexpected status")?;
    println!(
        "xdplb on {}: dataplane {}, {}{}; flows {}/{}; changed ring slots {} ({} taking over)",
        status.interface,
        if status.attached {
            "attached"
        } else {
            "NOT ATTACHED"
        },
        if status.in_sync {
            "in sync"
        } else {
            "OUT OF SYNC"
        },
        if status.adopted { " (adopted)" } else { "" },
        status.flows,
        status.max_flows,
        status.changed_slots.0 + status.changed_slots.1,
        status.changed_slots.0
    );
    for p in &status.dataplane_problems {
        println!("  dataplane problem: {p}");
    }
    if let Some(why) = &status.transmit_problem {
        println!("  NOT FORWARDING: {why}");
    }
    if let Some(e) = &status.last_error {
        println!("  last error: {e}");
    }
    let lost: u64 = status.driver_xdp_errors.values().sum();
    if lost > 0 {
        let names: Vec<String> = status
            .driver_xdp_errors
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        println!(
            "  WARNING: the driver dropped {lost} XDP frames the balancer sent ({})",
            names.join(", ")
        );
    }
    for w in &status.warnings {
        println!("  warning: {w}");
    }
    let a = &status.announce;
    if a.enabled {
        let list: Vec<String> = a.announced.iter().map(ToString::to_string).collect();
        println!(
            "announcing (table {} proto {}): {}{}",
            a.table,
            a.protocol,
            if list.is_empty() {
                "nothing".into()
            } else {
                list.join(", ")
            },
            a.reason
                .as_deref()
                .map_or(String::new(), |r| format!("; not the rest: {r}"))
        );
        if let Some(e) = &a.last_error {
            println!("  announcement error: {e}");
        }
    }
    if let Some(f) = &status.fleet {
        fleet::print_status(f);
    }
    for v in &status.vips {
        println!(
            "VIP {} {} {}{} check {}: {} packets, {}, {} flows",
            v.name,
            v.endpoint,
            spelling(&v.forwarding),
            if v.source_hash { " source-hash" } else { "" },
            spelling(&v.check),
            v.counters.packets,
            human_bytes(v.counters.bytes as f64),
            v.counters.new_flows
        );
        if v.drops.no_backend + v.drops.encap_failed > 0 {
            println!(
                "  dropped: {} with no usable backend, {} without room to encapsulate",
                v.drops.no_backend, v.drops.encap_failed
            );
        }
        for b in &v.backends {
            println!(
                "  {:<40} weight {:>5}  {:<8} health {:<5} check {:>8}  {} packets, {} flows{}",
                b.address.to_string(),
                b.weight,
                b.dataplane_state,
                if b.awaiting_first_check {
                    "new"
                } else if b.damped {
                    "damped"
                } else {
                    b.health.as_deref().unwrap_or("-")
                },
                b.last_check_ms
                    .map_or("-".into(), |ms| format!("{ms:.1} ms")),
                b.counters.packets,
                b.counters.new_flows,
                match (&b.checks_blocked, &b.last_error) {
                    (Some(e), _) => format!("  (NOT CHECKED: {e})"),
                    (None, Some(e)) => format!("  (last failure: {e})"),
                    (None, None) => String::new(),
                }
            );
        }
    }
    Ok(())
}

/// The parts of `Status` the CLI prints (owned strings, so it deserialises).
#[derive(serde::Deserialize)]
struct StatusView {
    interface: String,
    adopted: bool,
    attached: bool,
    dataplane_problems: Vec<String>,
    #[serde(default)]
    transmit_problem: Option<String>,
    driver_xdp_errors: std::collections::BTreeMap<String, u64>,
    warnings: Vec<String>,
    in_sync: bool,
    last_error: Option<String>,
    flows: usize,
    max_flows: u32,
    /// A daemon before ring-first placement sends none.
    #[serde(default)]
    changed_slots: (usize, usize),
    vips: Vec<VipView>,
    announce: crate::controller::AnnounceStatus,
    #[serde(default)]
    fleet: Option<crate::controller::FleetStatus>,
}

#[derive(serde::Deserialize)]
struct VipView {
    name: String,
    endpoint: String,
    forwarding: ForwardingMode,
    source_hash: bool,
    check: CheckKind,
    counters: crate::controller::Traffic,
    drops: crate::controller::Drops,
    backends: Vec<BackendView>,
}

#[derive(serde::Deserialize)]
struct BackendView {
    address: IpAddr,
    weight: u32,
    dataplane_state: String,
    health: Option<String>,
    last_check_ms: Option<f64>,
    last_error: Option<String>,
    awaiting_first_check: bool,
    damped: bool,
    #[serde(default)]
    checks_blocked: Option<String>,
    counters: crate::controller::Traffic,
}

fn watch_stats(socket: &Path, interval: f64, count: Option<u64>) -> Result<()> {
    if !interval.is_finite() || interval <= 0.0 {
        bail!("--interval must be positive");
    }
    let mut prev: Stats = data(request(socket, &Request::Stats {})?)?;
    let mut at = Instant::now();
    let mut n = 0u64;
    loop {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now: Stats = data(request(socket, &Request::Stats {})?)?;
        let dt = at.elapsed().as_secs_f64();
        at = Instant::now();
        println!("--- rates over {dt:.1} s");
        for ((name, c), (_, p)) in now.vips.iter().zip(&prev.vips) {
            println!(
                "VIP {name:<20} {:>12.0} pps {:>14}/s {:>10.0} new flows/s",
                (c.packets.saturating_sub(p.packets)) as f64 / dt,
                human_bytes((c.bytes.saturating_sub(p.bytes)) as f64 / dt),
                (c.new_flows.saturating_sub(p.new_flows)) as f64 / dt
            );
        }
        for ((vip, addr, c), (_, _, p)) in now.backends.iter().zip(&prev.backends) {
            println!(
                "  {vip:<12} {:<40} {:>12.0} pps {:>14}/s",
                addr.to_string(),
                (c.packets.saturating_sub(p.packets)) as f64 / dt,
                human_bytes((c.bytes.saturating_sub(p.bytes)) as f64 / dt)
            );
        }
        for (name, v) in &now.reasons {
            let before = prev.reasons.get(name).copied().unwrap_or(0);
            if v > &before {
                println!("  {name:<20} {:>12.0} /s", (v - before) as f64 / dt);
            }
        }
        prev = now;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
}

/// Nagios plugin semantics.
fn nagios(socket: &Path) -> ExitCode {
    let status = match request(socket, &Request::Status {}).and_then(data::<serde_json::Value>) {
        Ok(s) => s,
        Err(e) => {
            println!("XDPLB CRITICAL - daemon unreachable: {e:#}");
            return ExitCode::from(2);
        }
    };
    let Ok(status) = serde_json::from_value::<StatusView>(status) else {
        println!("XDPLB UNKNOWN - unexpected status from the daemon");
        return ExitCode::from(3);
    };
    let backends: usize = status.vips.iter().map(|v| v.backends.len()).sum();
    let down: usize = status
        .vips
        .iter()
        .flat_map(|v| &v.backends)
        .filter(|b| b.health.as_deref() == Some("down"))
        .count();
    let blocked: Vec<String> = status
        .vips
        .iter()
        .flat_map(|v| {
            v.backends
                .iter()
                .filter(|b| b.checks_blocked.is_some())
                .map(move |b| format!("{} of {}", b.address, v.name))
        })
        .collect();
    let empty: Vec<&str> = status
        .vips
        .iter()
        .filter(|v| !v.backends.iter().any(|b| b.dataplane_state == "up"))
        .map(|v| v.name.as_str())
        .collect();
    let summary = format!(
        "{} VIPs, {backends} backends, {down} down, {} flows",
        status.vips.len(),
        status.flows
    );
    if !status.attached {
        println!(
            "XDPLB CRITICAL - dataplane not attached as configured: {}",
            status.dataplane_problems.join("; ")
        );
        ExitCode::from(2)
    } else if let Some(why) = &status.transmit_problem {
        println!("XDPLB CRITICAL - not forwarding: {why}");
        ExitCode::from(2)
    } else if !status.in_sync {
        println!(
            "XDPLB CRITICAL - dataplane out of sync: {}",
            status.last_error.unwrap_or_default()
        );
        ExitCode::from(2)
    } else if !empty.is_empty() {
        println!(
            "XDPLB CRITICAL - no usable backend for {}; {summary}",
            empty.join(", ")
        );
        ExitCode::from(2)
    } else if !blocked.is_empty() {
        println!(
            "XDPLB WARNING - not checked for a local reason: {}; {summary}",
            blocked.join(", ")
        );
        ExitCode::from(1)
    } else if let Some(why) = status.fleet.as_ref().and_then(fleet::warning) {
        println!("XDPLB WARNING - {why}; {summary}");
        ExitCode::from(1)
    } else if down > 0 {
        println!("XDPLB WARNING - {summary}");
        ExitCode::from(1)
    } else if let Some(why) = status
        .announce
        .reason
        .as_deref()
        .filter(|_| status.announce.enabled)
    {
        println!("XDPLB WARNING - not announcing every VIP address: {why}; {summary}");
        ExitCode::from(1)
    } else {
        println!("XDPLB OK - {summary}");
        ExitCode::SUCCESS
    }
}

/// The packaging step that writes the man pages, completions and the
/// configuration reference: `xdplb __generate DIR`. Not a clap command, so
/// no page or completion offers it.
const GENERATE: &str = "__generate";

pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == GENERATE) {
        let Some(out) = args.get(2).filter(|_| args.len() == 3) else {
            eprintln!("usage: xdplb {GENERATE} DIR");
            return ExitCode::from(2);
        };
        return match generate(Path::new(out)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A client writing into a closed pipe (`xdplb status | head -1`)
        // ends quietly, as other command-line tools do; the daemon keeps
        // Rust's default of ignoring SIGPIPE.
        // SAFETY: resetting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Command::Check { client } = &cli.command {
        return nagios(&socket_path(client.socket.clone()));
    }
    if let Command::Status { json, client } = &cli.command {
        return status(&socket_path(client.socket.clone()), *json);
    }
    if let Command::Announce(AnnounceCommand::Check { config, addresses }) = &cli.command {
        return announce_check(config, addresses);
    }
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    let socket = |client: Client| socket_path(client.socket);
    match cli.command {
        Command::Run { config, replace } => run(config, replace),
        Command::CheckConfig { file } => check_config(&file),
        Command::Verify => verify(),
        Command::Detach { config, pin_dir } => detach(config, pin_dir),
        Command::Reload { client } => {
            request(&socket(client), &Request::Reload {}).map(|_| println!("reloaded"))
        }
        Command::Status { .. } => unreachable!("handled before"),
        Command::Stats {
            watch,
            interval,
            count,
            json,
            client,
        } => stats(&socket(client), watch, interval, count, json),
        Command::Check { .. } => unreachable!("handled before"),
        Command::Decap(cmd) => decap(cmd),
        Command::Loadgen(a) => loadgen(a),
        Command::Vip { client, cmd } => vip(&socket(client), cmd),
        Command::Backend { client, cmd } => backend(&socket(client), cmd),
        Command::Announce(cmd) => announce(cmd),
        Command::Fleet(cmd) => fleet::run(cmd),
        Command::Trace {
            config,
            vip,
            client,
            count,
        } => crate::trace::run(&crate::trace::Request {
            config: &config,
            vip: vip.as_deref(),
            client: client.as_deref(),
            count,
        }),
    }
}

/// Man pages (`xdplb(8)` and one per subcommand, `xdplb-vip-add(8)`...)
/// and bash, zsh and fish completions, all from the clap definitions.
fn generate(out: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut cmd = Cli::command();
    cmd.build();
    /// The page of `cmd` (named by its `path` of command words) and of
    /// each of its subcommands.
    fn pages(cmd: &clap::Command, path: &[&str], dir: &Path, written: &mut usize) -> Result<()> {
        // Hidden commands and clap's own `help` get no page.
        if cmd.is_hide_set() || cmd.get_name() == "help" {
            return Ok(());
        }
        let name = path.join("-");
        // The synopsis reads as typed (`xdplb check-config`), and no page
        // lists or links the `help` command, which has no page.
        let page = cmd
            .clone()
            .name(name.clone())
            .bin_name(path.join(" "))
            .disable_help_subcommand(true);
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .render(&mut text)
            .context("rendering a man page")?;
        let file = dir.join(format!("{name}.8"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        *written += 1;
        for sub in cmd.get_subcommands() {
            let mut sub_path = path.to_vec();
            sub_path.push(sub.get_name());
            pages(sub, &sub_path, dir, written)?;
        }
        Ok(())
    }
    let mut written = 0;
    pages(&cmd, &["xdplb"], &man, &mut written)?;
    // xdplb.toml(5) and the README's reference, from one table.
    let page = man.join("xdplb.toml.5");
    std::fs::write(&page, crate::config::reference::man_page())
        .with_context(|| format!("writing {}", page.display()))?;
    written += 1;
    let reference = out.join("config-reference.md");
    std::fs::write(&reference, crate::config::reference::markdown())
        .with_context(|| format!("writing {}", reference.display()))?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "xdplb.bash"),
        (clap_complete::Shell::Zsh, "_xdplb"),
        (clap_complete::Shell::Fish, "xdplb.fish"),
    ] {
        let path = completions.join(file);
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        clap_complete::generate(shell, &mut cmd, "xdplb", &mut f);
    }
    println!(
        "{written} man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// `announce withdraw|restore`: through the daemon; with no daemon, the
/// withdrawal is recorded for the next one and the routes are removed here.
fn announce(cmd: AnnounceCommand) -> Result<()> {
    let (config_path, withdraw, given_socket) = match cmd {
        AnnounceCommand::Withdraw { config, client } => (config, true, client.socket),
        AnnounceCommand::Restore { config, client } => (config, false, client.socket),
        AnnounceCommand::Check { .. } => unreachable!("handled before"),
    };
    let config = Config::load(&config_path);
    // The socket: --socket, $XDPLB_SOCKET, else this config's.
    let socket = given_socket
        .or_else(|| std::env::var_os("XDPLB_SOCKET").map(PathBuf::from))
        .or_else(|| config.as_ref().ok().map(|c| c.api.socket.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let verb = if withdraw { "withdrawn" } else { "restored" };
    match request(&socket, &Request::AnnounceWithdraw { withdraw }) {
        Ok(_) => {
            println!("announcements {verb}");
            return Ok(());
        }
        Err(e) if !daemon_absent(&e) => return Err(e),
        Err(_) => {}
    }
    let config = config.with_context(|| format!("no daemon answers on {}", socket.display()))?;
    let a = &config.announce;
    if !a.enabled {
        bail!("announcing is off in the config (set `[announce] enabled = true`)");
    }
    crate::announce::set_withdrawn(&config.daemon.pin_dir, withdraw)?;
    if withdraw {
        let gone = crate::announce::withdraw_all(a.into(), &mut owned_routes(&config)?)?;
        println!(
            "announcements withdrawn ({} routes removed); no daemon runs, the next one keeps them withdrawn",
            gone.len()
        );
    } else {
        println!(
            "withdrawal ended; no daemon runs: the next one announces the VIPs that are usable"
        );
    }
    Ok(())
}

/// The announcement routes `config`'s instance added (read while no daemon
/// runs; routes of a build that kept no record count for its addresses).
fn owned_routes(config: &Config) -> Result<crate::announce::Owned> {
    crate::announce::Owned::load(config, true)
}

/// Whether a client error means no daemon listens on the socket.
fn daemon_absent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            )
        })
    })
}

/// keepalived's view: exit 0 while this host announces (any configured
/// VIP address, or each of `addresses`).
fn announce_check(config: &Path, addresses: &[IpAddr]) -> ExitCode {
    let result = Config::load(config).and_then(|c| {
        if !c.announce.enabled {
            bail!("announcing is off in {}", config.display());
        }
        let have = crate::announce::announced((&c.announce).into(), &owned_routes(&c)?)?;
        let need: Vec<IpAddr> = if addresses.is_empty() {
            c.vips.iter().map(|v| v.address).collect()
        } else {
            addresses.to_vec()
        };
        Ok((have, need, addresses.is_empty()))
    });
    match result {
        Ok((have, need, any)) => {
            let missing: Vec<String> = need
                .iter()
                .filter(|a| !have.contains(a))
                .map(ToString::to_string)
                .collect();
            let ok = if any {
                need.iter().any(|a| have.contains(a))
            } else {
                missing.is_empty()
            };
            if ok {
                println!("announced: {have:?}");
                ExitCode::SUCCESS
            } else {
                println!("not announced: {}", missing.join(", "));
                ExitCode::from(1)
            }
        }
        Err(e) => {
            println!("xdplb: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(config: PathBuf, replace: bool) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(crate::daemon::run(crate::daemon::RunOptions {
            config_path: config,
            replace,
        }))
}

fn verify() -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let results = crate::dataplane::verify_all();
    let refused = results.iter().filter(|(_, r)| r.is_err()).count();
    for (name, result) in &results {
        match result {
            Ok(()) => println!("{name}: accepted"),
            Err(e) => println!("{name}: REFUSED: {e:#}"),
        }
    }
    if refused > 0 {
        bail!(
            "the kernel ({}) refused {refused} of {} programs",
            kernel.trim(),
            results.len()
        );
    }
    println!(
        "kernel {}: all {} programs accepted",
        kernel.trim(),
        results.len()
    );
    Ok(())
}

fn check_config(file: &Path) -> Result<()> {
    let config = Config::load(file)?;
    if config.fleet.is_some() {
        return fleet::check_config(file, &config);
    }
    let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    println!(
        "{}: ok ({} VIPs, {backends} backends; tables take about {} of kernel memory)",
        file.display(),
        config.vips.len(),
        human_bytes(config.tables.memory_bytes() as f64)
    );
    Ok(())
}

/// Remove the pinned dataplane, unless a daemon runs on it: it holds the
/// maps and would re-attach within a second, so it must be stopped first.
fn detach(config: Option<PathBuf>, pin_dir: Option<PathBuf>) -> Result<()> {
    // The announcements go with the dataplane: the config named, else the
    // default config when it describes this pin directory.
    let (dir, announce) = match (config, pin_dir) {
        (Some(c), _) => {
            let c = Config::load(&c)?;
            (c.daemon.pin_dir.clone(), Some(c))
        }
        (None, given) => {
            let default = Config::load(Path::new(DEFAULT_CONFIG)).ok();
            let dir = given.unwrap_or_else(|| crate::config::Daemon::default().pin_dir);
            let announce = default.filter(|c| c.daemon.pin_dir == dir);
            (dir, announce)
        }
    };
    let _lock = match crate::lock::try_acquire(&crate::lock::pin_dir_lock(&dir))? {
        Ok(lock) => lock,
        Err(crate::lock::Held::By(pid)) => bail!(
            "an xdplb daemon{} runs on {}: it holds the dataplane and would re-attach it; stop the daemon first (it leaves the dataplane forwarding), then detach",
            pid.map_or(String::new(), |p| format!(" (pid {p})")),
            dir.display()
        ),
    };
    if let Some(c) = announce.filter(|c| c.announce.enabled) {
        let gone = crate::announce::withdraw_all((&c.announce).into(), &mut owned_routes(&c)?)?;
        if !gone.is_empty() {
            println!("withdrew the announcements of {gone:?}");
        }
    }
    if crate::dataplane::detach(&dir)? {
        println!(
            "detached: removed the pinned dataplane at {}",
            dir.display()
        );
    } else {
        println!("nothing pinned at {}", dir.display());
    }
    Ok(())
}

/// The daemon's status; with no daemon answering, what the pinned
/// dataplane of the default config forwards (exit 3, as an LSB `status`
/// of a stopped service), or the error when nothing is pinned either.
fn status(socket: &Path, json: bool) -> ExitCode {
    let answer = match api::call(socket, &Request::Status {}) {
        Ok(response) => response,
        Err(no_daemon) => {
            let config = Config::load(Path::new(DEFAULT_CONFIG)).ok();
            let pin_dir = config.as_ref().map_or_else(
                || crate::config::Daemon::default().pin_dir,
                |c| c.daemon.pin_dir.clone(),
            );
            let why = format!("{:#}", no_daemon.root_cause());
            return match pinned::report(&pin_dir, config.as_ref(), &why) {
                Ok(report) if !json => {
                    print!("{report}");
                    ExitCode::from(3)
                }
                _ => {
                    eprintln!("xdplb: {no_daemon:#}");
                    ExitCode::from(3)
                }
            };
        }
    };
    let shown = match answer {
        Response {
            ok: true,
            data: Some(status),
            ..
        } if json => serde_json::to_string_pretty(&status)
            .map(|t| println!("{t}"))
            .map_err(Into::into),
        Response {
            ok: true,
            data: Some(status),
            ..
        } => print_status(&status),
        Response { error, .. } => Err(anyhow!(
            "{}",
            error.unwrap_or_else(|| "the daemon sent no status".into())
        )),
    };
    match shown {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stats(socket: &Path, watch: bool, interval: f64, count: Option<u64>, json: bool) -> Result<()> {
    if watch {
        return watch_stats(socket, interval, count);
    }
    let stats: Stats = data(request(socket, &Request::Stats {})?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    for (name, v) in &stats.reasons {
        println!("{name:<20} {v}");
    }
    for (name, c) in &stats.vips {
        println!(
            "VIP {name:<20} {} packets {} bytes {} flows",
            c.packets, c.bytes, c.new_flows
        );
    }
    for (vip, addr, c) in &stats.backends {
        println!(
            "  {vip:<12} {addr:<40} {} packets {} bytes {} flows",
            c.packets, c.bytes, c.new_flows
        );
    }
    Ok(())
}

fn decap(cmd: DecapCommand) -> Result<()> {
    match cmd {
        DecapCommand::Attach {
            interface,
            vips,
            mode,
            pin_dir,
            max_vips,
        } => {
            let mut decap = crate::dataplane::Decap::open(max_vips, &pin_dir)?;
            decap.set_vips(&vips)?;
            let adopted = decap.attach_pinned(&interface, mode.into(), &pin_dir)?;
            println!(
                "decap {} on {interface} for {} VIPs (pinned at {})",
                if adopted { "updated" } else { "attached" },
                vips.len(),
                pin_dir.display()
            );
        }
        DecapCommand::Detach { pin_dir } => {
            if crate::dataplane::detach(&pin_dir)? {
                println!("decap detached");
            } else {
                println!("nothing pinned at {}", pin_dir.display());
            }
        }
    }
    Ok(())
}

fn loadgen(a: LoadgenArgs) -> Result<()> {
    if !a.duration.is_finite() || a.duration <= 0.0 || a.duration > 3600.0 {
        bail!("--duration must be between 0 and 3600 seconds");
    }
    if a.rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let mac =
        |s: &str| crate::config::parse_mac(s).ok_or_else(|| anyhow!("{s:?} is not a MAC address"));
    let spec_count_at = a.count_at.clone();
    let spec = crate::loadgen::LoadSpec {
        src_mac: match &a.src_mac {
            Some(m) => mac(m)?,
            None => crate::loadgen::interface_mac(&a.interface)?,
        },
        dst_mac: mac(&a.dst_mac)?,
        interface: a.interface,
        src: a.src,
        dst: a.dst,
        dport: a.dport,
        protocol: a.protocol,
        flows: a.flows,
        size: a.size,
        count: a.count,
        duration: Duration::from_secs_f64(a.duration),
        rate: a.rate,
        batch: a.batch,
    };
    let counted = crate::loadgen::run(&spec, spec_count_at.as_ref())?;
    let r = counted.report;
    let pct = |n: u64| 100.0 * n as f64 / r.sent.max(1) as f64;
    println!(
        "generated {} frames ({} flows, {} bytes) in {:.2} s",
        r.sent,
        spec.flows,
        spec.size,
        r.elapsed.as_secs_f64()
    );
    println!(
        "left {}: {} ({:.1} %): {:.3} Mpps",
        spec.interface,
        counted.transmitted.min(r.sent),
        pct(counted.transmitted.min(r.sent)),
        counted.transmitted_mpps()
    );
    if let (Some(n), Some(c)) = (counted.arrived, &spec_count_at) {
        println!("arrived at {c}: {n} ({:.1} %)", pct(n));
    }
    for w in &counted.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn vip(socket: &Path, cmd: VipCommand) -> Result<()> {
    match cmd {
        VipCommand::List => {
            let vips: Vec<Vip> = data(request(socket, &Request::VipList {})?)?;
            for v in vips {
                println!(
                    "{} {} {} ({} backends)",
                    v.name,
                    v.endpoint(),
                    spelling(&v.forwarding),
                    v.backends.len()
                );
            }
            Ok(())
        }
        VipCommand::Add(a) => {
            let vip = a.into_vip();
            request(socket, &Request::VipAdd { vip }).map(|d| println!("added{}", written(&d)))
        }
        VipCommand::Del { name } => {
            request(socket, &Request::VipDel { name }).map(|d| println!("deleted{}", written(&d)))
        }
    }
}

impl VipAdd {
    fn into_vip(self) -> Vip {
        let defaults = HealthCheck::default();
        Vip {
            name: self.name,
            address: self.address,
            port: self.port,
            protocol: self.protocol,
            forwarding: self.forwarding,
            source_hash: self.source_hash,
            health: HealthCheck {
                kind: self.check,
                port: self.check_port,
                path: self.check_path.unwrap_or(defaults.path.clone()),
                expect_status: self.expect_status.unwrap_or(defaults.expect_status),
                interval_ms: self.interval_ms.unwrap_or(defaults.interval_ms),
                timeout_ms: self.timeout_ms.unwrap_or(defaults.timeout_ms),
                rise: self.rise.unwrap_or(defaults.rise),
                fall: self.fall.unwrap_or(defaults.fall),
                send: self.send,
                expect: self.expect,
                ..defaults
            },
            backends: Vec::new(),
        }
    }
}

fn backend(socket: &Path, cmd: BackendCommand) -> Result<()> {
    let req = match cmd {
        BackendCommand::Add {
            vip,
            address,
            weight,
            mac,
            state,
        } => Request::BackendAdd {
            vip,
            backend: BackendConfig {
                address,
                weight,
                mac,
                state,
            },
        },
        BackendCommand::Del { vip, address } => Request::BackendDel { vip, address },
        BackendCommand::Drain { vip, address } => Request::BackendDrain { vip, address },
        BackendCommand::Undrain { vip, address } => Request::BackendUndrain { vip, address },
        BackendCommand::Weight {
            vip,
            address,
            weight,
        } => Request::BackendWeight {
            vip,
            address,
            weight,
        },
    };
    request(socket, &req).map(|d| println!("ok{}", written(&d)))
}

/// For a fleet member's change: where it went, and whether this host runs
/// it yet.
fn written(data: &Option<serde_json::Value>) -> String {
    let Some(d) = data else {
        return String::new();
    };
    let mut out = match d["revision"].as_i64() {
        Some(r) => format!(" (etcd revision {r})"),
        None => return String::new(),
    };
    if let Some(note) = d["note"].as_str() {
        out += &format!("; {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Every command a page or a completion shows says what it does
    /// (`man -k xdplb` shows no "(unknown subject)").
    #[test]
    fn every_visible_command_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "xdplb", &mut missing);
        assert!(
            missing.is_empty(),
            "commands without a description: {missing:?}"
        );
    }

    /// Completions list an enum option's values and no hidden command.
    #[test]
    fn completions_list_values_and_hide_hidden_commands() {
        let mut cmd = Cli::command();
        let mut bash = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "xdplb", &mut bash);
        let bash = String::from_utf8_lossy(&bash);
        assert!(
            bash.contains("ipip ip6ip6 ip4ip6 l2dsr"),
            "forwarding values"
        );
        assert!(bash.contains("up down drain"), "state values");
        assert!(!bash.contains("generate"), "the hidden generate command");
    }
}
