//! Set-up shared by the transport tests: key pairs in a temporary directory and a
//! server endpoint on loopback.

use std::path::Path;

use doppel_transport::{keygen, server_endpoint, Identity};

/// A fresh key pair and certificate named `name`, written beneath `dir`.
pub fn identity(dir: &Path, name: &str) -> Identity {
    let d = dir.join(name);
    keygen(&d, name).unwrap();
    Identity::load(&d.join("cert.pem"), &d.join("key.pem")).unwrap()
}

/// A server endpoint on 127.0.0.1 (any port) with `server`'s certificate, admitting only
/// `client`'s.
pub fn loopback_server(server: &Identity, client: &Identity) -> quinn::Endpoint {
    server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        server,
        vec![client.fingerprint()],
    )
    .unwrap()
}
