//! Command-line flags and `DFLOCKD_*` environment variables, parsed once into
//! a plain [`Config`]. An explicit flag beats its variable, which beats the
//! default. Every bad value is an error that names the flag or variable.

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// One setting: its flag, the variables that can also set it, its default.
struct Spec {
    flag: &'static str,
    envs: &'static [&'static str],
    default: &'static str,
    meta: &'static str,
    help: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        flag: "host",
        envs: &["DFLOCKD_HOST"],
        default: "127.0.0.1",
        meta: "ADDR",
        help: "address to listen on (0.0.0.0 or :: for all interfaces)",
    },
    Spec {
        flag: "port",
        envs: &["DFLOCKD_PORT"],
        default: "6388",
        meta: "PORT",
        help: "TCP port; 0 picks a free port (the bound address is logged)",
    },
    Spec {
        flag: "default-lease-ttl",
        envs: &["DFLOCKD_DEFAULT_LEASE_TTL_S"],
        default: "33",
        meta: "SECS",
        help: "lease of a grant that names none",
    },
    Spec {
        flag: "lease-sweep-interval",
        envs: &["DFLOCKD_LEASE_SWEEP_INTERVAL_S"],
        default: "1",
        meta: "SECS",
        help: "accepted for compatibility; leases expire on their own timers",
    },
    Spec {
        flag: "gc-interval",
        envs: &["DFLOCKD_GC_INTERVAL_S", "DFLOCKD_GC_LOOP_SLEEP"],
        default: "5",
        meta: "SECS",
        help: "how often idle keys are pruned, at most",
    },
    Spec {
        flag: "gc-max-idle",
        envs: &["DFLOCKD_GC_MAX_IDLE_S", "DFLOCKD_GC_MAX_UNUSED_TIME"],
        default: "60",
        meta: "SECS",
        help: "forget a key with no holder and no waiter after this long",
    },
    Spec {
        flag: "max-locks",
        envs: &["DFLOCKD_MAX_LOCKS"],
        default: "1024",
        meta: "N",
        help: "most distinct keys (locks and semaphores); 0 = unlimited",
    },
    Spec {
        flag: "max-waiters",
        envs: &["DFLOCKD_MAX_WAITERS"],
        default: "0",
        meta: "N",
        help: "most waiters per key; 0 = unlimited",
    },
    Spec {
        flag: "max-connections",
        envs: &["DFLOCKD_MAX_CONNECTIONS"],
        default: "0",
        meta: "N",
        help: "most client connections; over it a new one is closed at once; 0 = unlimited",
    },
    Spec {
        flag: "max-holds-per-connection",
        envs: &["DFLOCKD_MAX_HOLDS_PER_CONNECTION"],
        default: "1024",
        meta: "N",
        help: "most locks and semaphore slots one connection may hold at once (error_max_locks beyond); 0 = unlimited",
    },
    Spec {
        flag: "max-subscriptions",
        envs: &["DFLOCKD_MAX_SUBSCRIPTIONS"],
        default: "0",
        meta: "N",
        help: "most signal subscriptions per connection; 0 = unlimited",
    },
    Spec {
        flag: "max-output-buffer",
        envs: &["DFLOCKD_MAX_OUTPUT_BUFFER"],
        default: "1048576",
        meta: "BYTES",
        help: "a connection with more unsent signal output than this is disconnected as a slow consumer",
    },
    Spec {
        flag: "max-connections-per-ip",
        envs: &["DFLOCKD_MAX_CONNECTIONS_PER_IP"],
        default: "0",
        meta: "N",
        help: "most connections from one IP address; over it a new one is closed at once; 0 = unlimited",
    },
    Spec {
        flag: "tls-cert",
        envs: &["DFLOCKD_TLS_CERT"],
        default: "",
        meta: "PATH",
        help: "PEM certificate chain; with --tls-key, every connection uses TLS (reloaded on SIGHUP)",
    },
    Spec {
        flag: "tls-key",
        envs: &["DFLOCKD_TLS_KEY"],
        default: "",
        meta: "PATH",
        help: "PEM private key (PKCS#8, PKCS#1 or SEC1) for --tls-cert",
    },
    Spec {
        flag: "auth-token",
        envs: &["DFLOCKD_AUTH_TOKEN"],
        default: "",
        meta: "TOKEN",
        help: "shared secret every connection must present first with `auth` (prefer --auth-token-file)",
    },
    Spec {
        flag: "auth-token-file",
        envs: &["DFLOCKD_AUTH_TOKEN_FILE"],
        default: "",
        meta: "PATH",
        help: "file holding the shared secret (trimmed; re-read on SIGHUP)",
    },
    Spec {
        flag: "metrics-addr",
        envs: &["DFLOCKD_METRICS_ADDR"],
        default: "",
        meta: "HOST:PORT",
        help: "serve Prometheus /metrics, /health and /ready over HTTP here (off by default)",
    },
    Spec {
        flag: "read-timeout",
        envs: &["DFLOCKD_READ_TIMEOUT_S", "DFLOCKD_DFLOCKD_READ_TIMEOUT_S"],
        default: "23",
        meta: "SECS",
        help: "close a connection idle or mid-request this long (not while it waits for a grant); 0 = never",
    },
    Spec {
        flag: "write-timeout",
        envs: &["DFLOCKD_WRITE_TIMEOUT_S"],
        default: "5",
        meta: "SECS",
        help: "close a connection whose output makes no progress this long; 0 = never",
    },
    Spec {
        flag: "shutdown-timeout",
        envs: &["DFLOCKD_SHUTDOWN_TIMEOUT_S"],
        default: "30",
        meta: "SECS",
        help: "on SIGTERM/SIGINT, exit after this long even if locks are held; 0 = wait forever",
    },
    Spec {
        flag: "auto-release-on-disconnect",
        envs: &["DFLOCKD_AUTO_RELEASE_ON_DISCONNECT"],
        default: "true",
        meta: "BOOL",
        help: "release a connection's locks when it closes (--no-auto-release-on-disconnect to keep them until their leases end)",
    },
    Spec {
        flag: "debug",
        envs: &["DFLOCKD_DEBUG"],
        default: "false",
        meta: "BOOL",
        help: "log at debug level (RUST_LOG, if set, takes precedence)",
    },
    Spec {
        flag: "node-id",
        envs: &["DFLOCKD_NODE_ID"],
        default: "",
        meta: "N",
        help: "cluster mode: this node's id, 1 to 65535; required with --peers, 1 if --data-dir is given alone",
    },
    Spec {
        flag: "peers",
        envs: &["DFLOCKD_PEERS"],
        default: "",
        meta: "ID=HOST:PORT,...",
        help: "cluster mode: every voting member, this node included (its entry is the address its peer listener binds); the same list on every node; needs --node-id and --data-dir",
    },
    Spec {
        flag: "data-dir",
        envs: &["DFLOCKD_DATA_DIR"],
        default: "",
        meta: "DIR",
        help: "cluster mode: the Raft log, hard state and snapshots; alone (no --peers), a durable one-node cluster",
    },
    Spec {
        flag: "heartbeat-interval",
        envs: &["DFLOCKD_HEARTBEAT_INTERVAL_MS"],
        default: "100",
        meta: "MS",
        help: "cluster mode: the leader's heartbeat period (checked, but no effect without --peers or --data-dir)",
    },
    Spec {
        flag: "election-timeout",
        envs: &["DFLOCKD_ELECTION_TIMEOUT_MS"],
        default: "1000",
        meta: "MS",
        help: "cluster mode: a follower that hears no leader this long starts an election; at least twice --heartbeat-interval",
    },
    Spec {
        flag: "snapshot-entries",
        envs: &["DFLOCKD_SNAPSHOT_ENTRIES"],
        default: "10000",
        meta: "N",
        help: "cluster mode: compact the log into a snapshot of the lock state every N applied entries (or 64 MiB of log)",
    },
];

