//! `dflockd-bench failover`: a driver for kill -9 failover measurements.
//!
//! N clients run closed-loop lock/release cycles against a cluster for a
//! fixed wall time while an outside script kills nodes and appends one line
//! `<monotonic_seconds> <label>` per kill to a marks file. Every client keeps
//! the CLOCK_MONOTONIC time of each grant, the interval during which it
//! believed it held the lock, and the grant's fence. At the end the driver
//! computes, single-threaded:
//!
//! - double grants: two clients whose observed holding intervals on one key
//!   overlap (an observed interval lies inside the true one, so any overlap
//!   proves that the service granted the lock twice);
//! - fence regressions: per key, in the order grants were received, a fence
//!   that does not exceed the previous one;
//! - per mark and per client, the pause: first grant at or after the mark
//!   minus the last grant before it; and the longest stall: the longest gap
//!   between consecutive grants from that last grant up to the next mark
//!   (a grant committed just before a kill but received after the mark
//!   makes the pause look short; the stall still shows the wait after it);
//! - locks still held once every client has released and is still
//!   connected (an acknowledged release that the service forgot).
//!
//! dflockd clients are blocking threads, one TCP connection each, that move
//! to the next endpoint when their connection dies. etcd clients (feature
//! `etcd`) are tasks on a small tokio runtime using the v3 lock service, each
//! with its own `etcd_client::Client` balanced over the usable endpoints.
//!
//! The orchestrator should take a mark's time once the kill has taken effect
//! (after waiting for the killed process), not just before sending it.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use lexopt::prelude::*;
use serde_json::{Value, json};

const USAGE: &str = "\
usage: dflockd-bench failover --system dflockd|etcd --endpoints H:P,H:P,H:P
           --connections N --keys K --duration SECS --output FILE.json
           [--marks FILE] [--key-prefix P] [--lease S] [--placement all|skip=H:P]

  --system S          dflockd (default) or etcd (needs a build with --features etcd)
  --endpoints LIST    comma-separated client addresses of the nodes
  --connections N     closed-loop clients (default 100); client i starts on
                      endpoint i % n and uses key <prefix>f<i % K>
  --keys K            distinct keys (default 10); K < N makes clients contend
  --duration SECS     wall time of the load (default 30)
  --marks FILE        lines `<CLOCK_MONOTONIC seconds> <label>` appended by the
                      orchestrator during the run (missing or empty: no marks)
  --output FILE       the JSON result
  --key-prefix P      key prefix (default bench-)
  --lease S           lease in seconds sent with each lock (dflockd: default the
                      server's; etcd: the session lease TTL, default 30, kept alive)
  --placement P       all (default) or skip=H:P: no client ever uses that endpoint
";

/// Acquire timeout sent with every `l`, in seconds.
const ACQUIRE_TIMEOUT_S: u64 = 30;
/// A reply later than this means the node hangs: the client moves on.
const READ_TIMEOUT: Duration = Duration::from_secs(ACQUIRE_TIMEOUT_S + 5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two failed connection attempts.
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// Pause after a non-`ok` reply before the next attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// Errors counted for a mark are those in `[t, t + this]`.
const MARK_ERROR_WINDOW_S: f64 = 5.0;
/// How long the end-of-run check waits for locks still held (by the
/// connections of a killed node, which the cluster releases once it declares
/// the node lost) to go away.
const HELD_WAIT_S: f64 = 10.0;
/// Errors kept with their text, per client and overall.
const FIRST_ERRORS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Dflockd,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Dflockd => "dflockd",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub system: System,
    /// Every endpoint given, in order.
    pub endpoints: Vec<String>,
    /// The endpoints clients use (`endpoints` without the skipped one).
    pub usable: Vec<String>,
    pub skip: Option<String>,
    pub connections: usize,
    pub keys: usize,
    pub duration_s: f64,
    pub marks: Option<String>,
    pub output: String,
    pub key_prefix: String,
    pub lease_s: Option<u64>,
}

impl Opts {
    fn key(&self, client: usize) -> String {
        format!("{}f{}", self.key_prefix, client % self.keys)
    }

    fn key_names(&self) -> Vec<String> {
        (0..self.keys)
            .map(|k| format!("{}f{}", self.key_prefix, k))
            .collect()
    }
}

/// CLOCK_MONOTONIC in seconds: the clock of Python's `time.monotonic()` on
/// Linux, which the orchestrator uses for its marks.
pub fn mono() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn sleep_s(d: Duration) {
    std::thread::sleep(d);
}

/// One grant as the client saw it: from the grant's arrival to the moment
/// the client stopped believing it held the lock (release sent, connection
/// found dead, or its lease over, whichever came first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hold {
    pub key: u32,
    pub client: u32,
    pub grant: f64,
    pub end: f64,
    pub fence: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ErrorEvent {
    pub t: f64,
    pub kind: String,
}

/// What one client collected.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// In grant order (so sorted by `grant`).
    pub holds: Vec<Hold>,
    pub errors: Vec<ErrorEvent>,
    /// `(time, text)` of this client's first errors.
    pub first_errors: Vec<(f64, String)>,
    /// Completed cycles: lock granted and release acknowledged.
    pub cycles: u64,
}

impl ClientLog {
    fn error(&mut self, kind: &str, detail: impl FnOnce() -> String) {
        let t = mono();
        if self.first_errors.len() < FIRST_ERRORS {
            self.first_errors.push((t, format!("{kind}: {}", detail())));
        }
        self.errors.push(ErrorEvent {
            t,
            kind: kind.to_string(),
        });
    }
}

