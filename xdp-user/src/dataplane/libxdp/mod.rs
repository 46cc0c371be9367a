//! libxdp's multi-program dispatcher, spoken as libxdp 1.3 to 1.5 (Debian
//! 12 and 13) speak it, so that xdplb shares an interface with the
//! programs xdp-tools' `xdp-loader` and `xdp-filter` load there.
//!
//! The dispatcher is libxdp's own `xdp-dispatcher.o`: an XDP program whose
//! slots `prog0` .. `prog9` the member programs replace (`freplace`), in
//! run-priority order; the next member runs on what one returned when that
//! action is among its chain-call actions. The set never changes in place:
//! a change loads a new dispatcher, links every member into it (those
//! already loaded are re-linked, Linux >= 5.10), pins it under
//! `<bpffs>/xdp/dispatch-<ifindex>-<id>/prog<N>-{link,prog}`, swaps it onto
//! the interface atomically (netlink, replacing the program it read) and
//! unpins the old one, all under the `flock` on `<bpffs>/xdp` libxdp takes.
//! Its configuration (`.rodata`, version 2) is how the members' priorities
//! and actions are found again, by libxdp and by this module.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    programs::{Extension, Xdp},
    EbpfLoader,
};
use aya_obj::btf::{Btf, BtfKind};
use tracing::warn;

use super::sys;
use crate::iface::{self, XdpMode};

/// The balancer's extension program in the eBPF object (and its name in
/// the kernel).
pub const COMPONENT: &str = "xdp_lb_libxdp";
/// The dispatcher's entry point, by which libxdp recognises one.
const DISPATCHER: &str = "xdp_dispatcher";
mod conf;
pub use conf::{Conf, Slot, DEFAULT_RUN_PRIO, SLOTS, XDP_PASS};

/// A member program of a dispatcher.
#[derive(Debug)]
pub struct Member {
    pub prog: OwnedFd,
    pub id: u32,
    pub name: String,
    pub slot: Slot,
}

/// What runs on an interface, as libxdp sees it.
#[derive(Debug)]
pub enum Current {
    /// No XDP program.
    Bare,
    /// libxdp's dispatcher, with its members.
    Dispatcher(Dispatcher),
    /// Another program, alone.
    Other { id: u32, name: String },
}

/// A dispatcher on an interface.
#[derive(Debug)]
pub struct Dispatcher {
    prog: OwnedFd,
    pub id: u32,
    pub mode: XdpMode,
    pub members: Vec<Member>,
}

/// libxdp's state directory: `$LIBXDP_BPFFS` (else `/sys/fs/bpf`) + `/xdp`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("LIBXDP_BPFFS")
        .map_or_else(|| PathBuf::from("/sys/fs/bpf"), PathBuf::from)
        .join("xdp")
}

/// Where the dispatcher `id` on interface `ifindex` is pinned.
fn pin_dir(ifindex: u32, id: u32) -> PathBuf {
    state_dir().join(format!("dispatch-{ifindex}-{id}"))
}

/// libxdp's lock: an exclusive `flock` on its state directory, released
/// when dropped.
struct Lock(OwnedFd);

