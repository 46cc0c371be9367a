//! `xdplb run`: load or adopt the pinned dataplane, then one task owns the
//! controller and serves health results, API queries and signals in turn.
//! Exiting leaves the dataplane forwarding (fail-static).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::{interval, Duration, MissedTickBehavior},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Query, Request},
    config::{Config, LogFormat},
    controller::Controller,
    dataplane::Dataplane,
    health::Checks,
};

/// Install the log subscriber (`RUST_LOG` filters; default info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    let config = Config::load(&config_path)?;
    init_logging(config.daemon.log_format);

    // Claim the admin socket first: a second daemon stops here, before it
    // touches the dataplane.
    let admin = api::bind_admin(&config.api.socket).await?;
    let metrics = TcpListener::bind(config.api.metrics)
        .await
        .with_context(|| format!("binding the metrics listener {}", config.api.metrics))?;

    let pin_dir = config.daemon.pin_dir.clone();
    let mut dp = Dataplane::open(config.tables.sizes(), &pin_dir)?;
    let adopted_maps = dp.adopted();
    let adopted_link = dp.attach_pinned(&config.interface, config.xdp_mode.into(), &pin_dir)?;
    info!(
        interface = %config.interface,
        mode = ?config.xdp_mode,
        pin_dir = %pin_dir.display(),
        adopted_maps,
        adopted_link,
        "dataplane {}",
        if adopted_link { "adopted: program replaced in the pinned link, conntrack kept" } else { "attached" }
    );

    let mut ctl = Controller::new(config.clone(), Some(config_path.clone()), dp)?;
    ctl.reconcile_logged();
    let (check_tx, mut check_rx) = mpsc::channel(4096);
    let mut checks = Checks::new(check_tx);
    checks.sync(ctl.wanted_checks());
    info!(vips = config.vips.len(), checks = checks.len(), "running");

    let (query_tx, mut query_rx) = mpsc::channel(64);
    tokio::spawn(api::serve_admin(admin, query_tx.clone()));
    tokio::spawn(api::serve_http(metrics, query_tx));

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut retry = interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            Some(result) = check_rx.recv() => ctl.on_check(result),
            Some(query) = query_rx.recv() => match query {
                Query::Api(request, reply) => {
                    let changes = !matches!(*request, Request::Status | Request::Stats | Request::VipList);
                    let response = api::handle(&mut ctl, Some(&config_path), *request);
                    if changes {
                        checks.sync(ctl.wanted_checks());
                    }
                    let _ = reply.send(response);
                }
                Query::Metrics(reply) => {
                    let _ = reply.send(api::metrics(&mut ctl));
                }
                Query::Healthz(reply) => {
                    let _ = reply.send(api::healthz(&ctl));
                }
            },
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", config_path.display());
                let response = api::handle(&mut ctl, Some(&config_path), Request::Reload);
                match response.error {
                    None => checks.sync(ctl.wanted_checks()),
                    Some(e) => error!(error = %e, "reload refused; the running state is unchanged"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = retry.tick() => {
                if !ctl.in_sync() {
                    warn!("dataplane out of sync; retrying reconcile");
                    ctl.reconcile_logged();
                }
            }
        }
    }
    let _ = std::fs::remove_file(&config.api.socket);
    info!("exiting; the dataplane keeps forwarding (`xdplb detach` removes it)");
    Ok(())
}
