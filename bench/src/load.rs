//! The closed-loop load generator: one thread, one `mio::Poll`, N client
//! connections. Each connection runs `depth` independent slots; a slot sends
//! one request, waits for its reply, sends the next (a "cycle" is the mode's
//! whole sequence, e.g. `l` then `r`). Replies on a connection come back in
//! request order, so each connection keeps the FIFO of slots it awaits.
//!
//! Care is taken to keep the generator cheap per request: buffers are reused
//! (no allocation per request), each connection is written once per loop
//! turn, and a short read ends the read loop without a `WouldBlock` call.
//!
//! `signal` is a fan-out: `--connections` publishers, each a closed loop of
//! `signal <root>.<i>.evt <seq>:<ns>` → `ok <n>` on its own channel, and
//! `--listeners` connections subscribed (before any publish) with one
//! wildcard pattern that matches every channel. The listeners count the
//! pushed `sig` lines, check per (listener, publisher) that sequence numbers
//! arrive in order without gaps, and time each delivery from its publish
//! (`<ns>` is the publish time since the run began). At the end publishing
//! stops and the run drains, so that the deliveries received can be checked
//! exactly against the sum of the `<n>` the server replied.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dflockd::protocol::reply::push_u64;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};

use crate::procstat;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Lock,
    Contended,
    Sem,
    TwoPhase,
    Renew,
    Pipeline,
    RedisLock,
    Signal,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "lock" => Mode::Lock,
            "contended" => Mode::Contended,
            "sem" => Mode::Sem,
            "twophase" => Mode::TwoPhase,
            "renew" => Mode::Renew,
            "pipeline" => Mode::Pipeline,
            "redis-lock" => Mode::RedisLock,
            "signal" => Mode::Signal,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Lock => "lock",
            Mode::Contended => "contended",
            Mode::Sem => "sem",
            Mode::TwoPhase => "twophase",
            Mode::Renew => "renew",
            Mode::Pipeline => "pipeline",
            Mode::RedisLock => "redis-lock",
            Mode::Signal => "signal",
        }
    }

    /// Requests per completed cycle.
    fn requests_per_cycle(self) -> u64 {
        match self {
            Mode::TwoPhase => 3,
            Mode::Renew | Mode::Signal => 1,
            _ => 2,
        }
    }

    /// Whether `--depth` applies (several independent slots per connection).
    fn pipelines(self) -> bool {
        matches!(self, Mode::Pipeline | Mode::RedisLock)
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    /// Connection i goes to `addrs[i % addrs.len()]` (never empty).
    pub addrs: Vec<SocketAddr>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Shared keys of `contended` and `sem`.
    pub keys: usize,
    pub mode: Mode,
    pub depth: usize,
    pub server_pid: Option<u32>,
    pub json: bool,
    /// Names the server in the output (e.g. `dflockd`, `python`, `redis`).
    pub label: String,
    /// Prefix of every key, so that runs against a shared server do not mix.
    pub key_prefix: String,
    /// Acquire timeout sent with `l`, `sl` and `w`, in seconds.
    pub acquire_timeout_s: u64,
    pub progress: bool,
    /// Tells apart runs of one server/mode/connections in the report (e.g.
    /// `metrics-on-a`); `None` for the main runs.
    pub variant: Option<String>,
    /// `signal`: listener connections (publishers are `connections`).
    pub listeners: usize,
    /// `signal`: the listeners' pattern; `None` = `<root>.*.evt`.
    pub pattern: Option<String>,
    /// `signal`: payload length; `<seq>:<ns>` padded with `x` to this.
    pub payload_bytes: usize,
}

/// Where a slot is in its cycle; the meaning of each step depends on the mode.
struct Slot {
    conn: u32,
    key: u32,
    step: u8,
    token: [u8; 64],
    token_len: u8,
    cycle_start: Instant,
    /// `contended`: the per-key sequence number of the outstanding `l`.
    seq: u64,
}

struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Slots awaiting a reply, in the order their requests were written.
    awaiting: VecDeque<u32>,
    alive: bool,
    dirty: bool,
}