/// The end-of-run check for locks still held.
#[derive(Debug)]
pub struct HeldCheck {
    pub held: Option<u64>,
    pub how: String,
}

// ---------------------------------------------------------------------------
// Pure analysis

/// A line of the marks file.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    pub t: f64,
    pub label: String,
}

/// Parses the marks file: `<seconds> <label...>` per line; blank lines and
/// `#` comments are skipped, and so are lines whose first field is not a
/// number (counted in the second value).
pub fn parse_marks(text: &str) -> (Vec<Mark>, usize) {
    let mut marks = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (t, label) = match line.split_once(char::is_whitespace) {
            Some((t, rest)) => (t, rest.trim()),
            None => (line, ""),
        };
        match t.parse::<f64>() {
            Ok(t) if t.is_finite() => marks.push(Mark {
                t,
                label: label.to_string(),
            }),
            _ => bad += 1,
        }
    }
    marks.sort_by(|a, b| a.t.total_cmp(&b.t));
    (marks, bad)
}

/// The pause a client saw around `mark`: its first grant at or after the
/// mark minus its last grant before it (`start` when it had none before).
/// `None` when it had no grant at or after the mark. `grants` is sorted.
pub fn pause(grants: &[f64], mark: f64, start: f64) -> Option<f64> {
    let i = grants.partition_point(|&g| g < mark);
    let after = *grants.get(i)?;
    let before = if i > 0 { grants[i - 1] } else { start };
    Some(after - before)
}

/// The longest gap between consecutive grants of a client from its last
/// grant before `mark` (`start` when none) through its grants up to `until`
/// (the next mark, or the end). Unlike [`pause`], a grant that the old leader
/// committed just before dying but that arrived after the mark does not hide
/// the stall that follows it. `None` when no grant is at or after the mark
/// and before `until`.
pub fn stall(grants: &[f64], mark: f64, until: f64, start: f64) -> Option<f64> {
    let i = grants.partition_point(|&g| g < mark);
    let j = grants.partition_point(|&g| g < until);
    if i >= j {
        return None;
    }
    let mut prev = if i > 0 { grants[i - 1] } else { start };
    let mut longest = 0.0f64;
    for &g in &grants[i..j] {
        longest = longest.max(g - prev);
        prev = g;
    }
    Some(longest)
}

/// Counts pairs of holds of different clients on one key whose observed
/// intervals overlap. Sorts `holds` by (key, grant).
pub fn double_grants(holds: &mut [Hold]) -> u64 {
    sort_holds(holds);
    let mut n = 0;
    for i in 0..holds.len() {
        let a = holds[i];
        for b in &holds[i + 1..] {
            if b.key != a.key || b.grant >= a.end {
                break;
            }
            if b.client != a.client {
                n += 1;
            }
        }
    }
    n
}

/// Counts grants whose fence does not exceed the fence of the previous grant
/// received on the same key. Sorts `holds` by (key, grant).
pub fn fence_regressions(holds: &mut [Hold]) -> u64 {
    sort_holds(holds);
    holds
        .windows(2)
        .filter(|w| w[0].key == w[1].key && w[1].fence <= w[0].fence)
        .count() as u64
}

fn sort_holds(holds: &mut [Hold]) {
    holds.sort_by(|a, b| a.key.cmp(&b.key).then(a.grant.total_cmp(&b.grant)));
}

/// Median and maximum of the non-null values.
fn median_max(v: &[Option<f64>]) -> (Option<f64>, Option<f64>) {
    let mut v: Vec<f64> = v.iter().flatten().copied().collect();
    if v.is_empty() {
        return (None, None);
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let med = if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    };
    (Some(med), v.last().copied())
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Builds the result object from what the clients collected.
pub fn analyse(
    opts: &Opts,
    logs: &[ClientLog],
    marks: &[Mark],
    t_start: f64,
    t_end: f64,
    held: &HeldCheck,
) -> Value {
    let cycles: u64 = logs.iter().map(|l| l.cycles).sum();
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let mut all_errors: Vec<f64> = Vec::new();
    for l in logs {
        for e in &l.errors {
            *by_kind.entry(e.kind.as_str()).or_default() += 1;
            all_errors.push(e.t);
        }
    }
    all_errors.sort_by(f64::total_cmp);
    let mut first: Vec<(f64, String)> = logs
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            l.first_errors
                .iter()
                .map(move |(t, s)| (*t, format!("+{:.3}s client {i}: {s}", t - t_start)))
        })
        .collect();
    first.sort_by(|a, b| a.0.total_cmp(&b.0));
    first.truncate(FIRST_ERRORS);

    let mut holds: Vec<Hold> = logs.iter().flat_map(|l| l.holds.iter().copied()).collect();
    let doubles = double_grants(&mut holds);
    let regressions = fence_regressions(&mut holds);

    let grants: Vec<Vec<f64>> = logs
        .iter()
        .map(|l| {
            let mut g: Vec<f64> = l.holds.iter().map(|h| h.grant).collect();
            g.sort_by(f64::total_cmp);
            g
        })
        .collect();
    let marks_json: Vec<Value> = marks
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let until = marks.get(k + 1).map_or(f64::INFINITY, |n| n.t);
            let pauses: Vec<Option<f64>> = grants.iter().map(|g| pause(g, m.t, t_start)).collect();
            let stalls: Vec<Option<f64>> = grants
                .iter()
                .map(|g| stall(g, m.t, until, t_start))
                .collect();
            let without = pauses.iter().filter(|p| p.is_none()).count();
            let (med, max) = median_max(&pauses);
            let (stall_med, stall_max) = median_max(&stalls);
            let lo = all_errors.partition_point(|&t| t < m.t);
            let hi = all_errors.partition_point(|&t| t <= m.t + MARK_ERROR_WINDOW_S);
            json!({
                "t": m.t,
                "label": m.label,
                "pauses_s": pauses.iter().map(|p| p.map(round6)).collect::<Vec<_>>(),
                "clients_without_grant_after": without,
                "pause_median_s": med.map(round6),
                "pause_max_s": max.map(round6),
                "stalls_s": stalls.iter().map(|p| p.map(round6)).collect::<Vec<_>>(),
                "stall_median_s": stall_med.map(round6),
                "stall_max_s": stall_max.map(round6),
                "errors_within_5s": hi - lo,
            })
        })
        .collect();

    let wall = (t_end - t_start).max(1e-9);
    json!({
        "system": opts.system.name(),
        "endpoints": opts.endpoints,
        "placement": match &opts.skip {
            Some(s) => format!("skip={s}"),
            None => "all".to_string(),
        },
        "connections": opts.connections,
        "keys": opts.keys,
        "key_prefix": opts.key_prefix,
        "lease_s": opts.lease_s,
        "duration_s": opts.duration_s,
        "cycles": cycles,
        "cycles_per_s": round6(cycles as f64 / wall),
        "errors": {"total": all_errors.len(), "by_kind": by_kind},
        "first_errors": first.into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
        "double_grants": doubles,
        "fence_regressions": regressions,
        "grants_checked": holds.len(),
        "held_at_end": held.held,
        "held_check": held.how,
        "marks": marks_json,
        "t_start": t_start,
        "t_end": t_end,
    })
}

