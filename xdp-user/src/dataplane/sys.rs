//! Raw `bpf(2)` commands aya 0.14 does not offer: batched array updates,
//! deletes through a bare descriptor, and the link operations the
//! self-check and `--replace` need.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::MapData;

use crate::iface::u32_at;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `bpf_link_type` of an XDP link.
pub const BPF_LINK_TYPE_XDP: u32 = 6;

/// bpf(2) with `attr`; the raw return value, or the errno as an error.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: every caller passes the `union bpf_attr` member `cmd` expects,
    // whose pointers (if any) reference live buffers of the sizes it states.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `union bpf_attr`, the `batch` member (BPF_MAP_*_BATCH).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`, the map element member (BPF_MAP_*_ELEM).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_DELETE_ELEM` of `key` in the map behind `fd` (the map's own fd,
/// not an aya handle: sweeps run on threads that hold only descriptors).
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, key: &K) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// `union bpf_attr`, the BPF_MAP_CREATE member (its first fields).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A new map, owned by nothing but the returned descriptor.
pub fn map_create(
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = CreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: flags,
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned_fd)
}

/// The bytes the kernel charges a map (`memlock` in its fdinfo).
pub fn memlock(fd: BorrowedFd<'_>) -> Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .context("reading the map's fdinfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in the map's fdinfo")
}

/// `union bpf_attr`, the `BPF_OBJ_*` member.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn owned_fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// `BPF_MAP_UPDATE_BATCH`: write `keys[i] -> values[i]` in as few syscalls
/// as the kernel allows (one, for an array), rather than one per entry.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    if keys.len() != values.len() {
        bail!("{} keys for {} values", keys.len(), values.len());
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).context("batch too large")?,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // The kernel reports how many entries it wrote, also on failure.
        done += attr.count as usize;
        match result {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                return Err(e).context(format!("BPF_MAP_UPDATE_BATCH after {done} entries"));
            }
            Ok(_) if attr.count == 0 => {
                bail!("BPF_MAP_UPDATE_BATCH made no progress at entry {done}")
            }
            _ => {}
        }
    }
    Ok(())
}

/// What the kernel says of a link (`struct bpf_link_info`, XDP member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For an XDP link: its interface; 0 once detached (defunct).
    pub ifindex: u32,
}

/// The facts of the link behind `fd`.
pub fn link_facts(fd: BorrowedFd<'_>) -> Result<LinkFacts> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose `xdp` member starts with the ifindex.
    let mut info = [0u8; 64];
    obj_info(fd, &mut info).context("reading a link's info")?;
    let word = |off: usize| u32_at(&info, off);
    Ok(LinkFacts {
        link_type: word(0),
        id: word(4),
        prog_id: word(8),
        ifindex: if word(0) == BPF_LINK_TYPE_XDP {
            word(16)
        } else {
            0
        },
    })
}

/// Open the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// The facts of the link pinned at `path`.
pub fn pinned_link_facts(path: &Path) -> Result<LinkFacts> {
    let fd =
        obj_get(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
    link_facts(fd.as_fd())
}

/// Detach the link with id `id` from its hook (`BPF_LINK_DETACH`): it
/// becomes defunct for whoever holds it.
pub fn detach_link_by_id(id: u32) -> Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let fd = fd_by_id(BPF_LINK_GET_FD_BY_ID, id).with_context(|| format!("opening link {id}"))?;
    let mut detach = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach).with_context(|| format!("detaching link {id}"))?;
    Ok(())
}

