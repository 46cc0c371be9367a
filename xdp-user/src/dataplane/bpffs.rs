//! The pin directory on a bpffs: mounting it, adopting pinned maps of
//! the right shapes, and removing the pins.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use aya::{maps::MapData, Ebpf};
use xdp_common::map_names as names;

use super::*;

/// bpffs magic number (`statfs.f_type`).
pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub(super) fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Make sure `pin_dir` exists on a bpffs, mounting one at /sys/fs/bpf if
/// none is mounted there (as systemd normally does).
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: constant NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "/sys/fs/bpf is not a bpffs and mounting one failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!(
            "{} is not on a bpffs (mount -t bpf bpf <dir>)",
            pin_dir.display()
        );
    }
    Ok(())
}

/// Remove a pinned dataplane (balancer or decap): unpinning the link detaches the program
/// (nothing else holds it), unpinning the maps frees them with their state.
/// Returns whether anything was there.
pub fn detach(pin_dir: &Path) -> Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    // A member of libxdp's dispatchers leaves them first.
    let mut removed = super::sharing::leave_dispatchers(pin_dir)?;
    // The extra uplinks' links (`link-<name>`).
    let uplinks = super::link::uplink_pins(pin_dir)?;
    let names = std::iter::once(LINK_PIN)
        .chain(uplinks.iter().map(|(file, _)| file.as_str()))
        .chain(LB_MAPS)
        .chain(DECAP_MAPS);
    for name in names {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    std::fs::remove_dir(pin_dir)
        .with_context(|| format!("removing {} (does it hold other files?)", pin_dir.display()))?;
    Ok(removed)
}

/// Detach the XDP link pinned in `pin_dir` from its interface and leave
/// every pin in place, as `bpftool link detach` does: the program stops
/// running while the maps and the (now defunct) link stay pinned. This is
/// the fault the daemon's self-check repairs; the HA tests inject it.
pub fn detach_pinned_link(pin_dir: &Path) -> Result<()> {
    let facts = sys::pinned_link_facts(&pin_dir.join(LINK_PIN))?;
    sys::detach_link_by_id(facts.id)
}

/// [`detach_pinned_link`] for the link of the extra uplink `iface`.
pub fn detach_pinned_uplink(pin_dir: &Path, iface: &str) -> Result<()> {
    let facts = sys::pinned_link_facts(&pin_dir.join(super::link::uplink_pin(iface)))?;
    sys::detach_link_by_id(facts.id)
}

/// An adopted map keeps the layout and size of the run that created it: a
/// build whose entries differ must not read or write it, and table sizes
/// cannot change under it.
pub(super) fn check_adopted_maps(ebpf: &Ebpf, sizes: &Sizes, ring_entries: u32) -> Result<()> {
    let dataplane_sizes = [
        (names::VIPS, sizes.max_vips),
        (names::VIP_STATS, sizes.max_vips),
        (names::VIP_DROPS, sizes.max_vips),
        (names::VIP_SERIALS, sizes.max_vips),
        (names::RINGS, ring_entries),
        (names::BACKENDS, sizes.max_backends),
        (names::BACKEND_STATS, sizes.max_backends),
        (names::QUIC_SERVERS, sizes.max_backends),
        (names::FLOWS, sizes.max_flows),
    ];
    // An adopted map keeps the layout and size of the run that created
    // it: a build whose entries differ must not read or write it, and
    // table sizes cannot change under it.
    for (name, key, value) in map_layouts() {
        let info = map_data(find_map(ebpf, name)?)?.info()?;
        if (info.key_size(), info.value_size()) != (key, value) {
            bail!(
                "the pinned map {name} has {}-byte keys and {}-byte values, this build uses {key} and {value}: \
                 it was made by an incompatible xdplb version; run `xdplb detach` (this drops conntrack)",
                info.key_size(),
                info.value_size()
            );
        }
        let Some(&(_, want)) = dataplane_sizes.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let have = info.max_entries();
        if have != want {
            bail!(
                "the pinned dataplane's {name} holds {have} entries but the config asks for {want}: \
                 table sizes cannot change under a running dataplane; \
                 run `xdplb detach` (this drops conntrack) or restore the old sizes"
            );
        }
    }
    Ok(())
}

/// Remove the map pins under `dir` that are `ebpf`'s own maps (never
/// another run's), then the directory if that left it empty.
pub(super) fn remove_own_pins(ebpf: &Ebpf, dir: &Path) {
    for name in LB_MAPS {
        let path = dir.join(name);
        let ours = find_map(ebpf, name)
            .and_then(map_data)
            .and_then(|m| Ok(m.info()?.id()))
            .ok();
        let pinned = MapData::from_pin(&path)
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id());
        if ours.is_some() && ours == pinned {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = std::fs::remove_dir(dir);
}
