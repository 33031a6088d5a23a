//! Command line and environment, parsed once into an [`Invocation`].

use std::ffi::OsString;
use std::time::Duration;

use dflockd_client::{Config, Servers, Tls};

pub const HELP: &str = "\
dflock: run a command while holding a dflockd lock, and other dflockd tools

USAGE:
    dflock [OPTIONS] lock KEY [--timeout S] [--lease S] [--kill-after S] -- CMD [ARGS...]
    dflock [OPTIONS] sem KEY LIMIT [--timeout S] [--lease S] [--kill-after S] -- CMD [ARGS...]
    dflock [OPTIONS] signal CHANNEL PAYLOAD...
    dflock [OPTIONS] listen PATTERN [--group G] [--heartbeat S]
    dflock [OPTIONS] stats [--json]
    dflock [OPTIONS] ping
    dflock [OPTIONS] shard KEY...

COMMANDS:
    lock     Wait for the lock on KEY (FIFO), run CMD while holding it, renew
             the lease while CMD runs (at half the lease, and at least every
             10 s), release when it exits. CMD gets DFLOCK_KEY, DFLOCK_TOKEN,
             DFLOCK_FENCE (the decimal fencing number, higher for every later
             grant) and DFLOCK_LEASE (seconds). CMD runs in its own process
             group, which gets the terminal when dflock has it; SIGTERM,
             SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to dflock are
             passed on to that group. If the lock is lost while CMD runs, the
             group gets SIGTERM, then SIGKILL after --kill-after seconds; if
             dflock itself dies, CMD gets SIGTERM.
    sem      The same for one of LIMIT slots of the semaphore KEY.
    signal   Publish PAYLOAD (the remaining words, joined by spaces) on
             CHANNEL; prints how many listeners received it.
    listen   Print `CHANNEL PAYLOAD` for every signal matching PATTERN
             (`*` one token, `>` the rest), one line each, until interrupted.
             With --group G, each signal goes to one listener of the group.
    stats    The servers' locks, semaphores and subscriptions as a table
             (--json: the raw JSON, one line per server).
    ping     Check that every server answers; prints the round trip.
    shard    Print the shard index and addresses that hold each KEY.

    signal and listen use the first shard of --servers (signals are not
    sharded); stats and ping visit every shard.

    For commands other than lock and sem, `--` ends the options, for a KEY,
    CHANNEL or PAYLOAD that starts with `-`.

COMMAND OPTIONS:
    -t, --timeout S      lock/sem: give up after S seconds (0 = try once);
                         default: wait without limit
    -l, --lease S        lock/sem: the lease to ask for and renew with;
                         default: the server's (33 s unless configured)
    -k, --kill-after S   lock/sem: grace between SIGTERM and SIGKILL when the
                         lock is lost [default: 10]
    -g, --group G        listen: join queue group G
        --heartbeat S    listen: ping the server every S seconds, below its
                         --read-timeout [default: 5]
        --json           stats: raw JSON

CONNECTION OPTIONS (flags beat environment variables):
    -s, --servers LIST   Servers: HOST:PORT entries, `,` between shards (a key
                         lives on shard crc32(key) % shards, as in the Python
                         and Go clients), `|` between addresses of one
                         cluster [env: DFLOCK_SERVERS] [default: 127.0.0.1:6388]
    -a, --auth-token T   Authenticate with token T [env: DFLOCK_AUTH_TOKEN]
        --auth-token-file F
                         Read the token from file F (first line)
        --tls            Use TLS, trusting the system's CA bundle
        --tls-ca FILE    Use TLS, trusting the CA certificates in FILE (PEM)
                         [env: DFLOCK_TLS_CA]
        --tls-server-name NAME
                         Check the server certificate against NAME instead of
                         the host dialled
        --tls-insecure   Use TLS without checking the server certificate
                         (encrypted but unauthenticated; only when asked for
                         by name)
        --connect-timeout S
                         Per-address connect, handshake and auth [default: 5]
    -h, --help           Print this help
    -V, --version        Print the version

EXIT STATUS:
    lock/sem exit with CMD's status (128 + N if signal N killed it), or:
    0    success (other commands)
    64   usage error: unknown flag, missing `--`, bad value
    69   no server reachable, TLS failure, or connection lost
    70   the server refused: too many locks or waiters, limit mismatch,
         shutting down, or (cluster) no leader
    74   writing standard output failed
    75   lock/sem: not granted within --timeout; CMD was not run
    76   the server answered something that is not the dflockd protocol
    77   the auth token was refused
    78   bad settings: unreadable CA or token file, bad DFLOCK_SERVERS
    79   lock/sem: the lock was lost while CMD ran; CMD was stopped
    126  CMD could not be executed
    127  CMD was not found