/// Where the shared secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthSource {
    /// Given on the command line or in the environment.
    Literal(String),
    /// Read (and re-read on SIGHUP) from a file.
    File(PathBuf),
}

/// Where the TLS certificate chain and key come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The highest node id: a connection id carries its node's id in its top 16
/// bits (docs/CLUSTER.md).
pub const MAX_NODE_ID: u64 = 0xFFFF;

/// The longest heartbeat interval or election timeout, in milliseconds (so
/// that multiples of them never overflow).
const MAX_MS: u64 = u32::MAX as u64;

/// One voting member of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub addr: SocketAddr,
}

/// Cluster mode's settings: present when `--peers` or `--data-dir` is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub node_id: u64,
    /// Every voting member, this node included, sorted by id. Empty with
    /// `--data-dir` alone (a one-node cluster of `node_id`).
    pub peers: Vec<Peer>,
    pub data_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    /// Applied entries between snapshots.
    pub snapshot_entries: u64,
}

impl ClusterSettings {
    /// The address this node's peer listener binds (None for a one-node
    /// cluster).
    pub fn own_addr(&self) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|p| p.id == self.node_id)
            .map(|p| p.addr)
    }

    /// The member ids, ascending (just `[node_id]` for a one-node cluster).
    pub fn voters(&self) -> Vec<u64> {
        if self.peers.is_empty() {
            return vec![self.node_id];
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids
    }

    /// A stable id of the member list: FNV-1a 64 of the `id=addr` entries in
    /// id order joined by `,` (`addr` as resolved, e.g. `1=127.0.0.1:7001` or
    /// `2=[::1]:7002`); for a one-node cluster, of `solo:<id>`. Never 0.
    ///
    /// Host names are resolved when the flags are parsed, so a name must
    /// resolve to the same address on every node for the ids to agree.
    pub fn cluster_id(&self) -> u64 {
        let text = if self.peers.is_empty() {
            format!("solo:{}", self.node_id)
        } else {
            let mut peers: Vec<&Peer> = self.peers.iter().collect();
            peers.sort_by_key(|p| p.id);
            peers
                .iter()
                .map(|p| format!("{}={}", p.id, p.addr))
                .collect::<Vec<_>>()
                .join(",")
        };
        match fnv1a64(text.as_bytes()) {
            0 => 1,
            h => h,
        }
    }
}

