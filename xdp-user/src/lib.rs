//! xdplb: an XDP layer-4 load balancer. This library holds the dataplane
//! loader; the daemon, health checks and CLI build on it.

/// `Display` for unit enums as the config file and the API spell them
/// (`native`, `up`, `ipip`): their serde names, never their Rust names.
#[macro_export]
macro_rules! display_as_written {
    ($($t:ty),* $(,)?) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(name)) => f.write_str(&name),
                    _ => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}

/// `n` things, as a sentence says it: "1 VIP", "3 VIPs", "0 backends"
/// (the CLI's output and the daemon's log lines).
pub fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

pub mod announce;
pub mod api;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod fleet;
pub mod health;
pub mod http;
pub mod iface;
pub mod loadgen;
pub mod lock;
pub mod maglev;
pub mod metrics;
pub mod service;
pub mod socket;
pub mod trace;
