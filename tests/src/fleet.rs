//! The fleet bed: a three-member etcd cluster (Debian's etcd-server, the
//! settings of `examples/fleet/etcd.env`, TLS with client certificates)
//! in namespaces of its own on links to the HA bed's router, and LB hosts
//! running `examples/fleet/xdplb.toml`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{anyhow, bail, Result};

use crate::{
    daemon::wait_for,
    ha::Service,
    netns::{sh, Netns},
};

/// A file of `examples/fleet/`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("examples/fleet")
        .join(name)
}

/// Members of the test cluster.
pub const MEMBERS: usize = 3;

/// Member `k`'s address.
pub fn member_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 80 + k as u8, 2)
}

/// The test's certificate authority and the certificates it signed, in
/// `dir`: one per member (its address as subject alternative name) and
/// one client certificate for the LB hosts and etcdctl.
#[derive(Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

fn openssl(args: &[&str]) -> Result<()> {
    sh(Command::new("openssl").args(args)).map(drop)
}

impl Pki {
    pub fn new(dir: &Path) -> Result<Self> {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir)?;
        let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=xdplb test CA",
        ]);
        openssl(&ca)?;
        let sign = |name: &str, san: Option<Ipv4Addr>| -> Result<()> {
            let (key, csr, pem, ext) = (
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.pem")),
                p(&format!("{name}.ext")),
            );
            let mut req = vec!["req"];
            req.extend(ec);
            let subject = format!("/CN={name}");
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&req)?;
            let mut text = "extendedKeyUsage=serverAuth,clientAuth\n".to_owned();
            if let Some(ip) = san {
                text += &format!("subjectAltName=IP:{ip}\n");
            }
            std::fs::write(&ext, text)?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ])
        };
        for k in 0..MEMBERS {
            sign(&format!("m{k}"), Some(member_addr(k)))?;
        }
        sign("client", None)?;
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One etcd member: its namespace (on a link to the router) and process.
pub struct Member {
    pub service: Option<Service>,
    pub ns: Netns,
    env: Vec<String>,
    log: PathBuf,
}

/// The cluster. Members stop before their namespaces go.
pub struct Etcd {
    pub members: Vec<Member>,
    pub pki: Pki,
    _scratch: crate::Scratch,
}

/// `examples/fleet/etcd.env` for member `k`: its name and addresses, this
/// test's certificates and data directory.
fn member_env(k: usize, pki: &Pki, data: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(example("etcd.env"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("etcd.env: {line:?} is not KEY=VALUE"))?;
        let value = match key {
            "ETCD_NAME" => format!("m{k}"),
            "ETCD_DATA_DIR" => data.to_string_lossy().into_owned(),
            "ETCD_INITIAL_CLUSTER" => value.to_owned(),
            "ETCD_CERT_FILE" | "ETCD_PEER_CERT_FILE" => pki
                .path(&format!("m{k}.pem"))
                .to_string_lossy()
                .into_owned(),
            "ETCD_KEY_FILE" | "ETCD_PEER_KEY_FILE" => pki
                .path(&format!("m{k}.key"))
                .to_string_lossy()
                .into_owned(),
            "ETCD_TRUSTED_CA_FILE" | "ETCD_PEER_TRUSTED_CA_FILE" => {
                pki.path("ca.pem").to_string_lossy().into_owned()
            }
            _ => value.replace(&member_addr(0).to_string(), &member_addr(k).to_string()),
        };
        out.push(format!("{key}={value}"));
    }
    if !out
        .iter()
        .any(|l| l.starts_with("ETCD_CLIENT_CERT_AUTH=true"))
    {
        bail!("examples/fleet/etcd.env no longer requires client certificates");
    }
    Ok(out)
}

