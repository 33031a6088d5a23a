//! Test certificates: a CA and a leaf for `localhost` made with rcgen.
#![allow(dead_code)]

use std::path::PathBuf;

use super::Server;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA and a leaf certificate for `localhost` it signed, written as PEM.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("dflockd-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.issue("a");
        pki
    }

    /// Makes CA `tag` and a leaf it signed: `<tag>-ca.pem`, `<tag>-cert.pem`,
    /// `<tag>-key.pem`.
    pub fn issue(&self, tag: &str) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("dflockd test CA {tag}"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        std::fs::write(self.path(&format!("{tag}-ca.pem")), ca.pem()).unwrap();
        std::fs::write(self.path(&format!("{tag}-cert.pem")), leaf.pem()).unwrap();
        std::fs::write(
            self.path(&format!("{tag}-key.pem")),
            leaf_key.serialize_pem(),
        )
        .unwrap();
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn s(&self, file: &str) -> String {
        self.path(file).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server with the leaf certificate of CA `a` (and `extra` flags).
pub fn tls_server(pki: &Pki, extra: &[&str]) -> Server {
    let cert = pki.s("a-cert.pem");
    let key = pki.s("a-key.pem");
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Server::start(&args)
}
