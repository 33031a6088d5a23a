//! The event loop: one `mio::Poll` owning the listener, every connection (in a
//! slab), the lock state machine and the timers.
//!
//! Each loop turn reads the clock once, fires due timers, handles readiness
//! events (reading until `WouldBlock`, decoding and applying every complete
//! request), resumes connections whose blocking command was answered, and
//! finally flushes each connection with pending output once.

pub mod cluster;
mod conn;
mod http;
pub mod metrics;
mod peer;
pub mod security;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hashbrown::HashMap;
use std::time::{Duration, Instant};

use http::{HttpConn, Progress, Route};
use metrics::{ErrorKind, Live, Metrics};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use slab::Slab;

use crate::config::ClusterSettings;
use crate::core::{self, ConnId, Core, Outbox, Outcome};
use crate::protocol::{FrameError, Reply, Request, encode_reply, parse_request};
use crate::timer::TimerWheel;
use conn::{Closing, Conn, OUTPUT_HIGH_WATER, ReadOutcome};
use security::{AuthSource, AuthToken, TlsSource};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const HTTP_LISTENER: Token = Token(usize::MAX - 3);
/// Monitoring connections use tokens from here up (client connections use
/// their slab index, far below).
const HTTP_BASE: usize = 1 << 40;
/// How long a closing connection may take to read our last reply.
const LINGER_MS: u64 = 2_000;
/// Delay between answering `error_auth` and closing the connection.
const AUTH_FAIL_CLOSE_MS: u64 = 100;
/// At most one log line per refused address per this long.
const REFUSAL_LOG_MS: u64 = 1_000;
const ACCEPT_BACKOFF_MIN_MS: u64 = 10;
const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;

/// Settings of the network layer and the state machine it drives.
#[derive(Clone, Debug)]
pub struct Options {
    pub core: core::Config,
    /// 0 = unlimited.
    pub max_connections: usize,
    /// Unsent output past which a connection receiving signals is dropped.
    pub max_output_buffer: usize,
    /// 0 = never.
    pub read_timeout_ms: u64,
    /// 0 = never.
    pub write_timeout_ms: u64,
    /// Start value of the fencing counter (wall clock in nanoseconds).
    pub fence_seed: u64,
    /// How long a drain may last before the server exits anyway; 0 = forever.
    pub shutdown_timeout_ms: u64,
    /// 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// TLS for every connection, and where it was loaded from (for SIGHUP).
    pub tls: Option<(Arc<rustls::ServerConfig>, TlsSource)>,
    /// The shared secret, and where it was loaded from (for SIGHUP).
    pub auth: Option<(AuthToken, AuthSource)>,
    /// Where to serve `/metrics`, `/health` and `/ready`; `None` = off.
    pub metrics_addr: Option<SocketAddr>,
    /// Cluster mode (`--peers` / `--data-dir`); `None` = a single node.
    pub cluster: Option<ClusterSettings>,
}

/// How [`Server::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Drained: nothing was held and nothing waited.
    Drained,
    /// The shutdown timeout ran out with locks still held.
    TimedOut,
    /// A second SIGTERM/SIGINT cut the drain short.
    Interrupted,
}

#[derive(Clone, Copy, Debug)]
enum NetTimer {
    Read(ConnId),
    Write(ConnId),
    Linger(ConnId),
    ResumeAccept,
    ShutdownDeadline,
    Http(u64),
    RaftTick,
}

pub struct Server {
    poll: Poll,
    /// `None` once draining: new connections are refused by the kernel.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: signal_hook_mio::v1_0::Signals,
    draining: bool,
    shutdown: Option<Shutdown>,
    conns: Slab<Conn>,
    core: Core,
    outbox: Outbox,
    timers: TimerWheel<NetTimer>,
    fired: Vec<NetTimer>,
    opts: Options,
    start: Instant,
    now: u64,
    scratch: Box<[u8]>,
    dirty: Vec<usize>,
    ready: Vec<usize>,
    /// Listeners found over the output cap while delivering signals.
    slow: Vec<usize>,
    next_generation: u32,
    accept_paused: bool,
    fd_exhausted: bool,
    /// Open connections per peer address (only with a per-IP cap), and when
    /// a refusal for it was last logged.
    per_ip: HashMap<IpAddr, (usize, u64)>,
    http_listener: Option<TcpListener>,
    http: Slab<HttpConn>,
    metrics: Metrics,
    accept_backoff_ms: u64,
    cluster: Option<Box<cluster::Cluster>>,
}

