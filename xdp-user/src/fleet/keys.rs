//! What a fleet keeps in etcd, and how it is read back: pure.
//!
//! - `<prefix>/vips/<name>`: one VIP, the TOML of a `[[vip]]` table of the
//!   config file (its backends, weights, drain and down included);
//! - `<prefix>/health/<host>`: one host's verdicts (JSON, VIP name ->
//!   backend address -> up), under the host's lease.
//!
//! Anything else under the prefix is not ours: the desired state that holds
//! it is refused, naming the key.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize as _;

use crate::config::Vip;

/// One key of the store as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// Where the VIPs of a fleet live.
pub fn vips_prefix(prefix: &str) -> String {
    format!("{prefix}/vips/")
}

pub fn vip_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/vips/{name}")
}

/// Where the hosts' verdicts live.
pub fn health_prefix(prefix: &str) -> String {
    format!("{prefix}/health/")
}

pub fn health_key(prefix: &str, host: &str) -> String {
    format!("{prefix}/health/{host}")
}

/// The fleet's desired state at one revision of the store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// The store's revision it was read at.
    pub revision: i64,
    /// By name.
    pub vips: Vec<Vip>,
    /// Each VIP key's last change (compare-and-swap).
    pub mod_revisions: BTreeMap<String, i64>,
}

/// A key the fleet cannot use, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadKey {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for BadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd key {}: {}", self.key, self.reason)
    }
}

impl std::error::Error for BadKey {}

/// What a key under the prefix is.
enum Kind<'a> {
    Vip(&'a str),
    Health(&'a str),
}

fn kind<'a>(prefix: &str, key: &'a str) -> Result<Kind<'a>, String> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or("outside the fleet's prefix")?;
    let named = |name: &'a str, what: &str| {
        if name.is_empty() || name.contains('/') {
            Err(format!("{what} names must be one non-empty key segment"))
        } else {
            Ok(name)
        }
    };
    if let Some(name) = rest.strip_prefix("vips/") {
        return named(name, "VIP").map(Kind::Vip);
    }
    if let Some(host) = rest.strip_prefix("health/") {
        return named(host, "host").map(Kind::Health);
    }
    Err(format!(
        "not a key xdplb uses (only {prefix}/vips/<name> and {prefix}/health/<host>)"
    ))
}

/// The TOML a VIP is stored as.
pub fn vip_value(vip: &Vip) -> Result<String, toml::ser::Error> {
    toml::to_string(vip)
}

/// Read one VIP's value; its name is the key's.
fn parse_vip(name: &str, value: &[u8]) -> Result<Vip, String> {
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8 text".to_owned())?;
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let why = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        format!("the value is not TOML: {why}")
    })?;
    match table.get("name") {
        None => {
            table.insert("name".into(), toml::Value::String(name.into()));
        }
        Some(toml::Value::String(n)) if n == name => {}
        Some(other) => return Err(format!("its name {other} is not the key's ({name:?})")),
    }
    Vip::deserialize(toml::Value::Table(table)).map_err(|e| format!("not a VIP: {}", e.message()))
}

/// The desired state in `entries` (every key under the prefix), or the
/// first key that cannot be part of it.
pub fn read_desired(prefix: &str, revision: i64, entries: &[Entry]) -> Result<Desired, BadKey> {
    let mut desired = Desired {
        revision,
        ..Desired::default()
    };
    for e in entries {
        let bad = |reason: String| BadKey {
            key: e.key.clone(),
            reason,
        };
        match kind(prefix, &e.key).map_err(bad)? {
            Kind::Health(_) => {}
            Kind::Vip(name) => {
                desired.vips.push(parse_vip(name, &e.value).map_err(bad)?);
                desired.mod_revisions.insert(name.into(), e.mod_revision);
            }
        }
    }
    desired.vips.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(desired)
}

/// Why the fleet's VIPs (with the local file) are not a valid config, with
/// each problem of one VIP located at its etcd key.
pub fn locate(prefix: &str, vips: &[Vip], invalid: &crate::config::Invalid) -> String {
    let mut out = format!(
        "{} problem{} in the fleet's VIPs:",
        invalid.0.len(),
        if invalid.0.len() == 1 { "" } else { "s" }
    );
    for p in &invalid.0 {
        // Locations of a VIP's problems start with `vip[i] <label>`.
        let at = p
            .location
            .strip_prefix("vip[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(i, rest)| {
                let vip = vips.get(i.parse::<usize>().ok()?)?;
                let rest = rest.trim_start().strip_prefix(&vip.label())?;
                Some(format!("etcd key {}{rest}", vip_key(prefix, &vip.name)))
            })
            .unwrap_or_else(|| p.location.clone());
        out += &format!("\n  {at}: {}", p.reason);
    }
    out
}

