//! The low-level client: one connection, one method per protocol command.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::conn::{Conn, Line, MAX_LINE, MAX_STATS_LINE, deadline_after, timed_out, unexpected};
use crate::error::{Error, Result};
use crate::stats::Stats;

/// The largest number of seconds the server accepts in a request.
pub const MAX_SECONDS: u64 = 9_223_372_036;

/// Longest key, token, channel or pattern (the server's line limit).
const MAX_FIELD: usize = 256;

/// Longest `signal` payload or `auth` token.
const MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes of pushed signals kept while nobody reads them; older ones are
/// dropped beyond this.
const MAX_PENDING_SIGNAL_BYTES: usize = 16 << 20;

/// A held lock or semaphore slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The key.
    pub key: String,
    /// The token that releases and renews it.
    pub token: String,
    /// The lease the server granted; the grant lapses this long after it
    /// was made unless renewed.
    pub lease: Duration,
}

impl Grant {
    /// The fencing number: the first 16 hex digits of the token, which
    /// strictly increase with every grant the server makes. `None` for a
    /// token of another shape (a server that does not fence).
    pub fn fence(&self) -> Option<u64> {
        fence_of(&self.token)
    }
}

/// The fence carried by a token (see [`Grant::fence`]).
pub fn fence_of(token: &str) -> Option<u64> {
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&token[..16], 16).ok()
}

/// What `enqueue` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// The slot was free: it is held now (no `wait` needed).
    Acquired(Grant),
    /// In the queue; [`Client::wait`] collects the grant.
    Queued,
}

/// A signal pushed to a listening connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    /// The channel it was published on.
    pub channel: String,
    /// The payload (the rest of the line, spaces included).
    pub payload: String,
}

/// How long a request may block on the server.
#[derive(Clone, Copy)]
enum Blocks {
    /// Answered at once: the reply is due within the I/O timeout.
    No,
    /// Up to this many seconds, plus the I/O timeout.
    Upto(u64),
}

/// A connection to one dflockd server (or cluster), with one method per
/// protocol command. Replies are matched to requests in order; signals
/// pushed by the server are queued aside and read with
/// [`next_signal`](Client::next_signal).
///
/// ```no_run
/// use std::time::Duration;
/// use dflockd_client::{Client, Config};
///
/// let mut c = Client::connect(&Config::new("127.0.0.1:6388")?)?;
/// let g = c.lock("deploy", Duration::from_secs(10), None)?;
/// println!("fence {:?}", g.fence());
/// c.release("deploy", &g.token)?;
/// # Ok::<(), dflockd_client::Error>(())
/// ```
///
/// When a call returns an error for which [`Error::is_connection`] is true,
/// the connection is closed; [`reconnect`](Client::reconnect) opens a new
/// one (to the next address of the server first).
pub struct Client {
    cfg: Config,
    addrs: Vec<String>,
    current: usize,
    conn: Option<Conn>,
    signals: VecDeque<Signal>,
    signal_bytes: usize,
    dropped_signals: u64,
    arg: String,
}

impl Client {
    /// Connects to the first shard of `cfg` (the only one in a plain
    /// set-up), trying its addresses in order.
    pub fn connect(cfg: &Config) -> Result<Client> {
        Client::connect_to(cfg, &cfg.servers.shards()[0])
    }

    /// Connects to the shard that holds `key`.
    pub fn connect_for_key(cfg: &Config, key: &str) -> Result<Client> {
        Client::connect_to(cfg, cfg.servers.for_key(key))
    }

    /// Connects to one server given by its addresses (several for a
    /// cluster), trying them in order.
    pub fn connect_to(cfg: &Config, addrs: &[String]) -> Result<Client> {
        if addrs.is_empty() {
            return Err(Error::InvalidInput("no server address".into()));
        }
        let mut c = Client {
            cfg: cfg.clone(),
            addrs: addrs.to_vec(),
            current: addrs.len() - 1,
            conn: None,
            signals: VecDeque::new(),
            signal_bytes: 0,
            dropped_signals: 0,
            arg: String::with_capacity(64),
        };
        c.reconnect()?;
        Ok(c)
    }

