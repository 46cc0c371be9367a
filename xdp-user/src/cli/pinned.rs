//! `xdplb status` with no daemon: what the pinned dataplane forwards, read
//! from its pins alone (as `ipvsadm -Ln` shows the kernel's table), marked
//! as such: no health check runs and nothing changes it.

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use xdp_common::{VipKey, PROTO_TCP};

use crate::{
    config::{endpoint, Config, Protocol},
    controller::{ip_of, state_name, vip_key},
    dataplane::trace::Pinned,
};

/// `198.18.0.10:80/tcp` of a VIP's key in the dataplane.
fn endpoint_of(key: &VipKey) -> String {
    let port = Some(u16::from_be(key.port)).filter(|p| *p != 0);
    let protocol = if key.proto == PROTO_TCP {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    endpoint(ip_of(key.addr, u32::from(key.family)), port, protocol)
}

/// The report: a header saying whose view this is, then each VIP of the
/// pinned maps (named from `config` where it has it) with its backends.
pub fn report(pin_dir: &Path, config: Option<&Config>, why: &str) -> Result<String> {
    let pinned = Pinned::new(pin_dir);
    let ifindex = pinned.attached_ifindex()?;
    let attached = if ifindex == 0 {
        "detached (it forwards nothing)".to_owned()
    } else {
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `name` has IF_NAMESIZE bytes, as if_indextoname needs.
        let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
        if found.is_null() {
            format!("attached to interface index {ifindex}")
        } else {
            // SAFETY: if_indextoname wrote a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
            format!("attached to {}", name.to_string_lossy())
        }
    };
    let mut out = format!(
        "NO DAEMON ({why}): what the pinned dataplane in {} forwards, {attached}; \
         no health check runs and nothing changes it until `xdplb run` adopts it\n",
        pin_dir.display()
    );
    let mut vips = pinned.vips()?;
    vips.sort_by_key(|(_, id)| *id);
    let backends = pinned.backends()?;
    let configured = |key: &VipKey| config.and_then(|c| c.vips.iter().find(|v| vip_key(v) == *key));
    let name_of = |key: &VipKey| {
        configured(key).map_or_else(|| "(not in the config)".to_owned(), |v| v.name.clone())
    };
    let n = vips.iter().filter(|(k, _)| k.subset_of().is_none()).count();
    out += &format!("{n} VIP{}\n", if n == 1 { "" } else { "s" });
    for (key, id) in &vips {
        match key.subset_of() {
            Some((vip, n)) => {
                let subset = configured(&vip)
                    .and_then(|v| v.subsets.get(n))
                    .map_or_else(|| format!("{}", n + 1), |s| s.name.clone());
                out += &format!(
                    "VIP {} {} subset {subset}\n",
                    name_of(&vip),
                    endpoint_of(&vip)
                );
            }
            None => out += &format!("VIP {} {}\n", name_of(key), endpoint_of(key)),
        }
        let mut mine: Vec<(IpAddr, &'static str)> = backends
            .iter()
            .filter(|(_, b)| b.vip_id == *id)
            .map(|(_, b)| (ip_of(b.addr, b.family), state_name(b.state)))
            .collect();
        mine.sort();
        if mine.is_empty() {
            out += "  no backend: its packets are dropped\n";
        }
        for (addr, state) in mine {
            out += &format!("  {addr:<40} {state}\n");
        }
    }
    Ok(out)
}
