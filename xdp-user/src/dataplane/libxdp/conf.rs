//! libxdp's dispatcher configuration (`struct xdp_dispatcher_config`,
//! version 2): the dispatcher's `.rodata`, where libxdp and xdplb find
//! each member's run priority, chain-call actions and flags again.

use anyhow::{bail, Result};

use crate::iface::u32_at;

/// Slots of a dispatcher (`MAX_DISPATCHER_ACTIONS`).
pub const SLOTS: usize = 10;
/// `XDP_DISPATCHER_MAGIC`, `XDP_DISPATCHER_VERSION`.
const MAGIC: u8 = 236;
const VERSION: u8 = 2;
/// The return value of an empty slot: always chained to the next.
const RETVAL_BIT: u32 = 1 << 31;
/// `BPF_F_XDP_HAS_FRAGS`, as a member's `program_flags`.
const HAS_FRAGS: u32 = 1 << 5;
/// `struct xdp_dispatcher_config` (version 2).
const CONF_LEN: usize = offset(3, 0);
/// libxdp's default run priority.
pub const DEFAULT_RUN_PRIO: u32 = 50;
/// `XDP_PASS`: what xdplb leaves alone goes on to the next member.
pub const XDP_PASS: u32 = 2;

/// Where slot `i`'s word of table `table` (0: chain-call actions, 1: run
/// priorities, 2: program flags) sits in the configuration, after its
/// four header bytes.
const fn offset(table: usize, i: usize) -> usize {
    4 + table * 4 * SLOTS + 4 * i
}

/// One member's line of the dispatcher's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Bit `1 << action` set: the next member runs on that action.
    pub chain_actions: u32,
    /// Lower runs first.
    pub run_prio: u32,
    /// The member handles multi-buffer frames.
    pub frags: bool,
}

/// `struct xdp_dispatcher_config`, version 2: the members' slots in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conf {
    pub slots: Vec<Slot>,
    /// The dispatcher itself was loaded for multi-buffer frames.
    pub frags: bool,
}

impl Conf {
    /// The bytes of the dispatcher's `conf`.
    pub fn to_bytes(&self) -> [u8; CONF_LEN] {
        let mut out = [0u8; CONF_LEN];
        out[0] = MAGIC;
        out[1] = VERSION;
        out[2] = self.slots.len() as u8;
        out[3] = u8::from(self.frags);
        for (i, s) in self.slots.iter().enumerate() {
            let mut put = |table: usize, v: u32| {
                let off = offset(table, i);
                out[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            };
            put(0, s.chain_actions | RETVAL_BIT);
            put(1, s.run_prio);
            put(2, if s.frags { HAS_FRAGS } else { 0 });
        }
        out
    }

    /// Read a dispatcher's `conf`; other versions are named in the error.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.first() != Some(&MAGIC) {
            bail!("its configuration has no dispatcher magic (a libxdp older than 1.3?)");
        }
        if b.get(1) != Some(&VERSION) || b.len() != CONF_LEN {
            bail!(
                "its configuration is version {} ({} bytes); xdplb speaks version {VERSION} \
                 ({CONF_LEN} bytes), as libxdp 1.3 to 1.5 do",
                b.get(1).copied().unwrap_or(0),
                b.len()
            );
        }
        let n = b[2] as usize;
        if n > SLOTS {
            bail!("its configuration enables {n} slots of {SLOTS}");
        }
        let word = |table: usize, i: usize| u32_at(b, offset(table, i));
        Ok(Self {
            slots: (0..n)
                .map(|i| Slot {
                    chain_actions: word(0, i) & !RETVAL_BIT,
                    run_prio: word(1, i),
                    frags: word(2, i) & HAS_FRAGS != 0,
                })
                .collect(),
            frags: b[3] != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_round_trips_and_sets_what_libxdp_reads() {
        let conf = Conf {
            slots: vec![
                Slot {
                    chain_actions: 1 << XDP_PASS,
                    run_prio: 10,
                    frags: false,
                },
                Slot {
                    chain_actions: 1 << XDP_PASS,
                    run_prio: DEFAULT_RUN_PRIO,
                    frags: true,
                },
            ],
            frags: false,
        };
        let b = conf.to_bytes();
        assert_eq!(b.len(), 124, "struct xdp_dispatcher_config, version 2");
        assert_eq!((b[0], b[1], b[2], b[3]), (236, 2, 2, 0));
        // chain_call_actions[0]: XDP_PASS and the empty slot's return value.
        assert_eq!(&b[4..8], &((1u32 << 2) | (1 << 31)).to_ne_bytes());
        // run_prios[1] and program_flags[1].
        assert_eq!(&b[44 + 4..44 + 8], &50u32.to_ne_bytes());
        assert_eq!(&b[84 + 4..84 + 8], &(1u32 << 5).to_ne_bytes());
        assert_eq!(Conf::parse(&b).unwrap(), conf);
    }

    #[test]
    fn other_dispatcher_versions_are_named() {
        let mut b = Conf::default().to_bytes();
        b[1] = 3;
        let e = format!("{:#}", Conf::parse(&b).unwrap_err());
        assert!(e.contains("version 3"), "{e}");
        let e = format!("{:#}", Conf::parse(&[0u8; 40]).unwrap_err());
        assert!(e.contains("no dispatcher magic"), "{e}");
        let mut b = Conf::default().to_bytes();
        b[2] = 11;
        assert!(Conf::parse(&b).is_err());
    }
}