/// The one-line summary printed to stderr.
fn summary(v: &Value) -> String {
    let mut s = format!(
        "failover {}: {} clients, {} keys, {} s: {} cycles ({:.0}/s), errors {} {}, \
         double grants {}, fence regressions {} (of {} grants), held at end {}",
        v["system"].as_str().unwrap_or("?"),
        v["connections"],
        v["keys"],
        v["duration_s"],
        v["cycles"],
        v["cycles_per_s"].as_f64().unwrap_or(0.0),
        v["errors"]["total"],
        v["errors"]["by_kind"],
        v["double_grants"],
        v["fence_regressions"],
        v["grants_checked"],
        v["held_at_end"],
    );
    for m in v["marks"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "; mark {:?}: pause median {} s max {} s (longest stall median {} s max {} s), \
             {} clients without grant after, {} errors in 5 s",
            m["label"].as_str().unwrap_or(""),
            m["pause_median_s"],
            m["pause_max_s"],
            m["stall_median_s"],
            m["stall_max_s"],
            m["clients_without_grant_after"],
            m["errors_within_5s"],
        ));
    }
    s
}

// ---------------------------------------------------------------------------
// CLI

pub fn main(args: Vec<std::ffi::OsString>) -> Result<(), String> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut system = System::Dflockd;
    let mut endpoints = None;
    let mut connections = 100usize;
    let mut keys = 10usize;
    let mut duration_s = 30.0;
    let mut marks = None;
    let mut output = None;
    let mut key_prefix = "bench-".to_string();
    let mut lease_s = None;
    let mut skip = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("system") => {
                system = match crate::val(&mut parser)?.as_str() {
                    "dflockd" => System::Dflockd,
                    "etcd" => System::Etcd,
                    v => return Err(format!("--system: dflockd or etcd, not {v:?}")),
                }
            }
            Long("endpoints") => endpoints = Some(crate::val(&mut parser)?),
            Long("connections") | Short('c') => {
                connections = crate::num(&crate::val(&mut parser)?, "--connections")?
            }
            Long("keys") => keys = crate::num(&crate::val(&mut parser)?, "--keys")?,
            Long("duration") | Short('d') => {
                duration_s = crate::secs(&crate::val(&mut parser)?, "--duration")?.as_secs_f64()
            }
            Long("marks") => marks = Some(crate::val(&mut parser)?),
            Long("output") | Short('o') => output = Some(crate::val(&mut parser)?),
            Long("key-prefix") => key_prefix = crate::val(&mut parser)?,
            Long("lease") => {
                let l: u64 = crate::num(&crate::val(&mut parser)?, "--lease")?;
                if l == 0 {
                    return Err("--lease: must be at least 1".into());
                }
                lease_s = Some(l);
            }
            Long("placement") => {
                let v = crate::val(&mut parser)?;
                skip = match v.as_str() {
                    "all" => None,
                    _ => match v.strip_prefix("skip=") {
                        Some(ep) if !ep.is_empty() => Some(ep.to_string()),
                        _ => return Err(format!("--placement: all or skip=H:P, not {v:?}")),
                    },
                }
            }
            Long("help") | Short('h') => {
                print!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("{}\n{USAGE}", arg.unexpected())),
        }
    }
    let endpoints: Vec<String> = endpoints
        .ok_or("failover: --endpoints is required")?
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err("--endpoints: no endpoint".into());
    }
    let output = output.ok_or("failover: --output is required")?;
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if keys == 0 || keys > u32::MAX as usize {
        return Err("--keys must be at least 1".into());
    }
    if key_prefix.is_empty() || key_prefix.chars().any(char::is_whitespace) {
        return Err("--key-prefix: must be non-empty, without whitespace".into());
    }
    let usable: Vec<String> = endpoints
        .iter()
        .filter(|e| Some(*e) != skip.as_ref())
        .cloned()
        .collect();
    if let Some(s) = &skip {
        if usable.len() == endpoints.len() {
            return Err(format!("--placement skip={s}: not one of --endpoints"));
        }
    }
    if usable.is_empty() {
        return Err("--placement: no endpoint left to use".into());
    }
    let opts = Opts {
        system,
        endpoints,
        usable,
        skip,
        connections,
        keys,
        duration_s,
        marks,
        output,
        key_prefix,
        lease_s,
    };
    let (logs, t_start, t_end, held) = match opts.system {
        System::Dflockd => dflockd_run(&opts)?,
        System::Etcd => etcd_run(&opts)?,
    };
    let marks = match &opts.marks {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => {
                let (m, bad) = parse_marks(&text);
                if bad > 0 {
                    eprintln!("dflockd-bench failover: {path}: {bad} unreadable line(s) skipped");
                }
                m
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("--marks {path}: {e}")),
        },
        None => Vec::new(),
    };
    let v = analyse(&opts, &logs, &marks, t_start, t_end, &held);
    std::fs::write(&opts.output, format!("{v}\n"))
        .map_err(|e| format!("--output {}: {e}", opts.output))?;
    eprintln!("{}", summary(&v));
    Ok(())
}

