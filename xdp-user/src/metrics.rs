//! The Prometheus exposition of everything the controller knows, built with
//! `prometheus-client` from one snapshot per scrape: every family's samples
//! together, state gauges with every state (0/1), in the Prometheus text
//! format or OpenMetrics as the scraper asks.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use xdp_common::reason;

use crate::{controller::Controller, health::Health};

/// Which text format a scraper gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

type Labels = Vec<(String, String)>;

fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Registers families filled from a snapshot.
struct Exposition {
    registry: Registry,
}

/// prometheus-client ends every help text with a full stop itself.
fn trim_help(text: &str) -> &str {
    text.strip_suffix('.').unwrap_or(text)
}

impl Exposition {
    /// Register a family of `M`s named `name`, each sample set with `set`.
    fn family<M, V>(
        &mut self,
        name: &str,
        about: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
        set: impl Fn(&M, V),
    ) where
        M: prometheus_client::metrics::TypedMetric
            + prometheus_client::encoding::EncodeMetric
            + Default
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let family: Family<Labels, M> = Family::default();
        for (l, v) in samples {
            set(&family.get_or_create(&l), v);
        }
        self.registry.register(name, trim_help(about), family);
    }

    /// A counter family; `name` ends in `_total`, which the encoder adds.
    fn counter(
        &mut self,
        name: &str,
        about: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let base = name.strip_suffix("_total").unwrap_or(name);
        self.family(base, about, samples, |c: &Counter, v| {
            c.inc_by(v);
        });
    }

    fn counter_f64(
        &mut self,
        name: &str,
        about: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let base = name.strip_suffix("_total").unwrap_or(name);
        self.family(base, about, samples, |c: &Counter<f64, AtomicU64>, v| {
            c.inc_by(v);
        });
    }

    fn gauge(&mut self, name: &str, about: &str, samples: impl IntoIterator<Item = (Labels, i64)>) {
        self.family(name, about, samples, |g: &Gauge, v| {
            g.set(v);
        });
    }

    fn gauge_f64(
        &mut self,
        name: &str,
        about: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        self.family(name, about, samples, |g: &Gauge<f64, AtomicU64>, v| {
            g.set(v);
        });
    }

    fn one(value: i64) -> std::iter::Once<(Labels, i64)> {
        std::iter::once((Vec::new(), value))
    }

    fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = match format {
            Format::Prometheus => prometheus_text::encode(&mut out, &self.registry),
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
        };
        out
    }
}

/// Every dataplane state a backend can be in, for the 0/1 state gauge.
const STATES: [&str; 4] = ["up", "down", "draining", "absent"];

