//! Commands on the dataplane itself: `verify`, `detach`, `decap`, `loadgen`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};

use super::*;
use crate::config::{Config, Protocol};

#[derive(Args)]
pub(super) struct LoadgenArgs {
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

pub(super) const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/xdplb-decap";

#[derive(Subcommand)]
pub(super) enum DecapCommand {
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

pub(super) fn verify() -> Result<()> {
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

/// Remove the pinned dataplane, unless a daemon runs on it: it holds the
/// maps and would re-attach within a second, so it must be stopped first.
/// Announcements are withdrawn first, and the dataplane forwards until the
/// routers have stopped sending (at most `drain_wait`).
pub(super) fn detach(
    config: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    drain_wait: Duration,
) -> Result<()> {
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
            let list: Vec<String> = gone.iter().map(ToString::to_string).collect();
            println!("withdrew the announcements of {}", list.join(", "));
            let pinned = crate::dataplane::trace::Pinned::new(&dir);
            // Without pinned counters there is no dataplane to drain.
            let first = (!drain_wait.is_zero()).then(|| pinned.vip_packets().ok());
            if let Some(Some(first)) = first {
                println!("{}", drain(&pinned, first, drain_wait)?);
            }
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

/// A withdrawal reaches the routers after their BGP update (and BFD, and
/// ECMP rehash): until then they send this host VIP packets, which a
/// detached dataplane would black-hole. Wait until the pinned dataplane
/// (which had counted `first` VIP packets) has counted none for [`QUIET`],
/// at most `limit`; what it saw meanwhile.
fn drain(pinned: &crate::dataplane::trace::Pinned, first: u64, limit: Duration) -> Result<String> {
    const QUIET: Duration = Duration::from_secs(1);
    const POLL: Duration = Duration::from_millis(50);
    let start = Instant::now();
    let (mut last, mut changed) = (first, start);
    loop {
        std::thread::sleep(POLL);
        let now = pinned.vip_packets()?;
        if now != last {
            (last, changed) = (now, Instant::now());
        }
        let late = last.saturating_sub(first);
        if changed.elapsed() >= QUIET {
            let quiet = QUIET.as_secs();
            return Ok(if late == 0 {
                format!("drained: no VIP packet arrived after the withdrawal ({quiet} s)")
            } else {
                format!(
                    "drained: {late} VIP packets arrived after the withdrawal, the last {} ms after it; none for {quiet} s since",
                    changed.duration_since(start).as_millis()
                )
            });
        }
        if start.elapsed() >= limit {
            return Ok(format!(
                "still receiving VIP packets {} s after the withdrawal ({late} since; is this host announced another way?): detaching anyway",
                limit.as_secs()
            ));
        }
    }
}

pub(super) fn decap(cmd: DecapCommand) -> Result<()> {
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
                "decap {} on {interface} for {} (pinned at {})",
                if adopted { "updated" } else { "attached" },
                count(vips.len(), "VIP"),
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

pub(super) fn loadgen(a: LoadgenArgs) -> Result<()> {
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