// ---------------------------------------------------------------------------
// dflockd clients

/// A connection: requests are written whole, replies read line by line.
struct Conn {
    r: BufReader<TcpStream>,
    endpoint: String,
    line: String,
}

impl Conn {
    fn open(endpoint: &str, read_timeout: Duration) -> io::Result<Conn> {
        let mut last = None;
        for addr in resolve(endpoint)? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(read_timeout))?;
                    s.set_write_timeout(Some(Duration::from_secs(5)))?;
                    return Ok(Conn {
                        r: BufReader::new(s),
                        endpoint: endpoint.to_string(),
                        line: String::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    }

    /// Sends `cmd\nkey\narg\n` and returns the reply line without its
    /// newline. EOF is an `UnexpectedEof` error.
    fn request(&mut self, cmd: &str, key: &str, arg: &str) -> io::Result<&str> {
        let msg = format!("{cmd}\n{key}\n{arg}\n");
        self.r.get_ref().write_all(msg.as_bytes())?;
        self.line.clear();
        if self.r.read_line(&mut self.line)? == 0 || !self.line.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(self.line.trim_end_matches(['\n', '\r']))
    }
}

fn resolve(endpoint: &str) -> io::Result<Vec<SocketAddr>> {
    Ok(endpoint.to_socket_addrs()?.collect())
}

/// The error kind of a failed read or write.
fn io_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "read_timeout",
        _ => "connection_lost",
    }
}

/// The fence of a token: its first 16 hex characters as a u64.
pub fn token_fence(token: &str) -> Option<u64> {
    if token.len() != 32 {
        return None;
    }
    u64::from_str_radix(token.get(..16)?, 16).ok()
}

/// The kind under which a non-`ok` reply is counted: its first word.
fn reply_kind(line: &str) -> String {
    match line.split_whitespace().next() {
        Some(w) => w.to_string(),
        None => "empty_reply".to_string(),
    }
}

fn dflockd_client(i: usize, opts: &Opts, deadline: f64) -> (ClientLog, Option<Conn>) {
    let mut log = ClientLog::default();
    let key = opts.key(i);
    let key_idx = (i % opts.keys) as u32;
    let lock_arg = match opts.lease_s {
        Some(l) => format!("{ACQUIRE_TIMEOUT_S} {l}"),
        None => ACQUIRE_TIMEOUT_S.to_string(),
    };
    let n = opts.usable.len();
    let mut ep = i % n;
    let mut conn: Option<Conn> = None;
    while mono() < deadline {
        let c = match &mut conn {
            Some(c) => c,
            None => match Conn::open(&opts.usable[ep], READ_TIMEOUT) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    log.error("connect_failed", || format!("{}: {e}", opts.usable[ep]));
                    ep = (ep + 1) % n;
                    sleep_s(CONNECT_BACKOFF);
                    continue;
                }
            },
        };
        let sent = mono();
        let (token, lease) = match c.request("l", &key, &lock_arg) {
            Err(e) => {
                log.error(io_kind(&e), || format!("{} (lock): {e}", c.endpoint));
                conn = None;
                ep = (ep + 1) % n;
                continue;
            }
            Ok(line) => {
                let mut w = line.split_whitespace();
                if w.next() == Some("ok") {
                    let token = w.next().unwrap_or("").to_string();
                    let lease: Option<f64> = w.next().and_then(|l| l.parse().ok());
                    (token, lease)
                } else {
                    let kind = reply_kind(line);
                    let line = line.to_string();
                    let ep_name = c.endpoint.clone();
                    log.error(&kind, || format!("{ep_name} (lock): {line:?}"));
                    if kind == "error_unavailable" {
                        // The node has no leader and closes the connection:
                        // try the next one.
                        conn = None;
                        ep = (ep + 1) % n;
                    }
                    sleep_s(RETRY_BACKOFF);
                    continue;
                }
            }
        };
        let granted = mono();
        let fence = match token_fence(&token) {
            Some(f) => f,
            None => {
                let ep_name = c.endpoint.clone();
                log.error("bad_token", || format!("{ep_name}: {token:?}"));
                0
            }
        };
        // The grant happened on the server after the request was sent, so
        // the lease cannot end before `sent + lease`.
        let lease_end = lease.map_or(f64::INFINITY, |l| sent + l);
        let release_at = mono();
        let mut hold = Hold {
            key: key_idx,
            client: i as u32,
            grant: granted,
            end: release_at.min(lease_end),
            fence,
        };
        match c.request("r", &key, &token) {
            Err(e) => {
                // Whether the release arrived is unknown: the lock is left to
                // the server, which frees it with the connection.
                log.error(io_kind(&e), || format!("{} (release): {e}", c.endpoint));
                conn = None;
                ep = (ep + 1) % n;
            }
            Ok("ok") => log.cycles += 1,
            Ok(line) => {
                let kind = format!("release_{}", reply_kind(line));
                let line = line.to_string();
                let ep_name = c.endpoint.clone();
                log.error(&kind, || format!("{ep_name} (release): {line:?}"));
                if kind == "release_error_unavailable" {
                    conn = None;
                    ep = (ep + 1) % n;
                }
                sleep_s(RETRY_BACKOFF);
            }
        }
        hold.end = hold.end.max(hold.grant);
        log.holds.push(hold);
    }
    (log, conn)
}