/// FNV-1a, 64 bits.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The server's settings, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub default_lease_ttl_s: u64,
    pub gc_interval_s: u64,
    pub gc_max_idle_s: u64,
    pub max_locks: usize,
    pub max_waiters: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_subscriptions: usize,
    pub max_holds_per_connection: usize,
    pub max_output_buffer: usize,
    pub read_timeout_s: u64,
    pub write_timeout_s: u64,
    pub shutdown_timeout_s: u64,
    pub auto_release_on_disconnect: bool,
    pub debug: bool,
    pub tls: Option<TlsSource>,
    pub auth: Option<AuthSource>,
    /// `HOST:PORT` of the monitoring endpoint, if any.
    pub metrics_addr: Option<String>,
    /// Cluster mode, if `--peers` or `--data-dir` is given; `None` is the
    /// single node.
    pub cluster: Option<ClusterSettings>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Run(Box<Config>),
    Help,
    Version,
}

/// A startup error; the message names the flag or variable at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where a value came from, for error messages.
enum Source {
    Flag(&'static str),
    Env(&'static str),
    Default(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(name) => write!(f, "--{name}"),
            Source::Env(name) => write!(f, "environment variable {name}"),
            Source::Default(name) => write!(f, "default of --{name}"),
        }
    }
}

/// Parses `args` (without the program name) and the environment as given by
/// `env`.
pub fn parse<I, E>(args: I, env: E) -> Result<Action, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
    E: Fn(&str) -> Option<String>,
{
    use lexopt::prelude::*;
    let mut given: Vec<Option<String>> = vec![None; SPECS.len()];
    let mut parser = lexopt::Parser::from_args(args);
    let err = |e: lexopt::Error| ConfigError(e.to_string());
    while let Some(arg) = parser.next().map_err(err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Action::Help),
            Short('V') | Long("version") => return Ok(Action::Version),
            Long(name) => {
                let (name, negated) = match name.strip_prefix("no-") {
                    Some(rest) if is_bool(rest) => (rest.to_owned(), true),
                    _ => (name.to_owned(), false),
                };
                let Some(i) = SPECS.iter().position(|s| s.flag == name) else {
                    return Err(ConfigError(format!("unknown flag --{name} (see --help)")));
                };
                let value = if negated {
                    if parser.optional_value().is_some() {
                        return Err(ConfigError(format!("--no-{name} takes no value")));
                    }
                    "false".to_owned()
                } else if is_bool(&name) {
                    match parser.optional_value() {
                        Some(v) => v.string().map_err(err)?,
                        None => "true".to_owned(),
                    }
                } else {
                    parser.value().map_err(err)?.string().map_err(err)?
                };
                given[i] = Some(value);
            }
            other => return Err(ConfigError(other.unexpected().to_string())),
        }
    }
    let value = |flag: &'static str| -> (String, Source) {
        let i = SPECS
            .iter()
            .position(|s| s.flag == flag)
            .expect("known flag");
        let spec = &SPECS[i];
        if let Some(v) = &given[i] {
            return (v.clone(), Source::Flag(spec.flag));
        }
        for &name in spec.envs {
            if let Some(v) = env(name) {
                return (v, Source::Env(name));
            }
        }
        (spec.default.to_owned(), Source::Default(spec.flag))
    };
    let number = |flag: &'static str, min: u64, max: u64| -> Result<u64, ConfigError> {
        let (v, src) = value(flag);
        match v.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError(format!(
                "invalid value {v:?} for {src}: expected an integer from {min} to {max}"
            ))),
        }
    };
    let boolean = |flag: &'static str| -> Result<bool, ConfigError> {
        let (v, src) = value(flag);
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" | "on" => Ok(true),
            "0" | "no" | "false" | "off" => Ok(false),
            _ => Err(ConfigError(format!(
                "invalid value {v:?} for {src}: expected true/false, yes/no or 1/0"
            ))),
        }
    };
    const SECS: u64 = crate::protocol::request::MAX_NUMBER;
    const COUNT: u64 = u32::MAX as u64;
    let (host, host_src) = value("host");
    if host.trim().is_empty() {
        return Err(ConfigError(format!("empty value for {host_src}")));
    }
    // Validated here for the error message; the value itself is unused.
    number("lease-sweep-interval", 0, SECS)?;
    // Checked even when they have no effect (no cluster mode).
    let heartbeat_interval_ms = number("heartbeat-interval", 1, MAX_MS)?;
    let election_timeout_ms = number("election-timeout", 1, MAX_MS)?;
    if election_timeout_ms < 2 * heartbeat_interval_ms {
        let (_, hb_src) = value("heartbeat-interval");
        let (_, el_src) = value("election-timeout");
        return Err(ConfigError(format!(
            "invalid value {election_timeout_ms} for {el_src}: must be at least twice \
             the heartbeat interval ({heartbeat_interval_ms} ms, {hb_src})"
        )));
    }
    let snapshot_entries = number("snapshot-entries", 1, u32::MAX as u64)?;
    let cluster = cluster_settings(&value, heartbeat_interval_ms, election_timeout_ms)?.map(|c| {
        ClusterSettings {
            snapshot_entries,
            ..c
        }
    });
    Ok(Action::Run(Box::new(Config {
        host: host.trim().to_owned(),
        port: number("port", 0, u16::MAX as u64)? as u16,
        default_lease_ttl_s: number("default-lease-ttl", 1, SECS)?,
        gc_interval_s: number("gc-interval", 1, SECS)?,
        gc_max_idle_s: number("gc-max-idle", 0, SECS)?,
        max_locks: number("max-locks", 0, COUNT)? as usize,
        max_waiters: number("max-waiters", 0, COUNT)? as usize,
        max_connections: number("max-connections", 0, COUNT)? as usize,
        max_connections_per_ip: number("max-connections-per-ip", 0, COUNT)? as usize,
        max_subscriptions: number("max-subscriptions", 0, COUNT)? as usize,
        max_holds_per_connection: number("max-holds-per-connection", 0, COUNT)? as usize,
        max_output_buffer: number("max-output-buffer", 4096, 1 << 40)? as usize,
        read_timeout_s: number("read-timeout", 0, SECS)?,
        write_timeout_s: number("write-timeout", 0, SECS)?,
        shutdown_timeout_s: number("shutdown-timeout", 0, SECS)?,
        auto_release_on_disconnect: boolean("auto-release-on-disconnect")?,
        debug: boolean("debug")?,
        tls: tls_source(&value)?,
        metrics_addr: Some(value("metrics-addr").0.trim().to_owned()).filter(|s| !s.is_empty()),
        auth: auth_source(&given, &env),
        cluster,
    })))
}

