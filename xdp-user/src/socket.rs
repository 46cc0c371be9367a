//! The admin socket's place in the file system: claimed without ever
//! deleting anything but a stale socket, in a directory no other user can
//! write, and removed on exit only while it is still ours.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use tokio::net::UnixListener;

use crate::lock::create_private_dir;

/// The bound socket file; removed on drop if the path still names it,
/// with the directories made for it (those left empty) unless the start
/// succeeded.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    dirs: CreatedDirs,
}

impl SocketFile {
    /// The start succeeded: the directories made for the socket stay
    /// when it goes (as `/run/xdplb` does).
    pub fn started(&mut self) {
        self.dirs.0.clear();
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Directories this run created (innermost first): removed when dropped,
/// if empty, so a start refused after making them leaves none behind.
#[derive(Debug)]
struct CreatedDirs(Vec<PathBuf>);

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Sets the process umask until dropped.
struct Umask(libc::mode_t);

impl Umask {
    fn set(mask: libc::mode_t) -> Self {
        // SAFETY: umask(2) cannot fail.
        Self(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(self.0) };
    }
}

/// The id of group `name`.
pub fn group_id(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("group name")?;
    let mut grp: libc::group =
        // SAFETY: an all-zero struct group is a valid out-parameter.
        unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into buffers we own, of the sizes given.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        bail!("api.socket_group: no group named {name:?}");
    }
    Ok(grp.gr_gid)
}

/// Bind the admin socket at `path`: mode 0600 (0660 with `group`) whatever
/// the umask; missing directories are created 0700 (0750 with `group`). An
/// existing socket nobody answers on is stale and replaced; one a daemon
/// answers on, or any other kind of file, is refused and left alone.
pub async fn bind(path: &Path, group: Option<u32>) -> Result<(UnixListener, SocketFile)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    create_private_dir(dir)?;
    // Dropped on a refusal below (`bind_in` removes a socket file it bound
    // first), taking the directories made here with it.
    let dirs = CreatedDirs(missing.iter().map(|d| d.to_path_buf()).collect());
    let (listener, dev, ino) = bind_in(path, dir, &missing, group).await?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev,
            ino,
            dirs,
        },
    ))
}

/// [`bind`] once `dir` exists (`missing`: the directories it created).
async fn bind_in(
    path: &Path,
    dir: &Path,
    missing: &[&Path],
    group: Option<u32>,
) -> Result<(UnixListener, u64, u64)> {
    if let Some(gid) = group {
        for d in missing {
            std::os::unix::fs::chown(d, None, Some(gid))
                .with_context(|| format!("chgrp {}", d.display()))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))
                .with_context(|| format!("chmod 0750 {}", d.display()))?;
        }
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        bail!(
            "the admin socket's directory {} is writable by every user (mode {:o}) without the \
             sticky bit: anyone could replace the socket; use a directory of root's",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                bail!(
                    "another xdplb daemon answers on {}; stop it first",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(m) => bail!(
            "api.socket {} exists and is {}, not a socket: refusing to replace it; \
             choose another path for the admin socket",
            path.display(),
            describe(&m)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let listener = {
        // Owner-only from the moment it exists: no window for another user.
        let _mask = Umask::set(0o177);
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?
    };
    let finish = || -> Result<(u64, u64)> {
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chgrp {}", path.display()))?;
        }
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        let m = std::fs::symlink_metadata(path)?;
        Ok((m.dev(), m.ino()))
    };
    match finish() {
        Ok((dev, ino)) => Ok((listener, dev, ino)),
        Err(e) => {
            // The socket this run just bound: not left behind.
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn describe(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a device or other special file"
    }
}
