//! `xdplb status`, `stats` and `check`: the daemon's state as operators read it.

use std::{
    net::IpAddr,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::*;
use crate::{
    api::{self, Request, Response, Stats},
    config::{CheckKind, Config, ForwardingMode, HashFields},
};

pub(super) fn human_bytes(n: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub(super) fn print_status(s: &serde_json::Value) -> Result<()> {
    let status: StatusView = serde_json::from_value(s.clone()).context("unexpected status")?;
    println!(
        "xdplb on {}{}{}: dataplane {}, {}{}; conntrack {}/{} entries; changed ring slots {} ({} taking over)",
        status.interface,
        if status.uplinks.is_empty() {
            String::new()
        } else {
            format!(" and {}", status.uplinks.join(", "))
        },
        status
            .libxdp_priority
            .map(|p| format!(" (in libxdp's dispatcher, priority {p})"))
            .unwrap_or_default(),
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
            "VIP {} {} {}{}{} check {}: {} packets, {}, {} new flows",
            v.name,
            v.endpoint,
            v.forwarding,
            if v.hash == HashFields::FiveTuple {
                String::new()
            } else {
                format!(" hash {}", v.hash)
            },
            v.quic.map_or(String::new(), |q| format!(
                " quic ({}-octet server ids)",
                q.server_id_bytes
            )),
            v.check,
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
        for s in &v.subsets {
            let backends: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
            println!(
                "  subset {} for clients in {}: backends {}; {} packets, {} new flows",
                s.name,
                s.sources.join(", "),
                backends.join(", "),
                s.counters.packets,
                s.counters.new_flows
            );
        }
        for b in &v.backends {
            println!(
                "  {:<40} weight {:>5}  {:<8} health {:<5} check {:>8}  {} packets, {} new flows{}{}",
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
                b.server_id
                    .map_or(String::new(), |id| format!(", server id {id}")),
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
pub(super) struct StatusView {
    interface: String,
    #[serde(default)]
    uplinks: Vec<String>,
    #[serde(default)]
    libxdp_priority: Option<u32>,
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
pub(super) struct VipView {
    name: String,
    endpoint: String,
    forwarding: ForwardingMode,
    /// Absent from an older daemon's answer.
    #[serde(default)]
    hash: HashFields,
    #[serde(default)]
    quic: Option<crate::config::Quic>,
    check: CheckKind,
    counters: crate::controller::Traffic,
    drops: crate::controller::Drops,
    backends: Vec<BackendView>,
    #[serde(default)]
    subsets: Vec<crate::controller::SubsetStatus>,
}

#[derive(serde::Deserialize)]
pub(super) struct BackendView {
    address: IpAddr,
    weight: u32,
    #[serde(default)]
    server_id: Option<u32>,
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

pub(super) fn watch_stats(socket: &Path, interval: f64, count: Option<u64>) -> Result<()> {
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
pub(super) fn nagios(socket: &Path) -> ExitCode {
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
        "{}, {}, {down} down, {} conntrack entries",
        count(status.vips.len(), "VIP"),
        count(backends, "backend"),
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

/// The daemon's status; with no daemon answering, what the pinned
/// dataplane of the default config forwards (exit 3, as an LSB `status`
/// of a stopped service), or the error when nothing is pinned either.
pub(super) fn status(socket: &Path, json: bool) -> ExitCode {
    let answer = match api::call(socket, &Request::Status {}) {
        Ok(response) => response,
        Err(no_daemon) => {
            let config = Config::load(Path::new(DEFAULT_CONFIG)).ok();
            let pin_dir = config.as_ref().map_or_else(
                || crate::config::Daemon::default().pin_dir,
                |c| c.daemon.pin_dir.clone(),
            );
            let why = format!(
                "none answers on {}: {}",
                socket.display(),
                no_daemon.root_cause()
            );
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

pub(super) fn stats(
    socket: &Path,
    watch: bool,
    interval: f64,
    count: Option<u64>,
    json: bool,
) -> Result<()> {
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
