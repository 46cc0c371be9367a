//! A fleet of LB hosts sharing desired state and health through etcd:
//! what is stored where ([`keys`]), the fleet's verdict rule ([`verdict`]),
//! the store's client calls ([`store`]) and the daemon's session with it
//! ([`agent`]).

pub mod agent;
pub mod keys;
pub mod store;
pub mod verdict;

pub use agent::{Agent, Event};
pub use keys::{BadKey, Desired, Entry, Verdicts};
pub use store::ChangedSinceRead;
pub use verdict::fleet_verdict;
