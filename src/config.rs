//! Command-line flags and `DFLOCKD_*` environment variables, parsed once into
//! a plain [`Config`]. An explicit flag beats its variable, which beats the
//! default. Every bad value is an error that names the flag or variable.

use std::ffi::OsString;
use std::fmt;
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
