//! `xdplb run`: take the instance locks, claim the admin socket, load or
//! adopt the pinned dataplane, then one task owns the controller and serves
//! health results, API queries, signals and the self-check in turn.
//! A refused or failed start leaves nothing behind; exiting leaves the
//! dataplane forwarding (fail-static).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::{interval, sleep_until, Duration, Instant, MissedTickBehavior},
};
use tracing::{error, info, warn};

pub mod audit;
mod fleet;

use crate::{
    api::{self, Query, Request},
    config::{ConfigFile, LogFormat},
    controller::{Adopted, Controller},
    dataplane::Dataplane,
    health::Checks,
    iface, lock, socket,
};

use crate::controller::SELF_CHECK_INTERVAL;

/// Health changes within this window share one reconcile: a flap storm
/// rebuilds a VIP's ring at most once per window, and results of every
/// other VIP keep being read in between.
pub const RECONCILE_WINDOW: Duration = Duration::from_millis(50);

/// Descriptors the daemon needs besides health checks and clients (maps,
/// program, link, listeners, runtime, logs).
const FD_RESERVE: u64 = 64;

/// Raise the soft RLIMIT_NOFILE to the hard limit (a service started with
/// systemd's default soft 1024 would otherwise run out under load).
/// Returns the limit now in force.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Sweep conntrack every few seconds on a thread of its own, so a large
/// table never blocks the controller: count its entries, find which
/// backends the flows of changed ring slots are on, delete what no packet
/// can use.
fn spawn_flow_sweeper(
    sweeper: crate::dataplane::FlowSweeper,
) -> std::sync::Arc<crate::dataplane::Swept> {
    use std::sync::{atomic::Ordering, Arc};
    let shared = Arc::new(crate::dataplane::Swept::default());
    shared
        .idle
        .store(crate::config::DEFAULT_FLOW_IDLE_TIMEOUT, Ordering::Relaxed);
    let out = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("flow-sweep".into())
        .spawn(move || {
            while let Some(shared) = out.upgrade() {
                let started = std::time::Instant::now();
                match sweeper.sweep(shared.idle.load(Ordering::Relaxed), true) {
                    Ok(sweep) => {
                        if let Ok(n) = sweeper.count() {
                            shared.flows.store(n, Ordering::Relaxed);
                        }
                        if let Ok(mut latest) = shared.latest.lock() {
                            *latest = Some(sweep);
                        }
                    }
                    Err(e) => warn!(error = %format!("{e:#}"), "sweeping conntrack failed: {e:#}"),
                }
                drop(shared);
                // Never more than a fifth of a core, however large the table.
                std::thread::sleep(Duration::from_secs(2).max(started.elapsed() * 4));
            }
        })
        .map(drop)
        .unwrap_or_else(
            |e| warn!(error = %e, "cannot start the conntrack sweeper ({e}); changed ring slots stay marked"),
        );
    shared
}

/// Install the log subscriber (`RUST_LOG` filters; default info): the
/// journal's native fields when stderr is the journal (under systemd),
/// else human or JSON lines on stderr.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if crate::service::stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let subscriber = tracing_subscriber::registry()
                .with(filter())
                .with(journald.with_syslog_identifier("xdplb".into()));
            // A second init (tests) keeps the first subscriber.
            let _ = tracing::subscriber::set_global_default(subscriber);
            return;
        }
    }
    let filter = filter();
    // Colour only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// What `xdplb run` was asked to do.
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Replace an XDP program on the interface that is not this pin
    /// directory's.
    pub replace: bool,
}

/// Everything a running daemon holds; dropping it releases the locks and
/// removes the socket (while it is still ours).
struct Claimed {
    _pin_lock: lock::Lock,
    _iface_lock: lock::Lock,
    _uplink_locks: Vec<lock::Lock>,
    socket: socket::SocketFile,
}