";

/// Why parsing stopped without an invocation.
pub enum Exit {
    /// A usage error (status 64).
    Usage(String),
    /// A settings error (status 78).
    Config(String),
    /// `--help` or `--version`: print this and exit.
    Print(String),
}

pub enum Command {
    Hold {
        key: String,
        limit: Option<u64>,
        timeout: Duration,
        lease: Option<Duration>,
        kill_after: Duration,
        argv: Vec<OsString>,
    },
    Signal {
        channel: String,
        payload: String,
    },
    Listen {
        pattern: String,
        group: Option<String>,
        heartbeat: Duration,
    },
    Stats {
        json: bool,
    },
    Ping,
    Shard {
        keys: Vec<String>,
    },
}

pub struct Invocation {
    pub cfg: Config,
    pub command: Command,
}

#[derive(Default)]
struct Raw {
    servers: Option<String>,
    auth_token: Option<String>,
    auth_token_file: Option<String>,
    tls: bool,
    tls_ca: Option<String>,
    tls_server_name: Option<String>,
    tls_insecure: bool,
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    lease: Option<Duration>,
    kill_after: Option<Duration>,
    heartbeat: Option<Duration>,
    group: Option<String>,
    json: bool,
    positionals: Vec<String>,
}

pub fn parse(args: Vec<OsString>) -> Result<Invocation, Exit> {
    let (before, after) = match args.iter().position(|a| a == "--") {
        Some(i) => (args[..i].to_vec(), Some(args[i + 1..].to_vec())),
        None => (args, None),
    };
    let raw = parse_flags(before)?;
    let mut positionals = raw.positionals.clone();
    let is_hold = matches!(
        positionals.first().map(String::as_str),
        Some("lock" | "sem")
    );
    let after = match after {
        // Other commands take `--` to end options: `dflock shard -- -odd-key`.
        Some(extra) if !is_hold => {
            for a in extra {
                positionals.push(
                    a.into_string()
                        .map_err(|a| Exit::Usage(format!("argument {a:?} is not UTF-8")))?,
                );
            }
            None
        }
        other => other,
    };
    let mut pos = positionals.into_iter();
    let Some(name) = pos.next() else {
        return Err(Exit::Usage("no command given".into()));
    };
    let rest: Vec<String> = pos.collect();
    if !is_hold {
        for (set, flag) in [
            (raw.timeout.is_some(), "--timeout"),
            (raw.lease.is_some(), "--lease"),
            (raw.kill_after.is_some(), "--kill-after"),
        ] {
            if set {
                return Err(Exit::Usage(format!("{flag} is only for `lock` and `sem`")));
            }
        }
    }
    for (set, flag) in [
        (raw.group.is_some(), "--group"),
        (raw.heartbeat.is_some(), "--heartbeat"),
    ] {
        if set && name != "listen" {
            return Err(Exit::Usage(format!("{flag} is only for `listen`")));
        }
    }
    if raw.json && name != "stats" {
        return Err(Exit::Usage("--json is only for `stats`".into()));
    }
    let command = match name.as_str() {
        "lock" | "sem" => {
            let shape = if name == "sem" { "KEY LIMIT" } else { "KEY" };
            let Some(argv) = after else {
                return Err(Exit::Usage(format!(
                    "missing `--` before the command to run (dflock {name} {shape} [OPTIONS] -- CMD [ARGS...])"
                )));
            };
            let (key, limit) = match (name.as_str(), rest.as_slice()) {
                ("lock", [key]) => (key.clone(), None),
                ("sem", [key, limit]) => (key.clone(), Some(parse_limit(limit)?)),
                _ => {
                    return Err(Exit::Usage(format!(
                        "usage: dflock {name} {shape} [OPTIONS] -- CMD [ARGS...]"
                    )));
                }
            };
            if argv.is_empty() {
                return Err(Exit::Usage("no command after `--`".into()));
            }
            Command::Hold {
                key,
                limit,
                timeout: raw.timeout.unwrap_or(Duration::MAX),
                lease: raw.lease,
                kill_after: raw.kill_after.unwrap_or(Duration::from_secs(10)),
                argv,
            }
        }
        "signal" => match rest.as_slice() {
            [channel, payload @ ..] if !payload.is_empty() => Command::Signal {
                channel: channel.clone(),
                payload: payload.join(" "),
            },
            _ => {
                return Err(Exit::Usage(
                    "usage: dflock signal CHANNEL PAYLOAD...".into(),
                ));
            }
        },
        "listen" => match rest.as_slice() {
            [pattern] => Command::Listen {
                pattern: pattern.clone(),
                group: raw.group.clone(),
                heartbeat: raw.heartbeat.unwrap_or(Duration::from_secs(5)),
            },
            _ => {
                return Err(Exit::Usage(
                    "usage: dflock listen PATTERN [--group G]".into(),
                ));
            }
        },
        "stats" if rest.is_empty() => Command::Stats { json: raw.json },
        "ping" if rest.is_empty() => Command::Ping,
        "stats" | "ping" => {
            return Err(Exit::Usage(format!("`{name}` takes no arguments")));
        }
        "shard" if !rest.is_empty() => Command::Shard { keys: rest },
        "shard" => return Err(Exit::Usage("usage: dflock shard KEY...".into())),
        other => return Err(Exit::Usage(format!("unknown command {other:?}"))),
    };
    check_names(&command)?;
    let cfg = config(&raw)?;
    Ok(Invocation { cfg, command })
}

