//! rustls verifiers that trust exactly the pinned certificate fingerprints.
//!
//! Chain building, names and validity dates are deliberately ignored: the certificates
//! are self-signed and the fingerprint in the config *is* the trust decision. What is not
//! skipped is the handshake signature check, which proves the peer holds the private key
//! of the pinned certificate rather than just a copy of the (public) certificate.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::keys::fingerprint;

/// Why a peer certificate was refused; carried inside the rustls error so that it reaches
/// the logs of whoever called `connect` or accepted the connection.
#[derive(Debug)]
pub struct NotPinned {
    pub role: &'static str,
    pub presented: String,
    pub hint: String,
}

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} certificate sha256 {} is not pinned; {}",
            self.role, self.presented, self.hint
        )
    }
}

impl std::error::Error for NotPinned {}

fn refuse(err: NotPinned) -> rustls::Error {
    tracing::warn!("{err}");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Client side: accepts only the server certificate with fingerprint `pinned`.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pinned: String,
    algs: WebPkiSupportedAlgorithms,
    // rustls reports a custom error only through its Debug form; keep the readable one
    // so that `connect` can tell the operator what happened in plain words.
    refused: Mutex<Option<String>>,
}

impl PinnedServerVerifier {
    pub fn new(pinned: String) -> Self {
        PinnedServerVerifier {
            pinned,
            algs: crate::crypto_provider().signature_verification_algorithms,
            refused: Mutex::new(None),
        }
    }

    /// Why the last server certificate was refused, if one was.
    pub fn refusal(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if fp == self.pinned {
            return Ok(ServerCertVerified::assertion());
        }
        let err = NotPinned {
            role: "server",
            presented: fp,
            hint: format!(
                "expected {}; if the receiver's key was regenerated, put its new fingerprint \
                 (printed by `doppel-receiver keygen`) in the agent config",
                self.pinned
            ),
        };
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
        Err(refuse(err))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only, but answer correctly rather than trust that.
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: requires a client certificate whose fingerprint is one of `allowed`.
#[derive(Debug)]
pub struct PinnedClientVerifier {
    allowed: Vec<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedClientVerifier {
    pub fn new(allowed: Vec<String>) -> Self {
        PinnedClientVerifier {
            allowed,
            algs: crate::crypto_provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Self-signed certificates: there is no CA to hint at.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if self.allowed.contains(&fp) {
            return Ok(ClientCertVerified::assertion());
        }
        Err(refuse(NotPinned {
            role: "client",
            presented: fp,
            hint:
                "add it as the `fingerprint` of a [[source]] in the receiver config if this agent \
             should be allowed"
                    .to_string(),
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