/// The exposition of everything the controller knows, in `format`.
pub fn render(ctl: &mut Controller, format: Format) -> String {
    let status = ctl.status();
    let mut e = Exposition {
        registry: Registry::default(),
    };
    e.gauge(
        "xdplb_build_info",
        "The running build (value 1).",
        [(labels([("version", env!("CARGO_PKG_VERSION"))]), 1)],
    );
    let reason_samples = |actions: bool, key: &'static str| {
        (0..)
            .zip(reason::NAMES)
            .filter(|(r, _)| reason::is_action(*r) == actions)
            .map(|(_, n)| {
                (
                    labels([(key, n)]),
                    status.reasons.get(n).copied().unwrap_or(0),
                )
            })
            .collect::<Vec<_>>()
    };
    e.counter(
        "xdplb_packets_total",
        "Packets by what the balancer did with them.",
        reason_samples(true, "reason"),
    );
    e.counter(
        "xdplb_events_total",
        "Conntrack and parsing events.",
        reason_samples(false, "event"),
    );

    let vip_labels =
        |v: &crate::controller::VipStatus| labels([("vip", &v.name), ("endpoint", &v.endpoint)]);
    for (name, help, pick) in [
        ("xdplb_vip_packets_total", "Packets forwarded per VIP.", 0),
        ("xdplb_vip_bytes_total", "Bytes forwarded per VIP.", 1),
        ("xdplb_vip_new_flows_total", "Flows assigned per VIP.", 2),
    ] {
        e.counter(
            name,
            help,
            status.vips.iter().map(|v| {
                let c = v.counters;
                (vip_labels(v), [c.packets, c.bytes, c.new_flows][pick])
            }),
        );
    }
    e.counter(
        "xdplb_vip_dropped_total",
        "Packets of the VIP dropped, by reason (no_backend: no usable backend; encap_failed: no headroom to encapsulate).",
        status.vips.iter().flat_map(|v| {
            [
                ("no_backend", v.drops.no_backend),
                ("encap_failed", v.drops.encap_failed),
            ]
            .into_iter()
            .map(move |(r, n)| {
                let mut l = vip_labels(v);
                l.push(("reason".into(), r.into()));
                (l, n)
            })
        }),
    );
    e.gauge(
        "xdplb_vip_usable_backends",
        "Backends of the VIP its ring holds now (up and weight above 0).",
        status.vips.iter().map(|v| {
            let usable = v
                .backends
                .iter()
                .filter(|b| b.dataplane_state == "up" && b.weight > 0)
                .count();
            (vip_labels(v), usable as i64)
        }),
    );

    let backends = || {
        status
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (v, b)))
    };
    let backend_labels = |v: &crate::controller::VipStatus,
                          b: &crate::controller::BackendStatus| {
        labels([("vip", &v.name), ("backend", &b.address.to_string())])
    };
    for (name, help, pick) in [
        (
            "xdplb_backend_packets_total",
            "Packets forwarded per backend.",
            0,
        ),
        (
            "xdplb_backend_bytes_total",
            "Bytes forwarded per backend.",
            1,
        ),
        (
            "xdplb_backend_new_flows_total",
            "Flows assigned per backend.",
            2,
        ),
    ] {
        // Removed backends' counters stay, under the backend "removed", so
        // the backends of a VIP always add up to it.
        let removed = status.vips.iter().filter(|v| v.id.is_some()).map(|v| {
            let c = v.removed_backends;
            (
                labels([("vip", v.name.as_str()), ("backend", "removed")]),
                [c.packets, c.bytes, c.new_flows][pick],
            )
        });
        e.counter(
            name,
            help,
            backends()
                .map(|(v, b)| {
                    let c = b.counters;
                    (
                        backend_labels(v, b),
                        [c.packets, c.bytes, c.new_flows][pick],
                    )
                })
                .chain(removed),
        );
    }
    e.gauge(
        "xdplb_backend_up",
        "Whether the backend passes its health checks (1) or not (0).",
        backends().map(|(v, b)| {
            (
                backend_labels(v, b),
                i64::from(b.health != Some(Health::Down)),
            )
        }),
    );
    e.gauge(
        "xdplb_backend_state",
        "Dataplane state of the backend: 1 for the current state, 0 for the others.",
        backends().flat_map(|(v, b)| {
            STATES.iter().map(move |s| {
                let mut l = backend_labels(v, b);
                l.push(("state".into(), (*s).into()));
                (l, i64::from(b.dataplane_state == *s))
            })
        }),
    );
    e.gauge(
        "xdplb_backend_weight",
        "Configured weight of the backend.",
        backends().map(|(v, b)| (backend_labels(v, b), i64::from(b.weight))),
    );
    e.gauge(
        "xdplb_backend_flap_damped",
        "Whether flap damping holds the backend down (1) or not (0).",
        backends().map(|(v, b)| (backend_labels(v, b), i64::from(b.damped))),
    );
    e.gauge(
        "xdplb_backend_checks_blocked",
        "Whether the backend's last checks could not run for a reason of this host's (1): its health is not known.",
        backends().map(|(v, b)| (backend_labels(v, b), i64::from(b.checks_blocked.is_some()))),
    );

    let health: Vec<(Labels, &crate::controller::BackendHealth)> = ctl
        .health()
        .iter()
        .map(|(k, h)| {
            (
                labels([("vip", &k.vip), ("backend", &k.backend.to_string())]),
                h,
            )
        })
        .collect();
    e.gauge_f64(
        "xdplb_health_check_latency_seconds",
        "Latency of the last check, while it passed (none after a failed check).",
        health
            .iter()
            .filter_map(|(l, h)| h.last_latency.map(|d| (l.clone(), d.as_secs_f64()))),
    );
    e.counter(
        "xdplb_health_checks_total",
        "Health checks run, by result.",
        health.iter().flat_map(|(l, h)| {
            [("ok", h.checks_ok), ("failed", h.checks_failed)]
                .into_iter()
                .map(move |(r, n)| {
                    let mut l = l.clone();
                    l.push(("result".into(), r.into()));
                    (l, n)
                })
        }),
    );
    e.counter(
        "xdplb_health_transitions_total",
        "Health state changes.",
        health.iter().map(|(l, h)| (l.clone(), h.transitions)),
    );
    e.counter(
        "xdplb_health_check_errors_total",
        "Checks that could not run for a reason local to this host (never counted against the backend), by VIP, backend and kind.",
        health.iter().flat_map(|(l, h)| {
            h.local_errors.iter().map(move |(kind, n)| {
                let mut l = l.clone();
                l.push(("kind".into(), (*kind).into()));
                (l, *n)
            })
        }),
    );

    e.gauge(
        "xdplb_flows",
        "Conntrack entries in use (refreshed in the background).",
        Exposition::one(status.flows as i64),
    );
    e.gauge(
        "xdplb_flows_max",
        "Conntrack capacity.",
        Exposition::one(i64::from(status.max_flows)),
    );
    e.gauge(
        "xdplb_ring_slots_changed",
        "Ring slots whose owner changed and whose packets consult conntrack, by phase: taking_over (flows of the previous owner are told apart), settled (until no tracked flow needs the mark).",
        [
            (labels([("phase", "taking_over")]), status.changed_slots.0 as i64),
            (labels([("phase", "settled")]), status.changed_slots.1 as i64),
        ],
    );
    e.gauge(
        "xdplb_dataplane_in_sync",
        "Whether the last reconcile succeeded.",
        Exposition::one(i64::from(status.in_sync)),
    );
    e.counter(
        "xdplb_reconcile_failures_total",
        "Failed reconciles (each is retried).",
        [(Vec::new(), ctl.reconcile_failures)],
    );
    e.counter(
        "xdplb_ring_rebuilds_total",
        "Maglev rings computed (coalesced: at most one per VIP per window).",
        [(Vec::new(), ctl.ring_rebuilds())],
    );
    let (reload_ok, reload_at) = ctl.last_reload();
    e.gauge(
        "xdplb_config_last_reload_successful",
        "Whether the last reload of the config file was applied (1) or refused (0).",
        Exposition::one(i64::from(reload_ok)),
    );
    e.gauge_f64(
        "xdplb_config_last_reload_success_timestamp_seconds",
        "When the config was last loaded successfully (Unix time).",
        [(Vec::new(), reload_at)],
    );
    e.gauge(
        "xdplb_dataplane_attached",
        "Whether the self-check passes: the program is attached through the daemon's pinned link and the pins are its maps.",
        Exposition::one(i64::from(status.attached)),
    );
    let (losses, repairs) = ctl.self_check_counts();
    e.counter(
        "xdplb_dataplane_losses_total",
        "Times the self-check found the dataplane not as the daemon left it.",
        [(Vec::new(), losses)],
    );
    e.counter(
        "xdplb_dataplane_repairs_total",
        "Re-attachments and re-pinnings the daemon carried out.",
        [(Vec::new(), repairs)],
    );
    e.counter(
        "xdplb_driver_xdp_errors_total",
        "XDP frames the NIC driver failed to transmit or redirect (ethtool statistics).",
        status
            .driver_xdp_errors
            .iter()
            .map(|(n, v)| (labels([("counter", n)]), *v)),
    );
    let a = &status.announce;
    if a.enabled {
        let addresses: std::collections::BTreeSet<std::net::IpAddr> =
            ctl.config().vips.iter().map(|v| v.address).collect();
        e.gauge(
            "xdplb_vip_address_announced",
            "Whether this host announces the VIP address (its route is in the announcement table).",
            addresses.iter().map(|addr| {
                (
                    labels([("address", &addr.to_string())]),
                    i64::from(a.announced.contains(addr)),
                )
            }),
        );
        e.gauge(
            "xdplb_vip_address_announce_conflict",
            "Whether the announcement table holds a route for the VIP address that xdplb did not add (1): left alone, and the address is not announced.",
            addresses.iter().map(|addr| {
                (
                    labels([("address", &addr.to_string())]),
                    i64::from(a.conflicts.contains_key(addr)),
                )
            }),
        );
        e.gauge(
            "xdplb_announce_withdrawn",
            "Whether the operator withdrew this host's announcements (`xdplb announce withdraw`).",
            Exposition::one(i64::from(a.withdrawn_by_operator)),
        );
        e.counter(
            "xdplb_announce_changes_total",
            "Announcement routes added or removed.",
            [(Vec::new(), a.changes)],
        );
    }
    if let Some(f) = &status.fleet {
        e.gauge(
            "xdplb_fleet_revision",
            "The etcd revision whose desired state runs on this host.",
            Exposition::one(f.revision),
        );
        e.gauge(
            "xdplb_fleet_store_revision",
            "The newest etcd revision this host has seen.",
            Exposition::one(f.store_revision),
        );
        e.gauge(
            "xdplb_fleet_store_connected",
            "Whether the fleet's store (etcd) answers; 0: forwarding goes on with the last applied state.",
            Exposition::one(i64::from(f.connected)),
        );
        e.gauge(
            "xdplb_fleet_local_health",
            "Whether the rings follow this host's checks alone (the store is lost for longer than the lease TTL).",
            Exposition::one(i64::from(f.local_health)),
        );
        e.gauge(
            "xdplb_fleet_desired_state_refused",
            "Whether the store's newest desired state was refused (status names the key); the last good one runs.",
            Exposition::one(i64::from(f.refused.is_some())),
        );
        e.gauge(
            "xdplb_fleet_hosts",
            "Live hosts publishing verdicts, this one included.",
            Exposition::one(f.hosts.len() as i64),
        );
        e.gauge(
            "xdplb_fleet_backend_disagrees",
            "Backends this host's checks judge otherwise than the fleet (1 per backend; own = this host's verdict).",
            f.disagreements.iter().map(|d| {
                (
                    labels([
                        ("vip", d.vip.as_str()),
                        ("backend", &d.backend.to_string()),
                        ("own", if d.own { "up" } else { "down" }),
                    ]),
                    1,
                )
            }),
        );
    }
    if let Ok((run_time, run_count)) = ctl.dataplane().program_stats() {
        e.counter_f64(
            "xdplb_program_run_seconds_total",
            "Time spent in the XDP program (needs sysctl kernel.bpf_stats_enabled=1).",
            [(Vec::new(), run_time.as_secs_f64())],
        );
        e.counter(
            "xdplb_program_runs_total",
            "Runs of the XDP program (needs sysctl kernel.bpf_stats_enabled=1).",
            [(Vec::new(), run_count)],
        );
    }
    e.encode(format)
}