/// Per-key FIFO bookkeeping of `contended`.
#[derive(Default)]
struct KeyOrder {
    next_seq: u64,
    /// Sequence numbers of `l` requests sent and not yet answered, in order.
    outstanding: VecDeque<u64>,
}

struct Gen {
    mode: Mode,
    timeout: Vec<u8>,
    keys: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    conns: Vec<Conn>,
    order: Vec<KeyOrder>,
    dirty: Vec<u32>,
    hist: Histogram<u64>,
    cycles: u64,
    errors: u64,
    fifo_violations: u64,
    grants_checked: u64,
    dead_conns: u64,
    first_error: Option<String>,
    /// Cycles and deliveries are counted only while this is set.
    recording: bool,
    sg: SignalState,
}

/// The `signal` bookkeeping (empty in the other modes).
struct SignalState {
    /// Publisher connections are `0..publishers`, listeners the rest.
    publishers: usize,
    listeners: usize,
    /// `<root>.`: channels are `<root>.<i>.evt`.
    root_dot: Vec<u8>,
    payload_bytes: usize,
    t0: Instant,
    /// `listen` requests not yet answered `ok`.
    listen_pending: usize,
    /// Set after the measured window: publishers send nothing more.
    stopping: bool,
    /// Last sequence number sent per publisher (the first is 1).
    sent_seq: Vec<u64>,
    /// Last sequence number received, per (listener, publisher).
    last_seq: Vec<u64>,
    /// Over the whole run (warm-up and drain included).
    total_published: u64,
    total_expected: u64,
    total_received: u64,
    /// In the measured window.
    win_expected: u64,
    win_received: u64,
    /// Sequence numbers skipped (lost between two later deliveries).
    gaps: u64,
    /// A sequence number at or below one already received.
    out_of_order: u64,
    /// `ok <n>` with `n` other than the number of listeners.
    short_fanouts: u64,
    malformed: u64,
    /// Publish → delivery, in the measured window.
    dhist: Histogram<u64>,
}

/// Marks a `listen` request in a connection's `awaiting` queue.
const LISTEN: u32 = u32::MAX;

const RBUF: usize = 64 * 1024;

