//! The balancer's (or decapsulator's) attachment to an interface: a bpf_link
//! pinned at `<pin_dir>/link` (an extra uplink's at `<pin_dir>/link-<name>`)
//! and held open by this process. Adopting one a
//! previous run left swaps the program atomically; a foreign XDP program is
//! never replaced unless asked; the self-check compares the link, its pin and
//! the interface with what the kernel reports, and repairs what it can.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
    Xdp,
};
use tracing::warn;

use super::{
    sys::{self, LinkFacts, BPF_LINK_TYPE_XDP},
    AttachMode,
};
use crate::iface;

/// File name of the pinned XDP link in the pin directory.
pub const LINK_PIN: &str = "link";

/// File name of the pinned XDP link of the extra uplink `iface`. bpffs
/// refuses dots in names, and interface names (`eth0.100`) may have them;
/// they may not have colons, so a dot becomes one.
pub fn uplink_pin(iface: &str) -> String {
    format!("{LINK_PIN}-{}", iface.replace('.', ":"))
}

/// The interface an extra uplink's link pin is for (None: not one).
fn uplink_of_pin(file_name: &str) -> Option<String> {
    let name = file_name.strip_prefix(LINK_PIN)?.strip_prefix('-')?;
    Some(name.replace(':', "."))
}

/// The extra uplinks' link pins in `pin_dir`: (file name, interface).
pub fn uplink_pins(pin_dir: &Path) -> Result<Vec<(String, String)>> {
    Ok(std::fs::read_dir(pin_dir)
        .with_context(|| format!("listing {}", pin_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|file| {
            let iface = uplink_of_pin(&file)?;
            Some((file, iface))
        })
        .collect())
}

/// Attach `program` (named `name`) to `iface` with a plain link (not pinned:
/// tests and helper programs), explaining a refusal.
pub fn attach_xdp(
    program: &mut Xdp,
    name: &str,
    iface: &str,
    mode: AttachMode,
) -> Result<aya::programs::xdp::XdpLinkId> {
    program.attach(iface, mode.xdp_mode()).map_err(|e| {
        let why = match iface::by_name(iface) {
            Ok(None) => format!("there is no interface {iface} in this network namespace"),
            Ok(Some(i)) => match i.xdp {
                Some((id, m)) => format!(
                    "{iface} already has an XDP program (id {id}, {m:?} mode); the kernel \
                     allows one"
                ),
                None => format!("does {iface}'s driver support {mode} mode? try generic"),
            },
            Err(q) => format!("and asking the kernel about {iface} failed too: {q:#}"),
        };
        anyhow!(e).context(format!(
            "attaching {name} to {iface} in {mode} mode failed: {why}"
        ))
    })
}

/// A program attached through a pinned link that this process holds open.
#[derive(Debug)]
pub struct Attachment {
    /// Our own descriptor of the link (aya's FdLink does not lend its
    /// own), which keeps it alive while its pin is missing.
    link: Option<OwnedFd>,
    /// Where the link is pinned.
    pin: PathBuf,
    /// The link was pinned by an earlier run and adopted.
    pub adopted: bool,
}

/// Remove whatever XDP program `iface` runs (for `--replace`): a bpf_link is
/// detached, a netlink attachment removed.
pub(super) fn remove_foreign(
    iface: &iface::Interface,
    prog_id: u32,
    mode: iface::XdpMode,
) -> Result<()> {
    let links: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.program_id() == prog_id)
        .map(|l| l.id())
        .collect();
    if links.is_empty() {
        iface::detach_netlink_xdp(iface.index, mode)?;
    }
    for id in links {
        sys::detach_link_by_id(id)?;
    }
    warn!(
        interface = %iface.name,
        prog_id,
        "replaced the XDP program (id {prog_id}) that was attached to {} (--replace)",
        iface.name
    );
    Ok(())
}

impl Attachment {
    /// Attach through the link pinned at `link_path`: a link a previous
    /// run pinned there gets this program swapped in atomically (no packet
    /// sees no program); otherwise a new link is created and pinned.
    /// Another XDP program on the interface is refused unless `replace`.
    pub fn attach(
        program: &mut Xdp,
        name: &str,
        iface_name: &str,
        mode: AttachMode,
        link_path: &Path,
        replace: bool,
    ) -> Result<Self> {
        let iface = iface::require(iface_name)?;
        let link_path = link_path.to_owned();
        if link_path.exists() {
            let facts = sys::pinned_link_facts(&link_path)?;
            if facts.link_type != BPF_LINK_TYPE_XDP {
                bail!(
                    "{} is not an XDP link (type {})",
                    link_path.display(),
                    facts.link_type
                );
            }
            if facts.ifindex == 0 {
                warn!(pin = %link_path.display(), "the pinned XDP link {} was detached from its interface; replacing it", link_path.display());
                std::fs::remove_file(&link_path)
                    .with_context(|| format!("removing {}", link_path.display()))?;
            } else if facts.ifindex != iface.index {
                bail!(
                    "the program pinned at {} is attached to interface index {}, \
                     not to {iface_name} (index {}): detach it first to move it",
                    link_path.display(),
                    facts.ifindex,
                    iface.index
                );
            } else {
                let pinned = PinnedLink::from_pin(&link_path)
                    .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .context("the pinned link is not an XDP link")?;
                let id = program
                    .attach_to_link(link)
                    .context("replacing the program in the pinned XDP link")?;
                // Ours is the pin's descriptor; aya's copy is closed.
                let link = sys::obj_get(&link_path)
                    .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
                drop(program.take_link(id)?);
                return Ok(Self {
                    link: Some(link),
                    pin: link_path,
                    adopted: true,
                });
            }
        }
        if let Some((prog_id, xdp_mode)) = iface.xdp {
            if !replace {
                bail!(
                    "interface {iface_name} already runs an XDP program (id {prog_id}, {xdp_mode} \
                     mode) that {} does not hold; it is never replaced silently: remove it \
                     (`ip link set dev {iface_name} xdp off`, or `bpftool link detach` when a \
                     bpf_link holds it) or start with --replace",
                    link_path.display()
                );
            }
            remove_foreign(&iface, prog_id, xdp_mode)?;
        }
        let link = new_pinned_link(program, name, iface_name, mode, &link_path)?;
        Ok(Self {
            link: Some(link),
            pin: link_path,
            adopted: false,
        })
    }

