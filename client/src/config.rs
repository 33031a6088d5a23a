//! Where the servers are and how to talk to them: the server list (shards,
//! each a list of addresses of one server or cluster), TLS, the auth token
//! and the timeouts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};
use crate::shard::shard_index;

/// The default server address, the servers' default bind address and port.
pub const DEFAULT_SERVER: &str = "127.0.0.1:6388";

/// The servers a key may live on.
///
/// A list of *shards*; a key lives on shard `crc32(key) % shards` (see
/// [`shard_index`]), the same choice as the Python and Go clients, so
/// programs in every language agree on where each key is. Each shard is one
/// server, or several addresses of one cluster, tried in turn.
///
/// The text form separates shards with `,` and the addresses of one
/// cluster with `|`:
///
/// ```
/// use dflockd_client::Servers;
/// let s: Servers = "10.0.0.1:6388|10.0.0.2:6388|10.0.0.3:6388,10.0.1.1:6388".parse()?;
/// assert_eq!(s.shards().len(), 2);
/// assert_eq!(s.shards()[0].len(), 3);
/// # Ok::<(), dflockd_client::Error>(())
/// ```
///
/// A shard without a port gets 6388; IPv6 addresses are written
/// `[::1]:6388`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Servers {
    shards: Vec<Vec<String>>,
}

impl Servers {
    /// One server (or cluster) given by its addresses.
    pub fn single<I, S>(addrs: I) -> Result<Servers>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let shard: Vec<String> = addrs.into_iter().map(Into::into).collect();
        Servers::from_shards(vec![shard])
    }

    /// Several shards, each given by its addresses.
    pub fn from_shards(shards: Vec<Vec<String>>) -> Result<Servers> {
        if shards.is_empty() || shards.iter().any(|s| s.is_empty()) {
            return Err(Error::InvalidInput("empty server list".into()));
        }
        let shards = shards
            .into_iter()
            .map(|s| s.into_iter().map(|a| with_port(a.trim())).collect())
            .collect::<Result<Vec<Vec<String>>>>()?;
        Ok(Servers { shards })
    }

    /// The shards, each a list of addresses.
    pub fn shards(&self) -> &[Vec<String>] {
        &self.shards
    }

    /// The addresses of the shard that holds `key`.
    pub fn for_key(&self, key: &str) -> &[String] {
        &self.shards[shard_index(key, self.shards.len())]
    }
}

impl Default for Servers {
    fn default() -> Servers {
        Servers {
            shards: vec![vec![DEFAULT_SERVER.to_string()]],
        }
    }
}

impl std::str::FromStr for Servers {
    type Err = Error;

    fn from_str(s: &str) -> Result<Servers> {
        let shards: Vec<Vec<String>> = s
            .split(',')
            .map(|shard| {
                shard
                    .split('|')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(String::from)
                    .collect()
            })
            .collect();
        Servers::from_shards(shards).map_err(|_| {
            Error::InvalidInput(format!(
                "bad server list {s:?}: expected HOST:PORT entries, `,` between shards, `|` between addresses of one cluster"
            ))
        })
    }
}

impl std::fmt::Display for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards: Vec<String> = self.shards.iter().map(|s| s.join("|")).collect();
        f.write_str(&shards.join(","))
    }
}

fn with_port(addr: &str) -> Result<String> {
    if addr.is_empty() || addr.chars().any(char::is_whitespace) {
        return Err(Error::InvalidInput(format!("bad address {addr:?}")));
    }
    let has_port = match addr.rfind(']') {
        Some(close) => addr[close..].contains(':'),
        None => addr.matches(':').count() == 1,
    };
    Ok(if has_port {
        addr.to_string()
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:6388") // bare IPv6
    } else {
        format!("{addr}:6388")
    })
}

