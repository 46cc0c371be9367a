//! xdplb: an XDP layer-4 load balancer. This library holds the dataplane
//! loader; the daemon, health checks and CLI build on it.

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
