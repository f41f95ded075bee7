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
    connect, connect_tuned, connect_with_endpoint, peer_fingerprint, server_endpoint,
    server_endpoint_tuned, Tuning, ALPN,
};
pub use framed::{FrameReceiver, FrameSender, FramedStream};
pub use keys::{fingerprint, keygen, parse_fingerprint, Identity};

/// Seeds the crypto library's random generator now, not in the first handshake. aws-lc
/// does it on first use: 60 µs as this workspace builds it (OS entropy only, see
/// `.cargo/config.toml`), 45 ms of CPU-jitter timing in aws-lc's default build. Each
/// daemon calls this as it starts.
pub fn warm_up() {
    let mut seed = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut seed);
}

/// The one crypto provider doppel uses, passed explicitly to every rustls config so that
/// nothing depends on which provider some other crate installed as the process default.
///
/// AES-128-GCM is preferred over AES-256-GCM (rustls' default first choice): both are
/// TLS 1.3's standard suites, and 128-bit AES does 10 rounds per block instead of 14,
/// which is about a fifth less CPU for every byte replicated. Both ends use this order,
/// so it is the suite negotiated; a peer offering only the others still gets them.
pub(crate) fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != cipher_suite::TLS13_AES_128_GCM_SHA256.suite());
    std::sync::Arc::new(provider)
}