impl Etcd {
    /// Three members, each in a namespace `<tag>-e<k>` linked to `router`
    /// (198.18.(80+k).0/24), started and answering.
    pub fn start(router: &Netns, tag: &str, pki: Pki, scratch: crate::Scratch) -> Result<Self> {
        let dir = scratch.0.clone();
        let dir = dir.as_path();
        let mut members = Vec::new();
        for k in 0..MEMBERS {
            let ns = Netns::new(&format!("{tag}-e{k}"))?;
            let rif = format!("re{k}");
            router.ip(&[
                "link", "add", &rif, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            let net = 80 + k as u8;
            router.ip(&["addr", "add", &format!("198.18.{net}.1/24"), "dev", &rif])?;
            router.ip(&["link", "set", &rif, "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", member_addr(k)),
                "dev",
                "eth0",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
            let data = dir.join(format!("etcd-m{k}"));
            members.push(Member {
                env: member_env(k, &pki, &data)?,
                log: dir.join(format!("etcd-m{k}.log")),
                service: None,
                ns,
            });
        }
        let mut etcd = Self {
            members,
            pki,
            _scratch: scratch,
        };
        for k in 0..MEMBERS {
            etcd.start_member(k)?;
        }
        etcd.wait_healthy(Duration::from_secs(30))?;
        Ok(etcd)
    }

    pub fn start_member(&mut self, k: usize) -> Result<()> {
        let m = &mut self.members[k];
        let mut argv: Vec<&str> = vec!["env"];
        argv.extend(m.env.iter().map(String::as_str));
        argv.push("etcd");
        // Appended to, so a restart's log follows the first run's.
        let log = m.log.with_extension(format!(
            "{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        m.service = Some(Service::start(&m.ns, &argv, log)?);
        Ok(())
    }

    /// Kill member `k` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, k: usize) {
        if let Some(mut s) = self.members[k].service.take() {
            s.stop_with(libc::SIGKILL);
        }
    }

    pub fn endpoints(&self, only: Option<usize>) -> String {
        (0..MEMBERS)
            .filter(|k| only.is_none_or(|o| o == *k))
            .map(|k| format!("https://{}:2379", member_addr(k)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcdctl (v3) with the client certificate, from the first running
    /// member's namespace, against `endpoints` (None: every member).
    pub fn etcdctl_at(&self, only: Option<usize>, args: &[&str]) -> Result<String> {
        let from = self
            .members
            .iter()
            .position(|m| m.service.is_some())
            .unwrap_or(0);
        let (ca, cert, key) = (
            self.pki.path("ca.pem"),
            self.pki.path("client.pem"),
            self.pki.path("client.key"),
        );
        let endpoints = self.endpoints(only);
        let mut argv = vec![
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--dial-timeout=2s",
            "--command-timeout=3s",
        ];
        let flags = [
            format!("--endpoints={endpoints}"),
            format!("--cacert={}", ca.display()),
            format!("--cert={}", cert.display()),
            format!("--key={}", key.display()),
        ];
        argv.extend(flags.iter().map(String::as_str));
        argv.extend_from_slice(args);
        self.members[from].ns.exec(&argv)
    }

    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcdctl_at(None, args)
    }

    /// The member that leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        (0..MEMBERS).find(|k| {
            self.members[*k].service.is_some()
                && self
                    .etcdctl_at(Some(*k), &["endpoint", "status", "-w", "json"])
                    .ok()
                    .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
                    .is_some_and(|v| {
                        let s = &v[0]["Status"];
                        s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"]
                    })
        })
    }

    /// Wait until the running members answer and one leads.
    pub fn wait_healthy(&self, limit: Duration) -> Result<()> {
        wait_for(limit, || {
            self.etcdctl(&["put", "/xdplb-test/ping", "1"]).ok()?;
            self.leader()
        })
        .map(drop)
        .ok_or_else(|| {
            anyhow!(
                "the etcd cluster did not answer with a leader within {limit:?}:\n{}",
                self.members
                    .iter()
                    .filter_map(|m| m.service.as_ref())
                    .map(|s| s.log_text())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for k in 0..MEMBERS {
            self.kill(k);
        }
    }
}

/// `examples/fleet/xdplb.toml` for LB host `j`: this test's certificates,
/// the host's name, pin directory and socket.
pub fn lb_config(pki: &Pki, j: usize, pin_dir: &Path, socket: &Path) -> String {
    let text = std::fs::read_to_string(example("xdplb.toml")).expect("examples/fleet/xdplb.toml");
    let text = text.replace("/etc/xdplb/etcd/", &format!("{}/", pki.dir.display()));
    assert!(
        text.trim_end().ends_with("# host = \"lb1\"              # this host's name in the fleet (default: its host name)"),
        "[fleet] is the example's last section, ending with the host line"
    );
    format!(
        "{text}host = \"lb{j}\"\n\n[daemon]\npin_dir = \"{}\"\n\n[api]\nsocket = \"{}\"\n",
        pin_dir.display(),
        socket.display()
    )
}

/// The ECMP bed of the HA tests (BIRD on three LB hosts, BFD) as a fleet:
/// the LB hosts run `examples/fleet/xdplb.toml`, the etcd cluster starts
/// once they run, `examples/fleet/vips.toml` is imported through LB 0,
/// and every host applies it, checks, and announces.
pub fn bed(tag: &str) -> Result<(crate::ha::Ecmp, Etcd)> {
    use crate::ha::{Ecmp, Speaker};
    let scratch = crate::Scratch::new(&format!("{tag}-etcd"));
    let pki = Pki::new(&scratch.0)?;
    let config_pki = pki.clone();
    Ecmp::start_with(
        tag,
        &[Speaker::Bird; 3],
        true,
        |j, pins, socket| lb_config(&config_pki, j, pins, socket),
        |sys| {
            let etcd = Etcd::start(&sys.topo.router, tag, pki, scratch)?;
            import(sys, &etcd, &example("vips.toml"))?;
            for j in 0..sys.daemons.len() {
                wait_for(Duration::from_secs(20), || {
                    let s = sys.status(j).ok()?;
                    (s["vips"].as_array()?.len() == 1).then_some(())
                })
                .ok_or_else(|| {
                    anyhow!(
                        "LB {j} did not apply the fleet's VIPs within 20 s: {:?}",
                        sys.status(j).map(|s| s["fleet"].clone())
                    )
                })?;
            }
            Ok(etcd)
        },
    )
}

/// `xdplb fleet import FILE` on LB 0.
pub fn import(sys: &crate::e2e::System, _etcd: &Etcd, file: &Path) -> Result<String> {
    let config = sys.configs[0].to_string_lossy().into_owned();
    let file = file.to_string_lossy().into_owned();
    let out = crate::daemon::run_in(
        &sys.topo.lbs[0].ns,
        &["fleet", "import", &file, "--config", &config],
        Duration::from_secs(20),
    )?;
    if !out.status.success() {
        bail!(
            "xdplb fleet import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