type Lookup<'a> = &'a dyn Fn(&'static str) -> (String, Source);

fn tls_source(value: Lookup<'_>) -> Result<Option<TlsSource>, ConfigError> {
    let (cert, cert_src) = value("tls-cert");
    let (key, key_src) = value("tls-key");
    match (cert.trim().is_empty(), key.trim().is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(TlsSource {
            cert: cert.trim().into(),
            key: key.trim().into(),
        })),
        (false, true) => Err(ConfigError(format!(
            "{cert_src} is set but --tls-key is not: TLS needs both"
        ))),
        (true, false) => Err(ConfigError(format!(
            "{key_src} is set but --tls-cert is not: TLS needs both"
        ))),
    }
}

/// Cluster mode's settings from `--node-id`, `--peers` and `--data-dir`
/// (timings already checked); `None` without `--peers` and `--data-dir`.
fn cluster_settings(
    value: Lookup<'_>,
    heartbeat_interval_ms: u64,
    election_timeout_ms: u64,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let (node, node_src) = value("node-id");
    let (peers, peers_src) = value("peers");
    let (dir, _) = value("data-dir");
    let (node, peers, dir) = (node.trim(), peers.trim(), dir.trim());
    let node_id = match node {
        "" => None,
        n => match n.parse::<u64>() {
            Ok(n) if (1..=MAX_NODE_ID).contains(&n) => Some(n),
            _ => {
                return Err(ConfigError(format!(
                    "invalid value {n:?} for {node_src}: expected an integer from 1 to {MAX_NODE_ID}"
                )));
            }
        },
    };
    if peers.is_empty() && dir.is_empty() {
        return match node_id {
            None => Ok(None),
            Some(_) => Err(ConfigError(format!(
                "{node_src} is set but neither --peers nor --data-dir is: \
                 a node id only means something in cluster mode"
            ))),
        };
    }
    if dir.is_empty() {
        return Err(ConfigError(format!(
            "{peers_src} is set but --data-dir is not: cluster mode keeps its Raft log \
             there (DFLOCKD_DATA_DIR)"
        )));
    }
    let (node_id, peers) = if peers.is_empty() {
        (node_id.unwrap_or(1), Vec::new())
    } else {
        let Some(node_id) = node_id else {
            return Err(ConfigError(format!(
                "{peers_src} is set but --node-id is not: every member needs its id \
                 (DFLOCKD_NODE_ID)"
            )));
        };
        let peers = parse_peers(peers, &peers_src)?;
        if !peers.iter().any(|p| p.id == node_id) {
            let ids: Vec<String> = peers.iter().map(|p| p.id.to_string()).collect();
            return Err(ConfigError(format!(
                "{peers_src} (ids {}) does not include this node, {node_src} {node_id}: \
                 the list names every member, this node included",
                ids.join(", ")
            )));
        }
        (node_id, peers)
    };
    Ok(Some(ClusterSettings {
        node_id,
        peers,
        data_dir: dir.into(),
        heartbeat_interval_ms,
        election_timeout_ms,
        snapshot_entries: 10_000,
    }))
}

