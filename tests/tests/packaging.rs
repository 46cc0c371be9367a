//! Shipping xdplb (issue: ship it as a system service): the Debian package
//! built by `cargo xtask package`, installed into a clean root, verified
//! and removed; the alert rules and the Grafana dashboard against a real
//! Prometheus scraping a running daemon; the CLI as an operator meets it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    daemon::{wait_for, xdplb_bin, Daemon},
    netns::sh,
    ops::{fails, http_get, servers, topology, Cfg, Files},
    prometheus::{dashboard, packaging, Prometheus},
    require_root, Scratch,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `cargo xtask package`; the .deb it built.
fn build_package() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["run", "--quiet", "--package", "xtask", "--", "package"])
        .output()
        .expect("running cargo xtask package");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo xtask package failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = stdout
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .expect("the .deb's path")
        .trim();
    PathBuf::from(deb)
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    sh(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(args))
    .unwrap()
}

/// The subcommands a `--help` text lists (clap's own `help` aside).
fn subcommands(help: &str) -> Vec<String> {
    help.split("Commands:")
        .nth(1)
        .unwrap_or("")
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_debian_package_installs_verifies_and_removes_keeping_the_config() {
    if !require_root() {
        return;
    }
    let deb = build_package();
    let info = sh(Command::new("dpkg-deb").arg("-I").arg(&deb)).unwrap();
    assert!(info.contains("Package: xdplb"), "{info}");
    let conffiles = sh(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"))
    .unwrap();
    assert_eq!(conffiles.trim(), "/etc/xdplb/xdplb.toml");

    // A clean root with an empty dpkg database.
    let scratch = Scratch::new("deb");
    let root = scratch.0.join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    // The maintainer scripts run chrooted in the root: it gets a shell and
    // the libraries it and xdplb link. There is no systemd in it, so the
    // scripts' systemctl steps are skipped (the VM bed's operator host runs
    // them under a real systemd). No dpkg package provides libc here.
    let mut files = vec![
        std::path::PathBuf::from("/bin/sh"),
        "/bin/dash".into(),
        "/bin/rm".into(),
    ];
    for binary in [Path::new("/bin/dash"), Path::new("/bin/rm"), xdplb_bin()] {
        let libs = sh(Command::new("ldd").arg(binary)).unwrap();
        files.extend(
            libs.split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(std::path::PathBuf::from),
        );
    }
    for file in files {
        let to = root.join(file.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, &to).unwrap();
    }
    for (what, script) in [
        ("postinst", "configure"),
        ("prerm", "remove"),
        ("postrm", "purge"),
    ] {
        let text = sh(Command::new("dpkg-deb").arg("--info").arg(&deb).arg(what)).unwrap();
        assert!(
            text.contains(script),
            "the package's {what} handles {script}"
        );
    }
    dpkg(&root, &["--force-depends", "-i", deb.to_str().unwrap()]);

    let bin = root.join("usr/sbin/xdplb");
    let version = sh(Command::new(&bin).arg("--version")).unwrap();
    assert_eq!(
        version.trim(),
        format!("xdplb {}", env!("CARGO_PKG_VERSION"))
    );
    use std::os::unix::fs::PermissionsExt as _;
    let config = root.join("etc/xdplb/xdplb.toml");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    sh(Command::new(&bin).arg("check-config").arg(&config)).unwrap();
    for file in [
        "lib/systemd/system/xdplb.service",
        "usr/share/bash-completion/completions/xdplb",
        "usr/share/zsh/vendor-completions/_xdplb",
        "usr/share/fish/vendor_completions.d/xdplb.fish",
        "usr/share/doc/xdplb/examples/ha/bird-lb.conf",
        "usr/share/doc/xdplb/examples/uplinks/bird-lb.conf",
        "usr/share/doc/xdplb/examples/libxdp/xdplb.toml",
        "usr/share/doc/xdplb/grafana-dashboard.json",
        "usr/share/doc/xdplb/xdplb-alerts.yml",
    ] {
        assert!(root.join(file).is_file(), "{file} not installed");
    }
    sh(Command::new("bash")
        .arg("-n")
        .arg(root.join("usr/share/bash-completion/completions/xdplb")))
    .unwrap();

    // xdplb(8) and one page per subcommand, nested ones included.
    let help = sh(Command::new(&bin).arg("--help")).unwrap();
    let mut pages = vec!["xdplb".to_owned()];
    for top in subcommands(&help) {
        let sub_help = sh(Command::new(&bin).arg(&top).arg("--help")).unwrap();
        pages.extend(
            subcommands(&sub_help)
                .iter()
                .map(|sub| format!("xdplb-{top}-{sub}")),
        );
        pages.push(format!("xdplb-{top}"));
    }
    assert!(pages.contains(&"xdplb-announce-withdraw".to_owned()));
    for page in &pages {
        // Compressed, as Debian's policy asks.
        let path = root.join(format!("usr/share/man/man8/{page}.8.gz"));
        let text = sh(Command::new("zcat").arg(&path)).unwrap_or_else(|e| panic!("{page}(8): {e}"));
        assert!(text.contains(".TH"), "{page}(8) is not a man page");
    }
    assert!(!root.join("usr/share/man/man8/xdplb-generate.8.gz").exists());
    // xdplb.toml(5): every key of the configuration reference.
    let page =
        sh(Command::new("zcat").arg(root.join("usr/share/man/man5/xdplb.toml.5.gz"))).unwrap();
    for key in xdp_user::config::reference::KEYS {
        assert!(
            page.contains(&format!(".B {}\n", key.name)),
            "{} not in xdplb.toml(5)",
            key.name
        );
    }
    // Every page names what it is about (`man -k xdplb` shows no
    // "(unknown subject)"), and no page refers to a missing one.
    for entry in std::fs::read_dir(root.join("usr/share/man/man8"))
        .unwrap()
        .flatten()
    {
        let text = sh(Command::new("zcat").arg(entry.path())).unwrap();
        let name = text
            .split(".SH NAME\n")
            .nth(1)
            .and_then(|t| t.lines().next())
            .unwrap_or("");
        let file = entry.file_name();
        assert!(
            name.contains(" \\- "),
            "{file:?} has no description: {name:?}"
        );
        assert!(
            !text.contains("xdplb\\-help"),
            "{file:?} refers to xdplb-help"
        );
        if file == "xdplb-check-config.8.gz" {
            assert!(text.contains("xdplb check\\-config"), "synopsis: {text}");
        }
    }

    // The unit as installed passes systemd's own checks (the root gets
    // the host's stock units and /bin/kill, which the unit refers to).
    let units = root.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let to = units.join(entry.file_name());
        if !to.exists() && entry.path().is_file() {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(units.join("xdplb.service"))
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Removal keeps the operator's config (a conffile); purge removes it.
    std::fs::write(&config, "# edited by the operator\n").unwrap();
    dpkg(&root, &["-r", "xdplb"]);
    assert!(!bin.exists(), "binary left behind");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the operator\n"
    );
    dpkg(&root, &["--purge", "xdplb"]);
    assert!(!config.exists(), "config left after purge");
}

#[test]
fn alert_rules_check_and_fire_as_their_tests_say() {
    if !require_root() {
        return;
    }
    let out = sh(Command::new("promtool")
        .args(["check", "rules"])
        .arg(packaging("xdplb-alerts.yml")))
    .unwrap();
    assert!(out.contains("SUCCESS: 15 rules found"), "{out}");
    let out = sh(Command::new("promtool")
        .args(["test", "rules"])
        .arg(packaging("xdplb-alerts.test.yml")))
    .unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_dashboard_panel_and_alert_query_returns_data_from_a_real_prometheus() {
    if !require_root() {
        return;
    }
    let files = Files::new("grafana");
    let mut cfg = Cfg::new(&files);
    cfg.extra = "\n[announce]\nenabled = true\n".into();
    cfg.write(&files.config);
    let ns = topology("grafana");
    let _backends = servers(&ns, &["198.18.1.1", "198.18.1.2"]);
    let daemon = Daemon::start(&ns, &files.config, &files.socket, files.log("d.log")).unwrap();
    // Prometheus (Debian's) in the namespace, scraping the daemon every
    // second and loading the alert rules.
    let prom = Prometheus::start(&ns, &files.scratch.0, "127.0.0.1:9477");

    // An instance variable (HA hosts are several) that every query uses.
    let (dashboard, panels) = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "instance"),
        "no instance variable"
    );
    // A panel for every metric family the daemon exports.
    let (_, metrics) = http_get(&ns, "127.0.0.1:9477", "/metrics");
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() >= 30, "{metrics}");
    let shown = |family: &str| {
        panels.iter().any(|p| {
            p.expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w == family || w.strip_suffix("_total") == Some(family))
        })
    };
    let missing: Vec<_> = families.iter().filter(|f| !shown(f)).collect();
    assert!(
        missing.is_empty(),
        "metric families on no panel: {missing:?}"
    );
    // None empty on a default host (the fleet row has data on fleet
    // members: tests/tests/fleet.rs queries it there).
    let empty: Vec<_> = panels
        .iter()
        .filter(|p| !p.fleet_only && !prom.has_data(&p.expr))
        .map(|p| (&p.title, &p.expr))
        .collect();
    assert!(empty.is_empty(), "panels without data: {empty:#?}");

    // Prometheus loaded every alert rule and evaluates it without error.
    let body = prom.get("/api/v1/rules");
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    assert_eq!(loaded.len(), 15, "{body}");
    let unhealthy: Vec<_> = loaded.iter().filter(|r| r["health"] != "ok").collect();
    assert!(
        wait_for(Duration::from_secs(5), || {
            let body = prom.get("/api/v1/rules");
            (!body.contains("\"health\":\"err\"") && body.contains("\"health\":\"ok\""))
                .then_some(())
        })
        .is_some(),
        "{unhealthy:?}"
    );
    drop(prom);
    daemon.stop().unwrap();
}

#[test]
fn the_socket_option_is_offered_only_where_it_is_used() {
    // Client commands take it (after the command, as anywhere else)...
    for args in [
        &["status", "--socket", "/nonexistent/x.sock"][..],
        &["vip", "list", "--socket", "/nonexistent/x.sock"],
        &[
            "announce",
            "withdraw",
            "--socket",
            "/nonexistent/x.sock",
            "--config",
            "/nonexistent.toml",
        ],
    ] {
        let out = Command::new(xdplb_bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.contains("unexpected argument"),
            "{args:?}: {err}"
        );
    }
    // ...commands that never talk to the daemon refuse it.
    for args in [
        &["run", "--socket", "/x.sock"][..],
        &["check-config", "--socket", "/x.sock", "/x.toml"],
        &["detach", "--socket", "/x.sock"],
        &["announce", "check", "--socket", "/x.sock"],
    ] {
        fails(
            &Command::new(xdplb_bin()).args(args).output().unwrap(),
            "unexpected argument '--socket'",
        );
    }
}