type RunResult = (Vec<ClientLog>, f64, f64, HeldCheck);

fn dflockd_run(opts: &Opts) -> Result<RunResult, String> {
    let opts = Arc::new(opts.clone());
    let t_start = mono();
    let deadline = t_start + opts.duration_s;
    let mut threads = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let o = Arc::clone(&opts);
        let h = std::thread::Builder::new()
            .name(format!("client-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || dflockd_client(i, &o, deadline))
            .map_err(|e| format!("spawning client {i}: {e}"))?;
        threads.push(h);
    }
    let mut logs = Vec::with_capacity(opts.connections);
    // The connections stay open until the check below, so that nothing is
    // released by a disconnect before it looks.
    let mut conns = Vec::with_capacity(opts.connections);
    for h in threads {
        let (log, conn) = h.join().map_err(|_| "a client thread panicked")?;
        logs.push(log);
        conns.push(conn);
    }
    let t_end = mono();
    let connected = conns.iter().filter(|c| c.is_some()).count();
    let mut held = dflockd_held(&opts);
    held.how = format!(
        "{}; {connected} of {} clients still connected",
        held.how, opts.connections
    );
    drop(conns);
    Ok((logs, t_start, t_end, held))
}

/// Asks every endpoint for `stats` and returns the leader's answer (or the
/// first answer of a node outside a cluster): `(endpoint, role, json)`.
fn stats_view(opts: &Opts) -> Option<(String, String, Value)> {
    let mut fallback = None;
    for ep in &opts.endpoints {
        let Ok(mut c) = Conn::open(ep, Duration::from_secs(5)) else {
            continue;
        };
        let Ok(line) = c.request("stats", "_", "_") else {
            continue;
        };
        let Some(body) = line.strip_prefix("ok ") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            continue;
        };
        let role = v["cluster"]["role"].as_str().unwrap_or("").to_string();
        if role == "leader" {
            return Some((ep.clone(), role, v));
        }
        if fallback.is_none() && v.get("cluster").is_none() {
            fallback = Some((ep.clone(), "standalone".to_string(), v));
        }
    }
    fallback
}

/// Counts the run's keys among the held locks of a `stats` body, and the
/// node ids (top 16 bits of the owner's connection id) that hold them.
pub fn held_in_stats(stats: &Value, keys: &[String]) -> (u64, Vec<u64>) {
    let mut n = 0;
    let mut nodes = Vec::new();
    for l in stats["locks"].as_array().into_iter().flatten() {
        let Some(k) = l["key"].as_str() else { continue };
        if keys.iter().any(|x| x == k) && !l["owner_conn_id"].is_null() {
            n += 1;
            if let Some(id) = l["owner_conn_id"].as_u64() {
                let node = id >> 48;
                if !nodes.contains(&node) {
                    nodes.push(node);
                }
            }
        }
    }
    nodes.sort_unstable();
    (n, nodes)
}

