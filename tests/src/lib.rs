//! Shared helpers of the privileged tests: running XDP programs through
//! BPF_PROG_TEST_RUN and building packets.

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// Room the output buffer leaves for encapsulation growth.
pub const HEADROOM_GROWTH: usize = 256;

/// What one BPF_PROG_TEST_RUN of an XDP program returned.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
}

/// Run `program` once on `packet`.
pub fn run(program: &Xdp, packet: &[u8]) -> Result<Run> {
    let mut out = vec![0u8; packet.len() + HEADROOM_GROWTH];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(Run {
        action: result.return_value,
        output: out,
    })
}

/// Skip (with a message, not silently) when not root: BPF needs CAP_BPF.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (CAP_BPF, CAP_NET_ADMIN); run `cargo xtask test`");
    }
    root
}
