//! Backend health: the checkers (TCP connect, HTTP GET, UDP request/reply),
//! the rise/fall state machine, and the scheduler that runs every check as a
//! task on one tokio runtime.

pub mod check;
pub mod probe;
pub mod schedule;
pub mod state;
pub mod tunnel;

pub use check::{run_check, CheckError, CheckSpec, LOCAL_ERROR_KINDS};
pub use schedule::{own_runtime, CheckKey, CheckResult, Checks};
pub use state::{Health, Tracker, Transition};