/// Locks of the run still held once every client has released. Locks held
/// by connections of a killed node stay until the cluster declares the node
/// lost, so a non-zero count is looked at again for up to `HELD_WAIT_S`;
/// an acknowledged release that was lost stays for the whole lease.
fn dflockd_held(opts: &Opts) -> HeldCheck {
    let keys = opts.key_names();
    let began = mono();
    let mut first: Option<(u64, Vec<u64>)> = None;
    loop {
        let Some((ep, role, v)) = stats_view(opts) else {
            if mono() - began < HELD_WAIT_S {
                sleep_s(Duration::from_millis(500));
                continue;
            }
            return HeldCheck {
                held: None,
                how: "stats: no endpoint answered with a leader's view".into(),
            };
        };
        let (n, nodes) = held_in_stats(&v, &keys);
        let first = first.get_or_insert_with(|| (n, nodes.clone()));
        let waited = mono() - began;
        if n == 0 || waited >= HELD_WAIT_S {
            let mut how = format!(
                "stats on {ep} ({role}) {waited:.1} s after the clients finished: \
                 {n} of the {} keys held",
                keys.len()
            );
            if n > 0 {
                how.push_str(&format!(" (owner nodes {nodes:?})"));
            }
            if first.0 != n {
                how.push_str(&format!(
                    "; first look: {} held (owner nodes {:?})",
                    first.0, first.1
                ));
            }
            return HeldCheck { held: Some(n), how };
        }
        sleep_s(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------------
// etcd clients

#[cfg(not(feature = "etcd"))]
fn etcd_run(_opts: &Opts) -> Result<RunResult, String> {
    Err(
        "--system etcd: this dflockd-bench was built without etcd support; \
         rebuild with `cargo build --release -p dflockd-bench --features etcd`"
            .into(),
    )
}

/// The kind under which an etcd error is counted: the gRPC status code's
/// name (`Unavailable`, `DeadlineExceeded`, ...) or the client error's type.
#[cfg(feature = "etcd")]
fn etcd_kind(e: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => format!("{:?}", s.code()),
        E::TransportError(_) => "transport".into(),
        E::IoError(_) => "io".into(),
        E::LeaseKeepAliveError(_) => "lease_keep_alive".into(),
        E::EndpointError(_) => "endpoint".into(),
        _ => "other".into(),
    }
}

#[cfg(feature = "etcd")]
fn etcd_lease_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// The session lease's TTL when `--lease` is not given, in seconds.
#[cfg(feature = "etcd")]
const ETCD_DEFAULT_TTL_S: u64 = 30;

/// A client after the run: kept (with its lease alive) until the check.
#[cfg(feature = "etcd")]
struct EtcdSession {
    client: etcd_client::Client,
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "etcd")]
async fn etcd_sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Grants a lease and starts keeping it alive, retrying until `give_up`.
#[cfg(feature = "etcd")]
async fn etcd_session(
    client: &mut etcd_client::Client,
    ttl: u64,
    give_up: f64,
    log: &mut ClientLog,
) -> Option<(i64, tokio::task::JoinHandle<()>)> {
    use crate::etcd;
    loop {
        match etcd::grant_lease(client, ttl as i64).await {
            Ok(lease) => {
                let every = Duration::from_secs_f64((ttl as f64 / 3.0).max(0.5));
                let keeper = etcd::spawn_keep_alive(client.clone(), lease, every);
                return Some((lease, keeper));
            }
            Err(e) => {
                log.error(&format!("lease_{}", etcd_kind(&e)), || {
                    format!("lease grant: {}", etcd::error_text(&e))
                });
                if mono() >= give_up {
                    return None;
                }
                etcd_sleep(RETRY_BACKOFF).await;
            }
        }
    }
}

/// One etcd client: its own `Client` over the usable endpoints, one lease
/// kept alive, then Lock → Unlock cycles until the deadline. A failed Lock
/// is retried (with the same lease and name it returns the same ownership
/// key if the failed call had created it), and so is a failed Unlock; after
/// the deadline a cycle in progress is still finished, for at most
/// `ACQUIRE_TIMEOUT_S` more seconds.
#[cfg(feature = "etcd")]
async fn etcd_client(
    i: usize,
    opts: Arc<Opts>,
    urls: Arc<Vec<String>>,
    deadline: f64,
) -> (ClientLog, Option<EtcdSession>) {
    use crate::etcd;
    let mut log = ClientLog::default();
    let give_up = deadline + ACQUIRE_TIMEOUT_S as f64;
    let name = opts.key(i).into_bytes();
    let key_idx = (i % opts.keys) as u32;
    let ttl = opts.lease_s.unwrap_or(ETCD_DEFAULT_TTL_S);
    let timeout = Some(Duration::from_secs(ACQUIRE_TIMEOUT_S));
    let mut client = loop {
        match etcd::connect(&urls, timeout).await {
            Ok(c) => break c,
            Err(e) => {
                log.error(&format!("connect_{}", etcd_kind(&e)), || {
                    etcd::error_text(&e)
                });
                if mono() >= deadline {
                    return (log, None);
                }
                etcd_sleep(CONNECT_BACKOFF).await;
            }
        }
    };
    let Some((mut lease, mut keeper)) = etcd_session(&mut client, ttl, deadline, &mut log).await
    else {
        return (log, None);
    };
    // Set while a Lock has failed and not been retried with success: such a
    // Lock may have left an ownership key behind, so it is finished even
    // after the deadline.
    let mut lock_pending = false;
    loop {
        let now = mono();
        if (now >= deadline && !lock_pending) || now >= give_up {
            break;
        }
        let (key, rev) = match etcd::lock(&mut client, &name, lease).await {
            Ok(r) => r,
            Err(e) => {
                log.error(&etcd_kind(&e), || format!("lock: {}", etcd::error_text(&e)));
                if etcd_lease_gone(&e) {
                    // The lease lapsed: whatever it held is gone with it.
                    keeper.abort();
                    lock_pending = false;
                    match etcd_session(&mut client, ttl, give_up, &mut log).await {
                        Some((l, k)) => (lease, keeper) = (l, k),
                        None => return (log, None),
                    }
                } else {
                    lock_pending = true;
                }
                etcd_sleep(RETRY_BACKOFF).await;
                continue;
            }
        };
        lock_pending = false;
        let granted = mono();
        // The lease is kept alive, so the lock is held until the Unlock.
        let hold = Hold {
            key: key_idx,
            client: i as u32,
            grant: granted,
            end: mono(),
            fence: rev.max(0) as u64,
        };
        loop {
            match etcd::unlock(&mut client, &key).await {
                Ok(_) => {
                    log.cycles += 1;
                    break;
                }
                Err(e) => {
                    log.error(&format!("unlock_{}", etcd_kind(&e)), || {
                        format!("unlock: {}", etcd::error_text(&e))
                    });
                    if mono() >= give_up {
                        break;
                    }
                    etcd_sleep(RETRY_BACKOFF).await;
                }
            }
        }
        log.holds.push(hold);
    }
    let session = EtcdSession {
        client,
        lease,
        keeper,
    };
    (log, Some(session))
}

#[cfg(feature = "etcd")]
fn etcd_run(opts: &Opts) -> Result<RunResult, String> {
    use crate::etcd;
    let urls = Arc::new(
        etcd::parse_endpoints(&opts.usable.join(",")).map_err(|e| format!("--endpoints: {e}"))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let opts = Arc::new(opts.clone());
    let out = rt.block_on(async move {
        let t_start = mono();
        let deadline = t_start + opts.duration_s;
        let tasks: Vec<_> = (0..opts.connections)
            .map(|i| {
                tokio::spawn(etcd_client(
                    i,
                    Arc::clone(&opts),
                    Arc::clone(&urls),
                    deadline,
                ))
            })
            .collect();
        let mut logs = Vec::with_capacity(tasks.len());
        let mut sessions = Vec::with_capacity(tasks.len());
        for t in tasks {
            let (log, s) = t.await.map_err(|e| format!("a client task failed: {e}"))?;
            logs.push(log);
            sessions.extend(s);
        }
        let t_end = mono();
        let leases: Vec<i64> = sessions.iter().map(|s| s.lease).collect();
        let mut held = etcd_held(&opts, &urls, &leases).await;
        held.how = format!(
            "{}; {} of {} clients still had their session",
            held.how,
            sessions.len(),
            opts.connections
        );
        // Clean up: revoking a lease deletes whatever key it still holds.
        let revokes: Vec<_> = sessions
            .into_iter()
            .map(|mut s| {
                s.keeper.abort();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        etcd::revoke_lease(&mut s.client, s.lease),
                    )
                    .await;
                })
            })
            .collect();
        for r in revokes {
            let _ = r.await;
        }
        Ok::<_, String>((logs, t_start, t_end, held))
    });
    rt.shutdown_timeout(Duration::from_millis(200));
    out
}

