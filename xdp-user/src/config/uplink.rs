//! `[[uplink]]`: more interfaces one daemon serves over the same maps, each
//! to its own router (two uplinks, each announcing over its own BGP
//! session). A frame leaves by the interface it arrived on, so each
//! uplink names the next hop behind it.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{parse_mac, Config};

/// Extra interfaces at most (the main `interface` not counted).
pub const MAX_UPLINKS: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// The interface, served by the same program and maps as `interface`.
    pub interface: String,
    /// MAC of the router behind this interface: the next hop of the
    /// encapsulated packets that arrived on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_mac: Option<String>,
}

impl Config {
    /// The problems of the `[[uplink]]` entries, each with its location.
    pub(super) fn uplink_problems(&self, problem: &mut impl FnMut(String, String)) {
        if self.uplinks.len() > MAX_UPLINKS {
            problem(
                "uplink".into(),
                format!(
                    "{} uplinks; at most {MAX_UPLINKS} besides `interface`",
                    self.uplinks.len()
                ),
            );
        }
        let mut seen = HashSet::from([self.interface.as_str()]);
        for (i, u) in self.uplinks.iter().enumerate() {
            let at = format!("uplink[{i}]");
            if let Some(why) = crate::iface::invalid_name(&u.interface) {
                problem(format!("{at}.interface"), why);
            } else if !seen.insert(u.interface.as_str()) {
                problem(
                    format!("{at}.interface"),
                    format!(
                        "{:?} is served already (by `interface` or an earlier uplink)",
                        u.interface
                    ),
                );
            }
            let what_for = format!(
                "encapsulated packets that arrive on {} go back out of it to this next hop",
                u.interface
            );
            if let Some(why) = self.next_hop_problem(u.gateway_mac.as_deref(), &what_for) {
                problem(format!("{at}.gateway_mac"), why);
            }
        }
    }

    /// The uplinks as the dataplane serves them: (interface, next hop).
    pub fn uplink_hops(&self) -> Vec<(String, [u8; 6])> {
        self.uplinks
            .iter()
            .map(|u| {
                let mac = u.gateway_mac.as_deref().and_then(parse_mac);
                (u.interface.clone(), mac.unwrap_or([0; 6]))
            })
            .collect()
    }
}
