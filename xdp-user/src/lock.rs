//! One daemon per pin directory and per interface: exclusive `flock`s on
//! files under the runtime directory, each holding its owner's pid so a
//! refusal can name it. The kernel drops a lock when its holder dies, so a
//! crashed daemon never blocks the next one.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// Where the lock files live (tmpfs: they vanish on reboot, with the pins).
pub const LOCK_DIR: &str = "/run/xdplb/locks";

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

/// File-name-safe form of `key` (a path or an interface name).
fn escape(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c.to_string(),
            c => format!("%{:02X}", u32::from(c)),
        })
        .collect()
}

/// What `dir` names, however it is spelled: the existing part of the path
/// with its symlinks resolved, the rest (not created yet) normalised
/// (`//`, `.` and `..` segments), so `/sys/fs/bpf//x`, `/sys/fs/bpf/./x`
/// and a symlink to it are one instance.
pub fn resolved_dir(dir: &Path) -> PathBuf {
    use std::path::Component;
    let mut lexical = PathBuf::new();
    for c in dir.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut missing = Vec::new();
    let mut existing = lexical.as_path();
    loop {
        if let Ok(mut real) = existing.canonicalize() {
            real.extend(missing.iter().rev());
            return real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// The lock file for the pin directory `pin_dir` (as [`resolved_dir`]
/// names it).
pub fn pin_dir_lock(pin_dir: &Path) -> PathBuf {
    Path::new(LOCK_DIR).join(format!(
        "pin-{}.lock",
        escape(&resolved_dir(pin_dir).to_string_lossy())
    ))
}

/// Where per-instance state files live (tmpfs, like the locks).
pub const STATE_DIR: &str = "/run/xdplb/state";

/// The state file `kind` of the instance pinned at `pin_dir`.
pub fn state_file(kind: &str, pin_dir: &Path) -> PathBuf {
    Path::new(STATE_DIR).join(format!(
        "{kind}-{}",
        escape(&resolved_dir(pin_dir).to_string_lossy())
    ))
}

/// Replace the state file `path` with `bytes` (beside it, then renamed:
/// a reader sees the old contents or the new, never half), making its
/// private directory first.
pub fn write_state(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// This process's network namespace (its inode: names of interfaces and
/// routing tables repeat across namespaces, inodes do not).
fn netns() -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino())
}

/// The lock file for the interface with index `index` in this process's
/// network namespace (its name or any altname resolves to the index).
pub fn interface_lock(index: u32) -> Result<PathBuf> {
    Ok(Path::new(LOCK_DIR).join(format!("ifindex-{}-{index}.lock", netns()?)))
}

/// The lock file for announcing in routing table `table` with route
/// protocol `protocol` in this network namespace: two daemons announcing
/// there would each withdraw the other's routes.
pub fn announce_lock(table: u32, protocol: u8) -> Result<PathBuf> {
    Ok(Path::new(LOCK_DIR).join(format!("announce-{}-{table}-{protocol}.lock", netns()?)))
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum Held {
    /// Another process holds it; its pid, when it wrote one.
    By(Option<u32>),
}

/// Take the lock at `path` without waiting. `Ok(Err(Held))` when another
/// process holds it.
pub fn try_acquire(path: &Path) -> Result<std::result::Result<Lock, Held>> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(Err(Held::By(text.trim().parse().ok())));
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Ok(Lock {
        _file: file,
        path: path.to_owned(),
    }))
}

/// Take the lock at `path`, or fail naming its holder and `what` it guards.
pub fn acquire(path: &Path, what: &str) -> Result<Lock> {
    match try_acquire(path)? {
        Ok(lock) => Ok(lock),
        Err(Held::By(pid)) => bail!(
            "another xdplb daemon{} already runs on {what} (lock {}); stop it first",
            pid.map_or(String::new(), |p| format!(" (pid {p})")),
            path.display()
        ),
    }
}

/// Create `dir` and any missing parents with mode 0700 whatever the umask;
/// directories that already exist are left as they are.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_owned());
        at = d.parent();
    }
    for d in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
        // The umask may have taken bits away, never added them; be exact.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_directory_is_one_lock_however_spelled() {
        let tmp = std::env::temp_dir().join(format!("xdplb-resolve-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.join("real"), tmp.join("link")).unwrap();
        let want = tmp.canonicalize().unwrap().join("real/pins");
        for spelling in [
            "real/pins",
            "real//pins",
            "./real/./pins",
            "link/pins",
            "real/x/../pins",
        ] {
            let p = PathBuf::from(format!("{}/{spelling}", tmp.display()));
            assert_eq!(resolved_dir(&p), want, "{spelling}");
            assert_eq!(pin_dir_lock(&p), pin_dir_lock(&want), "{spelling}");
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn escaped_names_are_distinct_and_flat() {
        assert_eq!(escape("/sys/fs/bpf/xdplb"), "%2Fsys%2Ffs%2Fbpf%2Fxdplb");
        assert_ne!(escape("a_b"), escape("a/b"));
        assert_ne!(escape("a%2Fb"), escape("a/b"));
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = std::env::temp_dir().join(format!("xdplb-lock-{}", std::process::id()));
        let path = dir.join("sub").join("x.lock");
        let first = acquire(&path, "x").unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        match try_acquire(&path).unwrap() {
            Err(Held::By(pid)) => assert_eq!(pid, Some(std::process::id())),
            Ok(_) => panic!("second lock granted"),
        }
        let e = acquire(&path, "pin dir x").unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        assert!(try_acquire(&path).unwrap().is_ok());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("sub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