/// Counts the ownership keys under the run's lock names (`<name>/<lease>`)
/// that belong to the clients' leases, all still alive: each is a lock that
/// an acknowledged Unlock did not remove (or a cycle that never finished).
#[cfg(feature = "etcd")]
async fn etcd_held(opts: &Opts, urls: &[String], leases: &[i64]) -> HeldCheck {
    use crate::etcd;
    use etcd_client::GetOptions;
    let names = opts.key_names();
    let prefix = format!("{}f", opts.key_prefix);
    let began = mono();
    let mut last_err = String::from("no attempt");
    while mono() - began < HELD_WAIT_S {
        let r = async {
            let mut c = etcd::connect(urls, Some(Duration::from_secs(5))).await?;
            c.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()))
                .await
        }
        .await;
        match r {
            Ok(resp) => {
                let (mut ours, mut other) = (0u64, 0u64);
                for kv in resp.kvs() {
                    let Ok(k) = std::str::from_utf8(kv.key()) else {
                        continue;
                    };
                    let Some((name, _)) = k.rsplit_once('/') else {
                        continue;
                    };
                    if !names.iter().any(|n| n == name) {
                        continue;
                    }
                    if leases.contains(&kv.lease()) {
                        ours += 1;
                    } else {
                        other += 1;
                    }
                }
                let mut how = format!(
                    "linearizable range over {prefix:?} right after the clients finished, \
                     their leases alive: {ours} ownership keys of this run's leases"
                );
                if other > 0 {
                    how.push_str(&format!(
                        " ({other} more under other leases, e.g. an earlier run)"
                    ));
                }
                return HeldCheck {
                    held: Some(ours),
                    how,
                };
            }
            Err(e) => last_err = etcd::error_text(&e),
        }
        etcd_sleep(Duration::from_millis(500)).await;
    }
    HeldCheck {
        held: None,
        how: format!("range over {prefix:?} failed: {last_err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(key: u32, client: u32, grant: f64, end: f64, fence: u64) -> Hold {
        Hold {
            key,
            client,
            grant,
            end,
            fence,
        }
    }

    #[test]
    fn marks_file() {
        let (m, bad) = parse_marks("12.5 kill leader n1\n\n# c\n3.25\tk2  \nxx y\n7 \n");
        assert_eq!(bad, 1);
        assert_eq!(
            m,
            vec![
                Mark {
                    t: 3.25,
                    label: "k2".into()
                },
                Mark {
                    t: 7.0,
                    label: "".into()
                },
                Mark {
                    t: 12.5,
                    label: "kill leader n1".into()
                },
            ]
        );
        assert_eq!(parse_marks(""), (vec![], 0));
        assert_eq!(parse_marks("nan x\ninf y\n").1, 2);
    }

    #[test]
    fn pauses() {
        let g = [1.0, 2.0, 3.0, 6.5, 7.0];
        assert_eq!(pause(&g, 4.0, 0.0), Some(3.5));
        // A grant exactly at the mark counts as after it.
        assert_eq!(pause(&g, 3.0, 0.0), Some(1.0));
        // No grant before the mark: from the start.
        assert_eq!(pause(&g, 0.5, 0.25), Some(0.75));
        // No grant after: null.
        assert_eq!(pause(&g, 7.5, 0.0), None);
        assert_eq!(pause(&[], 1.0, 0.0), None);
    }

    #[test]
    fn stalls() {
        // A grant delivered just after the mark, then the real stall.
        let g = [1.0, 1.01, 3.5, 3.51, 10.0];
        assert!((pause(&g, 1.005, 0.0).unwrap() - 0.01).abs() < 1e-9);
        assert_eq!(stall(&g, 1.005, f64::INFINITY, 0.0), Some(6.49));
        // Bounded by the next mark.
        assert_eq!(stall(&g, 1.005, 5.0, 0.0), Some(2.49));
        assert_eq!(stall(&g, 10.5, f64::INFINITY, 0.0), None);
        assert_eq!(stall(&g, 1.5, 2.0, 0.0), None);
        assert_eq!(stall(&g, 0.5, 1.005, 0.25), Some(0.75));
    }

    #[test]
    fn overlaps() {
        // Disjoint and touching intervals, one key: fine.
        let mut v = vec![
            h(0, 1, 0.0, 1.0, 1),
            h(0, 2, 1.0, 2.0, 2),
            h(0, 1, 2.5, 3.0, 3),
        ];
        assert_eq!(double_grants(&mut v), 0);
        // Overlap between two clients on one key.
        let mut v = vec![h(0, 1, 0.0, 1.0, 1), h(0, 2, 0.5, 2.0, 2)];
        assert_eq!(double_grants(&mut v), 1);
        // The same times on different keys do not overlap.
        let mut v = vec![h(0, 1, 0.0, 1.0, 1), h(1, 2, 0.5, 2.0, 2)];
        assert_eq!(double_grants(&mut v), 0);
        // A long interval overlapping two later ones, unsorted input; one of
        // them is the same client's (not counted).
        let mut v = vec![
            h(3, 2, 2.0, 2.5, 9),
            h(3, 1, 0.0, 5.0, 1),
            h(3, 1, 1.0, 1.5, 2),
            h(3, 3, 6.0, 7.0, 3),
        ];
        assert_eq!(double_grants(&mut v), 1);
    }

    #[test]
    fn fences() {
        let mut v = vec![
            h(0, 1, 0.0, 1.0, 5),
            h(0, 2, 1.0, 2.0, 7),
            h(1, 1, 0.5, 1.0, 1),
            h(0, 1, 3.0, 4.0, 7),
            h(0, 2, 5.0, 6.0, 6),
            h(1, 3, 2.0, 3.0, 2),
        ];
        // Key 0: 5, 7, 7 (regression), 6 (regression); key 1: 1, 2.
        assert_eq!(fence_regressions(&mut v), 2);
        assert_eq!(fence_regressions(&mut []), 0);
    }

    #[test]
    fn tokens_and_held() {
        assert_eq!(token_fence("0000000000000001b737106516adda15"), Some(1));
        assert_eq!(token_fence("00000000000001ffb737106516adda15"), Some(0x1ff));
        assert_eq!(token_fence("zz"), None);
        let stats: Value = serde_json::from_str(
            r#"{"locks":[{"key":"bench-f1","owner_conn_id":562949953421312,"lease_expires_in_s":3,"waiters":0},
                         {"key":"other","owner_conn_id":1,"lease_expires_in_s":3,"waiters":0}]}"#,
        )
        .unwrap();
        let keys = vec!["bench-f0".to_string(), "bench-f1".to_string()];
        assert_eq!(held_in_stats(&stats, &keys), (1, vec![2]));
        assert_eq!(held_in_stats(&json!({}), &keys), (0, vec![]));
    }

    #[test]
    fn analysis_json() {
        let opts = Opts {
            system: System::Dflockd,
            endpoints: vec!["a:1".into()],
            usable: vec!["a:1".into()],
            skip: None,
            connections: 2,
            keys: 1,
            duration_s: 10.0,
            marks: None,
            output: String::new(),
            key_prefix: "bench-".into(),
            lease_s: None,
        };
        let logs = vec![
            ClientLog {
                holds: vec![h(0, 0, 1.0, 1.1, 1), h(0, 0, 5.0, 5.1, 3)],
                errors: vec![ErrorEvent {
                    t: 4.5,
                    kind: "connection_lost".into(),
                }],
                first_errors: vec![(4.5, "connection_lost: x".into())],
                cycles: 2,
            },
            ClientLog {
                holds: vec![h(0, 1, 2.0, 2.1, 2)],
                errors: vec![],
                first_errors: vec![],
                cycles: 1,
            },
        ];
        let marks = vec![Mark {
            t: 4.0,
            label: "kill".into(),
        }];
        let held = HeldCheck {
            held: Some(0),
            how: "x".into(),
        };
        let v = analyse(&opts, &logs, &marks, 0.0, 10.0, &held);
        assert_eq!(v["cycles"], 3);
        assert_eq!(v["errors"]["total"], 1);
        assert_eq!(v["errors"]["by_kind"]["connection_lost"], 1);
        assert_eq!(v["double_grants"], 0);
        assert_eq!(v["fence_regressions"], 0);
        assert_eq!(v["grants_checked"], 3);
        let m = &v["marks"][0];
        assert_eq!(m["pauses_s"], json!([4.0, null]));
        assert_eq!(m["stalls_s"], json!([4.0, null]));
        assert_eq!(m["pause_max_s"], 4.0);
        assert_eq!(m["clients_without_grant_after"], 1);
        assert_eq!(m["errors_within_5s"], 1);
        assert_eq!(v["first_errors"][0], "+4.500s client 0: connection_lost: x");
    }
}
