//! What a guest boots: Debian's kernel packages (downloaded and
//! extracted, never installed) and an initramfs of busybox, the `xdplb`
//! binary, host tools and the kernel's modules.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::*;

/// Numbers in a package name, for ordering versions.
pub(super) fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest package whose name matches `pattern`.
pub(super) fn newest(pattern: &str) -> Result<String> {
    let list = sh(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version_key(n))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no package matches {pattern} (apt-get update?)"))
}

/// The package `name` downloaded and extracted under `cache` (reused).
pub(super) fn fetch(name: &str, cache: &Path) -> Result<PathBuf> {
    let root = cache.join(name);
    if root.join("boot").is_dir() {
        return Ok(root);
    }
    std::fs::create_dir_all(cache)?;
    sh(Command::new("apt-get")
        .current_dir(cache)
        .args(["download", name]))
    .with_context(|| format!("downloading {name}"))?;
    let deb = std::fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
        })
        .ok_or_else(|| anyhow!("apt-get download left no .deb for {name}"))?;
    let partial = cache.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &root)?;
    std::fs::remove_file(&deb)?;
    Ok(root)
}

/// A module file's contents, decompressed.
pub(super) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("xz")?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        Ok(out.stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// The modules a module needs: its `.modinfo` `depends=` entry.
pub(super) fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `modules` and what they depend on, dependencies first: (file name,
/// decompressed contents). Modules built into the kernel are skipped.
/// (The package ships no modules.dep: depmod runs at install.)
pub(super) fn module_order(moddir: &Path, modules: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|f| f.to_str()) {
                if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
                    files.insert(stem.replace('-', "_"), path.clone());
                }
            }
        }
    }
    fn visit(
        name: &str,
        files: &std::collections::BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        let Some(path) = files.get(&name) else {
            return Ok(()); // built in
        };
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        let data = module_bytes(path)?;
        for dep in depends(&data) {
            visit(&dep, files, seen, out)?;
        }
        out.push((format!("{name}.ko"), data));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in modules {
        visit(m, &files, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// A newc cpio archive of `files` (archive path, contents, mode).
pub(super) fn cpio(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, data: &[u8], mode: u32, ino: usize| {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    // Directories first, each once.
    let mut dirs = BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut ino = 1;
    for d in &dirs {
        entry(d, &[], 0o040755, ino);
        ino += 1;
    }
    for (path, data, mode) in files {
        entry(path, data, 0o100000 | mode, ino);
        ino += 1;
    }
    entry("TRAILER!!!", &[], 0, 0);
    out
}

/// The guest's initramfs for the kernel extracted at `kroot`, with
/// `extra` files (path, contents) besides the roles.
pub(super) fn initramfs(
    kroot: &Path,
    xdplb: &Path,
    extra: &[(&str, String)],
    out: &Path,
) -> Result<()> {
    let release = std::fs::read_dir(kroot.join("lib/modules"))?
        .flatten()
        .next()
        .ok_or_else(|| anyhow!("no modules in {}", kroot.display()))?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let moddir = kroot.join("lib/modules").join(&release);
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        ("init".into(), INIT.as_bytes().to_vec(), 0o755),
        (
            "bin/busybox".into(),
            std::fs::read("/bin/busybox").context("busybox-static")?,
            0o755,
        ),
        ("bin/xdplb".into(), std::fs::read(xdplb)?, 0o755),
    ];
    for (role, script) in ROLES {
        files.push((
            format!("roles/{role}.sh"),
            script.as_bytes().to_vec(),
            0o755,
        ));
    }
    for (path, text) in extra {
        files.push(((*path).to_owned(), text.as_bytes().to_vec(), 0o755));
    }
    // iproute2, procps and dash as operators have them: the README's steps
    // run under dash (Debian's /bin/sh) with the real `ip` and `sysctl`
    // (busybox's ip lacks options they use, and busybox's shell prefers
    // its own applets to PATH).
    for (host, guest) in HOST_TOOLS {
        files.push((guest.to_string(), std::fs::read(host)?, 0o755));
    }
    for object in std::fs::read_dir(LIBXDP_OBJECTS)
        .with_context(|| format!("{LIBXDP_OBJECTS} (xdp-tools)"))?
        .flatten()
    {
        let path = object.path();
        let guest = path.to_string_lossy().trim_start_matches('/').to_owned();
        files.push((guest, std::fs::read(&path)?, 0o644));
    }
    // The libraries the binaries link, at the paths the loader looks in.
    let mut libs = BTreeSet::new();
    for binary in std::iter::once(xdplb).chain(HOST_TOOLS.iter().map(|(h, _)| Path::new(*h))) {
        for line in sh(Command::new("ldd").arg(binary))?.lines() {
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                libs.insert(path.to_owned());
            }
        }
    }
    for path in libs {
        let data = std::fs::read(&path)?;
        files.push((path.trim_start_matches('/').to_owned(), data, 0o755));
    }
    let mut order = String::new();
    for (name, data) in module_order(&moddir, MODULES)? {
        order += &format!("{name}\n");
        files.push((format!("lib/modules/{name}"), data, 0o644));
    }
    files.push(("lib/modules/order".into(), order.into_bytes(), 0o644));
    let mut gz = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()?;
    gz.stdin
        .take()
        .ok_or_else(|| anyhow!("gzip stdin"))?
        .write_all(&cpio(&files))?;
    if !gz.wait()?.success() {
        bail!("gzip failed");
    }
    Ok(())
}
