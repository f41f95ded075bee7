//! Records the eBPF program writes into the ring buffer. `#[repr(C)]`, no_std.
//! (Owned by the capture work: see agent/src/capture.)
