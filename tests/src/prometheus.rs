//! Debian's Prometheus in a test's namespace, scraping a daemon's metrics
//! every second and loading the shipped alert rules; and the shipped
//! Grafana dashboard's queries, to run against it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use crate::{daemon::wait_for, netns::Netns, ops::http_get};

/// A file of `packaging/`.
pub fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(name)
}

/// Percent-encode a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running Prometheus; killed on drop.
pub struct Prometheus<'a> {
    ns: &'a Netns,
    child: Child,
    log: PathBuf,
}

impl<'a> Prometheus<'a> {
    /// Start it in `ns` (listening on 127.0.0.1:9090, its files under
    /// `dir`), scraping `target` as job "xdplb"; wait until it has scraped
    /// four times, for rates over a minute.
    pub fn start(ns: &'a Netns, dir: &Path, target: &str) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: xdplb\n    static_configs:\n      - targets: ['{target}']\n",
                packaging("xdplb-alerts.yml").display()
            ),
        )
        .expect("writing prometheus.yml");
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).expect("prometheus.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("starting prometheus");
        let prometheus = Self { ns, child, log };
        let ready = wait_for(Duration::from_secs(30), || {
            prometheus
                .log_text()
                .contains("Server is ready to receive web requests")
                .then_some(())
        });
        assert!(
            ready.is_some(),
            "Prometheus did not start:\n{}",
            prometheus.log_text()
        );
        let scraped = wait_for(Duration::from_secs(30), || {
            (prometheus.query("count_over_time(up{job=\"xdplb\"}[1m])")["data"]["result"][0]
                ["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                >= 4.0)
                .then_some(())
        });
        assert!(
            scraped.is_some(),
            "Prometheus did not scrape:\n{}",
            prometheus.log_text()
        );
        prometheus
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API's answer to an instant query.
    pub fn query(&self, q: &str) -> serde_json::Value {
        let (_, body) = http_get(
            self.ns,
            "127.0.0.1:9090",
            &format!("/api/v1/query?query={}", encode(q)),
        );
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether `q` returns at least one series.
    pub fn has_data(&self, q: &str) -> bool {
        let r = self.query(q);
        r["status"] == "success"
            && r["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    }

    /// A path of the API, its body.
    pub fn get(&self, path: &str) -> String {
        http_get(self.ns, "127.0.0.1:9090", path).1
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One query of the dashboard.
pub struct Panel {
    pub title: String,
    /// With the `$instance` variable matching every host.
    pub expr: String,
    /// Described "Fleet members only": data on fleet members alone.
    pub fleet_only: bool,
}

/// The dashboard, and every panel's queries.
pub fn dashboard() -> (serde_json::Value, Vec<Panel>) {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(packaging("grafana-dashboard.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            continue;
        }
        let fleet_only = panel["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("Fleet members only"));
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains("$instance"),
                "{expr} ignores the instance variable"
            );
            panels.push(Panel {
                title: panel["title"].as_str().unwrap_or_default().to_owned(),
                expr: expr.replace("$instance", ".+"),
                fleet_only,
            });
        }
    }
    (dashboard, panels)
}
