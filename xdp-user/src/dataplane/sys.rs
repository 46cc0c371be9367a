//! Raw `bpf(2)` commands aya 0.14 does not offer: batched array updates,
//! deletes through a bare descriptor, and the link operations the
//! self-check and `--replace` need.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::MapData;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
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
    /// `union bpf_attr`, the `info` member.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose `xdp` member starts with the ifindex.
    let mut info = [0u8; 64];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading a link's info")?;
    let word =
        |off: usize| u32::from_ne_bytes([info[off], info[off + 1], info[off + 2], info[off + 3]]);
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
    struct IdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut get = IdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = owned_fd(
        bpf(BPF_LINK_GET_FD_BY_ID, &mut get).with_context(|| format!("opening link {id}"))?,
    );
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
