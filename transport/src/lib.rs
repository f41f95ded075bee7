//! QUIC transport between `doppel-agent` and `doppel-receiver` (see README.md).
//!
//! Both ends authenticate with self-signed certificates and *pin* each other by the
//! SHA-256 fingerprint of the certificate: there is no CA, no hostname check and no expiry
//! check, because the operator copies fingerprints between configs by hand (or by config
//! management) and that is the whole trust model.
//!
//! - [`keys`]: key generation, fingerprints, loading an [`Identity`] from PEM files.
//! - [`verify`]: the rustls verifiers that compare fingerprints.
//! - [`endpoint`]: QUIC endpoints with the transport settings doppel needs.
//! - [`framed`]: [`wire::Frame`](doppel_common::wire::Frame)s over a bidirectional stream.
//! - [`close`]: application close codes both sides agree on.
//! - `socket`: the UDP socket under both endpoints (buffer sizes, GSO sends the
//!   kernel accepts).

pub mod close;
pub mod endpoint;
pub mod framed;
pub mod keys;
mod socket;
pub mod verify;

pub use endpoint::{
    connect, connect_tuned, peer_fingerprint, server_endpoint, server_endpoint_tuned, Tuning, ALPN,
};
pub use framed::{FrameReceiver, FrameSender, FramedStream};
pub use keys::{fingerprint, keygen, parse_fingerprint, Identity};

/// The one crypto provider doppel uses, passed explicitly to every rustls config so that
/// nothing depends on which provider some other crate installed as the process default.
pub(crate) fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
