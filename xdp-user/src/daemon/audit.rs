//! One log line for every runtime change an operator asks for: what
//! changed (or why it was refused) and who asked, by the admin socket
//! peer's uid and pid (SO_PEERCRED) or by signal.

use std::fmt;

use tracing::{info, warn};

use crate::{
    api::{Request, Response},
    config::{Change, Vip},
};

/// Who asked for a change.
#[derive(Clone, Copy, Debug)]
pub enum Asker {
    /// A client of the admin socket, by its credentials.
    Socket { uid: Option<u32>, pid: Option<i32> },
    /// A signal (SIGHUP: the sender is not known).
    Signal(&'static str),
}

impl Asker {
    /// The peer of an admin connection.
    pub fn of(stream: &tokio::net::UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => Self::Socket {
                uid: Some(cred.uid()),
                pid: cred.pid(),
            },
            Err(_) => Self::Socket {
                uid: None,
                pid: None,
            },
        }
    }
}

impl fmt::Display for Asker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
        match self {
            Self::Socket { uid, pid } => write!(
                f,
                "uid {}, pid {}",
                or_unknown(uid.map(|u| u.to_string())),
                or_unknown(pid.map(|p| p.to_string()))
            ),
            Self::Signal(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VipAdd(v) => write!(
                f,
                "add VIP {} ({} {}{}, {} backends)",
                v.name,
                v.protocol,
                v.address,
                v.port.map(|p| format!(" port {p}")).unwrap_or_default(),
                v.backends.len()
            ),
            Self::VipDel(name) => write!(f, "delete VIP {name}"),
            Self::BackendAdd(vip, b) => write!(
                f,
                "add backend {} (weight {}, {}) to VIP {vip}",
                b.address, b.weight, b.state
            ),
            Self::BackendDel(vip, a) => write!(f, "delete backend {a} of VIP {vip}"),
            Self::BackendDrain(vip, a, true) => write!(f, "drain backend {a} of VIP {vip}"),
            Self::BackendDrain(vip, a, false) => write!(f, "undrain backend {a} of VIP {vip}"),
            Self::BackendWeight(vip, a, w) => {
                write!(f, "set the weight of backend {a} of VIP {vip} to {w}")
            }
        }
    }
}

/// What a request asks to change, in words; None for queries.
pub fn describe(request: &Request) -> Option<String> {
    match request {
        Request::Reload {} => Some("reload the config".into()),
        Request::AnnounceWithdraw { withdraw: true } => {
            Some("withdraw this host's announcements".into())
        }
        Request::AnnounceWithdraw { withdraw: false } => {
            Some("end the withdrawal of this host's announcements".into())
        }
        other => other.change().map(|c| c.to_string()),
    }
}

/// Log a handled change request once: accepted (with `outcome`, what it
/// changed, when known) or refused with the reason.
pub fn log(asker: Asker, what: &str, response: &Response, outcome: Option<&str>) {
    match &response.error {
        None => info!(
            asker = %asker,
            change = what,
            outcome,
            "{what}: accepted{} (asked by {asker})",
            outcome.map(|o| format!(": {o}")).unwrap_or_default()
        ),
        Some(e) => {
            // One line in the journal, however many problems the reason lists.
            let reason = e.lines().map(str::trim).collect::<Vec<_>>().join(" ");
            warn!(
                asker = %asker,
                change = what,
                error = %e,
                "{what}: refused, the running state is unchanged (asked by {asker}): {reason}"
            )
        }
    }
}

/// What a reload changed: VIPs added, removed and changed (with their
/// backends added and removed), or that it changed nothing.
pub fn reload_outcome(before: &[Vip], after: &[Vip]) -> String {
    let find = |vips: &[Vip], name: &str| vips.iter().position(|v| v.name == name);
    let mut parts = Vec::new();
    for v in after.iter().filter(|v| find(before, &v.name).is_none()) {
        parts.push(format!("VIP {} added", v.name));
    }
    for v in before.iter().filter(|v| find(after, &v.name).is_none()) {
        parts.push(format!("VIP {} removed", v.name));
    }
    for new in after {
        let Some(old) = find(before, &new.name).map(|i| &before[i]) else {
            continue;
        };
        if old == new {
            continue;
        }
        let has = |vip: &Vip, b: &crate::config::BackendConfig| {
            vip.backends
                .iter()
                .find(|x| x.address == b.address)
                .cloned()
        };
        let mut what = Vec::new();
        for b in &new.backends {
            match has(old, b) {
                None => what.push(format!("backend {} added", b.address)),
                Some(o) if o != *b => what.push(format!("backend {} changed", b.address)),
                Some(_) => {}
            }
        }
        for b in old.backends.iter().filter(|b| has(new, b).is_none()) {
            what.push(format!("backend {} removed", b.address));
        }
        let mut settings = old.clone();
        settings.backends.clone_from(&new.backends);
        if settings != *new {
            what.push("settings changed".into());
        }
        parts.push(format!("VIP {}: {}", new.name, what.join(", ")));
    }
    if parts.is_empty() {
        "no VIP changed".into()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(name: &str, backends: &[&str]) -> Vip {
        let text = format!(
            "name = {name:?}\naddress = \"198.18.0.10\"\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n{}",
            backends
                .iter()
                .map(|b| format!("[[backend]]\naddress = {b:?}\n"))
                .collect::<String>()
        );
        toml::from_str(&text).expect("a VIP")
    }

    #[test]
    fn a_reload_names_what_it_changed() {
        let before = [vip("web", &["198.18.1.1"]), vip("old", &[])];
        let mut weighted = vip("web", &["198.18.1.1", "198.18.1.2"]);
        weighted.backends[0].weight = 7;
        let after = [weighted, vip("new", &[])];
        assert_eq!(
            reload_outcome(&before, &after),
            "VIP new added; VIP old removed; VIP web: backend 198.18.1.1 changed, backend 198.18.1.2 added"
        );
        assert_eq!(reload_outcome(&before, &before), "no VIP changed");
        let mut udp = vip("web", &["198.18.1.1"]);
        udp.protocol = crate::config::Protocol::Udp;
        assert_eq!(
            reload_outcome(&before[..1], &[udp]),
            "VIP web: settings changed"
        );
    }

    #[test]
    fn changes_read_as_operators_write_them() {
        let addr = "198.18.1.2".parse().expect("an address");
        assert_eq!(
            Change::BackendDrain("web".into(), addr, true).to_string(),
            "drain backend 198.18.1.2 of VIP web"
        );
        assert_eq!(
            describe(&Request::BackendWeight {
                vip: "web".into(),
                address: addr,
                weight: 3
            })
            .as_deref(),
            Some("set the weight of backend 198.18.1.2 of VIP web to 3")
        );
        assert_eq!(describe(&Request::Status {}), None);
        let asker = Asker::Socket {
            uid: Some(0),
            pid: Some(42),
        };
        assert_eq!(asker.to_string(), "uid 0, pid 42");
    }
}
