//! Types shared across doppel's crates.
//!
//! - [`abi`]: `#[repr(C)]` records written by the eBPF program into the ring buffer
//!   (no_std, no allocation; the kernel side builds this crate without features).
//! - [`event`]: the user-space view of a captured change, decoded from the ABI.
//! - [`wire`]: the replication protocol spoken between agent and receiver.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod abi;
#[cfg(feature = "user")]
pub mod event;
#[cfg(feature = "user")]
pub mod wire;