/// The host part of `host:port`, without IPv6 brackets.
pub(crate) fn host_of(addr: &str) -> &str {
    let host = match addr.rfind(':') {
        Some(i) => &addr[..i],
        None => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// TLS settings for connections to servers with a certificate.
#[derive(Clone)]
pub struct Tls {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Trust the CA certificates in a PEM file (the server's own certificate
    /// works too, for a self-signed server).
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Tls> {
        let path = path.as_ref();
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| Error::Tls(format!("cannot read CA file {}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert
                .map_err(|e| Error::Tls(format!("bad PEM in CA file {}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| {
                Error::Tls(format!("bad CA certificate in {}: {e}", path.display()))
            })?;
        }
        if roots.is_empty() {
            return Err(Error::Tls(format!(
                "no certificate in CA file {}",
                path.display()
            )));
        }
        Ok(Tls::from_roots(roots))
    }

    /// Trust the system's CA bundle (`SSL_CERT_FILE`, else the usual
    /// locations of Debian, Fedora, Alpine, SUSE and Arch).
    pub fn system_roots() -> Result<Tls> {
        const BUNDLES: &[&str] = &[
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/ca-bundle.pem",
            "/etc/ssl/cert.pem",
            "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        ];
        if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
            return Tls::with_ca_file(file);
        }
        match BUNDLES.iter().find(|p| Path::new(p).is_file()) {
            Some(p) => Tls::with_ca_file(p),
            None => Err(Error::Tls(
                "no system CA bundle found; give a CA file".into(),
            )),
        }
    }

    /// Accept any certificate. The connection is encrypted but the server
    /// is not authenticated: for tests and first set-ups only.
    pub fn insecure() -> Tls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        Tls {
            config: Arc::new(config),
            server_name: None,
        }
    }

    /// Use a prepared rustls configuration.
    pub fn from_config(config: Arc<ClientConfig>) -> Tls {
        Tls {
            config,
            server_name: None,
        }
    }

    /// Check the certificate against this name instead of the host of the
    /// address dialled (e.g. dial `127.0.0.1`, verify `localhost`).
    pub fn server_name(mut self, name: &str) -> Result<Tls> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| Error::Tls(format!("invalid TLS server name {name:?}")))?;
        self.server_name = Some(name);
        Ok(self)
    }

    fn from_roots(roots: RootCertStore) -> Tls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Tls {
            config: Arc::new(config),
            server_name: None,
        }
    }
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How to reach the servers: addresses, security and timeouts.
///
/// ```
/// use std::time::Duration;
/// use dflockd_client::Config;
/// let cfg = Config::new("127.0.0.1:6388")?
///     .auth_token("s3cret")
///     .io_timeout(Duration::from_secs(5));
/// assert_eq!(cfg.servers().shards().len(), 1);
/// # Ok::<(), dflockd_client::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) servers: Servers,
    pub(crate) auth_token: Option<String>,
    pub(crate) tls: Option<Tls>,
    pub(crate) connect_timeout: Duration,
    pub(crate) io_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            servers: Servers::default(),
            auth_token: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// A configuration for the servers in `servers` (see [`Servers`] for
    /// the syntax), with no TLS, no token and default timeouts.
    pub fn new(servers: &str) -> Result<Config> {
        Ok(Config {
            servers: servers.parse()?,
            ..Config::default()
        })
    }

    /// A configuration from the environment: `DFLOCK_SERVERS` (default
    /// `127.0.0.1:6388`), `DFLOCK_AUTH_TOKEN`, and `DFLOCK_TLS_CA` (a CA
    /// file; TLS is used when it is set).
    pub fn from_env() -> Result<Config> {
        let mut cfg = Config::default();
        if let Some(s) = env_nonempty("DFLOCK_SERVERS") {
            cfg.servers = s.parse()?;
        }
        if let Some(t) = env_nonempty("DFLOCK_AUTH_TOKEN") {
            cfg.auth_token = Some(t);
        }
        if let Some(ca) = env_nonempty("DFLOCK_TLS_CA") {
            cfg.tls = Some(Tls::with_ca_file(ca)?);
        }
        Ok(cfg)
    }

    /// The server list.
    pub fn servers(&self) -> &Servers {
        &self.servers
    }

    /// Sets the server list.
    pub fn with_servers(mut self, servers: Servers) -> Config {
        self.servers = servers;
        self
    }

    /// Authenticates every connection with this token.
    pub fn auth_token(mut self, token: impl Into<String>) -> Config {
        self.auth_token = Some(token.into());
        self
    }

    /// Connects with TLS.
    pub fn tls(mut self, tls: Tls) -> Config {
        self.tls = Some(tls);
        self
    }

    /// How long one connection attempt (TCP, TLS handshake and auth) may
    /// take. Default 5 s; at least 1 ms.
    pub fn connect_timeout(mut self, t: Duration) -> Config {
        self.connect_timeout = t.max(Duration::from_millis(1));
        self
    }

    /// How long a reply may take beyond the time the request itself may
    /// wait (an acquire's timeout). Default 10 s; at least 1 ms;
    /// `Duration::MAX` waits without limit.
    pub fn io_timeout(mut self, t: Duration) -> Config {
        self.io_timeout = t.max(Duration::from_millis(1));
        self
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_parse() {
        let s: Servers = "a:1,b|c:3, d".parse().unwrap();
        assert_eq!(
            s.shards(),
            &[
                vec!["a:1".to_string()],
                vec!["b:6388".to_string(), "c:3".to_string()],
                vec!["d:6388".to_string()],
            ]
        );
        assert_eq!(s.to_string(), "a:1,b:6388|c:3,d:6388");
        let v6: Servers = "[::1]:7000|::1".parse().unwrap();
        assert_eq!(v6.shards()[0], vec!["[::1]:7000", "[::1]:6388"]);
        assert!("".parse::<Servers>().is_err());
        assert!("a,,b".parse::<Servers>().is_err());
        assert!("a b:1".parse::<Servers>().is_err());
    }

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("localhost:6388"), "localhost");
        assert_eq!(host_of("[::1]:6388"), "::1");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
    }
}
