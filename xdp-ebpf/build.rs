//! Rebuild the eBPF object when bpf-linker changes: it is the linker cargo
//! does not know about. And let it emit unaligned loads and stores: packet
//! headers sit at any offset, and without the feature LLVM splits every
//! multi-byte packet access into single bytes and shifts (x86-64 and arm64
//! kernels accept unaligned packet access; the stack stays aligned).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
