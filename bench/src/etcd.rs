//! Load on etcd's v3 lock service (feature `etcd`), measured the same way as
//! the dflockd modes of `load.rs`: closed loops, an HDR histogram of cycle
//! latencies, the generator's own CPU from `/proc/self`, warm-up excluded.
//!
//! Each of the N connections is an independent `etcd_client::Client` (so its
//! own HTTP/2 connection to each endpoint; with several endpoints the client
//! balances its requests over them). At start a connection grants itself one
//! lease, the way etcd's concurrency session does, then loops
//! `Lock(name, lease)` → `Unlock(key)`; one cycle is that pair.
//!
//! * `etcd-lock`: connection i locks its own name `<prefix>k<i>`;
//! * `etcd-contended`: the connections share `--keys` K names
//!   `<prefix>c<j>`, connection i using j = i mod K.
//!
//! The lease has a TTL of [`SESSION_TTL_S`] (600 s) and no keep-alive: runs
//! are far shorter than that, and a keep-alive stream would add traffic
//! to what is measured. Every lease is revoked when the run ends, which
//! removes any lock key a connection still held or waited with, so that the
//! next run on the same names does not queue behind a leftover.
//!
//! The pieces a driver of its own needs (parse an endpoint list, connect,
//! grant/keep alive/revoke the session lease, lock, unlock) are public.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, Error, LockOptions};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::{load, procstat};

/// etcd's client port on the local host, when no endpoint is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";

/// TTL of the session lease of a benchmark connection, in seconds.
pub const SESSION_TTL_S: i64 = 600;

/// Parses a comma-separated endpoint list `host:port,host:port,...` (an
/// entry may also be written `http://host:port`) into the `http://` URLs
/// that [`connect`] takes. Blanks around entries are ignored; an empty
/// entry, a missing or bad port, or another scheme (TLS is not built in) is
/// an error.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for raw in list.split(',') {
        let e = raw.trim();
        if e.is_empty() {
            return Err(format!("endpoint list {list:?}: empty entry"));
        }
        let hostport = match e.split_once("://") {
            Some(("http", rest)) => rest.trim_end_matches('/'),
            Some((scheme, _)) => {
                return Err(format!(
                    "endpoint {e:?}: scheme {scheme}:// not supported (plain http:// only)"
                ));
            }
            None => e,
        };
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return Err(format!("endpoint {e:?}: expected host:port"));
        };
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.is_empty() || host.contains('/') || (host.contains(':') && !bracketed) {
            return Err(format!("endpoint {e:?}: bad host (IPv6 goes in brackets)"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("endpoint {e:?}: bad port {port:?}")),
        }
        out.push(format!("http://{host}:{port}"));
    }
    Ok(out)
}

/// Connects one client to `endpoints` (URLs from [`parse_endpoints`]); the
/// client opens its own HTTP/2 connection to each endpoint and balances its
/// requests over those it can reach. Connections are made lazily: an
/// unreachable cluster shows as errors of the first requests, not here.
///
/// `request_timeout`: `None` lets a request wait as long as the server
/// takes (a `Lock` on a held name waits for the holder); `Some(t)` fails a
/// request after `t` and also sends HTTP/2 keep-alive pings every `t`
/// (failing after `t` without an answer), so that a member that dies without
/// closing its sockets is noticed.
pub async fn connect(
    endpoints: &[String],
    request_timeout: Option<Duration>,
) -> Result<Client, Error> {
    let mut o = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
    if let Some(t) = request_timeout {
        o = o.with_timeout(t).with_keep_alive(t, t);
    }
    Client::connect(endpoints, Some(o)).await
}

/// Grants the session lease a connection attaches its locks to, and returns
/// its ID. Without a keep-alive ([`spawn_keep_alive`]) it lapses after
/// `ttl_s` seconds, releasing every lock taken with it.
pub async fn grant_lease(client: &mut Client, ttl_s: i64) -> Result<i64, Error> {
    Ok(client.lease_grant(ttl_s, None).await?.id())
}

/// Revokes a lease: every key attached to it (a held lock, a waiter's
/// queue entry) is deleted.
pub async fn revoke_lease(client: &mut Client, lease: i64) -> Result<(), Error> {
    client.lease_revoke(lease).await.map(|_| ())
}