impl Lock {
    fn acquire() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = state_dir();
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        let fd: OwnedFd = std::fs::File::open(&dir)
            .with_context(|| format!("opening {}", dir.display()))?
            .into();
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {} (libxdp's lock)", dir.display()));
        }
        Ok(Self(fd))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the descriptor would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// What runs on the interface `ifindex` now. Read under libxdp's lock, so
/// that a dispatcher being replaced is not read half unpinned.
pub fn current(ifindex: u32) -> Result<Current> {
    let _lock = Lock::acquire()?;
    let Some(iface) = iface::by_index(ifindex)? else {
        bail!("there is no interface with index {ifindex}");
    };
    let Some((id, mode)) = iface.xdp else {
        return Ok(Current::Bare);
    };
    let prog = sys::prog_by_id(id).with_context(|| format!("opening XDP program {id}"))?;
    let facts = sys::prog_facts(prog.as_fd())?;
    if facts.name != DISPATCHER {
        return Ok(Current::Other {
            id,
            name: facts.name,
        });
    }
    let [map] = facts.map_ids[..] else {
        bail!(
            "{}'s program {id} is named {DISPATCHER} but uses {} maps, not libxdp's one",
            iface.name,
            facts.map_ids.len()
        );
    };
    let (value, _) = sys::first_value(map)?;
    let conf = Conf::parse(&value)
        .with_context(|| format!("reading the dispatcher {id} on {}", iface.name))?;
    let dir = pin_dir(ifindex, id);
    let mut members = Vec::new();
    for (i, slot) in conf.slots.into_iter().enumerate() {
        let path = dir.join(format!("prog{i}-prog"));
        let prog = sys::obj_get(&path).with_context(|| {
            format!(
                "the dispatcher {id} on {} has no member pinned at {} (libxdp's pins are \
                 gone; `xdp-loader unload --all {}` clears the interface)",
                iface.name,
                path.display(),
                iface.name
            )
        })?;
        let facts = sys::prog_facts(prog.as_fd())?;
        members.push(Member {
            prog,
            id: facts.id,
            name: facts.name,
            slot,
        });
    }
    Ok(Current::Dispatcher(Dispatcher {
        prog,
        id,
        mode,
        members,
    }))
}

/// The balancer's place in a dispatcher.
pub struct Ours<'a> {
    pub program: &'a mut Extension,
    pub slot: Slot,
}

/// Replace what `ifindex` runs (`old`, None: nothing) by a dispatcher with
/// `others` and, if given, the balancer; by nothing when neither is left.
/// The balancer's extension is loaded now if it is not yet. Under
/// libxdp's lock, which the caller must not hold.
pub fn change(
    ifindex: u32,
    mode: XdpMode,
    object: &Path,
    old: Option<&Dispatcher>,
    others: Vec<&Member>,
    ours: Option<Ours<'_>>,
) -> Result<()> {
    let _lock = Lock::acquire()?;
    // The members in run order: priority, then name (libxdp's order).
    let mut order: Vec<(u32, &str, Option<&Member>)> = others
        .iter()
        .map(|m| (m.slot.run_prio, m.name.as_str(), Some(*m)))
        .collect();
    let our_slot = ours.as_ref().map(|o| o.slot);
    if let Some(slot) = our_slot {
        order.push((slot.run_prio, COMPONENT, None));
    }
    order.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    if order.len() > SLOTS {
        bail!(
            "libxdp's dispatcher holds at most {SLOTS} programs; {} would share the interface",
            order.len()
        );
    }
    if order.is_empty() {
        let old = old.ok_or_else(|| anyhow!("nothing to remove"))?;
        iface::set_netlink_xdp(ifindex, None, Some(old.prog.as_fd()), mode)
            .context("removing the dispatcher from the interface")?;
        unpin_dir(&pin_dir(ifindex, old.id));
        return Ok(());
    }
    let conf = Conf {
        slots: order
            .iter()
            .map(|(_, _, m)| m.map_or_else(|| our_slot.unwrap_or_default(), |m| m.slot))
            .collect(),
        // aya loads an `xdp` section without BPF_F_XDP_HAS_FRAGS.
        frags: false,
    };
    let bytes = conf.to_bytes();
    let mut ebpf = EbpfLoader::new()
        .override_global("conf", &bytes, true)
        .load_file(object)
        .with_context(|| format!("opening libxdp's dispatcher {}", object.display()))?;
    let dispatcher: &mut Xdp = ebpf
        .program_mut(DISPATCHER)
        .ok_or_else(|| anyhow!("{} has no {DISPATCHER} program", object.display()))?
        .try_into()?;
    dispatcher
        .load()
        .with_context(|| format!("the kernel rejected {}'s {DISPATCHER}", object.display()))?;
    let disp_fd = dispatcher.fd()?.try_clone()?;
    let facts = sys::prog_facts(disp_fd.as_fd())?;
    let btf = Btf::parse(
        &sys::btf_bytes(facts.btf_id)?,
        object::Endianness::default(),
    )
    .context("parsing the dispatcher's BTF")?;
    let mut ours = ours;
    // (slot name, link, program) of each member, in order.
    let mut linked: Vec<(String, OwnedFd, OwnedFd)> = Vec::new();
    for (i, (_, name, member)) in order.iter().enumerate() {
        // libxdp puts a lone member in place of the dispatcher itself.
        let func = if order.len() == 1 {
            DISPATCHER.to_owned()
        } else {
            format!("prog{i}")
        };
        let btf_id = btf
            .id_by_type_name_kind(&func, BtfKind::Func)
            .with_context(|| format!("{} has no function {func}", object.display()))?;
        let prog: OwnedFd = match member {
            Some(m) => m.prog.try_clone()?,
            None => {
                let o = ours.as_mut().ok_or_else(|| anyhow!("no balancer"))?;
                if o.program.fd().is_err() {
                    o.program.load(disp_fd.try_clone()?, &func).map_err(|e| {
                        refused(anyhow!(e), "loading the balancer's extension", object)
                    })?;
                }
                o.program.fd()?.as_fd().try_clone_to_owned()?
            }
        };
        let link = sys::link_extension(prog.as_fd(), disp_fd.as_fd(), btf_id)
            .map_err(|e| refused(e.into(), &format!("linking {name} into {func}"), object))?;
        linked.push((format!("prog{i}"), link, prog));
    }
    let dir = pin_dir(ifindex, facts.id);
    pin_members(&dir, &linked).inspect_err(|_| unpin_dir(&dir))?;
    let expected = old.map(|o| o.prog.as_fd());
    if let Err(e) = iface::set_netlink_xdp(ifindex, Some(disp_fd.as_fd()), expected, mode) {
        unpin_dir(&dir);
        let context = format!("attaching the new dispatcher to interface index {ifindex}");
        return Err(match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::EBUSY) => anyhow!(Raced).context(context),
            _ => anyhow!(e).context(context),
        });
    }
    if let Some(old) = old {
        unpin_dir(&pin_dir(ifindex, old.id));
    }
    Ok(())
}

