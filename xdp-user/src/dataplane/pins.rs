//! The pinned dataplane's life beyond loading: attaching through the pinned
//! link, the self-check of attachment and pins, their repair, and undoing a
//! start that failed.

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::MapData;

use super::{
    ensure_bpffs, map_data, remove_own_pins, xdp_program_mut, AttachMode, Attached, Attachment,
    Dataplane, Hold, LB_MAPS, LB_PROGRAM,
};

impl Dataplane {
    /// Undo a start that failed after [`Dataplane::open`]: pins this run
    /// created (maps, link) are removed, so nothing is left behind; adopted
    /// ones stay, forwarding as before.
    pub fn abandon(mut self) {
        let Some(dir) = self.pin_dir.take() else {
            return;
        };
        let attached: Vec<Attached> = self
            .attached
            .take()
            .into_iter()
            .chain(self.uplinks.drain(..))
            .collect();
        for a in attached {
            match a.hold {
                Hold::Link(l) if !l.adopted => l.unpin(),
                Hold::Dispatcher { adopted: false, .. } => self.leave_dispatcher(&a.iface),
                _ => {}
            }
        }
        if !self.adopted {
            let _ = std::fs::remove_file(dir.join(super::sharing::COMPONENT_PIN));
            remove_own_pins(&self.ebpf, &dir);
        }
    }

    /// Attach through a link pinned at `pin_dir/link` (the directory of
    /// [`Dataplane::open`]): a link a previous run left gets this program
    /// swapped in atomically (no packet sees no program); otherwise a new
    /// link is created and pinned. Either way the program stays attached
    /// when this process exits. Another XDP program on the interface is
    /// refused unless `replace`. Returns whether a pinned link was adopted.
    pub fn attach_pinned(&mut self, iface: &str, mode: AttachMode, replace: bool) -> Result<bool> {
        self.take_source_mac(iface)?;
        let attached = self.attach_through(iface, mode, super::LINK_PIN, replace)?;
        let adopted = attached.adopted();
        self.attached = Some(attached);
        Ok(adopted)
    }

    /// Attach to `iface` through the link pinned as `pin` in the pin
    /// directory (see [`Dataplane::attach_pinned`]).
    pub(super) fn attach_through(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin: &str,
        replace: bool,
    ) -> Result<Attached> {
        let dir = self
            .pin_dir
            .clone()
            .ok_or_else(|| anyhow!("a dataplane with private maps has no pin directory"))?;
        let hold = if self.sharing.is_some() {
            let link_pin = dir.join(pin);
            let adopted = self.join_dispatcher(iface, mode, &link_pin, replace)?;
            Hold::Dispatcher { adopted, link_pin }
        } else {
            let program = xdp_program_mut(&mut self.ebpf, LB_PROGRAM)?;
            Hold::Link(Attachment::attach(
                program,
                LB_PROGRAM,
                iface,
                mode,
                &dir.join(pin),
                replace,
            )?)
        };
        Ok(Attached {
            hold,
            iface: iface.to_owned(),
            mode,
        })
    }

    /// The self-check: what is wrong now with the attachment (program on
    /// the interface through our link, the link's pin) and the map pins
    /// (each must be the map this process uses). Empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let (Some(a), Some(dir)) = (&self.attached, &self.pin_dir) else {
            return Vec::new();
        };
        let mut out = match self.program().and_then(|p| Ok(p.info()?.id())) {
            Ok(prog_id) => std::iter::once(a)
                .chain(&self.uplinks)
                .flat_map(|a| match &a.hold {
                    Hold::Link(l) => l.problems(prog_id, &a.iface),
                    Hold::Dispatcher { .. } => self.dispatcher_problems(&a.iface),
                })
                .collect(),
            Err(e) => vec![format!("cannot read the program's id: {e:#}")],
        };
        out.extend(self.uplink_problems());
        for name in LB_MAPS {
            let path = dir.join(name);
            let ours = self
                .map(name)
                .and_then(map_data)
                .and_then(|m| Ok(m.info()?.id()));
            let pinned = MapData::from_pin(&path)
                .and_then(|m| m.info())
                .map(|i| i.id());
            match (ours, pinned) {
                (Ok(o), Ok(p)) if o == p => {}
                (_, Err(_)) => out.push(format!("the map pin {} is missing", path.display())),
                (_, Ok(p)) => out.push(format!(
                    "{} pins map {p}, not the one the program uses",
                    path.display()
                )),
            }
        }
        out
    }

    /// Repair what [`Dataplane::problems`] found: re-pin the maps (they are
    /// this process's, so conntrack survives), re-pin the link or attach a
    /// new one. Returns what was done.
    pub fn repair(&mut self) -> Result<Vec<String>> {
        let dir = self
            .pin_dir
            .clone()
            .ok_or_else(|| anyhow!("a dataplane with private maps has no pin directory"))?;
        ensure_bpffs(&dir)?;
        let mut done = Vec::new();
        for name in LB_MAPS {
            let path = dir.join(name);
            let map = map_data(self.map(name)?)?;
            let ours = map.info()?.id();
            match MapData::from_pin(&path)
                .and_then(|m| m.info())
                .map(|i| i.id())
            {
                Ok(p) if p == ours => continue,
                Ok(_) => std::fs::remove_file(&path)
                    .with_context(|| format!("removing the foreign pin {}", path.display()))?,
                Err(_) if std::fs::symlink_metadata(&path).is_ok() => {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?
                }
                Err(_) => {}
            }
            map.pin(&path)
                .with_context(|| format!("re-pinning {}", path.display()))?;
            done.push(format!("re-pinned {name}"));
        }
        // A re-created interface may have a new MAC.
        if let Some(iface) = self.attached.as_ref().map(|a| a.iface.clone()) {
            self.take_source_mac(&iface)?;
        }
        // Each link on its own: an uplink that cannot be repaired (its NIC
        // gone) must not keep the others down.
        let mut failed = Vec::new();
        let mut outcomes = Vec::new();
        let mut members = Vec::new();
        let program = xdp_program_mut(&mut self.ebpf, LB_PROGRAM)?;
        for a in self.attached.iter_mut().chain(self.uplinks.iter_mut()) {
            match &mut a.hold {
                Hold::Link(l) => outcomes.push((
                    a.iface.clone(),
                    l.repair(program, LB_PROGRAM, &a.iface, a.mode),
                )),
                Hold::Dispatcher { link_pin, .. } => {
                    members.push((a.iface.clone(), a.mode, link_pin.clone()))
                }
            }
        }
        for (iface, mode, link_pin) in members {
            let outcome = self.repair_dispatcher(&iface, mode, &link_pin);
            outcomes.push((iface, outcome));
        }
        for (iface, outcome) in outcomes {
            match outcome {
                Ok(what) if what == "nothing to repair" => {}
                Ok(what) => done.push(what),
                Err(e) => failed.push(format!("{iface}: {e:#}")),
            }
        }
        if !self.uplink_problems().is_empty() {
            match self.write_uplinks() {
                Ok(()) => done.push("rewrote UPLINKS from the uplinks' interfaces".to_owned()),
                Err(e) => failed.push(format!("UPLINKS: {e:#}")),
            }
        }
        if done.is_empty() && !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(done)
    }
}