impl Gen {
    fn record_error(&mut self, what: &str, line: &[u8]) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {:?}", String::from_utf8_lossy(line)));
        }
    }

    /// Writes the request for slot `s`'s current step into its connection's
    /// output and queues the slot for the reply.
    fn send(&mut self, s: u32, now: Instant) {
        let mode = self.mode;
        let slot = &mut self.slots[s as usize];
        let key = &self.keys[slot.key as usize];
        let conn = &mut self.conns[slot.conn as usize];
        let w = &mut conn.wbuf;
        let token = &slot.token[..slot.token_len as usize];
        match (mode, slot.step) {
            (Mode::Lock | Mode::Contended | Mode::Pipeline | Mode::Renew, 0) => {
                if mode == Mode::Contended {
                    let order = &mut self.order[slot.key as usize];
                    slot.seq = order.next_seq;
                    order.next_seq += 1;
                    order.outstanding.push_back(slot.seq);
                }
                slot.cycle_start = now;
                line3(w, b"l", key, &[&self.timeout]);
            }
            (Mode::Lock | Mode::Contended | Mode::Pipeline, _) => line3(w, b"r", key, &[token]),
            (Mode::Renew, _) => {
                slot.cycle_start = now;
                line3(w, b"n", key, &[token]);
            }
            (Mode::Sem, 0) => {
                slot.cycle_start = now;
                line3(w, b"sl", key, &[&self.timeout, b" 4"]);
            }
            (Mode::Sem, _) => line3(w, b"sr", key, &[token]),
            (Mode::TwoPhase, 0) => {
                slot.cycle_start = now;
                line3(w, b"e", key, &[]);
            }
            (Mode::TwoPhase, 1) => line3(w, b"w", key, &[&self.timeout]),
            (Mode::TwoPhase, _) => line3(w, b"r", key, &[token]),
            (Mode::RedisLock, 0) => {
                slot.cycle_start = now;
                resp(w, &[b"SET", key, b"bench-token", b"NX", b"PX", b"30000"]);
            }
            (Mode::RedisLock, _) => resp(w, &[b"DEL", key]),
            (Mode::Signal, _) => {
                slot.cycle_start = now;
                let sg = &mut self.sg;
                sg.sent_seq[slot.key as usize] += 1;
                sg.total_published += 1;
                w.extend_from_slice(b"signal\n");
                w.extend_from_slice(key);
                w.push(b'\n');
                let start = w.len();
                push_u64(w, sg.sent_seq[slot.key as usize]);
                w.push(b':');
                push_u64(w, now.duration_since(sg.t0).as_nanos() as u64);
                let len = w.len() - start;
                if len < sg.payload_bytes {
                    w.resize(w.len() + sg.payload_bytes - len, b'x');
                }
                w.push(b'\n');
            }
        }
        conn.awaiting.push_back(s);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot.conn);
        }
    }

    fn complete_cycle(&mut self, s: u32, now: Instant) {
        if !self.recording {
            return;
        }
        let slot = &mut self.slots[s as usize];
        let ns = now.duration_since(slot.cycle_start).as_nanos() as u64;
        self.hist.saturating_record(ns.max(1));
        self.cycles += 1;
    }

    /// Checks that a grant on a contended key goes to its oldest waiter.
    fn check_fifo(&mut self, s: u32, granted: bool) {
        if self.mode != Mode::Contended {
            return;
        }
        let slot = &self.slots[s as usize];
        let order = &mut self.order[slot.key as usize];
        let Some(pos) = order.outstanding.iter().position(|&q| q == slot.seq) else {
            return;
        };
        if granted {
            self.grants_checked += 1;
            if pos != 0 {
                self.fifo_violations += 1;
            }
        }
        order.outstanding.remove(pos);
    }

    /// Handles one reply line for slot `s` and sends its next request.
    fn on_reply(&mut self, s: u32, line: &[u8], now: Instant) {
        let step = self.slots[s as usize].step;
        let mut next = step;
        match (self.mode, step) {
            (Mode::Lock | Mode::Contended | Mode::Pipeline | Mode::Sem | Mode::Renew, 0) => {
                let granted = self.take_token(s, line, b"ok");
                self.check_fifo(s, granted);
                if granted {
                    next = 1;
                    if self.mode == Mode::Renew {
                        // Setup done; each `n` is a cycle of its own.
                        self.send_step(s, 1, now);
                        return;
                    }
                } else {
                    self.record_error("acquire", line);
                }
            }
            (Mode::Renew, _) => {
                if line.starts_with(b"ok ") {
                    self.complete_cycle(s, now);
                } else {
                    self.record_error("renew", line);
                    next = 0;
                }
            }
            (Mode::TwoPhase, 0) => {
                if self.take_token(s, line, b"acquired") || line == b"queued" {
                    next = 1;
                } else {
                    self.record_error("enqueue", line);
                }
            }
            (Mode::TwoPhase, 1) => {
                if self.take_token(s, line, b"ok") {
                    next = 2;
                } else {
                    self.record_error("wait", line);
                    next = 0;
                }
            }
            (Mode::RedisLock, 0) => {
                // On failure (the key exists) delete it anyway so that the
                // run recovers, and count the error.
                if line != b"+OK" {
                    self.record_error("SET NX", line);
                }
                next = 1;
            }
            (Mode::RedisLock, _) => {
                if line == b":1" {
                    self.complete_cycle(s, now);
                } else {
                    self.record_error("DEL", line);
                }
                next = 0;
            }
            (Mode::Signal, _) => {
                match line.strip_prefix(b"ok ").and_then(parse_u64) {
                    Some(n) => {
                        let sg = &mut self.sg;
                        sg.total_expected += n;
                        if self.recording {
                            sg.win_expected += n;
                        }
                        if n != sg.listeners as u64 {
                            sg.short_fanouts += 1;
                        }
                        self.complete_cycle(s, now);
                    }
                    None => self.record_error("signal", line),
                }
                if self.sg.stopping {
                    return;
                }
            }
            // The release step of every lock-like mode.
            (_, _) => {
                if line == b"ok" {
                    self.complete_cycle(s, now);
                } else {
                    self.record_error("release", line);
                }
                next = 0;
            }
        }
        self.send_step(s, next, now);
    }

    fn send_step(&mut self, s: u32, step: u8, now: Instant) {
        self.slots[s as usize].step = step;
        self.send(s, now);
    }

    /// A reply to a listener's `listen`.
    fn on_listen_reply(&mut self, line: &[u8]) {
        if line == b"ok" {
            self.sg.listen_pending = self.sg.listen_pending.saturating_sub(1);
        } else {
            self.record_error("listen", line);
        }
    }

    /// A pushed `sig <channel> <seq>:<ns>x...` line on connection `c`.
    fn on_sig(&mut self, c: u32, line: &[u8], now: Instant) {
        let sg = &mut self.sg;
        sg.total_received += 1;
        if self.recording {
            sg.win_received += 1;
        }
        let c = c as usize;
        if c < sg.publishers {
            self.record_error("signal pushed to a publisher", line);
            return;
        }
        let parsed = (|| {
            let rest = line.strip_prefix(b"sig ")?;
            let sp = rest.iter().position(|&b| b == b' ')?;
            let (channel, payload) = (&rest[..sp], &rest[sp + 1..]);
            let idx = channel.strip_prefix(&sg.root_dot[..])?;
            let idx = parse_u64(idx.strip_suffix(b".evt")?)? as usize;
            let colon = payload.iter().position(|&b| b == b':')?;
            let seq = parse_u64(&payload[..colon])?;
            let digits = payload[colon + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let ns = parse_u64(&payload[colon + 1..colon + 1 + digits])?;
            (idx < sg.publishers).then_some((idx, seq, ns))
        })();
        let Some((p, seq, ns)) = parsed else {
            sg.malformed += 1;
            self.record_error("malformed sig", line);
            return;
        };
        let last = &mut sg.last_seq[(c - sg.publishers) * sg.publishers + p];
        if seq > *last {
            sg.gaps += seq - *last - 1;
            *last = seq;
        } else {
            sg.out_of_order += 1;
        }
        if self.recording {
            let sent = sg.t0 + Duration::from_nanos(ns);
            let ns = now.saturating_duration_since(sent).as_nanos() as u64;
            sg.dhist.saturating_record(ns.max(1));
        }
    }

    /// If `line` is `<status> <token> ...`, keeps the token.
    fn take_token(&mut self, s: u32, line: &[u8], status: &[u8]) -> bool {
        let Some(rest) = line.strip_prefix(status) else {
            return false;
        };
        let Some(rest) = rest.strip_prefix(b" ") else {
            return false;
        };
        let token = rest.split(|&b| b == b' ').next().unwrap_or_default();
        let slot = &mut self.slots[s as usize];
        if token.is_empty() || token.len() > slot.token.len() {
            return false;
        }
        slot.token[..token.len()].copy_from_slice(token);
        slot.token_len = token.len() as u8;
        true
    }

    /// Reads what the socket has and handles every complete reply line.
    fn on_readable(&mut self, c: u32, now: Instant) {
        let ci = c as usize;
        if !self.conns[ci].alive {
            return;
        }
        let mut rbuf = std::mem::take(&mut self.conns[ci].rbuf);
        let mut rlen = self.conns[ci].rlen;
        let mut failed: Option<&str> = None;
        loop {
            if rlen == rbuf.len() {
                failed = Some("reply line too long");
                break;
            }
            let room = rbuf.len() - rlen;
            match self.conns[ci].stream.read(&mut rbuf[rlen..]) {
                Ok(0) => {
                    failed = Some("server closed the connection");
                    break;
                }
                Ok(n) => {
                    rlen += n;
                    let mut start = 0;
                    while let Some(pos) = rbuf[start..rlen].iter().position(|&b| b == b'\n') {
                        let mut line = &rbuf[start..start + pos];
                        if let Some(l) = line.strip_suffix(b"\r") {
                            line = l;
                        }
                        start += pos + 1;
                        if self.mode == Mode::Signal && line.starts_with(b"sig ") {
                            self.on_sig(c, line, now);
                            continue;
                        }
                        match self.conns[ci].awaiting.pop_front() {
                            Some(LISTEN) => self.on_listen_reply(line),
                            Some(s) => self.on_reply(s, line, now),
                            None => self.record_error("unsolicited reply", line),
                        }
                    }
                    rbuf.copy_within(start..rlen, 0);
                    rlen -= start;
                    // A short read drained the socket: the next arrival
                    // raises a new edge, so no `WouldBlock` read is needed.
                    if n < room {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = Some("read error");
                    break;
                }
            }
        }
        let conn = &mut self.conns[ci];
        conn.rbuf = rbuf;
        conn.rlen = rlen;
        if let Some(why) = failed {
            self.kill(c, why);
        }
    }

    fn kill(&mut self, c: u32, why: &str) {
        let conn = &mut self.conns[c as usize];
        if conn.alive {
            conn.alive = false;
            self.dead_conns += 1;
            self.record_error(why, b"");
        }
    }

    /// Writes each connection with new output once.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &c in &dirty {
            let conn = &mut self.conns[c as usize];
            conn.dirty = false;
            if !conn.alive || conn.wpos == conn.wbuf.len() {
                continue;
            }
            let result = loop {
                match conn.stream.write(&conn.wbuf[conn.wpos..]) {
                    Ok(n) => break Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok(n) => {
                    conn.wpos += n;
                    if conn.wpos == conn.wbuf.len() {
                        conn.wbuf.clear();
                        conn.wpos = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.kill(c, "write error"),
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    fn mark_dirty(&mut self, c: u32) {
        let conn = &mut self.conns[c as usize];
        if !conn.dirty && conn.wpos < conn.wbuf.len() {
            conn.dirty = true;
            self.dirty.push(c);
        }
    }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// `<cmd>\n<key>\n<arg parts>\n`.
fn line3(w: &mut Vec<u8>, cmd: &[u8], key: &[u8], arg: &[&[u8]]) {
    w.extend_from_slice(cmd);
    w.push(b'\n');
    w.extend_from_slice(key);
    w.push(b'\n');
    for part in arg {
        w.extend_from_slice(part);
    }
    w.push(b'\n');
}

/// A RESP array of bulk strings.
fn resp(w: &mut Vec<u8>, parts: &[&[u8]]) {
    w.push(b'*');
    push_u64(w, parts.len() as u64);
    w.extend_from_slice(b"\r\n");
    for p in parts {
        w.push(b'$');
        push_u64(w, p.len() as u64);
        w.extend_from_slice(b"\r\n");
        w.extend_from_slice(p);
        w.extend_from_slice(b"\r\n");
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut last = None;
    for _ in 0..50 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                return Ok(TcpStream::from_std(s));
            }
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("connect failed")))
}

/// One loop turn: waits up to `timeout` for events, handles them and writes
/// what they produced.
fn turn(
    g: &mut Gen,
    poll: &mut Poll,
    events: &mut Events,
    timeout: Duration,
) -> Result<(), String> {
    match poll.poll(events, Some(timeout)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
        Err(e) => return Err(format!("poll: {e}")),
    }
    for ev in events.iter() {
        let c = ev.token().0 as u32;
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            let now = Instant::now();
            g.on_readable(c, now);
        }
        if ev.is_writable() {
            g.mark_dirty(c);
        }
    }
    g.flush_dirty();
    Ok(())
}

/// The root of the `signal` channels: the key prefix without trailing
/// separators (`bench-` → `bench`), so channels read `bench.<i>.evt`.
fn signal_root(prefix: &str) -> String {
    let root = prefix.trim_end_matches(['-', '.', '_']);
    if root.is_empty() {
        "bench".into()
    } else {
        root.into()
    }
}

/// Runs one benchmark and returns its result as a JSON object.
pub fn run(opts: &Opts) -> Result<Value, String> {
    if opts.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let mode = opts.mode;
    let signal = mode == Mode::Signal;
    if signal && opts.listeners == 0 {
        return Err("--listeners must be at least 1 in mode signal".into());
    }
    let depth = if mode.pipelines() {
        opts.depth.max(1)
    } else {
        1
    };
    let nslots = opts.connections * depth;
    let prefix = &opts.key_prefix;
    let root = signal_root(prefix);
    let pattern = opts
        .pattern
        .clone()
        .unwrap_or_else(|| format!("{root}.*.evt"));
    let keys: Vec<Vec<u8>> = match mode {
        Mode::Contended => (0..opts.keys.max(1))
            .map(|i| format!("{prefix}c{i}").into_bytes())
            .collect(),
        Mode::Sem => (0..opts.keys.max(1))
            .map(|i| format!("{prefix}s{i}").into_bytes())
            .collect(),
        Mode::RedisLock => (0..nslots)
            .map(|i| format!("{prefix}r{i}").into_bytes())
            .collect(),
        Mode::Signal => (0..nslots)
            .map(|i| format!("{root}.{i}.evt").into_bytes())
            .collect(),
        _ => (0..nslots)
            .map(|i| format!("{prefix}k{i}").into_bytes())
            .collect(),
    };
    let listeners = if signal { opts.listeners } else { 0 };
    let nconns = opts.connections + listeners;

    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut conns = Vec::with_capacity(nconns);
    for i in 0..nconns {
        let addr = opts.addrs[i % opts.addrs.len()];
        let mut stream = connect(addr).map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
        poll.registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("register: {e}"))?;
        conns.push(Conn {
            stream,
            rbuf: vec![0; RBUF],
            rlen: 0,
            wbuf: Vec::with_capacity(4096),
            wpos: 0,
            awaiting: VecDeque::with_capacity(depth * 2),
            alive: true,
            dirty: false,
        });
    }
    let now = Instant::now();
    let nkeys = keys.len();
    let slots = (0..nslots)
        .map(|i| Slot {
            conn: (i / depth) as u32,
            key: (i % nkeys) as u32,
            step: 0,
            token: [0; 64],
            token_len: 0,
            cycle_start: now,
            seq: 0,
        })
        .collect();
    let new_hist = || {
        Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|e| format!("histogram: {e}"))
    };
    let mut g = Gen {
        mode,
        timeout: opts.acquire_timeout_s.to_string().into_bytes(),
        keys,
        slots,
        conns,
        order: (0..nkeys).map(|_| KeyOrder::default()).collect(),
        dirty: Vec::with_capacity(nconns),
        hist: new_hist()?,
        cycles: 0,
        errors: 0,
        fifo_violations: 0,
        grants_checked: 0,
        dead_conns: 0,
        first_error: None,
        recording: true,
        sg: SignalState {
            publishers: if signal { opts.connections } else { 0 },
            listeners,
            root_dot: format!("{root}.").into_bytes(),
            payload_bytes: opts.payload_bytes,
            t0: now,
            listen_pending: listeners,
            stopping: false,
            sent_seq: vec![0; if signal { nkeys } else { 0 }],
            last_seq: vec![
                0;
                if signal {
                    listeners * opts.connections
                } else {
                    0
                }
            ],
            total_published: 0,
            total_expected: 0,
            total_received: 0,
            win_expected: 0,
            win_received: 0,
            gaps: 0,
            out_of_order: 0,
            short_fanouts: 0,
            malformed: 0,
            dhist: new_hist()?,
        },
    };
    let mut events = Events::with_capacity(1024);

    if signal {
        // Subscribe every listener before the first publish, so that every
        // `ok <n>` should say `n` = listeners.
        for l in 0..listeners {
            let c = opts.connections + l;
            let conn = &mut g.conns[c];
            line3(&mut conn.wbuf, b"listen", pattern.as_bytes(), &[]);
            conn.awaiting.push_back(LISTEN);
            conn.dirty = true;
            g.dirty.push(c as u32);
        }
        g.flush_dirty();
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.sg.listen_pending > 0 && g.errors == 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{} of {listeners} listeners not subscribed after 10 s",
                    g.sg.listen_pending
                ));
            }
            turn(&mut g, &mut poll, &mut events, deadline - now)?;
        }
        if g.errors > 0 {
            return Err(format!(
                "listen {pattern:?} failed: {}",
                g.first_error.unwrap_or_default()
            ));
        }
    }

    let now = Instant::now();
    for s in 0..nslots as u32 {
        g.send(s, now);
    }
    g.flush_dirty();

    let pid_str = opts.server_pid.map(|p| p.to_string());
    let pid = pid_str.as_deref();
    let start = Instant::now();
    let measure_at = start + opts.warmup;
    let end_at = measure_at + opts.duration;
    let mut measuring = opts.warmup.is_zero();
    let mut m = procstat::mark(pid);
    let mut next_progress = start + Duration::from_secs(1);
    let mut last_cycles = 0u64;
    let mut last_received = 0u64;
    let mut warmup_errors = 0;

    loop {
        let now = Instant::now();
        if !measuring && now >= measure_at {
            measuring = true;
            warmup_errors = g.errors;
            g.hist.reset();
            g.cycles = 0;
            g.errors = 0;
            g.fifo_violations = 0;
            g.grants_checked = 0;
            g.sg.dhist.reset();
            g.sg.win_expected = 0;
            g.sg.win_received = 0;
            last_cycles = 0;
            last_received = g.sg.total_received;
            m = procstat::mark(pid);
        }
        if measuring && now >= end_at {
            break;
        }
        if now >= next_progress {
            if opts.progress {
                let phase = if measuring { "measure" } else { "warm-up" };
                let deliveries = if signal {
                    format!(", {} deliveries/s", g.sg.total_received - last_received)
                } else {
                    String::new()
                };
                eprintln!(
                    "  [{} {} c={} {phase} t={:.0}s] {} cycles/s{deliveries}, {} errors",
                    opts.label,
                    mode.name(),
                    opts.connections,
                    now.duration_since(start).as_secs_f64(),
                    g.cycles - last_cycles,
                    g.errors,
                );
            }
            last_cycles = g.cycles;
            last_received = g.sg.total_received;
            next_progress += Duration::from_secs(1);
        }
        if g.dead_conns as usize == nconns {
            return Err(format!(
                "every connection failed; first error: {}",
                g.first_error.unwrap_or_default()
            ));
        }
        let wake = next_progress.min(if measuring { end_at } else { measure_at });
        let timeout = wake.saturating_duration_since(now) + Duration::from_micros(100);
        turn(&mut g, &mut poll, &mut events, timeout)?;
    }
    let end = procstat::mark(pid);
    let rss_kib = pid.and_then(procstat::rss_kib);
    // Signal: stop publishing and wait for the replies and deliveries still
    // in flight, so that the totals can be compared exactly.
    g.recording = false;
    let mut drain_s = 0.0;
    let mut unanswered = 0u64;
    if signal {
        g.sg.stopping = true;
        let deadline = end.at + Duration::from_secs(5);
        loop {
            unanswered = g.conns[..opts.connections]
                .iter()
                .filter(|c| c.alive)
                .map(|c| c.awaiting.len() as u64)
                .sum();
            let now = Instant::now();
            if (unanswered == 0 && g.sg.total_received >= g.sg.total_expected) || now >= deadline {
                break;
            }
            turn(
                &mut g,
                &mut poll,
                &mut events,
                (deadline - now).min(Duration::from_millis(50)),
            )?;
        }
        drain_s = end.at.elapsed().as_secs_f64();
    }
    let elapsed = end.at.duration_since(m.at).as_secs_f64();
    let cycles = g.cycles;
    let requests = cycles * mode.requests_per_cycle();
    let mut out = json!({
        "server": opts.label,
        "variant": opts.variant,
        "mode": mode.name(),
        "connections": opts.connections,
        "depth": depth,
        "keys": if matches!(mode, Mode::Contended | Mode::Sem) { opts.keys.max(1) } else { nkeys },
        "duration_s": elapsed,
        "warmup_s": opts.warmup.as_secs_f64(),
        "cycles": cycles,
        "requests": requests,
        "cycles_per_s": cycles as f64 / elapsed,
        "requests_per_s": requests as f64 / elapsed,
        "latency_us": quantiles(&g.hist),
        "errors": g.errors,
        "warmup_errors": warmup_errors,
        "first_error": g.first_error,
        "dead_connections": g.dead_conns,
        "fifo_checked_grants": if mode == Mode::Contended { json!(g.grants_checked) } else { Value::Null },
        "fifo_violations": if mode == Mode::Contended { json!(g.fifo_violations) } else { Value::Null },
        "server_pid": opts.server_pid,
        "server_rss_kib": rss_kib,
    });
    let (server_cpu, client_cpu) = add_cpu_fields(&mut out, &m, &end, cycles, requests);
    if signal {
        let sg = &g.sg;
        let lost = sg.total_expected.saturating_sub(sg.total_received);
        let extra = sg.total_received.saturating_sub(sg.total_expected);
        out["signal"] = json!({
            "publishers": opts.connections,
            "listeners": listeners,
            "pattern": pattern,
            "payload_bytes": opts.payload_bytes,
            "publishes": cycles,
            "deliveries": sg.win_received,
            "deliveries_per_s": sg.win_received as f64 / elapsed,
            // Sum of `n` replied in the window; differs from `deliveries`
            // only by what was in flight at the window's two edges.
            "expected_deliveries": sg.win_expected,
            "delivery_latency_us": quantiles(&sg.dhist),
            "server_cpu_us_per_delivery": cpu_per(server_cpu, sg.win_received),
            "client_cpu_us_per_delivery": cpu_per(client_cpu, sg.win_received),
            "total_published": sg.total_published,
            "total_expected": sg.total_expected,
            "total_received": sg.total_received,
            "lost": lost,
            "extra": extra,
            "gaps": sg.gaps,
            "out_of_order": sg.out_of_order,
            "short_fanouts": sg.short_fanouts,
            "malformed": sg.malformed,
            "unanswered_publishes": unanswered,
            "drain_s": drain_s,
        });
    }
    Ok(out)
}