    /// Closes the connection (if any) and opens a new one, trying the
    /// server's addresses in turn, starting after the current one.
    pub fn reconnect(&mut self) -> Result<()> {
        self.conn = None;
        let n = self.addrs.len();
        let mut last = None;
        for i in 1..=n {
            let idx = (self.current + i) % n;
            match Conn::open(&self.addrs[idx], &self.cfg) {
                Ok(conn) => {
                    self.conn = Some(conn);
                    self.current = idx;
                    return Ok(());
                }
                Err(Error::Auth) => return Err(Error::Auth),
                Err(e) => last = Some(e),
            }
        }
        Err(Error::Unreachable {
            addrs: self.addrs.clone(),
            last: Box::new(last.unwrap_or(Error::NotConnected)),
        })
    }

    /// True while the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The address of the current connection.
    pub fn peer(&self) -> Option<&str> {
        self.conn.as_ref().map(Conn::addr)
    }

    // ---- locks ----

    /// `l`: waits up to `timeout` (rounded up to whole seconds; zero tries
    /// once) for the lock, FIFO. `lease` `None` takes the server default.
    /// A timeout is [`Error::Timeout`].
    pub fn lock(&mut self, key: &str, timeout: Duration, lease: Option<Duration>) -> Result<Grant> {
        self.acquire("l", key, timeout, None, lease)
    }

    /// `r`: releases the lock held with `token`.
    pub fn release(&mut self, key: &str, token: &str) -> Result<()> {
        self.release_cmd("r", key, token)
    }

    /// `n`: renews the lease for `lease` (or the server default) from now;
    /// returns the new lease.
    pub fn renew(&mut self, key: &str, token: &str, lease: Option<Duration>) -> Result<Duration> {
        self.renew_cmd("n", key, token, lease, None)
    }

    /// `e`: joins the lock's queue and returns at once.
    pub fn enqueue(&mut self, key: &str, lease: Option<Duration>) -> Result<Enqueued> {
        self.enqueue_cmd("e", key, None, lease)
    }

    /// `w`: waits up to `timeout` for the grant of an earlier `enqueue`.
    pub fn wait(&mut self, key: &str, timeout: Duration) -> Result<Grant> {
        self.wait_cmd("w", key, timeout)
    }

    // ---- semaphores ----

    /// `sl`: waits up to `timeout` for one of `limit` slots, FIFO.
    pub fn sem_acquire(
        &mut self,
        key: &str,
        limit: u64,
        timeout: Duration,
        lease: Option<Duration>,
    ) -> Result<Grant> {
        self.acquire("sl", key, timeout, Some(limit), lease)
    }

    /// `sr`: releases the slot held with `token`.
    pub fn sem_release(&mut self, key: &str, token: &str) -> Result<()> {
        self.release_cmd("sr", key, token)
    }

    /// `sn`: renews a slot's lease; returns the new lease.
    pub fn sem_renew(
        &mut self,
        key: &str,
        token: &str,
        lease: Option<Duration>,
    ) -> Result<Duration> {
        self.renew_cmd("sn", key, token, lease, None)
    }

    /// `se`: joins the semaphore's queue and returns at once.
    pub fn sem_enqueue(
        &mut self,
        key: &str,
        limit: u64,
        lease: Option<Duration>,
    ) -> Result<Enqueued> {
        self.enqueue_cmd("se", key, Some(limit), lease)
    }

    /// `sw`: waits up to `timeout` for the slot of an earlier `sem_enqueue`.
    pub fn sem_wait(&mut self, key: &str, timeout: Duration) -> Result<Grant> {
        self.wait_cmd("sw", key, timeout)
    }

    // ---- other commands ----

    /// `ping`: checks the server answers (and resets its idle timer).
    pub fn ping(&mut self) -> Result<()> {
        let reply = self.call("ping", "_", "", Blocks::No)?;
        let r = expect_ok("ping", &reply);
        self.settle(r)
    }

    /// `stats`, parsed.
    pub fn stats(&mut self) -> Result<Stats> {
        let raw = self.stats_json()?;
        let r = Stats::parse(&raw);
        self.settle(r)
    }

    /// `stats`: the JSON object as the server sent it.
    pub fn stats_json(&mut self) -> Result<String> {
        if let Some(c) = self.conn.as_mut() {
            c.max_line = MAX_STATS_LINE;
        }
        let reply = self.call("stats", "_", "", Blocks::No);
        if let Some(c) = self.conn.as_mut() {
            c.max_line = MAX_LINE;
        }
        let reply = reply?;
        let r = match reply.strip_prefix("ok ") {
            Some(json) => Ok(json.to_string()),
            None => Err(status_or_unexpected("stats", &reply)),
        };
        self.settle(r)
    }

