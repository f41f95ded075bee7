//! QUIC transport (see README.md).
