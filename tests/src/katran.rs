//! Katran, measured beside xdp_lb: its balancer built from a checkout the
//! user supplies (the project holds none of its code), loaded with
//! bpftool, and given the lab's VIPs and backends through its own maps,
//! with one ordinary 1M-entry LRU table per CPU as Katran's userspace
//! makes them. Map layouts follow Katran's `balancer_structs.h`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::Xdp,
};
use aya_obj::programs::XdpAttachType;

/// Katran's `RING_SIZE`.
pub const RING_SIZE: u32 = 65537;
/// Entries of each per-CPU LRU table.
pub const LRU_ENTRIES: u32 = 1_000_000;
/// Katran's `F_IPV6` (vip_meta and real_definition flags).
const F_IPV6: u8 = 1;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The commit of the Katran checkout at `dir`, if it is a git work tree.
pub fn commit(dir: &Path) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"]))
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown (not a git checkout)".into())
}

/// Build Katran's `balancer.bpf.c` from the checkout at `dir` into `out`
/// with the system's clang, as Katran's own build does (`-O2`, BPF target,
/// `__KERNEL__`), and return the object's path.
pub fn build(dir: &Path, out: &Path) -> Result<PathBuf> {
    let source = dir.join("katran/lib/bpf/balancer.bpf.c");
    if !source.exists() {
        bail!(
            "{} has no katran/lib/bpf/balancer.bpf.c: pass the root of a Katran checkout",
            dir.display()
        );
    }
    std::fs::create_dir_all(out.join("include/gnu"))?;
    // glibc's headers pick a stubs file by word size, which the BPF target
    // has none of; the balancer uses no libc function.
    std::fs::write(out.join("include/gnu/stubs-32.h"), "")?;
    let multiarch = run(Command::new("gcc").arg("-print-multiarch"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "x86_64-linux-gnu".into());
    let object = out.join("balancer.bpf.o");
    run(Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-D__KERNEL__"])
        .args([
            "-Wno-unused-value",
            "-Wno-pointer-sign",
            "-Wno-compare-distinct-pointer-types",
        ])
        .arg(format!("-I{}", dir.display()))
        .arg(format!("-I{}", out.join("include").display()))
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object))
    .context("compiling Katran's balancer (clang, libbpf-dev)")?;
    Ok(object)
}

/// Katran's balancer, loaded and pinned under a directory of its own.
pub struct Katran {
    pins: PathBuf,
    prog: Xdp,
}

/// A VIP as Katran's `vip_definition`: address, port, protocol.
fn vip_key(addr: IpAddr, port: u16, proto: u8) -> [u8; 20] {
    let mut key = [0u8; 20];
    match addr {
        IpAddr::V4(a) => key[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => key[..16].copy_from_slice(&a.octets()),
    }
    key[16..18].copy_from_slice(&port.to_be_bytes());
    key[18] = proto;
    key
}

/// A backend as Katran's `real_definition`: address and flags.
fn real(addr: IpAddr) -> [u8; 20] {
    let mut value = [0u8; 20];
    match addr {
        IpAddr::V4(a) => value[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => {
            value[..16].copy_from_slice(&a.octets());
            value[16] = F_IPV6;
        }
    }
    value
}

impl Katran {
    /// Load the object built by [`build`], pinning it under a fresh
    /// directory of bpffs, with one LRU table per CPU.
    pub fn load(object: &Path) -> Result<Self> {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-bench-katran-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pins);
        std::fs::create_dir_all(&pins)?;
        let mut katran = Self {
            prog: {
                run(Command::new("bpftool")
                    .args(["prog", "load"])
                    .arg(object)
                    .arg(pins.join("prog"))
                    .args(["type", "xdp", "pinmaps"])
                    .arg(pins.join("maps")))
                .context("loading Katran with bpftool")?;
                Xdp::from_pin(pins.join("prog"), XdpAttachType::Interface)?
            },
            pins,
        };
        katran.per_cpu_lrus()?;
        Ok(katran)
    }

    fn map(&self, name: &str) -> Result<MapData> {
        MapData::from_pin(self.pins.join("maps").join(name))
            .with_context(|| format!("Katran's map {name}"))
    }

    /// One ordinary LRU table per CPU in `lru_mapping`, as Katran's
    /// userspace sets them up.
    fn per_cpu_lrus(&mut self) -> Result<()> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for cpu in 0..cpus {
            let path = self.pins.join(format!("lru{cpu}"));
            run(Command::new("bpftool")
                .args(["map", "create"])
                .arg(&path)
                .args(["type", "lru_hash", "key", "40", "value", "16", "entries"])
                .arg(LRU_ENTRIES.to_string())
                .args(["name", &format!("katran_lru{cpu}")]))?;
            let key: Vec<String> = (cpu as u32)
                .to_le_bytes()
                .iter()
                .map(|b| b.to_string())
                .collect();
            run(Command::new("bpftool")
                .args(["map", "update", "pinned"])
                .arg(self.pins.join("maps/lru_mapping"))
                .arg("key")
                .args(&key)
                .args(["value", "pinned"])
                .arg(&path))?;
        }
        Ok(())
    }

    /// Give Katran the next hop's MAC, and VIP `vip_num` at `addr:port`
    /// served by `backends` (real indexes from `first_real`), its ring
    /// filled from `ring` (indexes into `backends`).
    pub fn add_vip(
        &mut self,
        vip_num: u32,
        (addr, port, proto): (IpAddr, u16, u8),
        backends: &[IpAddr],
        first_real: u32,
        ring: &[u32],
        gateway_mac: [u8; 6],
    ) -> Result<()> {
        let mut ctl: Array<_, [u8; 8]> = Array::try_from(Map::Array(self.map("ctl_array")?))?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&gateway_mac);
        ctl.set(0, mac, 0).context("ctl_array")?;
        let mut reals: Array<_, [u8; 20]> = Array::try_from(Map::Array(self.map("reals")?))?;
        for (i, b) in (first_real..).zip(backends) {
            reals.set(i, real(*b), 0).context("reals")?;
        }
        let mut vips: HashMap<_, [u8; 20], [u8; 8]> =
            HashMap::try_from(Map::HashMap(self.map("vip_map")?))?;
        let mut meta = [0u8; 8];
        meta[4..].copy_from_slice(&vip_num.to_ne_bytes());
        vips.insert(vip_key(addr, port, proto), meta, 0)
            .context("vip_map")?;
        let mut rings: Array<_, u32> = Array::try_from(Map::Array(self.map("ch_rings")?))?;
        for (i, &b) in (0..).zip(ring) {
            rings
                .set(vip_num * RING_SIZE + i, first_real + b, 0)
                .context("ch_rings")?;
        }
        Ok(())
    }

    pub fn program(&self) -> &Xdp {
        &self.prog
    }

    /// Bytes the kernel charges Katran's maps and its per-CPU tables.
    pub fn memory(&self) -> Result<u64> {
        let out = run(Command::new("bpftool").args(["map", "show", "--json"]))?;
        let maps: serde_json::Value = serde_json::from_str(&out)?;
        let ids: Vec<u64> = self
            .prog
            .info()?
            .map_ids()?
            .unwrap_or_default()
            .into_iter()
            .map(u64::from)
            .collect();
        Ok(maps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| {
                let name = m["name"].as_str().unwrap_or("");
                m["id"].as_u64().is_some_and(|id| ids.contains(&id))
                    || name.starts_with("katran_lru")
            })
            .filter_map(|m| m["bytes_memlock"].as_u64())
            .sum())
    }
}

impl Drop for Katran {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}
