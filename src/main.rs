//! The `dflockd` binary: parse the configuration, start logging, serve.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use dflockd::config::{self, Action, Config};
use dflockd::core;
use dflockd::net::{Options, Server, Shutdown, security};

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args_os().skip(1), |k| std::env::var(k).ok()) {
        Ok(Action::Run(cfg)) => cfg,
        Ok(Action::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Action::Version) => {
            println!("dflockd {}", env!("CARGO_PKG_VERSION"));
            println!("features: tls (rustls with ring), token auth, signals, prometheus metrics");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("dflockd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let addr = match resolve(&cfg) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("dflockd: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = match options(&cfg) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("dflockd: {e}");
            return ExitCode::from(2);
        }
    };
    let mut server = match Server::bind(addr, opts) {
        Ok(s) => s,
        // Settings that cannot work (a data dir of another node, a damaged
        // log) are configuration errors.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            eprintln!("dflockd: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            log::error!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!("listening on {}", server.local_addr());
    if let Some(addr) = server.peer_addr() {
        log::info!("peer links listening on {addr}");
    }
    if let Some(addr) = server.metrics_addr() {
        log::info!("metrics listening on {addr}");
    }
    match server.run() {
        Ok(Shutdown::Drained | Shutdown::TimedOut) => ExitCode::SUCCESS,
        Ok(Shutdown::Interrupted) => ExitCode::FAILURE,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    let default = if cfg.debug { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
}

fn resolve(cfg: &Config) -> Result<SocketAddr, String> {
    let host = cfg.host.trim_start_matches('[').trim_end_matches(']');
    (host, cfg.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("invalid value {:?} for --host: not an address", cfg.host))
}

/// The event loop's options, with TLS material and the token loaded.
fn options(cfg: &Config) -> Result<Options, String> {
    // Tokens need the OS random number generator: find out now, not at the
    // first grant, if it is unusable (e.g. a static binary in an empty root).
    getrandom::fill(&mut [0u8; 8])
        .map_err(|e| format!("the OS random number generator is unavailable: {e}"))?;
    let metrics_addr = match &cfg.metrics_addr {
        Some(a) => Some(
            a.to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    format!("invalid value {a:?} for --metrics-addr: expected HOST:PORT")
                })?,
        ),
        None => None,
    };
    let tls = match &cfg.tls {
        Some(source) => Some((security::load_tls(source)?, source.clone())),
        None => None,
    };
    let auth = match &cfg.auth {
        Some(source) => Some((security::AuthToken::load(source)?, source.clone())),
        None => None,
    };
    let fence_seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Ok(Options {
        core: core::Config {
            default_lease_ms: cfg.default_lease_ttl_s * 1000,
            max_keys: cfg.max_locks,
            max_waiters: cfg.max_waiters,
            gc_interval_ms: cfg.gc_interval_s * 1000,
            gc_max_idle_ms: cfg.gc_max_idle_s * 1000,
            auto_release_on_disconnect: cfg.auto_release_on_disconnect,
            max_subscriptions: cfg.max_subscriptions,
            max_holds_per_conn: cfg.max_holds_per_connection,
        },
        max_output_buffer: cfg.max_output_buffer,
        max_connections: cfg.max_connections,
        read_timeout_ms: cfg.read_timeout_s * 1000,
        write_timeout_ms: cfg.write_timeout_s * 1000,
        shutdown_timeout_ms: cfg.shutdown_timeout_s * 1000,
        max_connections_per_ip: cfg.max_connections_per_ip,
        tls,
        auth,
        metrics_addr,
        fence_seed,
        cluster: cfg.cluster.clone(),
    })
}
