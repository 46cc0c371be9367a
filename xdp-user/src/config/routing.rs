//! Validation of how a VIP's packets are routed past its hash: QUIC server
//! ids and source-routed backend subsets.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use super::*;

impl Config {
    pub(super) fn subset_problems(
        &self,
        at: &str,
        vip: &Vip,
        problem: &mut impl FnMut(String, String),
    ) {
        if vip.subsets.is_empty() {
            return;
        }
        if vip.subsets.len() > xdp_common::MAX_SUBSETS {
            problem(
                at.to_owned(),
                format!(
                    "{} subsets; a VIP has at most {}",
                    vip.subsets.len(),
                    xdp_common::MAX_SUBSETS
                ),
            );
        }
        if vip.quic.is_some() {
            problem(
                at.to_owned(),
                "subsets and [vip.quic] cannot be combined yet: a subset's backends would need server ids of their own".into(),
            );
        }
        let mut names = HashSet::new();
        let mut routed: BTreeMap<(IpAddr, u8), &str> = BTreeMap::new();
        let total: usize = self
            .vips
            .iter()
            .flat_map(|v| &v.subsets)
            .map(|s| s.sources.len())
            .sum();
        if total > xdp_common::SOURCE_ROUTES_MAX as usize {
            problem(
                at.to_owned(),
                format!(
                    "{total} source prefixes in all; the dataplane holds {}",
                    xdp_common::SOURCE_ROUTES_MAX
                ),
            );
        }
        for s in &vip.subsets {
            let sat = format!("{at} subset {:?}", s.name);
            if s.name.trim().is_empty() || s.name.chars().any(char::is_control) {
                problem(
                    sat.clone(),
                    "a subset needs a name without control characters".into(),
                );
            } else if !names.insert(s.name.as_str()) {
                problem(sat.clone(), "duplicate subset name".into());
            }
            if s.backends.is_empty() {
                problem(
                    sat.clone(),
                    "backends is empty: name the VIP's backends that serve these clients".into(),
                );
            }
            for b in &s.backends {
                if !vip.backends.iter().any(|vb| vb.address == *b) {
                    problem(sat.clone(), format!("{b} is not a backend of this VIP"));
                }
            }
            if s.sources.is_empty() {
                problem(
                    sat.clone(),
                    "sources is empty: list the client prefixes routed here".into(),
                );
            }
            for text in &s.sources {
                let Some((addr, len)) = parse_prefix(text) else {
                    problem(
                        sat.clone(),
                        format!("{text:?} is not a prefix (address/length)"),
                    );
                    continue;
                };
                if addr.is_ipv4() != vip.address.is_ipv4() {
                    problem(
                        sat.clone(),
                        format!("{text} is not of the VIP's address family"),
                    );
                    continue;
                }
                if masked(addr, len) != addr {
                    problem(
                        sat.clone(),
                        format!(
                            "{text} has host bits set; write {}/{len}",
                            masked(addr, len)
                        ),
                    );
                    continue;
                }
                if let Some(other) = routed.insert((addr, len), &s.name) {
                    problem(sat.clone(), format!("{text} is also subset {other:?}'s"));
                }
            }
        }
    }

    pub(super) fn quic_problems(
        &self,
        at: &str,
        vip: &Vip,
        problem: &mut impl FnMut(String, String),
    ) {
        let Some(quic) = vip.quic else {
            for b in vip.backends.iter().filter(|b| b.server_id.is_some()) {
                problem(
                    format!("{at} backend {}", b.address),
                    "server_id is for QUIC VIPs: add [vip.quic] to the VIP".into(),
                );
            }
            return;
        };
        if vip.protocol != Protocol::Udp {
            problem(
                at.to_owned(),
                format!(
                    "[vip.quic] needs protocol = \"udp\", not \"{}\"",
                    vip.protocol
                ),
            );
        }
        let max = xdp_common::quic::MAX_SERVER_ID_LEN;
        if !(1..=max).contains(&u32::from(quic.server_id_bytes)) {
            problem(
                format!("{at} quic.server_id_bytes"),
                format!(
                    "{} is out of range: 1 to {max} octets",
                    quic.server_id_bytes
                ),
            );
            return;
        }
        let mut owners: BTreeMap<u32, IpAddr> = BTreeMap::new();
        for b in &vip.backends {
            let Some(id) = b.server_id else { continue };
            let here = format!("{at} backend {}", b.address);
            if id > quic.max_server_id() {
                problem(
                    here,
                    format!(
                        "server_id {id} does not fit in {} octets (quic.server_id_bytes; at most {})",
                        quic.server_id_bytes,
                        quic.max_server_id()
                    ),
                );
            } else if let Some(other) = owners.insert(id, b.address) {
                problem(here, format!("server_id {id} is also backend {other}'s"));
            }
        }
    }
}
/// `addr` with the bits past the first `len` cleared.
fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}
