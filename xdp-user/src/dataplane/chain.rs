//! PASS_TO: the program `xdp_lb` hands every packet it passes to, the way
//! Katran's root program chains programs by tail calls. Where the kernel
//! refuses extension programs (libxdp's dispatcher falls back to one
//! program there), this is how another XDP program (a DDoS filter, a
//! firewall) shares the interface: xdplb is attached, and the other
//! program, loaded and pinned by its owner, sees all traffic that is not
//! for a VIP.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use aya::{maps::ProgramArray, programs::Xdp};
use aya_obj::programs::XdpAttachType;
use xdp_common::map_names as names;

use super::Dataplane;

/// The XDP program pinned at `path`.
pub fn pinned_xdp_program(path: &Path) -> Result<Xdp> {
    let program = Xdp::from_pin(path, XdpAttachType::Interface)
        .with_context(|| format!("{} is not a pinned program", path.display()))?;
    let kind = program
        .info()
        .with_context(|| format!("reading the program pinned at {}", path.display()))?
        .program_type();
    if kind != aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_XDP {
        bail!("{} is a {kind:?} program, not XDP", path.display());
    }
    Ok(program)
}

impl Dataplane {
    /// Chain the XDP program pinned at `pinned` after the balancer (None:
    /// unchain). The program must be an XDP program with the balancer's
    /// multi-buffer flag (`xdp.frags`); the kernel refuses any other.
    pub fn set_pass_to(&mut self, pinned: Option<&Path>) -> Result<()> {
        let Some(path) = pinned else {
            // The flag first: no packet tries the slot once it is cleared.
            self.set_chained(false)?;
            let mut slot: ProgramArray<_> = ProgramArray::try_from(self.map_mut(names::PASS_TO)?)?;
            return match slot.clear_index(&0) {
                Ok(()) => Ok(()),
                // Nothing chained: nothing to clear.
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(e) => Err(e).context("clearing PASS_TO"),
            };
        };
        let program = pinned_xdp_program(path)?;
        let mut slot: ProgramArray<_> = ProgramArray::try_from(self.map_mut(names::PASS_TO)?)?;
        let fd = program.fd().context("the pinned program's descriptor")?;
        slot.set(0, fd, 0).with_context(|| {
            format!(
                "the kernel refused to chain {} after the balancer: it must be an XDP program \
                 loaded as xdp.frags (multi-buffer), as the balancer is",
                path.display()
            )
        })?;
        self.set_chained(true)
    }

    /// Say in CONFIG whether a program is chained, keeping the rest.
    fn set_chained(&mut self, chained: bool) -> Result<()> {
        self.chained = chained;
        let config = self.config()?;
        self.set_config(&config)
    }
}