/// Keeps `lease` alive in a task on the current tokio runtime: one
/// keep-alive every `every` (a third of the TTL is usual) on a stream that
/// is reopened after an error. Abort the handle to stop; the lease then
/// lapses after its TTL unless revoked.
pub fn spawn_keep_alive(
    client: Client,
    lease: i64,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = client;
        loop {
            if let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await {
                while keeper.keep_alive().await.is_ok() {
                    match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => tokio::time::sleep(every).await,
                        // TTL 0: the lease is gone; nothing left to keep.
                        Ok(Some(_)) => return,
                        _ => break,
                    }
                }
            }
            tokio::time::sleep(every.min(Duration::from_millis(200))).await;
        }
    })
}

/// Acquires the lock `name` for `lease`, waiting while another lease holds
/// it (first come, first served). Returns the key that now stands for the
/// ownership (pass it to [`unlock`]) and the revision in the response
/// header. Locking again a name already held with the same lease returns at
/// once with the same key.
pub async fn lock(client: &mut Client, name: &[u8], lease: i64) -> Result<(Vec<u8>, i64), Error> {
    let r = client
        .lock(name, Some(LockOptions::new().with_lease(lease)))
        .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    Ok((r.key().to_vec(), rev))
}

/// Releases the lock whose ownership key [`lock`] returned; returns the
/// revision in the response header.
pub async fn unlock(client: &mut Client, key: &[u8]) -> Result<i64, Error> {
    let r = client.unlock(key).await?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// A one-line description of an error: the gRPC code and message for a
/// status (without its metadata), the error's own text otherwise.
pub fn error_text(e: &Error) -> String {
    match e {
        Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        e => e.to_string(),
    }
}

/// Whether `e` says the lease no longer exists (it lapsed or was revoked).
fn lease_gone(e: &Error) -> bool {
    matches!(e, Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

// ---------------------------------------------------------------------------
// The `run` modes
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `etcd-lock`: a name per connection.
    Lock,
    /// `etcd-contended`: `keys` names shared by all connections.
    Contended,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Lock => "etcd-lock",
            Mode::Contended => "etcd-contended",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    /// `http://` URLs, every client gets them all.
    pub endpoints: Vec<String>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Shared names of `etcd-contended`.
    pub keys: usize,
    pub mode: Mode,
    /// Report this process's CPU per cycle (one member of a local cluster).
    pub server_pid: Option<u32>,
    pub label: String,
    pub key_prefix: String,
    pub progress: bool,
    pub variant: Option<String>,
    /// Threads running the clients: 1 = a current-thread tokio runtime on
    /// the main thread, n > 1 = a multi-thread runtime with n workers.
    pub client_threads: usize,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one connection counted; read by the main task under the mutex.
struct Tally {
    hist: Histogram<u64>,
    /// Cycles completed while measuring.
    cycles: u64,
    /// Cycles completed in any phase (for the progress line).
    all_cycles: u64,
    errors: u64,
    warmup_errors: u64,
    first_error: Option<String>,
    lease_regrants: u64,
}

impl Tally {
    fn error(&mut self, phase: u8, what: &str, e: &Error) {
        match phase {
            WARMUP => self.warmup_errors += 1,
            MEASURE => self.errors += 1,
            _ => return,
        }
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {}", error_text(e)));
        }
    }
}

fn new_hist() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|e| format!("histogram: {e}"))
}