/// Keys, channels and patterns are caught here, before any connection.
fn check_names(command: &Command) -> Result<(), Exit> {
    let (what, name) = match command {
        Command::Hold { key, .. } => ("KEY", key),
        Command::Signal { channel, .. } => {
            if channel.contains(['*', '>']) {
                return Err(Exit::Usage(format!(
                    "CHANNEL {channel:?} has a wildcard; only listen patterns do"
                )));
            }
            ("CHANNEL", channel)
        }
        Command::Listen { pattern, .. } => ("PATTERN", pattern),
        Command::Shard { keys } => match keys.iter().find(|k| bad_name(k)) {
            Some(k) => ("KEY", k),
            None => return Ok(()),
        },
        Command::Stats { .. } | Command::Ping => return Ok(()),
    };
    if bad_name(name) {
        return Err(Exit::Usage(format!(
            "{what} {name:?} must be 1 to 256 bytes without whitespace"
        )));
    }
    Ok(())
}

fn bad_name(s: &str) -> bool {
    s.is_empty() || s.len() > 256 || s.chars().any(char::is_whitespace)
}

fn parse_flags(args: Vec<OsString>) -> Result<Raw, Exit> {
    use lexopt::prelude::*;
    let mut raw = Raw::default();
    let mut p = lexopt::Parser::from_args(args);
    loop {
        let arg = p.next().map_err(usage)?;
        let Some(arg) = arg else { break };
        match arg {
            Short('h') | Long("help") => {
                return Err(Exit::Print(HELP.to_string()));
            }
            Short('V') | Long("version") => {
                return Err(Exit::Print(format!(
                    "dflock {}\n",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            Short('s') | Long("servers") => raw.servers = Some(string(&mut p, "--servers")?),
            Short('a') | Long("auth-token") => {
                raw.auth_token = Some(string(&mut p, "--auth-token")?);
            }
            Long("auth-token-file") => {
                raw.auth_token_file = Some(string(&mut p, "--auth-token-file")?);
            }
            Long("tls") => raw.tls = true,
            Long("tls-ca") => raw.tls_ca = Some(string(&mut p, "--tls-ca")?),
            Long("tls-server-name") => {
                raw.tls_server_name = Some(string(&mut p, "--tls-server-name")?);
            }
            Long("tls-insecure") => raw.tls_insecure = true,
            Long("connect-timeout") => {
                raw.connect_timeout = Some(seconds(&mut p, "--connect-timeout")?);
            }
            Short('t') | Long("timeout") => raw.timeout = Some(seconds(&mut p, "--timeout")?),
            Short('l') | Long("lease") => {
                let l = seconds(&mut p, "--lease")?;
                if l.is_zero() {
                    return Err(Exit::Usage("--lease must be at least 1 second".into()));
                }
                raw.lease = Some(l);
            }
            Short('k') | Long("kill-after") => {
                raw.kill_after = Some(seconds(&mut p, "--kill-after")?);
            }
            Short('g') | Long("group") => raw.group = Some(string(&mut p, "--group")?),
            Long("heartbeat") => {
                let h = seconds(&mut p, "--heartbeat")?;
                if h < Duration::from_millis(100) {
                    return Err(Exit::Usage("--heartbeat must be at least 0.1 s".into()));
                }
                raw.heartbeat = Some(h);
            }
            Long("json") => raw.json = true,
            Value(v) => raw.positionals.push(
                v.into_string()
                    .map_err(|v| Exit::Usage(format!("argument {v:?} is not UTF-8")))?,
            ),
            other => return Err(usage(other.unexpected())),
        }
    }
    Ok(raw)
}

fn usage(e: lexopt::Error) -> Exit {
    Exit::Usage(e.to_string())
}

fn string(p: &mut lexopt::Parser, flag: &str) -> Result<String, Exit> {
    let v = p.value().map_err(usage)?;
    v.into_string()
        .map_err(|_| Exit::Usage(format!("{flag}: value is not UTF-8")))
}

/// A number of seconds: a non-negative integer or decimal.
fn seconds(p: &mut lexopt::Parser, flag: &str) -> Result<Duration, Exit> {
    let v = string(p, flag)?;
    let s = v.strip_suffix('s').unwrap_or(&v);
    match s.parse::<f64>() {
        Ok(x) if (0.0..=9_223_372_036.0).contains(&x) => Ok(Duration::from_secs_f64(x)),
        _ => Err(Exit::Usage(format!(
            "{flag}: expected a number of seconds, got {v:?}"
        ))),
    }
}

fn parse_limit(s: &str) -> Result<u64, Exit> {
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Exit::Usage(format!(
            "LIMIT must be a whole number of at least 1, got {s:?}"
        ))),
    }
}

fn config(raw: &Raw) -> Result<Config, Exit> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let servers_text = raw.servers.clone().or_else(|| env("DFLOCK_SERVERS"));
    let mut cfg = Config::default();
    if let Some(text) = servers_text {
        let servers: Servers = text.parse().map_err(|e| {
            let msg = format!("{e}");
            if raw.servers.is_some() {
                Exit::Usage(format!("--servers: {msg}"))
            } else {
                Exit::Config(format!("DFLOCK_SERVERS: {msg}"))
            }
        })?;
        cfg = cfg.with_servers(servers);
    }
    let token = match (&raw.auth_token, &raw.auth_token_file) {
        (Some(_), Some(_)) => {
            return Err(Exit::Usage(
                "give --auth-token or --auth-token-file, not both".into(),
            ));
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Exit::Config(format!("--auth-token-file {f}: {e}")))?;
            let first = text.lines().next().unwrap_or("").trim().to_string();
            if first.is_empty() {
                return Err(Exit::Config(format!("--auth-token-file {f}: empty")));
            }
            Some(first)
        }
        (None, None) => env("DFLOCK_AUTH_TOKEN"),
    };
    if let Some(t) = token {
        cfg = cfg.auth_token(t);
    }
    let ca = raw.tls_ca.clone().or_else(|| env("DFLOCK_TLS_CA"));
    if raw.tls_insecure && raw.tls_ca.is_some() {
        return Err(Exit::Usage(
            "--tls-insecure and --tls-ca contradict each other".into(),
        ));
    }
    let tls = if raw.tls_insecure {
        Some(Tls::insecure())
    } else if let Some(ca) = ca {
        Some(Tls::with_ca_file(&ca).map_err(|e| Exit::Config(format!("{e}")))?)
    } else if raw.tls {
        Some(Tls::system_roots().map_err(|e| Exit::Config(format!("{e}")))?)
    } else {
        None
    };
    if let Some(mut tls) = tls {
        if let Some(name) = &raw.tls_server_name {
            tls = tls
                .server_name(name)
                .map_err(|e| Exit::Usage(format!("--tls-server-name: {e}")))?;
        }
        cfg = cfg.tls(tls);
    } else if raw.tls_server_name.is_some() {
        return Err(Exit::Usage(
            "--tls-server-name needs --tls, --tls-ca or --tls-insecure".into(),
        ));
    }
    if let Some(t) = raw.connect_timeout {
        if t.is_zero() {
            return Err(Exit::Usage("--connect-timeout must be above 0".into()));
        }
        cfg = cfg.connect_timeout(t);
    }
    Ok(cfg)
}
