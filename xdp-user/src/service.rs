//! Running under systemd: readiness, reload and stop notifications, the
//! watchdog (`sd_notify`), and whether stderr is the journal. Outside
//! systemd (no `NOTIFY_SOCKET`) every call here does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

/// The service manager's side of the daemon's life.
#[derive(Debug, Default)]
pub struct Manager {
    ready: bool,
    /// The last status line sent.
    status: String,
    /// How often to tell the watchdog we are alive (half its timeout).
    pub watchdog: Option<Duration>,
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}

impl Manager {
    pub fn from_env() -> Self {
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(10)));
        Self {
            ready: false,
            status: String::new(),
            watchdog,
        }
    }

    /// Report readiness once, when the dataplane is attached and in sync
    /// (the first reconcile applied); until then keep the manager waiting.
    /// From then on keep the status line (`systemctl status`) as `status`
    /// says (`Controller::service_status`), sent when it changes.
    pub fn ready_when(&mut self, in_service: bool, status: &str) {
        if !self.ready && !in_service {
            return;
        }
        if self.ready && self.status == status {
            return;
        }
        let first = !self.ready;
        self.ready = true;
        status.clone_into(&mut self.status);
        if first {
            notify(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            notify(&[NotifyState::Status(status)]);
        }
    }

    /// The controller loop is alive.
    pub fn alive(&self) {
        if self.watchdog.is_some() {
            notify(&[NotifyState::Watchdog]);
        }
    }

    /// A reload starts; `reloaded` ends it.
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
    }

    pub fn reloaded(&self) {
        if self.ready {
            notify(&[NotifyState::Ready]);
        }
    }

    pub fn stopping(&self) {
        notify(&[NotifyState::Stopping]);
    }
}

/// Whether stderr is connected to the journal (systemd sets
/// `JOURNAL_STREAM` to its device and inode).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    // SAFETY: fstat on stderr into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}