pub async fn run(options: RunOptions) -> Result<()> {
    let config_path = options.config_path;
    let (config, file) = ConfigFile::load(&config_path)?;
    init_logging(config.daemon.log_format);
    let fd_limit = raise_fd_limit();
    let pin_dir = config.daemon.pin_dir.clone();

    // One daemon per pin directory and per interface: a second one stops
    // here, before it touches anything.
    let pin_lock = lock::acquire(
        &lock::pin_dir_lock(&pin_dir),
        &format!("pin directory {}", pin_dir.display()),
    )?;
    let interface = iface::require(&config.interface)?;
    let iface_lock = lock::acquire(
        &lock::interface_lock(interface.index)?,
        &format!(
            "interface {} (index {}; under any of its names)",
            config.interface, interface.index
        ),
    )?;
    let announce_lock = config
        .announce
        .enabled
        .then(|| crate::controller::lock_announce_target((&config.announce).into()))
        .transpose()?;
    let group = config
        .api
        .socket_group
        .as_deref()
        .map(socket::group_id)
        .transpose()?;
    let (admin, socket_file) = socket::bind(&config.api.socket, group).await?;
    let metrics = TcpListener::bind(config.api.metrics)
        .await
        .with_context(|| format!("binding the metrics listener {}", config.api.metrics))?;
    let uplink_locks = config
        .uplinks
        .iter()
        .map(|u| {
            let i = iface::require(&u.interface)?;
            lock::acquire(
                &lock::interface_lock(i.index)?,
                &format!("uplink {} (index {})", u.interface, i.index),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut claimed = Claimed {
        _pin_lock: pin_lock,
        _iface_lock: iface_lock,
        _uplink_locks: uplink_locks,
        socket: socket_file,
    };
    let health_runtime =
        crate::health::own_runtime().context("starting the health-check thread")?;

    // From here a failure must undo what this run pinned.
    let mut dp = Dataplane::open(config.tables.sizes(), &pin_dir)?;
    let adopted_maps = dp.adopted();
    // The policy goes in before the program: after an upgrade that reshaped
    // CONFIG, the map the new program reads starts out empty.
    let sharing = match &config.libxdp {
        Some(l) => dp.share_through_libxdp(l.dispatcher.as_deref(), l.run_priority),
        None => Ok(()),
    };
    let adopted = match sharing
        .and_then(|()| dp.set_uplinks(&config.uplink_hops()))
        .and_then(|()| crate::controller::dataplane_config(&config))
        .and_then(|policy| dp.set_config(&policy))
        .and_then(|()| dp.attach_pinned(&config.interface, config.xdp_mode.into(), options.replace))
        .and_then(|adopted| {
            dp.attach_uplinks(config.xdp_mode.into(), options.replace)?;
            Ok(adopted)
        })
        .and_then(|link| Ok((link, Adopted::read(&dp)?)))
    {
        Ok(a) => a,
        Err(e) => {
            dp.abandon();
            return Err(e);
        }
    };
    let (adopted_link, adopted_state) = adopted;
    info!(
        interface = %config.interface,
        mode = %config.xdp_mode,
        pin_dir = %pin_dir.display(),
        adopted_maps,
        adopted_link,
        "dataplane {} on {} ({} mode, pins in {})",
        if adopted_link { "adopted: program replaced in the pinned link, conntrack kept," } else { "attached" },
        config.interface,
        config.xdp_mode,
        pin_dir.display()
    );
    for (name, _) in config.uplink_hops() {
        info!(uplink = %name, "serving the uplink {name} too");
    }
    if let Some(warning) = iface::tx_loss_warning(&interface) {
        warn!("{warning}");
    }

    // A fleet member runs what it last applied until the store answers.
    let carried = config
        .fleet
        .as_ref()
        .and_then(|_| fleet::carried_state(&config));
    let mut running = config.clone();
    if let Some(saved) = &carried {
        running.vips = saved.vips.clone();
    }
    let mut ctl = Controller::with_adopted(running, Some(file), dp, adopted_state);
    let mut agent = config.fleet.as_ref().map(|fleet| {
        ctl.join_fleet(fleet, carried);
        crate::fleet::agent::spawn(
            fleet.clone(),
            lock::state_file("fleet-lease", &config.daemon.pin_dir),
        )
    });
    if let Some(lock) = announce_lock {
        ctl.hold_announce_lock(lock);
    }
    match ctl.dataplane().flow_sweeper() {
        Ok(sweeper) => ctl.sweep_with(spawn_flow_sweeper(sweeper)),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "no conntrack sweeper ({e:#}); changed ring slots stay marked")
        }
    }
    claimed.socket.started();
    if let (Some(agent), Some(fleet)) = (agent.as_mut(), &config.fleet) {
        // The fleet's state and verdicts before the first reconcile: a
        // fresh member builds (and announces) the fleet's rings at once.
        let bound = Duration::from_millis(2 * fleet.timeout_ms + 500);
        match tokio::time::timeout(bound, agent.events.recv()).await {
            Ok(Some(event)) => {
                fleet::on_event(&mut ctl, event);
            }
            _ => warn!(
                bound_ms = bound.as_millis() as u64,
                "the fleet's store did not answer within {} ms of the start; running the last applied state",
                bound.as_millis()
            ),
        }
    }
    ctl.reconcile_logged();
    // Before anything is announced: whether frames get out at all.
    ctl.self_check();
    ctl.announce();
    let (check_tx, mut check_rx) = mpsc::channel(4096);
    let mut checks = Checks::on(health_runtime, check_tx);
    info!(
        half_open = checks.half_open(),
        "health checks on their own thread ({})",
        if checks.half_open() {
            "half-open TCP checks"
        } else {
            "full TCP connects"
        }
    );
    checks.sync(ctl.wanted_checks());
    let fds_needed = checks.len() as u64
        + (crate::http::MAX_CONNECTIONS + api::MAX_ADMIN_CONNECTIONS) as u64
        + FD_RESERVE;
    if fd_limit < fds_needed {
        warn!(
            fd_limit,
            fds_needed,
            "RLIMIT_NOFILE is {fd_limit}, below the {fds_needed} the health checks and the capped client connections need; raise it (LimitNOFILE=)"
        );
    }
    info!(
        vips = config.vips.len(),
        checks = checks.len(),
        fd_limit,
        "running: {}, {}",
        crate::count(config.vips.len(), "VIP"),
        crate::count(checks.len(), "health check")
    );

    let mut manager = crate::service::Manager::from_env();
    let mut watchdog = interval(manager.watchdog.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (query_tx, mut query_rx) = mpsc::channel(64);
    tokio::spawn(api::serve_admin(admin, query_tx.clone()));
    tokio::spawn(crate::http::serve(metrics, query_tx));

    // Operators' changes written to the store, answered once this host
    // runs their revision.
    let (written_tx, mut written_rx) = mpsc::channel(64);
    let mut awaiting = fleet::Awaiting::default();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = interval(SELF_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Health changes waiting for the next reconcile, and when the last ran.
    let mut pending = false;
    let mut last_reconcile = Instant::now();

    // The status line, refreshed every tick (it reads the dataplane).
    let mut service_status = ctl.service_status();
    loop {
        // Ready once attached and in sync, and saying whether frames get
        // out (a start that cannot transmit still serves status and check).
        manager.ready_when(
            ctl.in_sync() && ctl.self_check_problems().is_empty(),
            &service_status,
        );
        tokio::select! {
            // The watchdog is fed from this loop: a wedged controller stops
            // feeding it and the service manager restarts the daemon (the
            // pinned dataplane keeps forwarding meanwhile).
            _ = watchdog.tick(), if manager.watchdog.is_some() => manager.alive(),
            Some(result) = check_rx.recv() => pending |= ctl.record_check(result),
            Some(event) = async { agent.as_mut()?.events.recv().await }, if agent.is_some() => {
                let taken = fleet::on_event(&mut ctl, event);
                pending |= taken.verdicts;
                if taken.desired {
                    checks.sync(ctl.wanted_checks());
                    ctl.announce();
                }
                awaiting.answer(&ctl, false);
            }
            Some(written) = written_rx.recv() => {
                awaiting.push(written);
                awaiting.answer(&ctl, false);
            }
            _ = sleep_until(last_reconcile + RECONCILE_WINDOW), if pending => {
                pending = false;
                last_reconcile = Instant::now();
                ctl.reconcile_logged();
                ctl.announce();
                fleet::publish_verdicts(&ctl, agent.as_ref());
            }
            Some(query) = query_rx.recv() => match query {
                Query::Api(request, asker, reply) if agent.is_some() && request.change().is_some() => {
                    fleet::change(&ctl, agent.as_ref(), &request, asker, reply, written_tx.clone());
                }
                Query::Api(request, asker, reply) => {
                    let response = answer(&mut ctl, *request, asker);
                    if response.changed {
                        checks.sync(ctl.wanted_checks());
                        ctl.announce();
                    }
                    let _ = reply.send(response.response);
                }
                Query::Metrics(format, reply) => {
                    let _ = reply.send(crate::metrics::render(&mut ctl, format));
                }
                Query::Healthz(reply) => {
                    let _ = reply.send(api::healthz(&ctl));
                }
            },
            _ = hup.recv() => {
                manager.reloading();
                if answer(&mut ctl, Request::Reload {}, audit::Asker::Signal("SIGHUP")).changed {
                    checks.sync(ctl.wanted_checks());
                    ctl.announce();
                }
                manager.reloaded();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                service_status = ctl.service_status();
                ctl.self_check();
                ctl.review_marks();
                pending |= ctl.expire_damping();
                pending |= ctl.fleet_fallback_changed();
                awaiting.answer(&ctl, true);
                fleet::publish_verdicts(&ctl, agent.as_ref());
                if !ctl.in_sync() {
                    warn!("dataplane out of sync; retrying reconcile");
                    ctl.reconcile_logged();
                }
                ctl.announce();
            }
        }
    }
    manager.stopping();
    if ctl.self_check_problems().is_empty() {
        info!("exiting; the dataplane keeps forwarding and its VIPs stay announced (`xdplb detach` removes both)");
    } else {
        error!(
            problems = ?ctl.self_check_problems(),
            "exiting while the dataplane is NOT as configured ({}); the next `xdplb run` repairs it",
            ctl.self_check_problems().join("; ")
        );
    }
    Ok(())
}

/// An admin request's answer, and whether the running state may have
/// changed (health checks and announcements must follow).
struct Answered {
    response: api::Response,
    changed: bool,
}

/// Answer `request`; a change (reload, VIP, backend, announcement) is
/// logged once with what it changed and who asked.
fn answer(ctl: &mut Controller, request: Request, asker: audit::Asker) -> Answered {
    let Some(what) = audit::describe(&request) else {
        return Answered {
            response: api::handle(ctl, request),
            changed: false,
        };
    };
    let before = matches!(request, Request::Reload {}).then(|| ctl.config().vips.clone());
    let response = api::handle(ctl, request);
    let outcome = before
        .filter(|_| response.ok)
        .map(|b| audit::reload_outcome(&b, &ctl.config().vips));
    audit::log(asker, &what, &response, outcome.as_deref());
    Answered {
        changed: response.ok,
        response,
    }
}