    fn facts(&self) -> Option<LinkFacts> {
        sys::link_facts(self.link.as_ref()?.as_fd()).ok()
    }

    /// What is wrong with the attachment now: the link detached, the
    /// interface gone, re-created or running another program, the pin
    /// missing or naming another link. Empty when all is well.
    pub fn problems(&self, prog_id: u32, iface_name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let facts = self.facts();
        match &facts {
            None => out.push("the XDP link is closed".to_owned()),
            Some(f) if f.ifindex == 0 => {
                out.push("the XDP link was detached from the interface".to_owned())
            }
            Some(_) => {}
        }
        match iface::by_name(iface_name) {
            Ok(None) => out.push(format!("interface {iface_name} is gone")),
            Ok(Some(i)) => {
                if let Some(f) = facts.filter(|f| f.ifindex != 0 && f.ifindex != i.index) {
                    out.push(format!(
                        "the link is on interface index {}, {iface_name} is now index {}",
                        f.ifindex, i.index
                    ));
                }
                match i.xdp {
                    None => out.push(format!("{iface_name} runs no XDP program")),
                    Some((id, _)) if id != prog_id => out.push(format!(
                        "{iface_name} runs XDP program {id}, not xdplb's ({prog_id})"
                    )),
                    Some(_) => {}
                }
            }
            Err(e) => out.push(format!("cannot ask the kernel about {iface_name}: {e:#}")),
        }
        let link_path = &self.pin;
        match sys::pinned_link_facts(link_path) {
            Ok(p) if facts.is_some_and(|f| f.id == p.id) => {}
            Ok(p) => out.push(format!(
                "{} pins link {}, not the daemon's",
                link_path.display(),
                p.id
            )),
            Err(_) => out.push(format!("the link pin {} is missing", link_path.display())),
        }
        out
    }

    /// Repair after [`Attachment::problems`] found some: re-pin a link that
    /// is still attached, or attach and pin a new one. A foreign program on
    /// the interface is never replaced here. Returns what was done.
    pub fn repair(
        &mut self,
        program: &mut Xdp,
        name: &str,
        iface_name: &str,
        mode: AttachMode,
    ) -> Result<String> {
        let iface = iface::require(iface_name)?;
        let link_path = self.pin.clone();
        let attached = self
            .facts()
            .is_some_and(|f| f.ifindex != 0 && f.ifindex == iface.index);
        if attached {
            let link = self.link.as_ref().ok_or_else(|| anyhow!("no link"))?;
            remove_other_pin(&link_path, link)?;
            if sys::pinned_link_facts(&link_path).is_ok() {
                return Ok("nothing to repair".into());
            }
            sys::obj_pin(link.as_fd(), &link_path)
                .with_context(|| format!("re-pinning {}", link_path.display()))?;
            return Ok(format!(
                "re-pinned the attached link at {}",
                link_path.display()
            ));
        }
        // The link is gone or defunct: a fresh attachment.
        self.link = None;
        if let Some((id, m)) = iface.xdp {
            bail!(
                "cannot re-attach: {iface_name} runs another XDP program (id {id}, {m:?} mode); \
                 remove it and the daemon re-attaches within a second"
            );
        }
        if std::fs::symlink_metadata(&link_path).is_ok() {
            std::fs::remove_file(&link_path)
                .with_context(|| format!("removing the stale {}", link_path.display()))?;
        }
        self.link = Some(new_pinned_link(
            program, name, iface_name, mode, &link_path,
        )?);
        Ok(format!(
            "re-attached to {iface_name} and pinned the new link at {}",
            link_path.display()
        ))
    }

    /// Unpin the link (a refused start that created it): the program
    /// detaches once this process lets go of it.
    pub fn unpin(mut self) {
        let link_path = &self.pin;
        if let Some(link) = self.link.take() {
            if remove_other_pin(link_path, &link).is_ok()
                && sys::pinned_link_facts(link_path).is_ok()
            {
                let _ = std::fs::remove_file(link_path);
            }
        }
    }
}

/// If `path` pins a link other than `link`, remove the pin.
fn remove_other_pin(path: &Path, link: &OwnedFd) -> Result<()> {
    let ours = sys::link_facts(link.as_fd()).map(|f| f.id).ok();
    match sys::pinned_link_facts(path) {
        Ok(p) if Some(p.id) != ours => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => Ok(()),
        Err(_) if std::fs::symlink_metadata(path).is_ok() => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
        Err(_) => Ok(()),
    }
}

fn new_pinned_link(
    program: &mut Xdp,
    name: &str,
    iface: &str,
    mode: AttachMode,
    link_path: &Path,
) -> Result<OwnedFd> {
    let id = attach_xdp(program, name, iface, mode)?;
    let link = program.take_link(id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP without a bpf_link, which cannot be pinned (needs Linux >= 5.9)",
    )?;
    fd_link
        .pin(link_path)
        .with_context(|| format!("pinning the XDP link at {}", link_path.display()))?;
    // aya's descriptor closes here; the pin and ours keep the link.
    sys::obj_get(link_path).with_context(|| format!("opening {}", link_path.display()))
}
