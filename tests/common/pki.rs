//! Test certificates: a CA and a leaf for `localhost` made with rcgen.
#![allow(dead_code)]

use std::path::PathBuf;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Server;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

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
        self.issue_for(tag, &["localhost"]);
    }

    /// Like [`issue`](Self::issue), the leaf naming `names` (host names or
    /// IP addresses).
    pub fn issue_for(&self, tag: &str, names: &[&str]) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("dflockd test CA {tag}"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
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

/// A blocking TLS client of the line protocol.
type TlsStream = StreamOwned<ClientConnection, TcpStream>;

pub struct TlsClient {
    pub reader: BufReader<TlsStream>,
}

pub fn client_config(ca: &Path, tls12_only: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    Arc::new(
        builder
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl TlsClient {
    pub fn connect(port: u16, ca: &Path) -> std::io::Result<TlsClient> {
        Self::connect_with(port, client_config(ca, false))
    }

    pub fn connect_with(port: u16, config: Arc<ClientConfig>) -> std::io::Result<TlsClient> {
        let conn =
            ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
        let sock = TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stream = StreamOwned::new(conn, sock);
        // Drive the handshake to completion now, so failures show here.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsClient {
            reader: BufReader::new(stream),
        })
    }

    pub fn cmd(&mut self, cmd: &str, key: &str, arg: &str) -> String {
        let s = self.reader.get_mut();
        s.write_all(format!("{cmd}\n{key}\n{arg}\n").as_bytes())
            .unwrap();
        s.flush().unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }
}
