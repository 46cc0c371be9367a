//! The balancer as a member of libxdp's dispatcher (`[libxdp]`): joining
//! it on each interface served (the member an earlier run left is
//! replaced, atomically, with the rest kept), the self-check and repair of
//! that membership, and leaving it (`xdplb detach`, a refused start).
//! Its extension program is pinned at `<pin_dir>/libxdp-prog`, so that
//! `xdplb detach` finds it in whichever dispatcher runs it now (libxdp
//! re-links it into a new one whenever another program comes or goes).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::Extension;
use tracing::warn;

use super::{
    libxdp::{self, Current, Ours, Slot, COMPONENT},
    link::remove_foreign,
    sys, AttachMode, Dataplane,
};
use crate::iface;

/// The balancer's extension program's pin in the pin directory.
pub const COMPONENT_PIN: &str = "libxdp-prog";

/// Where libxdp looks for its BPF objects when `LIBXDP_OBJECT_PATH` is
/// unset: Debian's multiarch directory, then the others distributions use.
fn object_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LIBXDP_OBJECT_PATH")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(format!("/usr/lib/{}-linux-gnu/bpf", std::env::consts::ARCH).into());
    dirs.extend(["/usr/lib/bpf", "/usr/local/lib/bpf", "/usr/lib64/bpf"].map(PathBuf::from));
    dirs
}

