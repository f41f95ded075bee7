//! Application close codes (`CONNECTION_CLOSE` error codes) shared by agent and receiver.
//!
//! The human-readable reason travels in the close frame and, before it, in a
//! [`Frame::Refused`](doppel_common::wire::Frame::Refused); the code tells the peer's
//! software what to do next without parsing text.

use quinn::VarInt;

/// The session ended normally (stream finished, nothing wrong).
pub const DONE: VarInt = VarInt::from_u32(0);
/// The peer is not allowed or spoke the protocol wrongly. Retrying unchanged will fail
/// again: an operator has to fix a config or upgrade one side.
pub const REFUSED: VarInt = VarInt::from_u32(1);
/// The receiver could not apply or persist records (disk full, I/O error). The agent keeps
/// its unacknowledged records and should reconnect later and resend them.
pub const RETRY_LATER: VarInt = VarInt::from_u32(2);
/// The receiver is shutting down; reconnect later.
pub const SHUTDOWN: VarInt = VarInt::from_u32(3);
/// A newer connection from the same source replaced this one.
pub const SUPERSEDED: VarInt = VarInt::from_u32(4);
/// The receiver took over this source's identity (failover): it accepts nothing from the
/// source until an operator fails back. Reconnecting does not help.
pub const FAILED_OVER: VarInt = VarInt::from_u32(5);