/// A closed loop of Lock → Unlock until the phase turns to STOP. An error
/// counts and restarts the cycle after a short pause (a retried Lock with
/// the same lease is idempotent); a lease found gone is granted anew.
async fn conn_loop(
    mut client: Client,
    mut lease: i64,
    name: Vec<u8>,
    phase: Arc<AtomicU8>,
    tally: Arc<Mutex<Tally>>,
) {
    let pause = Duration::from_millis(10);
    loop {
        if phase.load(Ordering::Relaxed) == STOP {
            return;
        }
        let start = Instant::now();
        let key = match lock(&mut client, &name, lease).await {
            Ok((key, _)) => key,
            Err(e) => {
                let p = phase.load(Ordering::Relaxed);
                tally.lock().unwrap().error(p, "lock", &e);
                if lease_gone(&e) {
                    if let Ok(l) = grant_lease(&mut client, SESSION_TTL_S).await {
                        lease = l;
                        tally.lock().unwrap().lease_regrants += 1;
                    }
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let r = unlock(&mut client, &key).await;
        let now = Instant::now();
        let p = phase.load(Ordering::Relaxed);
        match r {
            Ok(_) => {
                let mut t = tally.lock().unwrap();
                t.all_cycles += 1;
                if p == MEASURE {
                    let ns = now.duration_since(start).as_nanos() as u64;
                    t.hist.saturating_record(ns.max(1));
                    t.cycles += 1;
                }
            }
            Err(e) => {
                tally.lock().unwrap().error(p, "unlock", &e);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The lock names of a run and the index of the one each connection uses.
fn names(mode: Mode, prefix: &str, connections: usize, keys: usize) -> Vec<String> {
    match mode {
        Mode::Lock => (0..connections).map(|i| format!("{prefix}k{i}")).collect(),
        Mode::Contended => {
            let k = keys.max(1);
            (0..connections)
                .map(|i| format!("{prefix}c{}", i % k))
                .collect()
        }
    }
}

/// Runs one benchmark against etcd and returns its result as a JSON object
/// of the same shape as `load::run`'s.
pub fn run(opts: &Opts) -> Result<Value, String> {
    if opts.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if opts.endpoints.is_empty() {
        return Err("no etcd endpoint".into());
    }
    let threads = opts.client_threads.max(1);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("tokio runtime: {e}"))?;
    let out = rt.block_on(run_async(opts, threads));
    // Tasks still blocked in a Lock are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_millis(200));
    out
}

async fn run_async(opts: &Opts, threads: usize) -> Result<Value, String> {
    let mode = opts.mode;
    let names = names(mode, &opts.key_prefix, opts.connections, opts.keys);
    let nkeys = match mode {
        Mode::Lock => opts.connections,
        Mode::Contended => opts.keys.max(1),
    };

    // Set up every connection (client + lease) before any load starts.
    let mut clients = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let mut c = connect(&opts.endpoints, None)
            .await
            .map_err(|e| format!("connect #{i} to {:?}: {}", opts.endpoints, error_text(&e)))?;
        let lease = grant_with_retry(&mut c)
            .await
            .map_err(|e| format!("lease grant #{i} on {:?}: {e}", opts.endpoints))?;
        clients.push((c, lease));
    }

    let phase = Arc::new(AtomicU8::new(WARMUP));
    let mut tallies = Vec::with_capacity(opts.connections);
    let mut tasks = Vec::with_capacity(opts.connections);
    for ((client, lease), name) in clients.iter().cloned().zip(names) {
        let tally = Arc::new(Mutex::new(Tally {
            hist: new_hist()?,
            cycles: 0,
            all_cycles: 0,
            errors: 0,
            warmup_errors: 0,
            first_error: None,
            lease_regrants: 0,
        }));
        tallies.push(tally.clone());
        tasks.push(tokio::spawn(conn_loop(
            client,
            lease,
            name.into_bytes(),
            phase.clone(),
            tally,
        )));
    }

    let pid_str = opts.server_pid.map(|p| p.to_string());
    let pid = pid_str.as_deref();
    let start = Instant::now();
    let measure_at = start + opts.warmup;
    let end_at = measure_at + opts.duration;
    let mut measuring = false;
    let mut m = procstat::mark(pid);
    let mut next_progress = start + Duration::from_secs(1);
    let mut last_cycles = 0u64;
    let totals = |tallies: &[Arc<Mutex<Tally>>]| {
        tallies.iter().fold((0u64, 0u64), |(c, e), t| {
            let t = t.lock().unwrap();
            (c + t.all_cycles, e + t.errors + t.warmup_errors)
        })
    };
    loop {
        let now = Instant::now();
        if !measuring && now >= measure_at {
            measuring = true;
            m = procstat::mark(pid);
            phase.store(MEASURE, Ordering::Relaxed);
        }
        if measuring && now >= end_at {
            break;
        }
        if now >= next_progress {
            let (cycles, errors) = totals(&tallies);
            if opts.progress {
                let ph = if measuring { "measure" } else { "warm-up" };
                eprintln!(
                    "  [{} {} c={} {ph} t={:.0}s] {} cycles/s, {} errors",
                    opts.label,
                    mode.name(),
                    opts.connections,
                    now.duration_since(start).as_secs_f64(),
                    cycles - last_cycles,
                    errors,
                );
            }
            last_cycles = cycles;
            next_progress += Duration::from_secs(1);
        }
        let wake = next_progress.min(if measuring { end_at } else { measure_at });
        tokio::time::sleep_until(wake.into()).await;
    }
    phase.store(STOP, Ordering::Relaxed);
    let end = procstat::mark(pid);
    let rss_kib = pid.and_then(procstat::rss_kib);
    let dead = tasks.iter().filter(|t| t.is_finished()).count() as u64;

    let mut hist = new_hist()?;
    let (mut cycles, mut errors, mut warmup_errors, mut regrants) = (0u64, 0u64, 0u64, 0u64);
    let mut first_error = None;
    for t in &tallies {
        let t = t.lock().unwrap();
        hist.add(&t.hist).map_err(|e| format!("histogram: {e}"))?;
        cycles += t.cycles;
        errors += t.errors;
        warmup_errors += t.warmup_errors;
        regrants += t.lease_regrants;
        if first_error.is_none() {
            first_error.clone_from(&t.first_error);
        }
    }

    // Let each loop finish the cycle it is in, then revoke every lease so
    // that no lock key outlives the run.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for t in &mut tasks {
            let _ = t.await;
        }
    })
    .await;
    for t in &tasks {
        t.abort();
    }
    let revokes: Vec<_> = clients
        .into_iter()
        .map(|(mut c, lease)| {
            tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(2), revoke_lease(&mut c, lease));
                matches!(r.await, Ok(Ok(())))
            })
        })
        .collect();
    let mut revoke_failures = 0u64;
    for r in revokes {
        if !matches!(r.await, Ok(true)) {
            revoke_failures += 1;
        }
    }

    let elapsed = end.at.duration_since(m.at).as_secs_f64();
    let requests = cycles * 2;
    let mut out = json!({
        "server": opts.label,
        "variant": opts.variant,
        "mode": mode.name(),
        "connections": opts.connections,
        "depth": 1,
        "keys": nkeys,
        "duration_s": elapsed,
        "warmup_s": opts.warmup.as_secs_f64(),
        "cycles": cycles,
        "requests": requests,
        "cycles_per_s": cycles as f64 / elapsed,
        "requests_per_s": requests as f64 / elapsed,
        "latency_us": load::quantiles(&hist),
        "errors": errors,
        "warmup_errors": warmup_errors,
        "first_error": first_error,
        "dead_connections": dead,
        "fifo_checked_grants": Value::Null,
        "fifo_violations": Value::Null,
        "server_pid": opts.server_pid,
        "server_rss_kib": rss_kib,
        "etcd": {
            "endpoints": opts.endpoints,
            "client_threads": threads,
            "lease_ttl_s": SESSION_TTL_S,
            "lease_regrants": regrants,
            "lease_revoke_failures": revoke_failures,
        },
    });
    load::add_cpu_fields(&mut out, &m, &end, cycles, requests);
    Ok(out)
}