/// libxdp's `xdp-dispatcher.o`, where libxdp itself finds it.
pub fn find_dispatcher() -> Result<PathBuf> {
    let dirs = object_dirs();
    dirs.iter()
        .map(|d| d.join("xdp-dispatcher.o"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "libxdp's xdp-dispatcher.o is in none of {} (install libxdp1, or name it with \
                 [libxdp] dispatcher)",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// How the balancer shares its interfaces.
#[derive(Clone, Debug)]
pub(super) struct Sharing {
    /// libxdp's `xdp-dispatcher.o`.
    object: PathBuf,
    /// The balancer's slot: its run priority; XDP_PASS goes on.
    slot: Slot,
}

impl Dataplane {
    /// Attach from now on as a member of libxdp's dispatcher with run
    /// priority `run_prio` (`[libxdp]`), the dispatcher `object` (None:
    /// where libxdp finds it).
    pub fn share_through_libxdp(&mut self, object: Option<&Path>, run_prio: u32) -> Result<()> {
        let object = match object {
            Some(p) => p.to_owned(),
            None => find_dispatcher()?,
        };
        self.sharing = Some(Sharing {
            object,
            slot: Slot {
                chain_actions: 1 << libxdp::XDP_PASS,
                run_prio,
                // The balancer handles multi-buffer frames (xdp.frags).
                frags: true,
            },
        });
        Ok(())
    }

    /// The balancer's extension program and how it shares.
    fn member(&mut self) -> Result<(&mut Extension, &Sharing)> {
        let sharing = self
            .sharing
            .as_ref()
            .ok_or_else(|| anyhow!("the dataplane does not share through libxdp"))?;
        let program: &mut Extension = self
            .ebpf
            .program_mut(COMPONENT)
            .ok_or_else(|| anyhow!("program {COMPONENT} missing from the eBPF object"))?
            .try_into()?;
        Ok((program, sharing))
    }

    /// Join the dispatcher on `iface` (see [`join`]), then pin the
    /// extension where `xdplb detach` looks. Returns whether a member of an
    /// earlier run was replaced.
    pub(super) fn join_dispatcher(
        &mut self,
        iface: &str,
        mode: AttachMode,
        link_pin: &Path,
        replace: bool,
    ) -> Result<bool> {
        let pin_dir = self.pin_dir.clone();
        let (program, sharing) = self.member()?;
        let adopted = join(program, sharing, iface, mode, link_pin, replace)?;
        if let Some(dir) = pin_dir {
            let path = dir.join(COMPONENT_PIN);
            let _ = std::fs::remove_file(&path);
            sys::obj_pin(program.fd()?.as_fd(), &path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(adopted)
    }

    /// The id of the balancer's extension program (0: not loaded).
    fn member_id(&self) -> u32 {
        let program: Option<&Extension> =
            self.ebpf.program(COMPONENT).and_then(|p| p.try_into().ok());
        program.and_then(|p| p.info().ok()).map_or(0, |i| i.id())
    }

    /// What is wrong with the balancer's membership on `iface`.
    pub(super) fn dispatcher_problems(&self, iface_name: &str) -> Vec<String> {
        let ours = self.member_id();
        let index = match iface::by_name(iface_name) {
            Ok(Some(i)) => i.index,
            Ok(None) => return vec![format!("interface {iface_name} is gone")],
            Err(e) => return vec![format!("cannot ask the kernel about {iface_name}: {e:#}")],
        };
        match libxdp::current(index) {
            Err(e) => vec![format!("cannot read what {iface_name} runs: {e:#}")],
            Ok(Current::Bare) => vec![format!("{iface_name} runs no XDP program")],
            Ok(Current::Other { id, name }) => vec![format!(
                "{iface_name} runs XDP program {id} ({name}), not libxdp's dispatcher"
            )],
            Ok(Current::Dispatcher(d)) if !d.members.iter().any(|m| m.id == ours) => {
                vec![format!(
                    "libxdp's dispatcher on {iface_name} (program {}) runs {} but not xdplb \
                     (program {ours})",
                    d.id,
                    names(&d.members)
                )]
            }
            Ok(Current::Dispatcher(_)) => Vec::new(),
        }
    }

    /// Repair after [`Dataplane::dispatcher_problems`] found some: join
    /// the dispatcher on `iface` again (a new one if it is gone), keeping
    /// its other members. Another program alone on it is never replaced.
    pub(super) fn repair_dispatcher(
        &mut self,
        iface: &str,
        mode: AttachMode,
        link_pin: &Path,
    ) -> Result<String> {
        if self.dispatcher_problems(iface).is_empty() {
            return Ok("nothing to repair".into());
        }
        self.join_dispatcher(iface, mode, link_pin, false)?;
        Ok(format!("joined libxdp's dispatcher on {iface} again"))
    }

    /// Leave the dispatcher on `iface` (a start that failed): the other
    /// members stay.
    pub(super) fn leave_dispatcher(&mut self, iface: &str) {
        let ours = self.member_id();
        let object = self.sharing.as_ref().map(|s| s.object.clone());
        let Ok(Some(i)) = iface::by_name(iface) else {
            return;
        };
        if let Err(e) = leave(ours, i.index, object.as_deref()) {
            warn!(
                interface = iface,
                "leaving libxdp's dispatcher on {iface}: {e:#}"
            );
        }
    }
}

/// The members' names, for messages.
fn names(members: &[libxdp::Member]) -> String {
    if members.is_empty() {
        return "nothing".into();
    }
    members
        .iter()
        .map(|m| format!("{} ({})", m.name, m.id))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Put the balancer into the dispatcher on `iface_name`: a new one when the
/// interface is bare; in place of the member an earlier run left, with the
/// other members kept. A link an earlier run in link mode pinned at
/// `link_pin` is detached first (a moment without the balancer). Another
/// program alone on the interface is refused unless `replace`.
fn join(
    program: &mut Extension,
    sharing: &Sharing,
    iface_name: &str,
    mode: AttachMode,
    link_pin: &Path,
    replace: bool,
) -> Result<bool> {
    let iface = iface::require(iface_name)?;
    let xdp_mode = libxdp::xdp_mode(mode)?;
    leave_link(link_pin, iface.index)?;
    // Another loader may change the interface between reading it and
    // replacing it: read again, a few times, as libxdp does.
    let mut tries = 0;
    loop {
        match join_once(program, sharing, &iface, xdp_mode, replace) {
            Err(e) if e.downcast_ref::<libxdp::Raced>().is_some() && tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1 << tries));
            }
            other => {
                return other
                    .with_context(|| format!("joining libxdp's dispatcher on {iface_name}"))
            }
        }
    }
}

/// One try of [`join`].
fn join_once(
    program: &mut Extension,
    sharing: &Sharing,
    iface: &iface::Interface,
    xdp_mode: iface::XdpMode,
    replace: bool,
) -> Result<bool> {
    let iface_name = iface.name.as_str();
    let mut current = libxdp::current(iface.index)?;
    if let Current::Other { id, name } = &current {
        if !replace {
            bail!(
                "interface {iface_name} already runs an XDP program alone (id {id}, {name}), not \
                 libxdp's dispatcher; it is never replaced silently: load it through libxdp \
                 (`xdp-loader load {iface_name} ...`) to share the interface, remove it, or \
                 start with --replace"
            );
        }
        let mode = iface.xdp.map_or(xdp_mode, |(_, m)| m);
        remove_foreign(iface, *id, mode)?;
        current = libxdp::current(iface.index)?;
    }
    let old = match &current {
        Current::Dispatcher(d) => Some(d),
        Current::Bare => None,
        Current::Other { id, .. } => bail!("{iface_name} runs program {id} again"),
    };
    if let Some(d) = old.filter(|d| d.mode != xdp_mode) {
        bail!(
            "libxdp's dispatcher on {iface_name} runs in {} mode, xdplb's in {xdp_mode}: \
             members share the dispatcher's mode",
            d.mode
        );
    }
    let adopted = old.is_some_and(|d| d.members.iter().any(|m| m.name == COMPONENT));
    let others = old
        .map(|d| d.members.iter().filter(|m| m.name != COMPONENT).collect())
        .unwrap_or_default();
    let ours = Ours {
        program,
        slot: sharing.slot,
    };
    libxdp::change(
        iface.index,
        xdp_mode,
        &sharing.object,
        old,
        others,
        Some(ours),
    )?;
    Ok(adopted)
}

/// Detach and unpin the link an earlier run in link mode pinned at `pin`
/// for interface `index` (switching to the dispatcher).
fn leave_link(pin: &Path, index: u32) -> Result<()> {
    let Ok(facts) = sys::pinned_link_facts(pin) else {
        return Ok(());
    };
    if facts.ifindex == index {
        warn!(
            pin = %pin.display(),
            "switching to libxdp's dispatcher: detaching the link {} first (the interface is \
             without the balancer for a moment)",
            pin.display()
        );
        sys::detach_link_by_id(facts.id)?;
    }
    std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))
}

/// Take the program `ours` out of the dispatcher on `index`, if it is
/// there: the others stay (in a new dispatcher, built from `object`); the
/// last member takes the dispatcher with it. Returns whether it was there.
fn leave(ours: u32, index: u32, object: Option<&Path>) -> Result<bool> {
    let Current::Dispatcher(d) = libxdp::current(index)? else {
        return Ok(false);
    };
    if !d.members.iter().any(|m| m.id == ours) {
        return Ok(false);
    }
    let others: Vec<_> = d.members.iter().filter(|m| m.id != ours).collect();
    let object = match object {
        Some(p) => p.to_owned(),
        None if others.is_empty() => PathBuf::new(),
        None => find_dispatcher()?,
    };
    libxdp::change(index, d.mode, &object, Some(&d), others, None)?;
    Ok(true)
}

/// `xdplb detach`: take the balancer pinned in `pin_dir` out of every
/// dispatcher that runs it, and unpin it. Returns whether it was pinned.
pub fn leave_dispatchers(pin_dir: &Path) -> Result<bool> {
    let pin = pin_dir.join(COMPONENT_PIN);
    let Ok(fd) = sys::obj_get(&pin) else {
        return Ok(false);
    };
    let ours = sys::prog_facts(fd.as_fd())?.id;
    for index in member_of(ours) {
        if iface::by_index(index)?.is_none() {
            bail!(
                "xdplb's program ({ours}) is a member of libxdp's dispatcher on interface index \
                 {index}, which is not in this network namespace: run `xdplb detach` in that \
                 namespace"
            );
        }
        leave(ours, index, None)?;
    }
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    Ok(true)
}

/// The interfaces (by index) whose pinned dispatcher has the program
/// `ours` among its members. bpffs is shared by every network namespace,
/// so some may be elsewhere.
fn member_of(ours: u32) -> Vec<u32> {
    let entries = std::fs::read_dir(libxdp::state_dir())
        .into_iter()
        .flatten()
        .flatten();
    entries
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name
                .strip_prefix("dispatch-")?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            let pins = std::fs::read_dir(e.path()).ok()?;
            let ours_there = pins.flatten().any(|p| {
                p.file_name().to_string_lossy().ends_with("-prog")
                    && sys::obj_get(&p.path())
                        .ok()
                        .and_then(|fd| sys::prog_facts(fd.as_fd()).ok())
                        .is_some_and(|f| f.id == ours)
            });
            ours_there.then_some(index)
        })
        .collect()
}