    /// `listen`: subscribes to `pattern` (`*` one token, `>` the rest);
    /// with a `group`, each signal goes to one member of the group.
    pub fn listen(&mut self, pattern: &str, group: Option<&str>) -> Result<()> {
        self.subscription("listen", pattern, group)
    }

    /// `unlisten`: ends a subscription made with the same pattern and group.
    pub fn unlisten(&mut self, pattern: &str, group: Option<&str>) -> Result<()> {
        self.subscription("unlisten", pattern, group)
    }

    /// `signal`: publishes `payload` on `channel`; returns the number of
    /// deliveries made.
    pub fn signal(&mut self, channel: &str, payload: &str) -> Result<u64> {
        check_field("channel", channel)?;
        if channel.contains(['*', '>']) {
            return Err(Error::InvalidInput(format!(
                "wildcard in channel {channel:?} (only patterns have wildcards)"
            )));
        }
        if payload.trim().is_empty()
            || payload.contains(['\n', '\r'])
            || payload.len() > MAX_PAYLOAD
        {
            return Err(Error::InvalidInput(
                "a payload is one non-blank line of at most 64 KiB".into(),
            ));
        }
        let reply = self.call("signal", channel, payload, Blocks::No)?;
        let r = match reply.strip_prefix("ok ").map(str::parse::<u64>) {
            Some(Ok(n)) => Ok(n),
            _ => Err(status_or_unexpected("signal", &reply)),
        };
        self.settle(r)
    }

