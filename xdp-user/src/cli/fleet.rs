//! `xdplb fleet ...` and the fleet's part of `status`, `check` and
//! `check-config`: these talk to the store directly with the `[fleet]`
//! section of the local config.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Subcommand;

use crate::{
    config::{Config, Vip},
    controller::FleetStatus,
    fleet::{keys, store},
};

const DEFAULT_CONFIG: &str = super::DEFAULT_CONFIG;

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Write the VIPs of FILE (`[[vip]]` tables, e.g. a config file from
    /// before the fleet) to the store, in one compare-and-swap.
    Import {
        file: PathBuf,
        /// Also delete the store's VIPs that FILE does not have (and keys
        /// under vips/ that do not parse).
        #[arg(long)]
        replace: bool,
        /// The local config whose `[fleet]` names the store.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the store's VIPs as `[[vip]]` tables (the config file's
    /// syntax).
    Export {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Write here (atomically) instead of to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A file of `[[vip]]` tables; other sections are ignored.
#[derive(serde::Deserialize, serde::Serialize)]
struct VipFile {
    #[serde(default)]
    vip: Vec<Vip>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn fleet_config(path: &Path) -> Result<(Config, crate::config::Fleet)> {
    let config = Config::load(path)?;
    let fleet = config
        .fleet
        .clone()
        .ok_or_else(|| anyhow!("{} has no [fleet] section", path.display()))?;
    Ok((config, fleet))
}

/// Every VIP key of the store, readable or not: the readable ones, the
/// revisions of all (so a compare-and-swap covers them), and the rest.
async fn read_lenient(
    client: &mut etcd_client::Client,
    prefix: &str,
) -> Result<(keys::Desired, Vec<keys::BadKey>)> {
    let (revision, entries) = store::read_all(client, prefix).await?;
    let mut desired = keys::Desired {
        revision,
        ..keys::Desired::default()
    };
    let mut bad = Vec::new();
    let vips = keys::vips_prefix(prefix);
    for e in entries {
        let one = std::slice::from_ref(&e);
        match keys::read_desired(prefix, revision, one) {
            Ok(d) => {
                desired.vips.extend(d.vips);
                desired.mod_revisions.extend(d.mod_revisions);
            }
            Err(b) => {
                if let Some(name) = e.key.strip_prefix(&vips) {
                    desired
                        .mod_revisions
                        .insert(name.to_owned(), e.mod_revision);
                }
                bad.push(b);
            }
        }
    }
    Ok((desired, bad))
}

pub fn run(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Import {
            file,
            replace,
            config,
        } => import(&file, replace, &config),
        FleetCommand::Export { config, out } => export(&config, out.as_deref()),
    }
}

fn import(file: &Path, replace: bool, config_path: &Path) -> Result<()> {
    let (config, fleet) = fleet_config(config_path)?;
    let text = crate::config::read_bounded(file)?;
    let imported: VipFile =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {}", file.display(), e.message()))?;
    if imported.vip.is_empty() {
        bail!("{} has no [[vip]] tables", file.display());
    }
    runtime()?.block_on(async {
        let mut client = store::connect(&fleet).await?;
        let (base, bad) = read_lenient(&mut client, &fleet.prefix).await?;
        let mut vips: Vec<Vip> = if replace {
            Vec::new()
        } else {
            base.vips.clone()
        };
        for vip in &imported.vip {
            vips.retain(|v| v.name != vip.name);
            vips.push(vip.clone());
        }
        vips.sort_by(|a, b| a.name.cmp(&b.name));
        let vips_prefix = keys::vips_prefix(&fleet.prefix);
        for b in &bad {
            // --replace deletes or overwrites every key under vips/; an
            // import overwrites the keys of the VIPs it names.
            let name = b.key.strip_prefix(&vips_prefix);
            let fixed = name.is_some_and(|n| replace || imported.vip.iter().any(|v| v.name == n));
            if !fixed {
                bail!(
                    "{b}; the fleet refuses the store's desired state while it holds that key: \
                     import with --replace, or delete it (etcdctl del {})",
                    b.key
                );
            }
        }
        let mut whole = config.clone();
        whole.vips = vips.clone();
        whole.validate().map_err(|e| {
            anyhow!(
                "{} with the store's VIPs does not fit {}: {e}",
                file.display(),
                config_path.display()
            )
        })?;
        match store::write_vips(&mut client, &fleet.prefix, &base, &vips).await? {
            Some(revision) => println!(
                "imported {} from {} into {} at etcd revision {revision} ({} in the fleet)",
                super::count(imported.vip.len(), "VIP"),
                file.display(),
                fleet.prefix,
                super::count(vips.len(), "VIP")
            ),
            None => println!("nothing to import: the store already holds these VIPs"),
        }
        Ok(())
    })
}

fn export(config_path: &Path, out: Option<&Path>) -> Result<()> {
    let (_, fleet) = fleet_config(config_path)?;
    runtime()?.block_on(async {
        let mut client = store::connect(&fleet).await?;
        let (revision, entries) = store::read_all(&mut client, &fleet.prefix).await?;
        let desired = keys::read_desired(&fleet.prefix, revision, &entries)?;
        let text = format!(
            "# The VIPs of fleet {} at etcd revision {revision} (`xdplb fleet export`).\n{}",
            fleet.prefix,
            toml::to_string(&VipFile { vip: desired.vips })?
        );
        match out {
            Some(path) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, &text)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                eprintln!("exported revision {revision} to {}", path.display());
            }
            None => print!("{text}"),
        }
        Ok(())
    })
}

/// `check-config` of a fleet member's file: the file, then what the store
/// holds, as the daemon would apply it.
pub fn check_config(file: &Path, config: &Config) -> Result<()> {
    let fleet = config
        .fleet
        .as_ref()
        .ok_or_else(|| anyhow!("no [fleet] section"))?;
    println!(
        "{}: ok (a fleet member: tables take about {} of kernel memory)",
        file.display(),
        super::human_bytes(config.tables.memory_bytes() as f64)
    );
    runtime()?.block_on(async {
        let mut client = store::connect(fleet).await?;
        let (revision, entries) = store::read_all(&mut client, &fleet.prefix).await?;
        let desired = keys::read_desired(&fleet.prefix, revision, &entries)?;
        let mut whole = config.clone();
        whole.vips = desired.vips;
        whole.validate().map_err(|e| {
            anyhow!(
                "etcd revision {revision} does not fit {}: {}",
                file.display(),
                keys::locate(&fleet.prefix, &whole.vips, &e)
            )
        })?;
        let backends: usize = whole.vips.iter().map(|v| v.backends.len()).sum();
        println!(
            "etcd {} revision {revision}: ok ({}, {})",
            fleet.prefix,
            super::count(whole.vips.len(), "VIP"),
            super::count(backends, "backend")
        );
        Ok(())
    })
}

pub fn print_status(f: &FleetStatus) {
    let store = if f.connected {
        "store connected".to_owned()
    } else {
        format!(
            "store LOST for {:.0} s ({}){}",
            f.lost_for_s.unwrap_or_default(),
            f.lost_error.as_deref().unwrap_or("?"),
            if f.local_health {
                "; the rings follow this host's checks alone"
            } else {
                ""
            }
        )
    };
    println!(
        "fleet {} as {} (health rule {}): running etcd revision {} (seen {}), {store}",
        f.prefix, f.host, f.rule, f.revision, f.store_revision
    );
    println!("  hosts: {}", f.hosts.join(", "));
    if let Some(why) = &f.refused {
        println!("  REFUSED: {why}");
    }
    for d in &f.disagreements {
        println!(
            "  disagrees: backend {} of VIP {} is {} here, {} by the fleet's verdict",
            d.backend,
            d.vip,
            if d.own { "up" } else { "down" },
            if d.fleet { "up" } else { "down" }
        );
    }
    for k in &f.bad_peer_keys {
        println!("  unreadable verdicts: {k}");
    }
}

/// What `xdplb check` warns of for a fleet member, if anything.
pub fn warning(f: &FleetStatus) -> Option<String> {
    if !f.connected {
        return Some(format!(
            "fleet store unreachable for {:.0} s, forwarding with revision {}{}",
            f.lost_for_s.unwrap_or_default(),
            f.revision,
            if f.local_health {
                ", rings on local health"
            } else {
                ""
            }
        ));
    }
    if let Some(why) = &f.refused {
        return Some(format!("fleet desired state refused: {why}"));
    }
    if !f.disagreements.is_empty() {
        return Some(format!(
            "this host's checks disagree with the fleet on {}",
            super::count(f.disagreements.len(), "backend")
        ));
    }
    None
}