/// `ID=HOST:PORT,...`, sorted by id, without duplicate ids or addresses.
fn parse_peers(list: &str, src: &Source) -> Result<Vec<Peer>, ConfigError> {
    let mut peers: Vec<Peer> = Vec::new();
    for entry in list.split(',') {
        let entry = entry.trim();
        let bad = |why: &str| {
            ConfigError(format!(
                "invalid entry {entry:?} in {src} (ID=HOST:PORT,...): {why}"
            ))
        };
        let Some((id, addr)) = entry.split_once('=') else {
            return Err(bad("no '='"));
        };
        let id = match id.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_NODE_ID).contains(&n) => n,
            _ => {
                return Err(bad(&format!(
                    "the id must be an integer from 1 to {MAX_NODE_ID}"
                )));
            }
        };
        let addr = host_port(addr.trim()).map_err(|why| bad(&why))?;
        if let Some(p) = peers.iter().find(|p| p.id == id) {
            return Err(ConfigError(format!(
                "duplicate id {id} in {src} (addresses {} and {addr})",
                p.addr
            )));
        }
        if let Some(p) = peers.iter().find(|p| p.addr == addr) {
            return Err(ConfigError(format!(
                "duplicate address {addr} in {src} (ids {} and {id})",
                p.id
            )));
        }
        peers.push(Peer { id, addr });
    }
    peers.sort_by_key(|p| p.id);
    Ok(peers)
}

/// `HOST:PORT` or `[IPV6]:PORT`, resolved to its first address.
fn host_port(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => rest
            .split_once("]:")
            .ok_or_else(|| "expected [IPV6]:PORT".to_owned())?,
        None => {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| "no ':' before the port".to_owned())?;
            if host.contains(':') {
                return Err("an IPv6 address needs brackets, as in [::1]:7001".to_owned());
            }
            (host, port)
        }
    };
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("invalid port {port:?}: expected 1 to 65535")),
    };
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("host {host:?} does not resolve"))
}