/// Latency quantiles of a histogram of nanoseconds, in microseconds.
pub(crate) fn quantiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    json!({
        "p50": us(0.5),
        "p99": us(0.99),
        "p999": us(0.999),
        "max": h.max() as f64 / 1000.0,
        "mean": h.mean() / 1000.0,
    })
}

/// Microseconds of CPU per operation, or null.
pub(crate) fn cpu_per(cpu_s: Option<f64>, n: u64) -> Value {
    match cpu_s {
        Some(c) if n > 0 => json!(c * 1e6 / n as f64),
        _ => Value::Null,
    }
}

/// Adds the server's and the generator's CPU over the window between two
/// marks to a result object: per cycle, per request, and as a share of
/// one core. Returns both CPU times (seconds), when known.
pub(crate) fn add_cpu_fields(
    out: &mut Value,
    start: &procstat::Mark,
    end: &procstat::Mark,
    cycles: u64,
    requests: u64,
) -> (Option<f64>, Option<f64>) {
    let elapsed = end.at.duration_since(start.at).as_secs_f64();
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let server_cpu = diff(start.server_cpu, end.server_cpu);
    let client_cpu = diff(start.client_cpu, end.client_cpu);
    let util = |cpu: Option<f64>| cpu.map_or(Value::Null, |c| json!(c / elapsed));
    out["server_cpu_us_per_cycle"] = cpu_per(server_cpu, cycles);
    out["server_cpu_us_per_request"] = cpu_per(server_cpu, requests);
    out["server_cpu_util"] = util(server_cpu);
    out["client_cpu_us_per_cycle"] = cpu_per(client_cpu, cycles);
    out["client_cpu_util"] = util(client_cpu);
    (server_cpu, client_cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"1234567"), Some(1_234_567));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"12x"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"99999999999999999999"), None);
    }

    #[test]
    fn signal_channels_root() {
        assert_eq!(signal_root("bench-"), "bench");
        assert_eq!(signal_root("run7."), "run7");
        assert_eq!(signal_root("-"), "bench");
    }
}