/// What [`change`] found: another loader replaced the interface's program
/// after it was read (try again from [`current`], as libxdp does).
#[derive(Debug)]
pub struct Raced;

impl std::fmt::Display for Raced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("another program took the interface meanwhile")
    }
}

impl std::error::Error for Raced {}

/// An error of loading or linking an extension, explained where the
/// kernel refuses it for a reason of its own.
fn refused(e: anyhow::Error, what: &str, object: &Path) -> anyhow::Error {
    let said = |needle: &str| e.chain().any(|c| c.to_string().contains(needle));
    let eperm = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    }) || said("Operation not permitted");
    let changes_data = said("changes packet data, while original does not");
    let e = e.context(what.to_owned());
    if changes_data {
        e.context(format!(
            "this kernel lets an extension that changes packet data (as xdplb's does: it \
             encapsulates) replace only a function that does too (Linux 6.13, and 6.12's \
             stable updates), and the slots of {} do not: libxdp's dispatcher before 1.5.5 \
             has such slots. Set [libxdp] dispatcher to the xdp-dispatcher.o of libxdp 1.5.5 \
             or later, or run xdplb alone on the interface ([chain] pass_to)",
            object.display()
        ))
    } else if eperm {
        e.context(
            "this kernel refuses extension programs (BPF_PROG_TYPE_EXT, EPERM), so libxdp's \
             dispatcher cannot share the interface here: run xdplb alone on it, with another \
             program chained after it ([chain] pass_to)",
        )
    } else {
        e
    }
}

fn pin_members(dir: &Path, linked: &[(String, OwnedFd, OwnedFd)]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for (slot, link, prog) in linked {
        for (suffix, fd) in [("link", link), ("prog", prog)] {
            let path = dir.join(format!("{slot}-{suffix}"));
            sys::obj_pin(fd.as_fd(), &path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
    }
    Ok(())
}

/// Remove a dispatcher's pins (what is left unpinned goes with it).
fn unpin_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), "could not remove {}: {e}", dir.display());
        }
    }
}

/// The XDP attach mode libxdp records for an xdplb mode.
pub fn xdp_mode(mode: super::AttachMode) -> Result<XdpMode> {
    match mode {
        super::AttachMode::Native => Ok(XdpMode::Driver),
        super::AttachMode::Generic => Ok(XdpMode::Generic),
        super::AttachMode::Offload => {
            bail!("libxdp's dispatcher does not run offloaded (xdp_mode = \"offload\")")
        }
    }
}