/// Grants a session lease, retrying for a few seconds (the cluster may be
/// starting, or electing a leader).
async fn grant_with_retry(c: &mut Client) -> Result<i64, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(2), grant_lease(c, SESSION_TTL_S)).await;
        let e = match r {
            Ok(Ok(lease)) => return Ok(lease),
            Ok(Err(e)) => error_text(&e),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_lists() {
        assert_eq!(
            parse_endpoints("127.0.0.1:2379").unwrap(),
            ["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_endpoints(" 10.0.0.1:2379, http://10.0.0.2:2379/ ,node3:22379").unwrap(),
            [
                "http://10.0.0.1:2379",
                "http://10.0.0.2:2379",
                "http://node3:22379"
            ]
        );
        assert_eq!(
            parse_endpoints("[::1]:2379").unwrap(),
            ["http://[::1]:2379"]
        );
    }

    #[test]
    fn rejects_bad_endpoints() {
        for bad in [
            "",
            "a:1,",
            "a:1,,b:2",
            "localhost",
            "host:0",
            "host:99999",
            "host:x",
            ":2379",
            "::1:2379",
            "https://h:2379",
            "unix://sock:1",
            "h/p:2379",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lock_names_per_mode() {
        assert_eq!(names(Mode::Lock, "b-", 3, 1), ["b-k0", "b-k1", "b-k2"]);
        assert_eq!(
            names(Mode::Contended, "b-", 5, 2),
            ["b-c0", "b-c1", "b-c0", "b-c1", "b-c0"]
        );
        // --keys 0 means one shared name, as in `contended`.
        assert_eq!(names(Mode::Contended, "b-", 2, 0), ["b-c0", "b-c0"]);
    }
}