/// The token's source: explicit flag, then file flag, then variable, then
/// file variable. The token itself is read and checked by the caller.
fn auth_source(
    given: &[Option<String>],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<AuthSource> {
    let flag = |name: &str| {
        let i = SPECS
            .iter()
            .position(|s| s.flag == name)
            .expect("known flag");
        given[i].clone()
    };
    if let Some(t) = flag("auth-token") {
        return Some(AuthSource::Literal(t));
    }
    if let Some(f) = flag("auth-token-file") {
        return Some(AuthSource::File(f.into()));
    }
    if let Some(t) = env("DFLOCKD_AUTH_TOKEN") {
        return Some(AuthSource::Literal(t));
    }
    env("DFLOCKD_AUTH_TOKEN_FILE").map(|f| AuthSource::File(f.into()))
}

fn is_bool(flag: &str) -> bool {
    SPECS.iter().any(|s| s.flag == flag && s.meta == "BOOL")
}

/// The `--help` text.
pub fn help() -> String {
    let mut s = format!(
        "dflockd {} - a distributed lock server\n\n\
         USAGE:\n    dflockd [FLAGS]\n\n\
         Every flag also takes the --flag=value form. An explicit flag beats its\n\
         environment variable, which beats the default.\n\nFLAGS:\n",
        env!("CARGO_PKG_VERSION")
    );
    for spec in SPECS {
        let head = if spec.meta == "BOOL" {
            format!("--{}[=BOOL]", spec.flag)
        } else {
            format!("--{} {}", spec.flag, spec.meta)
        };
        let default = if spec.default.is_empty() {
            "(none)"
        } else {
            spec.default
        };
        s.push_str(&format!(
            "    {head}\n        {}\n        default: {default}; env: {}\n",
            spec.help,
            spec.envs.join(", ")
        ));
    }
    s.push_str(
        "    -h, --help\n        print this help\n    -V, --version\n        print the version\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Action::Run(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 6388);
        assert_eq!(c.default_lease_ttl_s, 33);
        assert_eq!(c.max_locks, 1024);
        assert_eq!(c.read_timeout_s, 23);
        assert!(c.auto_release_on_disconnect);
        assert!(!c.debug);
    }

    #[test]
    fn flag_beats_env_beats_default() {
        assert_eq!(run(&[], &[("DFLOCKD_PORT", "7000")]).unwrap().port, 7000);
        assert_eq!(
            run(&["--port", "7001"], &[("DFLOCKD_PORT", "7000")])
                .unwrap()
                .port,
            7001
        );
        assert_eq!(run(&["--port=7002"], &[]).unwrap().port, 7002);
        assert_eq!(
            run(&[], &[("DFLOCKD_GC_LOOP_SLEEP", "9")])
                .unwrap()
                .gc_interval_s,
            9
        );
        assert_eq!(
            run(&[], &[("DFLOCKD_DFLOCKD_READ_TIMEOUT_S", "4")])
                .unwrap()
                .read_timeout_s,
            4
        );
    }

    #[test]
    fn booleans() {
        assert!(
            !run(&["--no-auto-release-on-disconnect"], &[])
                .unwrap()
                .auto_release_on_disconnect
        );
        assert!(
            !run(&["--auto-release-on-disconnect=false"], &[])
                .unwrap()
                .auto_release_on_disconnect
        );
        assert!(
            run(
                &["--auto-release-on-disconnect"],
                &[("DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", "0")]
            )
            .unwrap()
            .auto_release_on_disconnect
        );
        assert!(
            !run(&[], &[("DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", "no")])
                .unwrap()
                .auto_release_on_disconnect
        );
        assert!(run(&["--debug"], &[]).unwrap().debug);
    }

    #[test]
    fn errors_name_the_flag() {
        let e = run(&["--port", "abc"], &[]).unwrap_err().0;
        assert!(e.contains("--port"), "{e}");
        let e = run(&[], &[("DFLOCKD_MAX_LOCKS", "-1")]).unwrap_err().0;
        assert!(e.contains("DFLOCKD_MAX_LOCKS"), "{e}");
        let e = run(&["--default-lease-ttl", "0"], &[]).unwrap_err().0;
        assert!(e.contains("--default-lease-ttl"), "{e}");
        let e = run(&["--bogus"], &[]).unwrap_err().0;
        assert!(e.contains("--bogus"), "{e}");
        let e = run(&["--auto-release-on-disconnect=maybe"], &[])
            .unwrap_err()
            .0;
        assert!(e.contains("--auto-release-on-disconnect"), "{e}");
        let e = run(&["--port"], &[]).unwrap_err().0;
        assert!(e.contains("--port"), "{e}");
    }

    fn cluster(args: &[&str], env: &[(&str, &str)]) -> ClusterSettings {
        run(args, env).unwrap().cluster.expect("cluster mode")
    }

    /// The error of `args`, asserting that it names every one of `names`.
    fn fails(args: &[&str], env: &[(&str, &str)], names: &[&str]) -> String {
        let e = run(args, env).unwrap_err().0;
        for n in names {
            assert!(e.contains(n), "{args:?}: {e:?} does not name {n}");
        }
        e
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const THREE: &str = "3=127.0.0.1:7003,1=127.0.0.1:7001,2=127.0.0.1:7002";

    #[test]
    fn cluster_off_by_default() {
        assert_eq!(run(&[], &[]).unwrap().cluster, None);
    }

    #[test]
    fn timing_flags_alone_are_single_node() {
        let c = run(
            &["--heartbeat-interval", "50", "--election-timeout", "500"],
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster, None);
        let c = run(&[], &[("DFLOCKD_HEARTBEAT_INTERVAL_MS", "20")]).unwrap();
        assert_eq!(c.cluster, None);
    }

    #[test]
    fn data_dir_alone_is_a_one_node_cluster() {
        let c = cluster(&["--data-dir", "/var/lib/dflockd"], &[]);
        assert_eq!(
            c,
            ClusterSettings {
                node_id: 1,
                peers: vec![],
                data_dir: "/var/lib/dflockd".into(),
                heartbeat_interval_ms: 100,
                election_timeout_ms: 1000,
                snapshot_entries: 10_000,
            }
        );
        assert_eq!(c.own_addr(), None);
        assert_eq!(c.voters(), vec![1]);
        assert_eq!(c.cluster_id(), fnv1a64(b"solo:1"));
        let c = cluster(&["--data-dir", "d", "--node-id", "7"], &[]);
        assert_eq!(c.node_id, 7);
        assert_eq!(c.voters(), vec![7]);
        assert_eq!(c.cluster_id(), fnv1a64(b"solo:7"));
        assert_ne!(c.cluster_id(), fnv1a64(b"solo:1"));
    }

    #[test]
    fn peers_node_id_and_data_dir() {
        let c = cluster(
            &["--node-id", "2", "--peers", THREE, "--data-dir", "/d"],
            &[],
        );
        assert_eq!(c.node_id, 2);
        assert_eq!(
            c.peers,
            vec![
                Peer {
                    id: 1,
                    addr: addr("127.0.0.1:7001")
                },
                Peer {
                    id: 2,
                    addr: addr("127.0.0.1:7002")
                },
                Peer {
                    id: 3,
                    addr: addr("127.0.0.1:7003")
                },
            ]
        );
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.own_addr(), Some(addr("127.0.0.1:7002")));
        assert_eq!(c.voters(), vec![1, 2, 3]);
        assert_eq!(
            (c.heartbeat_interval_ms, c.election_timeout_ms),
            (100, 1000)
        );
        // A one-member list is a cluster with a peer listener.
        let c = cluster(
            &["--node-id=1", "--peers=1=127.0.0.1:7001", "--data-dir=d"],
            &[],
        );
        assert_eq!(c.own_addr(), Some(addr("127.0.0.1:7001")));
        assert_eq!(c.voters(), vec![1]);
    }

    #[test]
    fn cluster_variables_and_flags_beat_them() {
        let env = [
            ("DFLOCKD_NODE_ID", "3"),
            ("DFLOCKD_PEERS", THREE),
            ("DFLOCKD_DATA_DIR", "/env"),
            ("DFLOCKD_HEARTBEAT_INTERVAL_MS", "50"),
            ("DFLOCKD_ELECTION_TIMEOUT_MS", "700"),
        ];
        let c = cluster(&[], &env);
        assert_eq!(c.node_id, 3);
        assert_eq!(c.voters(), vec![1, 2, 3]);
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        assert_eq!((c.heartbeat_interval_ms, c.election_timeout_ms), (50, 700));
        let c = cluster(
            &[
                "--node-id",
                "1",
                "--data-dir",
                "/flag",
                "--heartbeat-interval",
                "10",
                "--election-timeout",
                "20",
            ],
            &env,
        );
        assert_eq!(c.node_id, 1);
        assert_eq!(c.data_dir, PathBuf::from("/flag"));
        assert_eq!((c.heartbeat_interval_ms, c.election_timeout_ms), (10, 20));
        let e = fails(
            &[],
            &[("DFLOCKD_NODE_ID", "0"), ("DFLOCKD_DATA_DIR", "d")],
            &[],
        );
        assert!(e.contains("DFLOCKD_NODE_ID"), "{e}");
    }

    #[test]
    fn peer_host_names_and_ipv6() {
        let c = cluster(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=localhost:7001, 2=[::1]:7002 ,3=127.0.0.2:7003",
                "--data-dir",
                "d",
            ],
            &[],
        );
        assert_eq!(c.peers[0].addr.port(), 7001);
        assert!(c.peers[0].addr.ip().is_loopback(), "{:?}", c.peers[0]);
        assert_eq!(c.peers[1].addr, addr("[::1]:7002"));
        assert_eq!(c.peers[2].addr, addr("127.0.0.2:7003"));
        fails(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=no-such-host.invalid:7001",
                "--data-dir",
                "d",
            ],
            &[],
            &["--peers", "no-such-host.invalid", "does not resolve"],
        );
    }

    #[test]
    fn cluster_id_is_fnv1a_of_the_sorted_list() {
        // Reference vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let args = |node: &'static str, peers: &'static str| {
            ["--node-id", node, "--peers", peers, "--data-dir", "d"]
        };
        let a = cluster(&args("1", THREE), &[]);
        let b = cluster(
            &args("3", "2=127.0.0.1:7002,3=127.0.0.1:7003,1=127.0.0.1:7001"),
            &[],
        );
        assert_eq!(a.cluster_id(), b.cluster_id());
        assert_eq!(
            a.cluster_id(),
            fnv1a64(b"1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003")
        );
        let v6 = cluster(&args("2", "2=[::1]:7002,1=127.0.0.1:7001"), &[]);
        assert_eq!(v6.cluster_id(), fnv1a64(b"1=127.0.0.1:7001,2=[::1]:7002"));
        let other = cluster(&args("1", "1=127.0.0.1:7001,2=127.0.0.1:7002"), &[]);
        assert_ne!(a.cluster_id(), other.cluster_id());
        for c in [a, b, v6, other] {
            assert_ne!(c.cluster_id(), 0);
        }
    }

    #[test]
    fn peers_needs_data_dir_and_node_id() {
        fails(
            &["--node-id", "1", "--peers", THREE],
            &[],
            &["--peers", "--data-dir"],
        );
        fails(
            &["--peers", THREE, "--data-dir", "d"],
            &[],
            &["--peers", "--node-id"],
        );
        fails(
            &["--data-dir", "d"],
            &[("DFLOCKD_PEERS", THREE)],
            &["DFLOCKD_PEERS", "--node-id"],
        );
        // A node id alone is a mistake, not a single node.
        fails(
            &["--node-id", "1"],
            &[],
            &["--node-id", "--peers", "--data-dir"],
        );
    }

    #[test]
    fn node_id_must_be_a_positive_number() {
        for bad in ["0", "abc", "-1", "1.5", "65536"] {
            fails(&["--node-id", bad, "--data-dir", "d"], &[], &["--node-id"]);
            fails(
                &["--node-id", bad, "--peers", THREE, "--data-dir", "d"],
                &[],
                &["--node-id"],
            );
        }
        assert_eq!(
            cluster(&["--node-id", "65535", "--data-dir", "d"], &[]).node_id,
            65535
        );
    }

    #[test]
    fn peers_must_include_this_node() {
        fails(
            &["--node-id", "4", "--peers", THREE, "--data-dir", "d"],
            &[],
            &["--peers", "--node-id", "4"],
        );
    }

    #[test]
    fn peers_duplicates() {
        fails(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=127.0.0.1:7001,2=127.0.0.1:7002,1=127.0.0.1:7003",
                "--data-dir",
                "d",
            ],
            &[],
            &["--peers", "duplicate id 1"],
        );
        fails(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=127.0.0.1:7001,2=127.0.0.1:7001",
                "--data-dir",
                "d",
            ],
            &[],
            &["--peers", "duplicate address 127.0.0.1:7001"],
        );
        // The same address, spelt two ways.
        fails(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=127.0.0.1:7001,2=localhost:7001",
                "--data-dir",
                "d",
            ],
            &[],
            &["--peers", "duplicate address"],
        );
    }

    #[test]
    fn peers_malformed_entries() {
        for (entry, why) in [
            ("1127.0.0.1:7001", "no '='"),
            ("=127.0.0.1:7001", "the id must be"),
            ("0=127.0.0.1:7001", "the id must be"),
            ("x=127.0.0.1:7001", "the id must be"),
            ("1=127.0.0.1", "port"),
            ("1=127.0.0.1:", "port"),
            ("1=127.0.0.1:0", "port"),
            ("1=127.0.0.1:65536", "port"),
            ("1=127.0.0.1:http", "port"),
            ("1=:7001", "empty host"),
            ("1=[]:7001", "empty host"),
            ("1=::1:7001", "brackets"),
            ("1=[::1]7001", "[IPV6]:PORT"),
            ("1=", "port"),
        ] {
            let list = format!("{entry},2=127.0.0.1:7002");
            fails(
                &["--node-id", "2", "--peers", &list, "--data-dir", "d"],
                &[],
                &["--peers", entry, why],
            );
        }
        // An empty entry (a stray comma) is malformed too.
        fails(
            &[
                "--node-id",
                "1",
                "--peers",
                "1=127.0.0.1:7001,,2=127.0.0.1:7002",
                "--data-dir",
                "d",
            ],
            &[],
            &["--peers"],
        );
    }

    #[test]
    fn heartbeat_and_election_timeout() {
        fails(
            &["--heartbeat-interval", "0"],
            &[],
            &["--heartbeat-interval"],
        );
        fails(
            &["--heartbeat-interval", "0", "--data-dir", "d"],
            &[],
            &["--heartbeat-interval"],
        );
        fails(&["--election-timeout", "x"], &[], &["--election-timeout"]);
        fails(
            &["--data-dir", "d", "--election-timeout", "199"],
            &[],
            &["--election-timeout", "--heartbeat-interval"],
        );
        fails(
            &["--data-dir", "d", "--heartbeat-interval", "501"],
            &[],
            &["--election-timeout", "--heartbeat-interval"],
        );
        let c = cluster(&["--data-dir", "d", "--election-timeout", "200"], &[]);
        assert_eq!((c.heartbeat_interval_ms, c.election_timeout_ms), (100, 200));
    }

    #[test]
    fn help_lists_every_flag() {
        let h = help();
        for s in SPECS {
            assert!(h.contains(&format!("--{}", s.flag)));
            for e in s.envs {
                assert!(h.contains(e));
            }
        }
    }
}