    /// The next pushed signal: one already received, else waits up to
    /// `timeout` (`None`: without limit) for one. `Ok(None)` when none
    /// came in time.
    pub fn next_signal(&mut self, timeout: Option<Duration>) -> Result<Option<Signal>> {
        if let Some(s) = self.signals.pop_front() {
            self.signal_bytes -= s.channel.len() + s.payload.len();
            return Ok(Some(s));
        }
        let deadline = timeout.and_then(deadline_after);
        let Some(line) = self.read(deadline)? else {
            return Ok(None);
        };
        if let Some(sig) = parse_signal(&line) {
            return Ok(Some(sig));
        }
        self.conn = None;
        if Error::from_status(&line).is_some() {
            // The server's idle timeout: it says `error` and hangs up.
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("the server ended the connection (it sent {line:?})"),
            )));
        }
        Err(unexpected("nothing (no request was pending)", &line))
    }

    /// How many pushed signals were dropped because more than 16 MiB of
    /// them waited unread.
    pub fn dropped_signals(&self) -> u64 {
        self.dropped_signals
    }

    // ---- internals ----

    fn acquire(
        &mut self,
        cmd: &str,
        key: &str,
        timeout: Duration,
        limit: Option<u64>,
        lease: Option<Duration>,
    ) -> Result<Grant> {
        check_field("key", key)?;
        let t = secs_ceil(timeout);
        let mut arg = std::mem::take(&mut self.arg);
        arg.clear();
        let _ = write!(arg, "{t}");
        if let Some(limit) = limit {
            let _ = write!(arg, " {}", check_limit(limit)?);
        }
        if let Some(l) = lease {
            let _ = write!(arg, " {}", lease_secs(l));
        }
        let reply = self.call(cmd, key, &arg, Blocks::Upto(t));
        self.arg = arg;
        let r = parse_grant(cmd, key, &reply?);
        self.settle(r)
    }

    fn release_cmd(&mut self, cmd: &str, key: &str, token: &str) -> Result<()> {
        check_field("key", key)?;
        check_field("token", token)?;
        let reply = self.call(cmd, key, token, Blocks::No)?;
        let r = expect_ok(cmd, &reply);
        self.settle(r)
    }

    /// A renewal whose reply must come within `within` (default: the I/O
    /// timeout).
    pub(crate) fn renew_cmd(
        &mut self,
        cmd: &str,
        key: &str,
        token: &str,
        lease: Option<Duration>,
        within: Option<Duration>,
    ) -> Result<Duration> {
        check_field("key", key)?;
        check_field("token", token)?;
        let arg = match lease {
            Some(l) => format!("{token} {}", lease_secs(l)),
            None => token.to_string(),
        };
        let deadline = deadline_after(within.unwrap_or(self.cfg.io_timeout));
        let reply = self.call_until(cmd, key, &arg, deadline)?;
        // Whole seconds from this server; the Python server may send a
        // fraction. Anything else, or beyond what a request may carry, is
        // not a lease.
        let r = match reply.strip_prefix("ok ").map(|s| s.trim().parse::<f64>()) {
            Some(Ok(secs)) if (0.0..=MAX_SECONDS as f64).contains(&secs) => {
                Ok(Duration::from_secs_f64(secs))
            }
            _ => Err(status_or_unexpected(cmd, &reply)),
        };
        self.settle(r)
    }

    fn enqueue_cmd(
        &mut self,
        cmd: &str,
        key: &str,
        limit: Option<u64>,
        lease: Option<Duration>,
    ) -> Result<Enqueued> {
        check_field("key", key)?;
        let mut arg = String::new();
        if let Some(limit) = limit {
            let _ = write!(arg, "{}", check_limit(limit)?);
        }
        if let Some(l) = lease {
            if !arg.is_empty() {
                arg.push(' ');
            }
            let _ = write!(arg, "{}", lease_secs(l));
        }
        let reply = self.call(cmd, key, &arg, Blocks::No)?;
        if reply == "queued" {
            return Ok(Enqueued::Queued);
        }
        let r = match reply.strip_prefix("acquired ") {
            Some(rest) => parse_token_lease(cmd, key, rest, &reply).map(Enqueued::Acquired),
            None => Err(status_or_unexpected(cmd, &reply)),
        };
        self.settle(r)
    }

    fn wait_cmd(&mut self, cmd: &str, key: &str, timeout: Duration) -> Result<Grant> {
        check_field("key", key)?;
        let t = secs_ceil(timeout);
        let reply = self.call(cmd, key, &t.to_string(), Blocks::Upto(t))?;
        let r = parse_grant(cmd, key, &reply);
        self.settle(r)
    }

    fn subscription(&mut self, cmd: &str, pattern: &str, group: Option<&str>) -> Result<()> {
        check_field("pattern", pattern)?;
        let group = group.unwrap_or("");
        if !group.is_empty() {
            check_field("group", group)?;
        }
        let reply = self.call(cmd, pattern, group, Blocks::No)?;
        let r = expect_ok(cmd, &reply);
        self.settle(r)
    }

    /// Closes the connection when a reply could not be understood (a
    /// [`Error::Protocol`] from parsing it): the peer does not speak the
    /// protocol, or is out of step, so the next reply could not be trusted
    /// either. Status errors leave the connection open.
    /// Closes the connection after an error that leaves it unusable: a
    /// broken or desynchronised stream, or `error_auth` (the server closes
    /// the connection itself).
    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        if matches!(&r, Err(e) if e.is_connection() || matches!(e, Error::Auth)) {
            self.conn = None;
        }
        r
    }

    fn call(&mut self, cmd: &str, key: &str, arg: &str, blocks: Blocks) -> Result<String> {
        let deadline = match blocks {
            Blocks::No => deadline_after(self.cfg.io_timeout),
            Blocks::Upto(s) if s >= MAX_SECONDS => None,
            Blocks::Upto(s) => {
                deadline_after(Duration::from_secs(s).saturating_add(self.cfg.io_timeout))
            }
        };
        self.call_until(cmd, key, arg, deadline)
    }

    /// Sends one request and reads its reply, queueing pushed signals.
    /// Any failure but a status closes the connection: a reply that may
    /// still come would be taken for the next request's.
    fn call_until(
        &mut self,
        cmd: &str,
        key: &str,
        arg: &str,
        deadline: Option<Instant>,
    ) -> Result<String> {
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        if let Err(e) = conn.send(cmd, key, arg) {
            self.conn = None;
            return Err(e);
        }
        loop {
            match self.read(deadline)? {
                None => {
                    self.conn = None;
                    return Err(timed_out(cmd));
                }
                Some(line) => match parse_signal(&line) {
                    Some(sig) => self.push_signal(sig),
                    None => return Ok(line),
                },
            }
        }
    }

    fn read(&mut self, deadline: Option<Instant>) -> Result<Option<String>> {
        let conn = self.conn.as_mut().ok_or(Error::NotConnected)?;
        match conn.read_line(deadline) {
            Ok(Line::Line(l)) => Ok(Some(l)),
            Ok(Line::TimedOut) => Ok(None),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn push_signal(&mut self, sig: Signal) {
        self.signal_bytes += sig.channel.len() + sig.payload.len();
        self.signals.push_back(sig);
        while self.signal_bytes > MAX_PENDING_SIGNAL_BYTES {
            let Some(old) = self.signals.pop_front() else {
                break;
            };
            self.signal_bytes -= old.channel.len() + old.payload.len();
            self.dropped_signals += 1;
        }
    }
}

fn parse_signal(line: &str) -> Option<Signal> {
    let rest = line.strip_prefix("sig ")?;
    let (channel, payload) = rest.split_once(' ')?;
    Some(Signal {
        channel: channel.to_string(),
        payload: payload.to_string(),
    })
}

fn parse_grant(cmd: &str, key: &str, reply: &str) -> Result<Grant> {
    match reply.strip_prefix("ok ") {
        Some(rest) => parse_token_lease(cmd, key, rest, reply),
        None => Err(status_or_unexpected(cmd, reply)),
    }
}

fn parse_token_lease(cmd: &str, key: &str, rest: &str, reply: &str) -> Result<Grant> {
    let mut it = rest.split(' ');
    let (Some(token), Some(lease), None) = (it.next(), it.next(), it.next()) else {
        return Err(unexpected(cmd, reply));
    };
    let lease: u64 = lease.parse().map_err(|_| unexpected(cmd, reply))?;
    if token.is_empty() || lease > MAX_SECONDS {
        return Err(unexpected(cmd, reply));
    }
    Ok(Grant {
        key: key.to_string(),
        token: token.to_string(),
        lease: Duration::from_secs(lease),
    })
}

fn expect_ok(cmd: &str, reply: &str) -> Result<()> {
    if reply == "ok" {
        Ok(())
    } else {
        Err(status_or_unexpected(cmd, reply))
    }
}

fn status_or_unexpected(cmd: &str, reply: &str) -> Error {
    Error::from_status(reply).unwrap_or_else(|| unexpected(cmd, reply))
}

fn check_field(what: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::InvalidInput(format!("empty {what}")));
    }
    if s.len() > MAX_FIELD {
        return Err(Error::InvalidInput(format!(
            "{what} longer than {MAX_FIELD} bytes"
        )));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidInput(format!(
            "whitespace or a control character in {what} {s:?}"
        )));
    }
    Ok(())
}

