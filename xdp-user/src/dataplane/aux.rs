//! The auxiliary programs (tests, benchmarks, the load generator), and
//! `xdplb verify`: every program loaded into this kernel.

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{maps::Array, programs::Xdp, Ebpf, EbpfLoader};
use xdp_common::map_names as names;

use super::*;

/// The empty program: a benchmark baseline, and what a veth peer needs
/// attached for XDP_TX frames to arrive.
pub const PASS_PROGRAM: &str = "xdp_pass";
/// The live-frames load generator.
pub const GEN_PROGRAM: &str = "xdp_gen";
/// The counting sink of load tests.
pub const SINK_PROGRAM: &str = "xdp_sink";
/// The counting sink for multi-buffer frames (chained after `xdp_lb`).
pub const SINK_FRAGS_PROGRAM: &str = "xdp_sink_frags";
/// The MAC-swapping forwarder, the load tests' XDP baseline.
pub const SWAP_PROGRAM: &str = "xdp_swap";
/// The SYN-answering benchmark backend.
pub const SYNACK_PROGRAM: &str = "xdp_synack";
/// The per-path benchmark harness.
pub const BENCH_PROGRAM: &str = "xdp_bench";
/// The harness for programs under test that are not `xdp.frags`.
pub const BENCH_PLAIN_PROGRAM: &str = "xdp_bench_plain";

/// The context of a `BPF_PROG_TEST_RUN` of a frame of `frame_len` bytes
/// arriving on interface `ingress` (struct xdp_md: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex). Without a
/// context the kernel runs the frame as if from loopback.
pub fn test_run_ctx(frame_len: usize, ingress: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame_len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
    ctx
}

/// Load every program of the object into the running kernel (maps at
/// small sizes, nothing attached): what the verifier says of each, by name.
pub fn verify_all() -> Vec<(&'static str, Result<()>)> {
    let sizes = Sizes {
        max_vips: 2,
        max_backends: 4,
        ring_size: 13,
        max_flows: 64,
    };
    let mut out = vec![
        (LB_PROGRAM, Dataplane::load(sizes).map(drop)),
        (DECAP_PROGRAM, Decap::load(1).map(drop)),
    ];
    for name in [
        PASS_PROGRAM,
        GEN_PROGRAM,
        SINK_PROGRAM,
        SINK_FRAGS_PROGRAM,
        SWAP_PROGRAM,
        SYNACK_PROGRAM,
        BENCH_PROGRAM,
        BENCH_PLAIN_PROGRAM,
    ] {
        out.push((name, AuxProgram::load(name).map(drop)));
    }
    out
}

/// One of the object's helper programs, loaded on its own (its maps are
/// created at their minimum sizes).
pub struct AuxProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl AuxProgram {
    pub fn load(name: &'static str) -> Result<Self> {
        Self::load_with(name, 1, 0)
    }

    /// Writes the first GEN_HEADER_LEN bytes of `template` into GEN_TEMPLATE.
    fn set_template(&mut self, template: &[u8]) -> Result<()> {
        let head: [u8; xdp_common::GEN_HEADER_LEN] = template
            .get(..xdp_common::GEN_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| anyhow!("template shorter than {} bytes", xdp_common::GEN_HEADER_LEN))?;
        let mut map: Array<_, [u8; xdp_common::GEN_HEADER_LEN]> =
            Array::try_from(find_map_mut(&mut self.ebpf, names::GEN_TEMPLATE)?)?;
        map.set(0, head, 0).context("writing the template")
    }

    /// The benchmark harness: every run restores `frame` (stamped with one
    /// of `flows` flows) and tail-calls `target`. Run it with `frame` as
    /// the test-run input.
    pub fn bench(flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        Self::bench_with(BENCH_PROGRAM, flows, frame, target)
    }

    /// [`AuxProgram::bench`] for a program under test that is not
    /// `xdp.frags` (another balancer, measured side by side).
    pub fn bench_plain(flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        Self::bench_with(BENCH_PLAIN_PROGRAM, flows, frame, target)
    }

    fn bench_with(name: &'static str, flows: u32, frame: &[u8], target: &Xdp) -> Result<Self> {
        let len = u32::try_from(frame.len()).context("frame length")?;
        let mut bench = Self::load_with(name, flows.max(1), len)?;
        bench.set_template(frame)?;
        let mut targets =
            aya::maps::ProgramArray::try_from(find_map_mut(&mut bench.ebpf, names::BENCH_TARGET)?)?;
        targets
            .set(0, target.fd()?, 0)
            .context("putting the program under test behind the harness")?;
        Ok(bench)
    }

    /// The load generator, cycling through `flows` flows, restoring
    /// `template`'s first bytes in every frame.
    pub fn generator(flows: u32, template: &[u8]) -> Result<Self> {
        if flows == 0 {
            bail!("flows must be at least 1");
        }
        let mut gen = Self::load_with(GEN_PROGRAM, flows, 0)?;
        gen.set_template(template)
            .context("the generator's template")?;
        Ok(gen)
    }

    fn load_with(name: &'static str, flows: u32, frame_len: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GEN_FLOWS_GLOBAL, &flows, true)
            .override_global(names::BENCH_FRAME_LEN_GLOBAL, &frame_len, true)
            .load(object()?)
            .context("loading the eBPF object (map creation)")?;
        load_program(&mut ebpf, name)?;
        Ok(Self { ebpf, name })
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        attach_program(&mut self.ebpf, self.name, iface, mode)
    }

    pub fn program(&self) -> Result<&Xdp> {
        xdp_program(&self.ebpf, self.name)
    }

    /// Pin the program at `path` (a bpffs path), as another XDP program's
    /// owner would for `chain.pass_to`.
    pub fn pin(&mut self, path: &std::path::Path) -> Result<()> {
        xdp_program_mut(&mut self.ebpf, self.name)?
            .pin(path)
            .with_context(|| format!("pinning {} at {}", self.name, path.display()))
    }

    /// A one-slot per-CPU counter (GEN_COUNTER, SINK_COUNTER), summed.
    pub fn counter(&self, map: &str) -> Result<u64> {
        let [total] = sum_counters(find_map(&self.ebpf, map)?)?;
        Ok(total)
    }
}
