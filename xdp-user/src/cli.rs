//! The `xdplb` command line: `run` starts the daemon; everything else is a
//! thin client of its admin API (or, for `check-config` and `detach`, works
//! on files directly).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

mod announce;
mod changes;
mod dataplane;
mod fleet;
mod generate;
mod pinned;
mod status;

use announce::*;
use changes::*;
use dataplane::*;
use generate::*;
use status::*;

use crate::{
    api::{self, Request, Response},
    config::Config,
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
/// default path. The key is read from the file as TOML, not as a valid
/// config: `xdplb reload` of a file the daemon will refuse must still reach
/// the daemon that says why.
fn socket_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("XDPLB_SOCKET").map(PathBuf::from))
        .or_else(|| {
            let text = crate::config::read_bounded(Path::new(DEFAULT_CONFIG)).ok()?;
            let table: toml::Table = toml::from_str(&text).ok()?;
            table.get("api")?.get("socket")?.as_str().map(PathBuf::from)
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
        /// After withdrawing the announcements, keep forwarding until the
        /// dataplane has seen no VIP packet for a second (the routers have
        /// heard), for at most this many seconds; 0: detach at once.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        drain_wait: u64,
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
pub(crate) use crate::count;

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
        Command::Detach {
            config,
            pin_dir,
            drain_wait,
        } => detach(config, pin_dir, std::time::Duration::from_secs(drain_wait)),
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

fn check_config(file: &Path) -> Result<()> {
    let config = Config::load(file)?;
    if config.fleet.is_some() {
        return fleet::check_config(file, &config);
    }
    let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    println!(
        "{}: ok ({}, {}; tables take about {} of kernel memory)",
        file.display(),
        count(config.vips.len(), "VIP"),
        count(backends, "backend"),
        human_bytes(config.tables.memory_bytes() as f64)
    );
    Ok(())
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