/// Pin the object behind `fd` at `path` (`BPF_OBJ_PIN`).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `count` values of the array behind `fd` from index `start`,
/// `BPF_MAP_LOOKUP_BATCH` (a few syscalls for a whole ring, not one per
/// slot).
pub fn read_array<V: aya::Pod + Default + Clone>(
    fd: BorrowedFd<'_>,
    start: u32,
    count: u32,
) -> Result<Vec<V>> {
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![V::default(); count as usize];
    let mut done = 0usize;
    // The batch position is the key before the next one returned (none:
    // from the first).
    let mut after = start.checked_sub(1);
    while done < count as usize {
        let mut token_out = 0u32;
        let mut attr = BatchAttr {
            in_batch: after.as_mut().map_or(0, |k| k as *mut u32 as u64),
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: (count as usize - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        done += attr.count as usize;
        match result {
            Ok(_) if attr.count == 0 => bail!("BPF_MAP_LOOKUP_BATCH made no progress at {done}"),
            Ok(_) => after = Some(token_out),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        }
    }
    if done < count as usize {
        bail!(
            "the array ends {} entries before index {}",
            count as usize - done,
            start + count
        );
    }
    Ok(values)
}

/// Entries of the hash map behind `fd` (`BPF_MAP_LOOKUP_BATCH`, 4096 at a
/// time: about 250 syscalls for a million entries instead of a million).
pub fn count_entries(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> Result<u64> {
    let mut total = 0u64;
    read_batches(fd, key_size, value_size, |_, _, n| total += n as u64)?;
    Ok(total)
}

/// Every entry of the hash map behind `fd`, `BPF_MAP_LOOKUP_BATCH` 4096 at
/// a time: `chunk(keys, values, n)` gets the raw bytes of `n` entries.
pub fn read_batches(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut chunk: impl FnMut(&[u8], &[u8], usize),
) -> Result<()> {
    const CHUNK: usize = 4096;
    let mut keys = vec![0u8; key_size * CHUNK];
    let mut values = vec![0u8; value_size * CHUNK];
    // Hash maps' batch position: a bucket index (u32), kept in 8 bytes.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut token_in as *mut u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        chunk(&keys[..n * key_size], &values[..n * value_size], n);
        match result {
            Ok(_) => {
                token_in = token_out;
                first = false;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        }
    }
}

/// `union bpf_attr`, the `info` member (BPF_OBJ_GET_INFO_BY_FD).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (the kernel fills what it knows).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> std::io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// `BPF_{PROG,MAP,BTF}_GET_FD_BY_ID`: a descriptor of the object `id`.
fn fd_by_id(cmd: libc::c_long, id: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = IdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    bpf(cmd, &mut attr).map(owned_fd)
}

/// A descriptor of the loaded program `id`.
pub fn prog_by_id(id: u32) -> std::io::Result<OwnedFd> {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id)
}

/// What the kernel says of a loaded program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgFacts {
    pub id: u32,
    /// Its name, as the kernel keeps it (15 bytes at most).
    pub name: String,
    /// The id of its BTF (0: none).
    pub btf_id: u32,
    /// The maps it uses (the first 8).
    pub map_ids: Vec<u32>,
}

/// The facts of the program behind `fd`.
pub fn prog_facts(fd: BorrowedFd<'_>) -> Result<ProgFacts> {
    // struct bpf_prog_info: id at 4, nr_map_ids at 52, map_ids at 56, name
    // at 64 (16 bytes), btf_id at 128.
    let mut maps = [0u32; 8];
    let mut info = [0u8; 232];
    info[52..56].copy_from_slice(&(maps.len() as u32).to_ne_bytes());
    info[56..64].copy_from_slice(&(maps.as_mut_ptr() as u64).to_ne_bytes());
    obj_info(fd, &mut info).context("reading a program's info")?;
    let name = &info[64..80];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let nr = (u32_at(&info, 52) as usize).min(maps.len());
    Ok(ProgFacts {
        id: u32_at(&info, 4),
        name: String::from_utf8_lossy(&name[..len]).into_owned(),
        btf_id: u32_at(&info, 128),
        map_ids: maps[..nr].to_vec(),
    })
}

/// The raw BTF (header, types, strings) with id `id`.
pub fn btf_bytes(id: u32) -> Result<Vec<u8>> {
    let fd = fd_by_id(BPF_BTF_GET_FD_BY_ID, id).with_context(|| format!("opening BTF {id}"))?;
    // struct bpf_btf_info: btf (pointer), btf_size, id, ...
    let mut size = 1 << 16;
    loop {
        let mut data = vec![0u8; size];
        let mut info = [0u8; 32];
        info[0..8].copy_from_slice(&(data.as_mut_ptr() as u64).to_ne_bytes());
        info[8..12].copy_from_slice(&(size as u32).to_ne_bytes());
        obj_info(fd.as_fd(), &mut info).with_context(|| format!("reading BTF {id}"))?;
        let need = u32_at(&info, 8) as usize;
        if need <= size {
            data.truncate(need);
            return Ok(data);
        }
        size = need;
    }
}

/// The value of key 0 of the array map `id` (a program's `.rodata`), with
/// the map's flags.
pub fn first_value(id: u32) -> Result<(Vec<u8>, u32)> {
    let fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, id).with_context(|| format!("opening map {id}"))?;
    // struct bpf_map_info: type, id, key_size, value_size, max_entries,
    // map_flags.
    let mut info = [0u8; 80];
    obj_info(fd.as_fd(), &mut info).with_context(|| format!("reading map {id}'s info"))?;
    let (key_size, value_size, flags) = (u32_at(&info, 8), u32_at(&info, 12), u32_at(&info, 20));
    if key_size != 4 || u32_at(&info, 16) != 1 {
        bail!("map {id} is not an array of one entry");
    }
    let key = 0u32;
    let mut value = vec![0u8; value_size as usize];
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).with_context(|| format!("reading map {id}"))?;
    Ok((value, flags))
}

/// `BPF_LINK_CREATE` of the extension `prog` on the function `btf_id` of
/// the program `target` (re-attaching an extension loaded for another
/// target is allowed since Linux 5.10).
pub fn link_extension(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    btf_id: u32,
) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        target_btf_id: u32,
        _pad: [u32; 7],
    }
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: 0,
        flags: 0,
        target_btf_id: btf_id,
        _pad: [0; 7],
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned_fd)
}
