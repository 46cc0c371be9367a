//! The config file on disk: read bounded (a regular file, at most
//! [`MAX_CONFIG_BYTES`]: never a FIFO that hangs or a device that never
//! ends), and changes written back the way an operator would make them by
//! hand: through a symlink to its target, with its mode, owner, comments and
//! layout kept, atomically (temp file, fsync, rename), and never over edits
//! made on disk since the daemon last read it.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use toml_edit::DocumentMut;

use super::{Change, Config};

/// Largest config file read (a 4096-backend config is about 250 KB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Marker in the names of temporary files the writer leaves beside the
/// config: `.<name>.xdplb-tmp.<pid>`.
const TMP_MARK: &str = ".xdplb-tmp.";

/// Read `path` if it is a regular file of at most [`MAX_CONFIG_BYTES`].
pub fn read_bounded(path: &Path) -> Result<String> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading config {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "config {} is not a regular file (a FIFO, device or directory): refusing to read it",
            path.display()
        );
    }
    if meta.len() > MAX_CONFIG_BYTES {
        bail!(
            "config {} is {} bytes; the limit is {MAX_CONFIG_BYTES}",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading config {}", path.display()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "config {} grew past {MAX_CONFIG_BYTES} bytes while being read",
            path.display()
        );
    }
    String::from_utf8(bytes).with_context(|| format!("config {} is not UTF-8", path.display()))
}

/// A config file as last loaded: what changes are written back to.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    /// The text last read or written: the base of the next change, and how
    /// a hand edit since is recognised.
    text: String,
}

impl ConfigFile {
    /// Read, parse and validate `path`; temporary files a killed writer
    /// left beside it are removed.
    pub fn load(path: &Path) -> Result<(Config, Self)> {
        let text = read_bounded(path)?;
        let config = Config::parse(&text)
            .map_err(|e| anyhow::Error::new(e).context(format!("config {}", path.display())))?;
        if let Ok(target) = std::fs::canonicalize(path) {
            remove_stale_temps(&target);
        }
        Ok((
            config,
            Self {
                path: path.to_owned(),
                text,
            },
        ))
    }

    /// The path as given (possibly a symlink).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `change` into the file, which must then say `expected`.
    /// Refused, writing nothing, when the file changed on disk since it was
    /// last read or is read-only.
    pub fn write_change(&mut self, change: &Change, expected: &Config) -> Result<()> {
        let target = std::fs::canonicalize(&self.path)
            .with_context(|| format!("resolving {}", self.path.display()))?;
        let on_disk = read_bounded(&target)?;
        if on_disk != self.text {
            bail!(
                "{} changed on disk since the daemon last read it: run `xdplb reload` first \
                 (or undo the edit); nothing was changed",
                self.path.display()
            );
        }
        let meta = std::fs::metadata(&target)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o222 == 0 {
            bail!(
                "{} is read-only (mode {mode:04o}): the change was not made; make the file \
                 writable, or edit it by hand and run `xdplb reload`",
                target.display()
            );
        }
        let mut doc: DocumentMut = self
            .text
            .parse()
            .with_context(|| format!("parsing {}", self.path.display()))?;
        change.edit(&mut doc)?;
        let text = doc.to_string();
        match Config::parse(&text) {
            Ok(c) if &c == expected => {}
            Ok(_) => bail!(
                "internal error: the edited file does not say what was asked; nothing was written"
            ),
            Err(e) => {
                bail!("internal error: the edited file does not parse ({e}); nothing was written")
            }
        }
        replace_atomically(&target, text.as_bytes(), &meta)?;
        self.text = text;
        Ok(())
    }
}

/// Write `bytes` over `target` through a temp file beside it that gets the
/// target's mode and owner first, then rename; fsync file and directory, so
/// a crash leaves the old file or the new one.
fn replace_atomically(target: &Path, bytes: &[u8], meta: &std::fs::Metadata) -> Result<()> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .context("config path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))
            .with_context(|| format!("chown {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(
            meta.permissions().mode() & 0o7777,
        ))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
            .with_context(|| format!("renaming over {}", target.display()))?;
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove `.<name>.xdplb-tmp.<pid>` files beside `target` whose writer is
/// gone (a daemon killed mid-write).
fn remove_stale_temps(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefix = format!(".{}{TMP_MARK}", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only probes whether the pid exists.
        let alive = pid > 0
            && (unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH));
        if !alive || pid as u32 == std::process::id() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