impl Server {
    /// Binds the listener. Nothing is served until [`run`](Self::run).
    pub fn bind(addr: SocketAddr, opts: Options) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        widen_backlog(&listener)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let local_addr = listener.local_addr()?;
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let (cluster, core) = match &opts.cluster {
            Some(settings) => {
                let auth = opts.auth.as_ref().map(|(t, _)| t.clone());
                let (mut cl, core) =
                    cluster::Cluster::open(settings, &opts.core, auth, opts.tls.as_ref())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                if let Some(links) = cl.links.as_mut() {
                    poll.registry().register(
                        &mut links.listener,
                        cluster::PEER_LISTENER,
                        Interest::READABLE,
                    )?;
                }
                (Some(Box::new(cl)), core)
            }
            None => (
                None,
                Core::new(
                    opts.core.clone(),
                    opts.fence_seed,
                    Box::new(core::OsEntropy),
                ),
            ),
        };
        let http_listener = match opts.metrics_addr {
            Some(addr) => {
                let mut l = TcpListener::bind(addr)?;
                poll.registry()
                    .register(&mut l, HTTP_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            draining: false,
            shutdown: None,
            conns: Slab::new(),
            core,
            outbox: Outbox::default(),
            timers: TimerWheel::new(),
            fired: Vec::new(),
            opts,
            start: Instant::now(),
            now: 0,
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            dirty: Vec::new(),
            ready: Vec::new(),
            slow: Vec::new(),
            next_generation: 0,
            accept_paused: false,
            fd_exhausted: false,
            per_ip: HashMap::new(),
            http_listener,
            http: Slab::new(),
            metrics: Metrics::default(),
            accept_backoff_ms: ACCEPT_BACKOFF_MIN_MS,
            cluster,
        })
        .map(|mut server| {
            if server.cluster.is_some() {
                server.timers.insert(0, NetTimer::RaftTick);
            }
            server
        })
    }