fn check_limit(limit: u64) -> Result<u64> {
    if limit == 0 || limit > MAX_SECONDS {
        return Err(Error::InvalidInput(format!(
            "semaphore limit {limit} is not in 1..={MAX_SECONDS}"
        )));
    }
    Ok(limit)
}

/// Whole seconds, rounded up, capped at what the server accepts.
pub(crate) fn secs_ceil(d: Duration) -> u64 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    s.min(MAX_SECONDS)
}

fn lease_secs(d: Duration) -> u64 {
    secs_ceil(d).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_up_and_cap() {
        assert_eq!(secs_ceil(Duration::ZERO), 0);
        assert_eq!(secs_ceil(Duration::from_millis(1)), 1);
        assert_eq!(secs_ceil(Duration::from_millis(1500)), 2);
        assert_eq!(secs_ceil(Duration::MAX), MAX_SECONDS);
        assert_eq!(lease_secs(Duration::ZERO), 1);
    }

    #[test]
    fn fences_come_from_the_token() {
        assert_eq!(fence_of("00000000000000ff0123456789abcdef"), Some(255));
        assert_eq!(fence_of("xyz"), None);
        assert_eq!(fence_of("g0000000000000ff0123456789abcdef"), None);
    }

    #[test]
    fn replies_parse() {
        let g = parse_grant("l", "k", "ok abc 33").unwrap();
        assert_eq!(
            (g.token.as_str(), g.lease),
            ("abc", Duration::from_secs(33))
        );
        assert!(parse_grant("l", "k", "timeout").unwrap_err().is_timeout());
        assert!(matches!(
            parse_grant("l", "k", "error_max_waiters"),
            Err(Error::MaxWaiters)
        ));
        assert!(matches!(
            parse_grant("l", "k", "ok abc"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            parse_grant("l", "k", "ok abc 1 2"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            parse_grant("l", "k", "HTTP/1.1 400"),
            Err(Error::Protocol(_))
        ));
        assert_eq!(
            parse_signal("sig a.b hello world"),
            Some(Signal {
                channel: "a.b".into(),
                payload: "hello world".into()
            })
        );
        assert_eq!(parse_signal("ok 1"), None);
    }

    #[test]
    fn fields_are_checked() {
        assert!(check_field("key", "a").is_ok());
        assert!(check_field("key", "").is_err());
        assert!(check_field("key", "a b").is_err());
        assert!(check_field("key", &"k".repeat(257)).is_err());
        assert!(check_limit(0).is_err());
    }
}
