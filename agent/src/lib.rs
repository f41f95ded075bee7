//! doppel-agent: the source-host daemon.
//!
//! Data path, one module per stage:
//! [`capture`] (eBPF ring buffer) -> [`resolve`] (inode -> path, rules; uses [`index`])
//! -> [`queue`] (per set, until acknowledged) -> [`send`] (QUIC to each target).
//! [`run`] wires them; [`config`] and [`rules`] describe what to replicate.

pub mod age;
pub mod attrs;
pub mod capture;
pub mod check;
pub mod config;
pub mod control;
pub mod index;
pub mod journal;
pub mod mapped;
pub mod marks;
pub mod metrics;
pub mod mirror;
pub mod overlap;
pub mod pacing;
pub mod pagecache;
pub mod queue;
pub mod rate;
pub mod resolve;
pub mod restart;
pub mod rules;
pub mod run;
pub mod send;
pub mod stamps;
pub mod throttle;
pub mod verify;