    /// Where the peer listener of cluster mode listens.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.cluster
            .as_ref()
            .and_then(|c| c.links.as_ref())
            .and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the monitoring endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until a shutdown signal has been handled (see [`Shutdown`]) or
    /// the poll itself fails.
    pub fn run(&mut self) -> io::Result<Shutdown> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let turn_start = Instant::now();
            // Whole milliseconds: timers fire once the clock, rounded down,
            // reaches their deadline; what this turn's requests arm counts
            // from the clock rounded up. A timeout or lease armed by a
            // request thus never ends before its full length has passed
            // since the request arrived (rounding down both ways could end
            // it up to 1 ms early).
            let since = turn_start - self.start;
            let floor = since.as_millis() as u64;
            self.now = floor;
            self.fire_timers();
            self.now = floor + u64::from(since.subsec_nanos() % 1_000_000 != 0);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS => self.on_signals(),
                    HTTP_LISTENER => self.accept_http(),
                    Token(t) if t >= cluster::PEER_IN_BASE || t == cluster::PEER_LISTENER.0 => {
                        self.on_peer_event(t)
                    }
                    Token(t) if t >= HTTP_BASE => self.on_http(t - HTTP_BASE),
                    Token(idx) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(idx, event.is_read_closed());
                        }
                        if event.is_writable() {
                            self.mark_dirty(idx);
                        }
                    }
                }
            }
            self.resume_ready();
            self.cluster_turn();
            self.flush_dirty();
            // Requests resumed while flushing go to the log in this turn too.
            let mut rounds = 0;
            while self.cluster_pending() && rounds < 4 {
                self.cluster_turn();
                self.flush_dirty();
                rounds += 1;
            }
            self.flush_peers();
            self.drop_slow_consumers();
            if self.http_listener.is_some() {
                self.metrics.observe_turn(turn_start.elapsed());
            }
            if self.draining && self.shutdown.is_none() && self.quiescent() {
                self.shutdown = Some(Shutdown::Drained);
            }
            if let Some(how) = self.shutdown {
                self.finish(how);
                return Ok(how);
            }
        }
    }

    // ---- shutdown ----

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGTERM | SIGINT if self.draining => {
                    warn!("second {} received: exiting now", signal_name(sig));
                    self.shutdown = Some(Shutdown::Interrupted);
                }
                SIGTERM | SIGINT => self.start_draining(sig),
                SIGHUP => self.reload(),
                _ => {}
            }
        }
    }

    /// Re-reads the TLS certificate and key and a file-based auth token.
    /// New connections use the new material; established ones keep theirs.
    /// A failed reload keeps the old material.
    fn reload(&mut self) {
        let mut reloaded = false;
        if let Some((config, source)) = self.opts.tls.as_mut() {
            reloaded = true;
            match security::load_tls(source) {
                Ok(new) => {
                    *config = new;
                    info!(
                        "SIGHUP: reloaded the TLS certificate from {}",
                        source.cert.display()
                    );
                }
                Err(e) => warn!("SIGHUP: TLS reload failed, keeping the current certificate: {e}"),
            }
        }
        if let Some((token, source @ AuthSource::File(_))) = self.opts.auth.as_mut() {
            reloaded = true;
            match AuthToken::load(source) {
                Ok(new) => {
                    *token = new;
                    info!("SIGHUP: reloaded the auth token from its file");
                }
                Err(e) => warn!("SIGHUP: auth token reload failed, keeping the current token: {e}"),
            }
        }
        if !reloaded {
            info!("SIGHUP received: nothing to reload (no TLS files, no token file)");
        }
    }

    fn start_draining(&mut self, sig: i32) {
        self.draining = true;
        if self.cluster.is_none() {
            // In cluster mode the core is replicated state: this node
            // refuses acquisitions itself (see process_input).
            self.core.start_draining();
        }
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        info!(
            "{} received: draining (no new connections or acquisitions; {} held, {} connections); a second signal exits at once",
            signal_name(sig),
            self.core.holders(),
            self.conns.len()
        );
        if self.opts.shutdown_timeout_ms != 0 {
            self.timers.insert(
                self.now + self.opts.shutdown_timeout_ms,
                NetTimer::ShutdownDeadline,
            );
        }
    }

    /// Nothing this server answers for is held or awaited: a drain is done.
    fn quiescent(&self) -> bool {
        match &self.cluster {
            None => self.core.is_quiescent(),
            Some(cl) => {
                cl.node.outstanding() == 0
                    && self
                        .conns
                        .iter()
                        .all(|(_, c)| !c.replicated || self.core.conn_is_idle(c.id))
            }
        }
    }

    /// Logs what is left, sends what can be sent and closes every connection.
    fn finish(&mut self, how: Shutdown) {
        let held = self.core.held_keys();
        match how {
            Shutdown::Drained => info!("drained: nothing held; exiting"),
            Shutdown::TimedOut => warn!(
                "shutdown timeout reached with {} keys still held; exiting",
                held.len()
            ),
            Shutdown::Interrupted => warn!("exiting with {} keys still held", held.len()),
        }
        for (key, holders, waiters) in held.iter().take(100) {
            warn!("still held at exit: key {key:?}, {holders} holders, {waiters} waiters");
        }
        for (_, c) in self.conns.iter_mut() {
            let _ = c.flush();
        }
        let ids: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in ids {
            if let Some(mut c) = self.conns.try_remove(idx) {
                let _ = self.poll.registry().deregister(&mut c.stream);
            }
        }
    }

    /// Time until the earliest timer, rounded up so that it never fires early.
    fn poll_timeout(&self) -> Option<Duration> {
        let next = match (self.core.next_deadline(), self.timers.next_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let due = self.start + Duration::from_millis(next);
        let wait = due.saturating_duration_since(Instant::now());
        // Round up to whole milliseconds (epoll's resolution).
        Some(Duration::from_millis(wait.as_micros().div_ceil(1000) as u64))
    }

    // ---- accepting ----

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    self.pause_accepting(&e);
                    return;
                }
                // The peer gave up before we accepted (ECONNABORTED and the
                // like): nothing to do for it.
                Err(e) => debug!("accept failed: {e}"),
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted += 1;
        self.metrics.rejected += 1; // undone below once admitted
        if self.opts.max_connections != 0 && self.conns.len() >= self.opts.max_connections {
            debug!(
                "refusing {peer}: --max-connections {} reached",
                self.opts.max_connections
            );
            return;
        }
        if self.opts.max_connections_per_ip != 0 {
            let (count, logged) = self.per_ip.entry(peer.ip()).or_insert((0, 0));
            if *count >= self.opts.max_connections_per_ip {
                if *logged == 0 || self.now >= *logged + REFUSAL_LOG_MS {
                    *logged = self.now.max(1);
                    warn!(
                        "refusing {}: --max-connections-per-ip {} reached",
                        peer.ip(),
                        self.opts.max_connections_per_ip
                    );
                }
                return;
            }
            *count += 1;
        }
        let tls = match &self.opts.tls {
            Some((config, _)) => match rustls::ServerConnection::new(config.clone()) {
                Ok(session) => Some(Box::new(session)),
                Err(e) => {
                    warn!("cannot start TLS for {peer}: {e}");
                    self.forget_peer(peer);
                    return;
                }
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let node = self.cluster.as_ref().map(|c| c.settings.node_id);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        self.next_generation = self.next_generation.wrapping_add(1);
        let id = cluster::conn_id(node, self.next_generation, idx);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("cannot register connection from {peer}: {e}");
            self.forget_peer(peer);
            return;
        }
        let authed = self.opts.auth.is_none();
        let mut conn = Conn::new(id, stream, peer, self.now, tls, authed);
        if self.opts.read_timeout_ms != 0 {
            conn.read_timer = Some(
                self.timers
                    .insert(self.now + self.opts.read_timeout_ms, NetTimer::Read(id)),
            );
        }
        entry.insert(conn);
        self.metrics.rejected -= 1;
        if self.cluster.is_none() {
            self.core.connect(id);
        }
        debug!("conn {id} open from {peer}");
    }

    fn pause_accepting(&mut self, e: &io::Error) {
        if !self.fd_exhausted {
            warn!(
                "accept failed ({e}): out of file descriptors; pausing accepts, still serving {} connections",
                self.conns.len()
            );
            self.fd_exhausted = true;
        }
        if let Some(l) = self.listener.as_mut() {
            let _ = self.poll.registry().deregister(l);
        }
        self.accept_paused = true;
        self.timers
            .insert(self.now + self.accept_backoff_ms, NetTimer::ResumeAccept);
        self.accept_backoff_ms = (self.accept_backoff_ms * 2).min(ACCEPT_BACKOFF_MAX_MS);
    }

    fn resume_accepting(&mut self) {
        self.accept_paused = false;
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        if let Err(e) = self
            .poll
            .registry()
            .register(listener, LISTENER, Interest::READABLE)
        {
            warn!("cannot re-register the listener: {e}");
        }
        // Pending connections do not raise a new edge: accept them now.
        self.accept_all();
        if !self.accept_paused && self.fd_exhausted {
            info!("file descriptors available again; accepting connections");
            self.fd_exhausted = false;
            self.accept_backoff_ms = ACCEPT_BACKOFF_MIN_MS;
        }
    }

    // ---- timers ----

    fn fire_timers(&mut self) {
        // In cluster mode the core's timers fire when the leader's batches
        // are applied, on cluster time.
        if self.cluster.is_none() {
            self.core.tick(self.now, &mut self.outbox);
            self.dispatch(None);
        }
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.expire(self.now, &mut fired);
        for t in fired.drain(..) {
            match t {
                NetTimer::Read(id) => self.on_read_timer(id),
                NetTimer::Write(id) => self.on_write_timer(id),
                NetTimer::Http(id) => self.close_http(id),
                NetTimer::Linger(id) => {
                    if let Some(idx) = self.index_of(id) {
                        self.close(idx, "did not close after our last reply");
                    }
                }
                NetTimer::ResumeAccept => self.resume_accepting(),
                NetTimer::ShutdownDeadline => {
                    if self.shutdown.is_none() {
                        self.shutdown = Some(Shutdown::TimedOut);
                    }
                }
                NetTimer::RaftTick => self.on_raft_tick(),
            }
        }
        self.fired = fired;
    }

    fn on_read_timer(&mut self, id: ConnId) {
        let Some(idx) = self.index_of(id) else { return };
        let timeout = self.opts.read_timeout_ms;
        let c = &mut self.conns[idx];
        c.read_timer = None;
        if c.closing != Closing::No {
            return;
        }
        if c.tls_handshaking() && c.last_request_ms + timeout <= self.now {
            debug!(
                "conn {id} ({}): TLS handshake not finished in time; closing",
                c.peer
            );
            self.close(idx, "TLS handshake timeout");
            return;
        }
        // Waiting for a grant is not idleness; neither is recent traffic.
        let due = if c.blocked {
            self.now + timeout
        } else {
            c.last_request_ms + timeout
        };
        if due > self.now {
            c.read_timer = Some(self.timers.insert(due, NetTimer::Read(id)));
            return;
        }
        let partial = !c.unread().is_empty();
        self.metrics.count_error(ErrorKind::ReadTimeout);
        debug!(
            "conn {id}: read timeout ({})",
            if partial {
                "request incomplete"
            } else {
                "idle"
            }
        );
        self.fail(idx);
    }

    fn on_write_timer(&mut self, id: ConnId) {
        let Some(idx) = self.index_of(id) else { return };
        let timeout = self.opts.write_timeout_ms;
        let c = &mut self.conns[idx];
        c.write_timer = None;
        let Some(since) = c.write_stalled_since else {
            return;
        };
        if since + timeout > self.now {
            c.write_timer = Some(self.timers.insert(since + timeout, NetTimer::Write(id)));
            return;
        }
        warn!(
            "conn {id} ({}): output stalled for {} ms with {} bytes unsent; closing",
            c.peer,
            timeout,
            c.unsent()
        );
        self.close(idx, "write timeout");
    }

    // ---- reading and requests ----

    /// Reads until `WouldBlock`, handling requests as they complete.
    /// `peer_closed` is the poller's word that the peer has shut its side,
    /// which matters when the input is too full to read the EOF itself.
    fn on_readable(&mut self, idx: usize, peer_closed: bool) {
        loop {
            let Some(c) = self.conns.get_mut(idx) else {
                return;
            };
            let outcome = c.read_once(&mut self.scratch);
            let progressed = matches!(outcome, Ok(ReadOutcome::Data | ReadOutcome::Drained));
            if progressed && c.tls_wants_write() {
                // Handshake records or alerts to send. (Records that could not
                // be sent before wait for a writable event instead.)
                self.mark_dirty(idx);
            }
            let Some(c) = self.conns.get_mut(idx) else {
                return;
            };
            match outcome {
                Ok(outcome @ (ReadOutcome::Data | ReadOutcome::Drained)) => {
                    if c.closing != Closing::No {
                        // Draining the input of a connection we are closing.
                        c.input.clear();
                        c.consumed = 0;
                        continue;
                    }
                    self.process_input(idx);
                    if matches!(outcome, ReadOutcome::Drained) && !peer_closed {
                        return;
                    }
                }
                Ok(ReadOutcome::Full) if peer_closed => {
                    self.on_eof(idx);
                    return;
                }
                Ok(ReadOutcome::WouldBlock) | Ok(ReadOutcome::Full) => return,
                Ok(ReadOutcome::Eof) => {
                    self.on_eof(idx);
                    return;
                }
                Err(e) => {
                    debug!("conn {}: read error: {e}", c.id);
                    self.close(idx, "read error");
                    return;
                }
            }
        }
    }

    fn on_eof(&mut self, idx: usize) {
        // Requests that arrived before the close have been answered; send
        // what we can (one attempt, no further reading) and go.
        if let Some(c) = self.conns.get_mut(idx) {
            let _ = c.flush();
        }
        self.close(idx, "peer closed");
    }

    /// Applies every complete request in the connection's input, until it
    /// blocks, its output backs up, or the input runs out.
    fn process_input(&mut self, idx: usize) {
        loop {
            let now = self.now;
            let c = &mut self.conns[idx];
            if c.blocked || c.closing != Closing::No || c.unsent() > OUTPUT_HIGH_WATER {
                break;
            }
            let frame = match c.decoder.decode(&c.input[c.consumed..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(FrameError::LineTooLong) => {
                    self.metrics.count_error(ErrorKind::LineTooLong);
                    warn!("conn {} ({}): line too long; closing", c.id, c.peer);
                    self.fail(idx);
                    return;
                }
            };
            let start = c.consumed;
            c.consumed += frame.len;
            c.last_request_ms = now;
            let id = c.id;
            let parsed = parse_request(&c.input[start..], &frame);
            let outcome = match (&parsed, &self.opts.auth) {
                // With a token configured, `auth` is settled here.
                (Ok(Request::Auth { token }), Some((secret, _))) => {
                    if !secret.verify(token) {
                        self.fail(idx);
                        return;
                    }
                    c.authed = true;
                    self.outbox.replies.push((id, Reply::Ok));
                    Outcome::Replied
                }
                _ if !c.authed => {
                    self.fail(idx);
                    return;
                }
                (Ok(req), _)
                    if cluster::replicated(req)
                        && self.cluster.as_ref().is_some_and(|cl| !cl.node.joined()) =>
                {
                    // A cluster node takes state changes once it has
                    // rejoined (see `Node::joined`): this request waits.
                    c.consumed = start;
                    c.decoder = crate::protocol::FrameDecoder::new();
                    break;
                }
                (Ok(req), _) if self.cluster.is_some() => {
                    self.metrics.count_command(req);
                    if cluster::replicated(req) {
                        if self.draining && acquires(req) {
                            self.outbox.replies.push((id, Reply::ErrorDraining));
                            Outcome::Replied
                        } else {
                            let len = frame.len;
                            self.submit(idx, start, len);
                            Outcome::Blocked
                        }
                    } else {
                        let now = self
                            .cluster
                            .as_ref()
                            .map_or(now, |cl| cl.node.machine().now());
                        let o = self.core.handle(now, id, req, &mut self.outbox);
                        if matches!(req, Request::Stats) {
                            self.cluster_stats();
                        }
                        o
                    }
                }
                (Ok(req), _) => {
                    self.metrics.count_command(req);
                    self.core.handle(now, id, req, &mut self.outbox)
                }
                (Err(e), _) => {
                    self.metrics.count_error(ErrorKind::Parse(*e));
                    warn!("conn {id} ({}): bad request: {e:?}", c.peer);
                    self.outbox.replies.push((id, Reply::Error));
                    Outcome::Replied
                }
            };
            if outcome == Outcome::Blocked {
                self.conns[idx].blocked = true;
            }
            self.dispatch(Some(idx));
        }
        let c = &mut self.conns[idx];
        c.compact_input();
    }

    /// Delivers the outbox: encodes each reply into its connection's output
    /// and wakes connections whose blocking command was answered.
    fn dispatch(&mut self, current: Option<usize>) {
        for expired in self.outbox.expired.drain(..) {
            warn!(
                "lease expired: key {:?} held by conn {}",
                expired.key, expired.conn
            );
        }
        for i in 0..self.outbox.replies.len() {
            let (id, reply) = self.outbox.replies[i];
            let Some(idx) = self.index_of(id) else {
                if reply.is_push() {
                    self.forward_signal(id);
                }
                continue;
            };
            let c = &mut self.conns[idx];
            if c.closing == Closing::Dropped {
                continue;
            }
            encode_reply(&reply, self.outbox.body(&reply), &mut c.output);
            if reply.is_push()
                && c.unsent() > self.opts.max_output_buffer
                && c.closing == Closing::No
            {
                // Closed at the end of the turn: the connection may be the one
                // whose requests are being handled right now.
                c.closing = Closing::Dropped;
                self.slow.push(idx);
            }
            if c.blocked && !reply.is_push() {
                // The only reply a blocked connection can get ends its wait.
                c.blocked = false;
                c.last_request_ms = self.now;
                if Some(idx) != current {
                    self.ready.push(idx);
                }
            }
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(idx);
            }
        }
        self.outbox.replies.clear();
    }

    /// Disconnects the listeners found over their output cap this turn.
    fn drop_slow_consumers(&mut self) {
        while let Some(idx) = self.slow.pop() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            warn!(
                "conn {} ({}): slow consumer, {} bytes of signals unsent; disconnecting",
                c.id,
                c.peer,
                c.unsent()
            );
            self.metrics.slow_consumers += 1;
            self.close(idx, "slow consumer");
        }
    }

    /// Continues connections that were waiting (for a grant or for their
    /// output to drain): their pipelined requests are handled in this turn.
    fn resume_ready(&mut self) {
        while let Some(idx) = self.ready.pop() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            let pending = c.input_pending;
            self.process_input(idx);
            if pending {
                self.on_readable(idx, false);
            }
        }
    }

    // ---- writing and closing ----

    fn mark_dirty(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(idx);
            }
        }
    }

    /// Flushes every connection with new output, once. Flushing may close a
    /// connection (handing its locks to others) or drain a backed-up one, so
    /// repeat until nothing is left to do.
    fn flush_dirty(&mut self) {
        while !self.dirty.is_empty() || !self.ready.is_empty() {
            self.resume_ready();
            let mut dirty = std::mem::take(&mut self.dirty);
            for &idx in &dirty {
                if let Some(c) = self.conns.get_mut(idx) {
                    c.dirty = false;
                    self.flush(idx);
                }
            }
            dirty.clear();
            if self.dirty.is_empty() {
                self.dirty = dirty;
            }
        }
    }

    fn flush(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let was_backed_up = c.unsent() > OUTPUT_HIGH_WATER;
        let handshaking = c.tls_handshaking();
        let before = c.unsent();
        let flushed = c.flush();
        // The TLS session stopped reading to send its handshake flight; once
        // that is out, data may already wait in the socket without a new
        // readiness event.
        let reread = handshaking && matches!(flushed, Ok(false)) && c.closing == Closing::No;
        match flushed {
            Ok(true) => {
                if c.unsent() < before || c.write_stalled_since.is_none() {
                    c.write_stalled_since = Some(self.now);
                }
                if self.opts.write_timeout_ms != 0 && c.write_timer.is_none() {
                    let id = c.id;
                    c.write_timer = Some(
                        self.timers
                            .insert(self.now + self.opts.write_timeout_ms, NetTimer::Write(id)),
                    );
                }
            }
            Ok(false) => {
                c.write_stalled_since = None;
                if c.closing == Closing::AfterFlush && !c.write_shut {
                    c.write_shut = true;
                    c.send_close_notify();
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            Err(e) => {
                debug!("conn {}: write error: {e}", c.id);
                self.close(idx, "write error");
                return;
            }
        }
        let c = &self.conns[idx];
        if was_backed_up && c.unsent() <= OUTPUT_HIGH_WATER && c.closing == Closing::No {
            self.ready.push(idx);
        }
        if reread {
            self.on_readable(idx, false);
        }
    }

    /// Answers `error` after a read-level failure and closes the connection
    /// once the reply has been sent.
    ///
    /// Before authentication every failure is an authentication failure:
    /// `error_auth`, then the connection is closed about 100 ms later.
    fn fail(&mut self, idx: usize) {
        let now = self.now;
        let c = &mut self.conns[idx];
        let id = c.id;
        let (reply, closing, delay) = if c.authed {
            (Reply::Error, Closing::AfterFlush, LINGER_MS)
        } else {
            self.metrics.auth_failures += 1;
            warn!("conn {id} ({}): authentication failed", c.peer);
            (Reply::ErrorAuth, Closing::AuthFailed, AUTH_FAIL_CLOSE_MS)
        };
        encode_reply(&reply, &[], &mut c.output);
        c.closing = closing;
        c.blocked = false;
        c.input.clear();
        c.consumed = 0;
        c.linger_timer = Some(self.timers.insert(now + delay, NetTimer::Linger(id)));
        // The connection is finished as far as the locks are concerned.
        if self.cluster.is_some() {
            let replicated = std::mem::take(&mut c.replicated);
            self.cluster_disconnect(id, replicated);
        } else {
            self.core.disconnect(now, id, &mut self.outbox);
        }
        self.dispatch(Some(idx));
        self.mark_dirty(idx);
    }

    fn close(&mut self, idx: usize, why: &str) {
        let Some(mut c) = self.conns.try_remove(idx) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        for t in [c.read_timer, c.write_timer, c.linger_timer]
            .into_iter()
            .flatten()
        {
            self.timers.cancel(t);
        }
        debug!("conn {} closed ({why})", c.id);
        self.metrics.closed_bytes_read += c.bytes_read;
        self.metrics.closed_bytes_written += c.bytes_written;
        self.forget_peer(c.peer);
        if self.cluster.is_some() {
            self.cluster_disconnect(c.id, c.replicated);
        } else {
            self.core.disconnect(self.now, c.id, &mut self.outbox);
        }
        self.dispatch(None);
    }

    // ---- monitoring ----

    fn accept_http(&mut self) {
        loop {
            let Some(listener) = &self.http_listener else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => return,
                Err(_) => continue,
            };
            if self.http.len() >= http::MAX_CONNECTIONS {
                debug!("refusing monitoring connection from {peer}: too many");
                continue;
            }
            let entry = self.http.vacant_entry();
            let idx = entry.key();
            self.next_generation = self.next_generation.wrapping_add(1);
            let id = ((self.next_generation as u64) << 32) | idx as u64;
            let token = Token(HTTP_BASE + idx);
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            let timer = self
                .timers
                .insert(self.now + http::REQUEST_TIMEOUT_MS, NetTimer::Http(id));
            entry.insert(HttpConn {
                id,
                stream,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                responded: false,
                timer,
            });
        }
    }

    fn on_http(&mut self, idx: usize) {
        let Some(h) = self.http.get_mut(idx) else {
            return;
        };
        let id = h.id;
        if !h.responded {
            let auth = self.opts.auth.as_ref().map(|(t, _)| t);
            let authorized = |header: Option<&[u8]>| match auth {
                None => true,
                Some(token) => header
                    .and_then(|v| v.strip_prefix(b"Bearer "))
                    .is_some_and(|v| token.verify(v)),
            };
            let route = match h.read(&authorized) {
                Progress::Partial => return,
                Progress::Closed => return self.close_http(id),
                Progress::Request(route) => route,
            };
            self.answer_http(idx, route);
        }
        let h = &mut self.http[idx];
        match h.flush() {
            Ok(false) => {}
            Ok(true) | Err(_) => self.close_http(id),
        }
    }

    fn answer_http(&mut self, idx: usize, route: Route) {
        let mut body = Vec::new();
        let (status, ctype, extra) = match route {
            Route::Metrics => {
                let live = self.live_figures();
                self.metrics.encode(&self.core, &live, &mut body);
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", "")
            }
            Route::Health => {
                body.extend_from_slice(b"ok\n");
                ("200 OK", "text/plain", "")
            }
            Route::Ready if self.draining => {
                body.extend_from_slice(b"draining\n");
                ("503 Service Unavailable", "text/plain", "")
            }
            Route::Ready => match self.cluster_ready() {
                Ok(()) => {
                    body.extend_from_slice(b"ready\n");
                    ("200 OK", "text/plain", "")
                }
                Err(why) => {
                    body.extend_from_slice(why.as_bytes());
                    body.push(b'\n');
                    ("503 Service Unavailable", "text/plain", "")
                }
            },
            Route::Unauthorized => (
                "401 Unauthorized",
                "text/plain",
                "WWW-Authenticate: Bearer\r\n",
            ),
            Route::NotFound => ("404 Not Found", "text/plain", ""),
            Route::MethodNotAllowed => (
                "405 Method Not Allowed",
                "text/plain",
                "Allow: GET, HEAD\r\n",
            ),
            Route::TooLarge => ("431 Request Header Fields Too Large", "text/plain", ""),
            Route::BadRequest => ("400 Bad Request", "text/plain", ""),
        };
        let h = &mut self.http[idx];
        http::respond(&mut h.output, status, ctype, extra, &body);
        h.responded = true;
    }

    fn live_figures(&self) -> Live {
        let (read, written) = self.conns.iter().fold((0, 0), |(r, w), (_, c)| {
            (r + c.bytes_read, w + c.bytes_written)
        });
        Live {
            connections: self.conns.len(),
            bytes_read: self.metrics.closed_bytes_read + read,
            bytes_written: self.metrics.closed_bytes_written + written,
            draining: self.draining,
            cluster: self.cluster_figures(),
        }
    }

    fn close_http(&mut self, id: u64) {
        let idx = (id & 0xffff_ffff) as usize;
        if self.http.get(idx).is_none_or(|h| h.id != id) {
            return;
        }
        let mut h = self.http.remove(idx);
        self.timers.cancel(h.timer);
        let _ = self.poll.registry().deregister(&mut h.stream);
    }

    /// Counts a connection from `peer` as gone, for the per-IP cap.
    fn forget_peer(&mut self, peer: SocketAddr) {
        if self.opts.max_connections_per_ip == 0 {
            return;
        }
        if let Some((count, _)) = self.per_ip.get_mut(&peer.ip()) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&peer.ip());
            }
        }
    }

    fn index_of(&self, id: ConnId) -> Option<usize> {
        let mask = if self.cluster.is_some() {
            cluster::CLUSTER_IDX_MASK
        } else {
            0xffff_ffff
        };
        let idx = (id & mask) as usize;
        self.conns.get(idx).filter(|c| c.id == id).map(|_| idx)
    }
}

/// Connections the kernel may queue before we accept them. The standard
/// library listens with a backlog of 128; a burst of new clients larger than
/// that has its SYNs dropped and retried a second later, so ask for more (the
/// kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

fn widen_backlog(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `listen` on a descriptor we own; calling it again on a
    // listening socket only updates the backlog.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Requests that take a lock or a slot (refused while draining).
fn acquires(req: &Request<'_>) -> bool {
    matches!(req, Request::Acquire { .. } | Request::Enqueue { .. })
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: accepting again at once would only spin.
fn is_fd_exhaustion(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}
