//! `xdplb announce ...`: the operator's withdrawal of this host's announcements, and keepalived's check.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

use super::*;
use crate::{api::Request, config::Config};

#[derive(Subcommand)]
pub(super) enum AnnounceCommand {
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

/// `announce withdraw|restore`: through the daemon; with no daemon, the
/// withdrawal is recorded for the next one and the routes are removed here.
pub(super) fn announce(cmd: AnnounceCommand) -> Result<()> {
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
pub(super) fn owned_routes(config: &Config) -> Result<crate::announce::Owned> {
    crate::announce::Owned::load(config, true)
}

/// Whether a client error means no daemon listens on the socket.
pub(super) fn daemon_absent(e: &anyhow::Error) -> bool {
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
pub(super) fn announce_check(config: &Path, addresses: &[IpAddr]) -> ExitCode {
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
                let list: Vec<String> = have.iter().map(ToString::to_string).collect();
                println!("announced: {}", list.join(", "));
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
