//! Authentication tokens and TLS material: loading, verifying, reloading.
//!
//! Both can be reloaded on SIGHUP from the files they came from; a reload
//! that fails keeps what was loaded before.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use ring::digest;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use subtle::ConstantTimeEq;

pub use crate::config::{AuthSource, TlsSource};

/// The shared secret, kept only as its SHA-256 digest. Comparing digests in
/// constant time reveals neither the token nor its length.
#[derive(Clone)]
pub struct AuthToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(..)")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

impl AuthToken {
    /// A token from its text; surrounding whitespace is trimmed and an empty
    /// token is refused.
    pub fn new(text: &str) -> Result<AuthToken, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the auth token is empty".into());
        }
        Ok(AuthToken {
            digest: sha256(t.as_bytes()),
        })
    }

    /// Loads the token from its source.
    pub fn load(source: &AuthSource) -> Result<AuthToken, String> {
        match source {
            AuthSource::Literal(t) => AuthToken::new(t),
            AuthSource::File(path) => {
                let text = fs::read_to_string(path)
                    .map_err(|e| format!("cannot read auth token file {}: {e}", path.display()))?;
                AuthToken::new(&text)
                    .map_err(|e| format!("{e} (in auth token file {})", path.display()))
            }
        }
    }

    /// Whether `presented` is the token, in constant time.
    pub fn verify(&self, presented: &[u8]) -> bool {
        sha256(presented.trim_ascii()).ct_eq(&self.digest).into()
    }

    /// What a cluster peer sends to prove it knows the token: a digest
    /// bound to the cluster, so the token itself never crosses a peer link.
    pub fn peer_proof(&self, cluster_id: u64) -> [u8; 32] {
        let mut buf = [0u8; 8 + 8 + 32];
        buf[..8].copy_from_slice(b"dflkpeer");
        buf[8..16].copy_from_slice(&cluster_id.to_le_bytes());
        buf[16..].copy_from_slice(&self.digest);
        sha256(&buf)
    }

    /// Whether a peer's proof is right, in constant time.
    pub fn verify_peer_proof(&self, cluster_id: u64, proof: &[u8]) -> bool {
        proof.len() == 32 && bool::from(self.peer_proof(cluster_id).ct_eq(proof))
    }
}

/// Builds the TLS server configuration (TLS 1.2 and 1.3, the `ring`
/// provider) from PEM files: a certificate chain and a PKCS#8, PKCS#1 or
/// SEC1 private key that must match the certificate.
pub fn load_tls(source: &TlsSource) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&source.cert)?;
    let key = PrivateKeyDer::from_pem_file(&source.key).map_err(|e| {
        format!(
            "cannot read a private key from {}: {e}",
            source.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "the key in {} does not fit the certificate in {}: {e}",
                source.key.display(),
                source.cert.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// The TLS client side of cluster peer links: it trusts the certificates
/// in this node's own chain file, so nodes that share one certificate, or
/// whose chain files include the CA that signed them all, accept each
/// other. A peer's certificate must name its `--peers` address (an IP SAN).
pub fn peer_client_config(source: &TlsSource) -> Result<Arc<rustls::ClientConfig>, String> {
    let certs = read_certs(&source.cert)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            format!(
                "{}: cannot trust a certificate of it for peer links: {e}",
                source.cert.display()
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_trimmed_and_in_full() {
        let t = AuthToken::new("  s3cret\n").unwrap();
        assert!(t.verify(b"s3cret"));
        assert!(t.verify(b" s3cret "));
        assert!(!t.verify(b"s3cre"));
        assert!(!t.verify(b"s3cret!"));
        assert!(!t.verify(b""));
        assert!(!t.verify(&[b'x'; 65536]));
        assert!(AuthToken::new(" \t").is_err());
        assert_eq!(format!("{t:?}"), "AuthToken(..)");
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("dflockd-auth-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        fs::write(&f, "from-file\n").unwrap();
        let t = AuthToken::load(&AuthSource::File(f.clone())).unwrap();
        assert!(t.verify(b"from-file"));
        fs::write(&f, "\n").unwrap();
        assert!(AuthToken::load(&AuthSource::File(f.clone())).is_err());
        assert!(AuthToken::load(&AuthSource::File(dir.join("missing"))).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