/// One host's verdicts: VIP name -> backend address -> up.
pub type Verdicts = BTreeMap<String, BTreeMap<IpAddr, bool>>;

pub fn verdicts_value(v: &Verdicts) -> String {
    // A map of maps of strings and booleans always serializes.
    serde_json::to_string(v).unwrap_or_default()
}

/// The live hosts' verdicts under the prefix (their leases hold them
/// there), and the keys that could not be read.
pub fn read_peers(prefix: &str, entries: &[Entry]) -> (BTreeMap<String, Verdicts>, Vec<BadKey>) {
    let mut peers = BTreeMap::new();
    let mut bad = Vec::new();
    for e in entries {
        let Ok(Kind::Health(host)) = kind(prefix, &e.key) else {
            continue;
        };
        match serde_json::from_slice::<Verdicts>(&e.value) {
            Ok(v) => {
                peers.insert(host.to_owned(), v);
            }
            Err(err) => bad.push(BadKey {
                key: e.key.clone(),
                reason: format!("not a host's verdicts: {err}"),
            }),
        }
    }
    (peers, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, rev: i64) -> Entry {
        Entry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    const WEB: &str = "address = \"198.18.0.10\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n\n[[backend]]\naddress = \"198.18.1.1\"\n";

    #[test]
    fn vips_read_by_name_and_sorted() {
        let d = read_desired(
            "/f",
            9,
            &[
                entry("/f/vips/web", WEB, 7),
                entry("/f/vips/api", &WEB.replace("port = 80", "port = 81"), 8),
                entry("/f/health/lb1", "{}", 9),
            ],
        )
        .unwrap();
        assert_eq!(d.revision, 9);
        let names: Vec<&str> = d.vips.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        assert_eq!(d.mod_revisions["web"], 7);
        assert_eq!(d.vips[1].backends.len(), 1);
    }

    #[test]
    fn a_stored_vip_reads_back_as_written() {
        let d = read_desired("/f", 1, &[entry("/f/vips/web", WEB, 1)]).unwrap();
        let again = vip_value(&d.vips[0]).unwrap();
        let d2 = read_desired("/f", 2, &[entry("/f/vips/web", &again, 2)]).unwrap();
        assert_eq!(d.vips, d2.vips);
    }

    #[test]
    fn bad_keys_are_named() {
        for (key, value, why) in [
            ("/f/vips/web", "address = ", "not TOML"),
            ("/f/vips/web", "address = \"198.18.0.10\"", "not a VIP"),
            (
                "/f/vips/web",
                &format!("name = \"api\"\n{WEB}"),
                "not the key's",
            ),
            ("/f/vips/web/x", WEB, "one non-empty key segment"),
            ("/f/notes", "hello", "not a key xdplb uses"),
            ("/f/vips/web", "\u{0}\u{ff}", "not TOML"),
        ] {
            let e = read_desired(
                "/f",
                1,
                &[entry("/f/vips/ok", WEB, 1), entry(key, value, 1)],
            )
            .unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.reason.contains(why), "{key}: {}", e.reason);
        }
        let mut bin = entry("/f/vips/web", "", 1);
        bin.value = vec![0xff, 0xfe];
        assert!(read_desired("/f", 1, &[bin])
            .unwrap_err()
            .reason
            .contains("UTF-8"));
    }

    #[test]
    fn problems_are_located_at_their_keys() {
        let d = read_desired("/f", 1, &[entry("/f/vips/web", WEB, 1)]).unwrap();
        let invalid = crate::config::Invalid(vec![
            crate::config::Problem {
                location: format!("vip[0] {}.health", d.vips[0].label()),
                reason: "bad".into(),
            },
            crate::config::Problem {
                location: "vip.backend".into(),
                reason: "too many".into(),
            },
        ]);
        let text = locate("/f", &d.vips, &invalid);
        assert!(text.contains("etcd key /f/vips/web.health: bad"), "{text}");
        assert!(text.contains("vip.backend: too many"), "{text}");
    }

    #[test]
    fn peers_are_read_and_bad_ones_named() {
        let (peers, bad) = read_peers(
            "/f",
            &[
                entry("/f/health/lb1", r#"{"web":{"198.18.1.1":true}}"#, 1),
                entry("/f/health/lb2", "nonsense", 1),
                entry("/f/vips/web", WEB, 1),
            ],
        );
        assert_eq!(peers.len(), 1);
        assert!(peers["lb1"]["web"][&"198.18.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].key, "/f/health/lb2");
        let mut v = Verdicts::new();
        v.entry("web".into())
            .or_default()
            .insert("2001:db8::1".parse().unwrap(), false);
        let (back, _) = read_peers("/f", &[entry("/f/health/x", &verdicts_value(&v), 1)]);
        assert_eq!(back["x"], v);
    }
}
