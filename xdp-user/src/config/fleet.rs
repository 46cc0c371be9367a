//! `[fleet]`: where a fleet of LB hosts keeps its desired state and shares
//! health (etcd). What stays per host (interface, tables, pins, API,
//! metrics, announcing) stays in the local file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How the fleet's verdict on a backend follows the hosts' own verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthRule {
    /// In the ring while any live host that judges it sees it up: a
    /// backend leaves only when every host's checks fail.
    #[default]
    Any,
    /// In the ring while at least half of the live hosts that judge it see
    /// it up.
    Majority,
}

crate::display_as_written!(HealthRule);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// etcd client URLs (`http://` or `https://`), every member or some.
    pub endpoints: Vec<String>,
    /// The key prefix naming the fleet: VIPs under `<prefix>/vips/<name>`,
    /// verdicts under `<prefix>/health/<host>`.
    pub prefix: String,
    /// This host's name in the fleet (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// CA that signed the members' certificates (https endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (members started with
    /// `--client-cert-auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// etcd user (auth enabled); its password is read from `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Seconds this host's verdicts outlive it (its lease's TTL); also how
    /// long the others' verdicts are trusted once the store is lost, before
    /// the ring follows local checks alone.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u32,
    #[serde(default)]
    pub health_rule: HealthRule,
    /// How long one request to the store may take before the store counts
    /// as lost.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_lease_ttl() -> u32 {
    3
}

fn default_timeout_ms() -> u64 {
    1000
}

/// Longest lease TTL (an hour: a dead host's verdicts must not outlive it
/// by more).
pub const MAX_LEASE_TTL_S: u32 = 3600;

impl Fleet {
    /// This host's name in the fleet.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into())
        })
    }

    /// Every problem of the section, as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut problem = |key: &str, reason: String| out.push((format!("fleet.{key}"), reason));
        if self.endpoints.is_empty() {
            problem("endpoints", "name at least one etcd client URL".into());
        }
        for e in &self.endpoints {
            let Some(rest) = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
            else {
                problem(
                    "endpoints",
                    format!("{e:?} is not an http:// or https:// URL"),
                );
                continue;
            };
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                problem("endpoints", format!("{e:?} names no host"));
            }
        }
        let p = &self.prefix;
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains("//") {
            problem(
                "prefix",
                format!("{p:?} must start with / and not end with / (e.g. \"/xdplb/edge1\")"),
            );
        }
        if let Some(host) = &self.host {
            if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
                problem(
                    "host",
                    format!("{host:?} must be a non-empty name without / or spaces"),
                );
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            problem(
                "cert",
                "a client certificate needs its key (cert and key go together)".into(),
            );
        }
        if self.user.is_some() != self.password_file.is_some() {
            problem("user", "user and password_file go together".into());
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            problem(
                "endpoints",
                "ca/cert are set but an endpoint is http://; use https://".into(),
            );
        }
        if !(2..=MAX_LEASE_TTL_S).contains(&self.lease_ttl_s) {
            problem(
                "lease_ttl_s",
                format!(
                    "{} is outside 2..={MAX_LEASE_TTL_S} (etcd grants no shorter lease)",
                    self.lease_ttl_s
                ),
            );
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            problem(
                "timeout_ms",
                format!("{} is outside 100..=60000", self.timeout_ms),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const FLEET: &str = include_str!("../../../examples/fleet/xdplb.toml");

    #[test]
    fn the_fleet_example_is_valid_and_states_the_defaults() {
        let c = Config::parse(FLEET).unwrap_or_else(|e| panic!("{e}"));
        let f = c.fleet.clone().expect("[fleet]");
        assert_eq!(f.endpoints.len(), 3);
        assert_eq!(f.lease_ttl_s, default_lease_ttl());
        assert_eq!(f.timeout_ms, default_timeout_ms());
        assert_eq!(f.health_rule, HealthRule::default());
        assert!(c.vips.is_empty());
        #[derive(serde::Deserialize)]
        struct Vips {
            vip: Vec<crate::config::Vip>,
        }
        let vips: Vips = toml::from_str(include_str!("../../../examples/fleet/vips.toml")).unwrap();
        let mut whole = c.clone();
        whole.fleet = None;
        whole.vips = vips.vip;
        whole.validate().unwrap_or_else(|e| panic!("{e}"));
    }

    fn problems(replace: &str, by: &str) -> Vec<String> {
        assert!(FLEET.contains(replace), "{replace}");
        match Config::parse(&FLEET.replace(replace, by)) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn every_fleet_problem_is_named() {
        let endpoints = "endpoints = [\"https://198.18.80.2:2379\", \"https://198.18.81.2:2379\", \"https://198.18.82.2:2379\"]";
        for (replace, by, want) in [
            (
                endpoints,
                "endpoints = []",
                "fleet.endpoints: name at least one",
            ),
            (
                endpoints,
                "endpoints = [\"198.18.80.2:2379\"]",
                "not an http:// or https:// URL",
            ),
            (
                endpoints,
                "endpoints = [\"http://198.18.80.2:2379\"]",
                "use https://",
            ),
            (
                "prefix = \"/xdplb/edge\"",
                "prefix = \"xdplb\"",
                "fleet.prefix",
            ),
            (
                "prefix = \"/xdplb/edge\"",
                "prefix = \"/xdplb/\"",
                "fleet.prefix",
            ),
            (
                "key = \"/etc/xdplb/etcd/client.key\"",
                "",
                "cert and key go together",
            ),
            (
                "# user = \"xdplb\"",
                "user = \"xdplb\"",
                "user and password_file go together",
            ),
            ("lease_ttl_s = 3", "lease_ttl_s = 1", "fleet.lease_ttl_s"),
            ("timeout_ms = 1000", "timeout_ms = 10", "fleet.timeout_ms"),
            ("# host = \"lb1\"", "host = \"a/b\"", "fleet.host"),
            (
                "health_rule = \"any\"",
                "health_rule = \"most\"",
                "unknown variant",
            ),
        ] {
            let got = problems(replace, by);
            assert!(
                got.iter().any(|p| p.contains(want)),
                "{by:?}: want {want:?}, got {got:#?}"
            );
        }
    }

    #[test]
    fn a_fleet_members_file_has_no_vips() {
        let text = format!(
            "{FLEET}\n[[vip]]\nname = \"web\"\naddress = \"198.18.0.10\"\nprotocol = \"tcp\"\nforwarding = \"ipip\"\nport = 80\n"
        );
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("vip web") && e.contains("xdplb fleet import"),
            "{e}"
        );
    }
}
