//! `xdplb vip ...` and `xdplb backend ...`: runtime changes through the daemon.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use clap::{Args, Subcommand};

use super::*;
use crate::{
    api::Request,
    config::{
        BackendConfig, CheckKind, ForwardingMode, HashFields, HealthCheck, InitialState, Protocol,
        Quic, Vip,
    },
};

#[derive(Subcommand)]
pub(super) enum VipCommand {
    /// List the VIPs with their backends and settings.
    List,
    /// Add a VIP (written back to the config file, or to the fleet's store).
    Add(VipAdd),
    /// Delete a VIP: its flows end.
    Del { name: String },
}

#[derive(Args)]
pub(super) struct VipAdd {
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
    /// The fields a new flow's backend is hashed from.
    #[arg(long, value_enum, default_value_t = HashFields::FiveTuple)]
    hash: HashFields,
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
    /// Route QUIC packets by the server id in their connection IDs, of
    /// this many octets (1 to 4; UDP VIPs).
    #[arg(long)]
    quic_server_id_bytes: Option<u8>,
}

#[derive(Subcommand)]
pub(super) enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        vip: String,
        address: IpAddr,
        #[arg(long, default_value_t = 100)]
        weight: u32,
        #[arg(long)]
        mac: Option<String>,
        /// The server id it writes into its QUIC connection IDs.
        #[arg(long)]
        server_id: Option<u32>,
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

pub(super) fn vip(socket: &Path, cmd: VipCommand) -> Result<()> {
    match cmd {
        VipCommand::List => {
            let vips: Vec<Vip> = data(request(socket, &Request::VipList {})?)?;
            for v in vips {
                println!(
                    "{} {} {} ({})",
                    v.name,
                    v.endpoint(),
                    v.forwarding,
                    count(v.backends.len(), "backend")
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
            hash: (self.hash != HashFields::FiveTuple).then_some(self.hash),
            source_hash: false,
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
            quic: self
                .quic_server_id_bytes
                .map(|server_id_bytes| Quic { server_id_bytes }),
            subsets: Vec::new(),
            backends: Vec::new(),
        }
    }
}

pub(super) fn backend(socket: &Path, cmd: BackendCommand) -> Result<()> {
    let req = match cmd {
        BackendCommand::Add {
            vip,
            address,
            weight,
            mac,
            server_id,
            state,
        } => Request::BackendAdd {
            vip,
            backend: BackendConfig {
                address,
                weight,
                mac,
                state,
                server_id,
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
pub(super) fn written(data: &Option<serde_json::Value>) -> String {
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
