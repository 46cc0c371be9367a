//! Runs every backend's check as a task on the current tokio runtime: no
//! thread per backend, so thousands of backends cost thousands of small
//! futures. Results go to the controller over a channel.

use std::{
    collections::HashMap,
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle, time::sleep};

use super::{
    check::{run_check_with, CheckError, CheckSpec, HalfOpen},
    probe::Prober,
};

/// Which check: a backend of a VIP (health is per VIP: ports and checks differ).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckKey {
    pub vip: String,
    pub backend: IpAddr,
}

#[derive(Debug)]
pub struct CheckResult {
    /// Shared with the check's task: no copy of the names per result.
    pub key: std::sync::Arc<CheckKey>,
    /// Latency, or why the check failed.
    pub result: Result<Duration, CheckError>,
}

/// The running checks.
pub struct Checks {
    tasks: HashMap<CheckKey, (CheckSpec, JoinHandle<()>)>,
    results: mpsc::Sender<CheckResult>,
    /// The runtime the checks run on.
    runtime: tokio::runtime::Handle,
    /// Half-open TCP probes, when raw sockets are allowed.
    prober: Option<std::sync::Arc<Prober>>,
}

/// xorshift64: jitter only needs to desynchronise checks, not be secure.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn jitter(state: &mut u64, max: Duration) -> Duration {
    let max_ns = max.as_nanos() as u64;
    if max_ns == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(next_random(state) % max_ns)
}

fn spawn(
    runtime: &tokio::runtime::Handle,
    key: CheckKey,
    spec: CheckSpec,
    results: mpsc::Sender<CheckResult>,
    prober: Option<std::sync::Arc<Prober>>,
) -> JoinHandle<()> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    let mut rng = hasher.finish()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
        | 1;
    let key = std::sync::Arc::new(key);
    runtime.spawn(async move {
        let mut half_open = prober.map(HalfOpen::new);
        // Spread the first checks over one interval so a restart with
        // thousands of backends does not fire them all at once.
        let next = sleep(jitter(
            &mut rng,
            spec.interval.min(spec.jitter.max(spec.interval / 4)),
        ));
        tokio::pin!(next);
        next.as_mut().await;
        loop {
            let result = run_check_with(&spec, half_open.as_mut()).await;
            if results
                .send(CheckResult {
                    key: key.clone(),
                    result,
                })
                .await
                .is_err()
            {
                return;
            }
            // One timer entry for the task's life, re-armed each round.
            next.as_mut()
                .reset(tokio::time::Instant::now() + spec.interval + jitter(&mut rng, spec.jitter));
            next.as_mut().await;
        }
    })
}

/// A single-threaded runtime on a thread of its own, for health checks: no
/// client of the daemon's API or metrics can delay them, and thousands of
/// checks cost no cross-thread wake-ups.
pub fn own_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

impl Checks {
    /// Checks on the current runtime, reporting to `results`; TCP checks
    /// probe half-open where this process may open raw sockets.
    pub fn new(results: mpsc::Sender<CheckResult>) -> Self {
        Self::on(tokio::runtime::Handle::current(), results)
    }

    /// Checks on `runtime` (e.g. one of their own, see [`own_runtime`]).
    pub fn on(runtime: tokio::runtime::Handle, results: mpsc::Sender<CheckResult>) -> Self {
        let prober = {
            let _in = runtime.enter();
            Prober::open()
        };
        Self {
            tasks: HashMap::new(),
            results,
            runtime,
            prober,
        }
    }

    /// Whether TCP checks can probe half-open here.
    pub fn half_open(&self) -> bool {
        self.prober.is_some()
    }

    /// Run exactly the `wanted` checks: start new ones, restart changed
    /// ones, stop the rest.
    pub fn sync(&mut self, mut wanted: HashMap<CheckKey, CheckSpec>) {
        self.tasks
            .retain(|key, (spec, task)| match wanted.get(key) {
                Some(w) if w == spec => {
                    wanted.remove(key);
                    true
                }
                _ => {
                    task.abort();
                    false
                }
            });
        for (key, spec) in wanted {
            let task = spawn(
                &self.runtime,
                key.clone(),
                spec.clone(),
                self.results.clone(),
                self.prober.clone(),
            );
            self.tasks.insert(key, (spec, task));
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckKind, HealthCheck};

    fn spec(addr: std::net::SocketAddr, interval_ms: u64) -> CheckSpec {
        let h = HealthCheck {
            kind: CheckKind::Tcp,
            interval_ms,
            timeout_ms: interval_ms,
            jitter_ms: 0,
            ..HealthCheck::default()
        };
        CheckSpec::new(&h, addr)
    }

    #[tokio::test]
    async fn thousands_of_checks_on_one_runtime() {
        // 100 backends on loopback ports, 20 checks each (as 20 VIPs
        // sharing a backend would): the half-open prober keeps at most 32
        // probes in flight per backend, which 2,000 checks of one backend
        // fired at once exceeded on a busy machine (CI saw it).
        let mut backends = Vec::new();
        for _ in 0..100 {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            backends.push(listener.local_addr().unwrap());
            tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        }
        let (tx, mut rx) = mpsc::channel(4096);
        let mut checks = Checks::new(tx);
        let wanted: HashMap<_, _> = (0..2000u32)
            .map(|i| {
                let key = CheckKey {
                    vip: format!("vip{}", i % 10),
                    backend: IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
                };
                (key, spec(backends[i as usize % backends.len()], 2000))
            })
            .collect();
        checks.sync(wanted.clone());
        assert_eq!(checks.len(), 2000);
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < 2000 {
            let r = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("every check reports within 10 s")
                .unwrap();
            assert!(r.result.is_ok(), "{:?}", r.result);
            seen.insert(r.key);
        }
        // Shrinking stops the others.
        let keep: HashMap<_, _> = wanted.into_iter().take(5).collect();
        checks.sync(keep);
        assert_eq!(checks.len(), 5);
    }
}
