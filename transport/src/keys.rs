//! Key generation, fingerprints and loading an identity from PEM files.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Generates a self-signed certificate with subject alternative name `name` and writes
/// `out_dir/cert.pem` and `out_dir/key.pem` (mode 0600). Returns the fingerprint to put in
/// the peer's config.
///
/// Existing files are never overwritten: replacing a key silently would lock out every
/// peer that pinned the old fingerprint.
pub fn keygen(out_dir: &Path, name: &str) -> anyhow::Result<String> {
    let key = rcgen::generate_simple_self_signed(vec![name.to_string()]).with_context(|| {
        format!(
            "cannot generate a certificate for name {name:?}; use a DNS-like name such as \"web1\""
        )
    })?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create key directory {}", out_dir.display()))?;
    let cert_path = out_dir.join("cert.pem");
    let key_path = out_dir.join("key.pem");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!(
                "{} already exists; remove it first if you really want a new key \
                 (every peer pinning the old fingerprint must then be updated), \
                 or choose another output directory",
                p.display()
            );
        }
    }
    // The key first, so that a failure never leaves a certificate without its key.
    write_new(&key_path, key.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, key.cert.pem().as_bytes(), 0o644)?;
    Ok(fingerprint(key.cert.der()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Lowercase hex SHA-256 of a certificate's DER encoding (64 characters).
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Normalises a fingerprint written in a config: upper or lower case, with or without `:`
/// separators, with or without a `sha256:` prefix. Returns the canonical lowercase form.
pub fn parse_fingerprint(s: &str) -> anyhow::Result<String> {
    let t = s.trim();
    let t = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
        _ => t,
    };
    let hex: String = t.chars().filter(|&c| c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "invalid certificate fingerprint {s:?}: expected the 64 hex digits of a SHA-256 \
             (optionally with ':' separators or a \"sha256:\" prefix), as printed by `keygen`"
        );
    }
    Ok(hex.to_ascii_lowercase())
}

/// A certificate chain and its private key: who we are in the TLS handshake.
#[derive(Debug)]
pub struct Identity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM certificate (chain, leaf first) and a PEM private key (PKCS#8, SEC1 or
    /// PKCS#1), and checks that they belong together.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> anyhow::Result<Identity> {
        let chain = CertificateDer::pem_file_iter(cert_pem)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .with_context(|| {
                format!(
                    "cannot read certificate {}; generate one with `keygen --out DIR`",
                    cert_pem.display()
                )
            })?;
        if chain.is_empty() {
            bail!(
                "{} holds no PEM certificate (expected a \"BEGIN CERTIFICATE\" block)",
                cert_pem.display()
            );
        }
        let key = PrivateKeyDer::from_pem_file(key_pem).with_context(|| {
            format!(
                "cannot read private key {}; it must be the key.pem written by `keygen` \
                 next to the certificate",
                key_pem.display()
            )
        })?;
        let id = Identity { chain, key };
        id.check_pair().with_context(|| {
            format!(
                "certificate {} and key {} do not belong together",
                cert_pem.display(),
                key_pem.display()
            )
        })?;
        Ok(id)
    }

    /// Builds an identity from DER values already in memory (tests, embedding).
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Identity { chain, key }
    }

    /// Fingerprint of our own leaf certificate: what the peer must pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    fn check_pair(&self) -> anyhow::Result<()> {
        let signer = crate::crypto_provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .context("unsupported private key type")?;
        rustls::sign::CertifiedKey::new(self.chain.clone(), signer).keys_match()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalised() {
        let fp = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&fp).unwrap(), fp);
        assert_eq!(parse_fingerprint(&fp.to_uppercase()).unwrap(), fp);
        let colons = fp
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), fp);
        assert_eq!(parse_fingerprint(&format!("SHA256:{colons}")).unwrap(), fp);
        assert_eq!(parse_fingerprint(&format!(" sha256:{fp}\n")).unwrap(), fp);
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33), "sha256:"] {
            let e = parse_fingerprint(bad).unwrap_err().to_string();
            assert!(e.contains("64 hex digits"), "{e}");
        }
    }

    #[test]
    fn keygen_writes_loadable_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let fp = keygen(dir.path(), "web1").unwrap();
        assert_eq!(fp.len(), 64);
        let id = Identity::load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        assert_eq!(id.fingerprint(), fp);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = keygen(dir.path(), "web1").unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        keygen(a.path(), "a").unwrap();
        keygen(b.path(), "b").unwrap();
        let e = Identity::load(&a.path().join("cert.pem"), &b.path().join("key.pem")).unwrap_err();
        assert!(format!("{e:#}").contains("do not belong together"), "{e:#}");
    }
}
