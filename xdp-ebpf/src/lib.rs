//! Library target of the eBPF crate: empty. It exists so `xdp-user` can name
//! this crate as a build-dependency (cargo then rebuilds the object when the
//! crate changes); the programs are the `xdp-ebpf` binary.
#![no_std]
