//! doppel-receiver: accepts agents over QUIC with pinned mutual TLS and applies their
//! change records beneath its replica roots (see README.md).
//!
//! - [`config`]: the `receiver.toml` file.
//! - [`server`]: listener and per-source sessions; [`serve`] is the whole daemon.
//! - [`session`]: the protocol of one connection.
//! - [`set`], [`apply`]: ordered application of records beneath a root, confined by
//!   [`beneath`]; [`fdcache`] and [`dirty`] are its bookkeeping; [`compare`] answers
//!   block checksums (mirror and verify).
//! - [`writer`], [`state`]: durability and acknowledgements.
//! - [`monitor`]: each source's health from heartbeats; [`failover`]: taking over a
//!   source's identity; [`control`]: the control socket for `status` and `failover`.

pub mod apply;
mod attrs;
pub mod beneath;
pub mod compare;
pub mod config;
pub mod control;
pub mod counters;
pub mod dirty;
pub mod failover;
pub mod fdcache;
pub mod metrics;
pub mod monitor;
mod nodes;
pub mod server;
pub mod session;
pub mod set;
pub mod state;
pub mod writer;

pub use apply::{Applier, ApplyError};
pub use config::{Config, SourceConfig};
pub use server::{serve, Server};
