//! Peer links of cluster mode: the peer listener, one outbound connection to
//! every other member (this node sends only on those) and the inbound ones
//! the others dialled (it receives only on those).
//!
//! An outbound link starts with this node's hello; an inbound link must
//! start with a valid hello (right cluster id, a member's id, the proof of
//! the auth token when one is set) within [`HELLO_TIMEOUT_MS`], or it is
//! closed. Any framing error closes the link; raft-rs resends what a lost
//! link dropped, and a node's forwarded commands are sent again by it.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::security::AuthToken;
use crate::cluster::wire::{self, Frame};

/// How long an inbound peer connection may take to send its hello.
pub const HELLO_TIMEOUT_MS: u64 = 5_000;
/// Unsent bytes past which an outbound link is reset (its peer is not
/// reading; Raft will catch it up from the log when it reads again).
const OUTBOUND_CAP: usize = 64 << 20;
const RETRY_MIN_MS: u64 = 50;
const RETRY_MAX_MS: u64 = 1_000;
/// Most inbound peer connections at once (members reconnecting, strays).
const MAX_INBOUND: usize = 64;

/// TLS of peer links: the server side is the client-facing configuration;
/// the client side trusts the certificates of this node's own chain file.
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// A peer socket, in the clear or through TLS.
struct PeerIo {
    tcp: TcpStream,
    tls: Option<Box<rustls::Connection>>,
}

impl PeerIo {
    /// Reads plaintext. `Ok(0)` is the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.tcp.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.tcp)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            Self::send_records(tls, &mut self.tcp)?;
        }
    }

    /// Writes plaintext (`WouldBlock` while the handshake is not done).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.tcp.write(buf);
        };
        Self::send_records(tls, &mut self.tcp)?;
        if tls.is_handshaking() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = tls.writer().write(buf)?;
        Self::send_records(tls, &mut self.tcp)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Sends the TLS records rustls has ready, until the socket is full.
    fn send_records(tls: &mut rustls::Connection, tcp: &mut TcpStream) -> io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

pub struct Inbound {
    stream: PeerIo,
    peer: SocketAddr,
    input: Vec<u8>,
    /// The member that said hello.
    node: Option<u64>,
    opened_ms: u64,
    /// When a frame last arrived.
    heard_ms: u64,
}

pub struct Outbound {
    pub id: u64,
    addr: SocketAddr,
    stream: Option<PeerIo>,
    connected: bool,
    output: Vec<u8>,
    written: usize,
    pub retry_at: Option<u64>,
    backoff_ms: u64,
    /// Logged once per outage.
    down_logged: bool,
}

pub struct Links {
    pub listener: TcpListener,
    pub inbound: Slab<Inbound>,
    pub outbound: Vec<Outbound>,
    self_id: u64,
    cluster_id: u64,
    members: Vec<u64>,
    hello: Vec<u8>,
    proof: Vec<u8>,
    settings: u64,
    auth: Option<AuthToken>,
    tls: Option<PeerTls>,
    scratch: Vec<u8>,
    /// A link silent (inbound) or unacknowledged (outbound) this long is
    /// dropped and redialled: a partition leaves TCP connections open, with
    /// their retransmissions backing off for up to two minutes.
    dead_after_ms: u64,
}

impl Links {
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        addr: SocketAddr,
        election_timeout_ms: u64,
        self_id: u64,
        cluster_id: u64,
        peers: &[(u64, SocketAddr)],
        settings: u64,
        auth: Option<AuthToken>,
        tls: Option<PeerTls>,
    ) -> io::Result<Links> {
        let listener = TcpListener::bind(addr)?;
        let proof = auth
            .as_ref()
            .map(|a| a.peer_proof(cluster_id).to_vec())
            .unwrap_or_default();
        let mut hello = Vec::new();
        wire::encode_hello(
            &mut hello,
            &wire::Hello {
                cluster_id,
                node: self_id,
                settings,
                has_state: false,
                proof: &proof,
            },
        );
        let outbound = peers
            .iter()
            .filter(|(id, _)| *id != self_id)
            .map(|&(id, addr)| Outbound {
                id,
                addr,
                stream: None,
                connected: false,
                output: Vec::new(),
                written: 0,
                retry_at: Some(0),
                backoff_ms: RETRY_MIN_MS,
                down_logged: false,
            })
            .collect();
        Ok(Links {
            listener,
            inbound: Slab::new(),
            outbound,
            self_id,
            cluster_id,
            members: peers.iter().map(|p| p.0).collect(),
            hello,
            proof,
            settings,
            auth,
            tls,
            scratch: vec![0; 64 * 1024],
            dead_after_ms: (2 * election_timeout_ms).max(1_000),
        })
    }

    /// What this node's hellos say about it from now on (see
    /// `Node::has_state`).
    pub fn set_has_state(&mut self, has_state: bool) {
        self.hello.clear();
        wire::encode_hello(
            &mut self.hello,
            &wire::Hello {
                cluster_id: self.cluster_id,
                node: self.self_id,
                settings: self.settings,
                has_state,
                proof: &self.proof,
            },
        );
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts inbound peer connections; `token_of(idx)` names their poll token.
    pub fn accept(&mut self, registry: &Registry, now: u64, token_of: impl Fn(usize) -> Token) {
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("peer accept failed: {e}");
                    return;
                }
            };
            if self.inbound.len() >= MAX_INBOUND {
                warn!("refusing peer connection from {peer}: {MAX_INBOUND} already open");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let tls = match &self.tls {
                Some(t) => match rustls::ServerConnection::new(t.server.clone()) {
                    Ok(c) => Some(Box::new(rustls::Connection::Server(c))),
                    Err(e) => {
                        warn!("cannot start TLS for peer connection from {peer}: {e}");
                        continue;
                    }
                },
                None => None,
            };
            let entry = self.inbound.vacant_entry();
            if registry
                .register(&mut stream, token_of(entry.key()), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            entry.insert(Inbound {
                stream: PeerIo { tcp: stream, tls },
                peer,
                input: Vec::new(),
                node: None,
                opened_ms: now,
                heard_ms: now,
            });
        }
    }

    /// Reads an inbound link and hands each complete frame to `on_frame`
    /// (with the member it came from), the accepted hello included. A
    /// `false` from `on_frame`, a framing error, a bad hello or EOF closes
    /// the link.
    pub fn read_inbound(
        &mut self,
        registry: &Registry,
        now: u64,
        idx: usize,
        mut on_frame: impl FnMut(u64, Frame<'_>) -> bool,
    ) {
        let Some(link) = self.inbound.get_mut(idx) else {
            return;
        };
        let mut close = None;
        loop {
            match link.stream.read(&mut self.scratch) {
                Ok(0) => {
                    close = Some("closed by the peer".to_string());
                    break;
                }
                Ok(n) => link.input.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    close = Some(format!("read error: {e}"));
                    break;
                }
            }
            // Frames are handled as they complete so the buffer stays small.
            if link.input.len() >= 1 << 20 {
                break;
            }
        }
        let mut at = 0;
        if !link.input.is_empty() {
            link.heard_ms = now;
        }
        while close.is_none() {
            let max = if link.node.is_some() {
                wire::MAX_FRAME
            } else {
                wire::MAX_HELLO
            };
            let (frame, n) = match wire::decode(&link.input[at..], max) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    close = Some(format!("bad frame: {e}"));
                    break;
                }
            };
            at += n;
            match (link.node, frame) {
                (
                    None,
                    hello @ Frame::Hello {
                        cluster_id,
                        node,
                        settings,
                        proof,
                        ..
                    },
                ) => {
                    if cluster_id != self.cluster_id {
                        close = Some(format!(
                            "hello from another cluster (id {cluster_id:016x}, ours {:016x}): check --peers on every node",
                            self.cluster_id
                        ));
                    } else if node == self.self_id || !self.members.contains(&node) {
                        close = Some(format!("hello from unknown node {node}"));
                    } else if settings != self.settings {
                        close = Some(format!(
                            "node {node} runs with other lock settings: every node needs the same --default-lease-ttl, --max-locks, --max-waiters, --gc-interval, --gc-max-idle, --max-subscriptions, --max-holds-per-connection and --auto-release-on-disconnect"
                        ));
                    } else if let Some(auth) = &self.auth
                        && !auth.verify_peer_proof(cluster_id, proof)
                    {
                        close = Some(format!(
                            "node {node} did not prove the auth token (same --auth-token on every node?)"
                        ));
                    } else {
                        info!("peer link from node {node} ({}) up", link.peer);
                        link.node = Some(node);
                        on_frame(node, hello);
                    }
                }
                (None, _) => close = Some("no hello".into()),
                (Some(_), Frame::Hello { .. }) => close = Some("a second hello".into()),
                (Some(node), frame) => {
                    if !on_frame(node, frame) {
                        close = Some(format!("undecodable message from node {node}"));
                    }
                }
            }
        }
        link.input.drain(..at);
        if let Some(why) = close {
            self.close_inbound(registry, idx, &why);
        } else if link.input.len() >= 1 << 20 {
            // More to read: the poller will not signal again for data
            // already waiting, so go on now.
            self.read_inbound(registry, now, idx, on_frame);
        }
    }

    pub fn close_inbound(&mut self, registry: &Registry, idx: usize, why: &str) {
        let Some(mut link) = self.inbound.try_remove(idx) else {
            return;
        };
        let _ = registry.deregister(&mut link.stream.tcp);
        match link.node {
            Some(node) => info!("peer link from node {node} ({}) down: {why}", link.peer),
            None => warn!("peer connection from {} closed: {why}", link.peer),
        }
    }

    /// Every heartbeat interval (when the node has queued its pings):
    /// inbound links that said no hello in time, or nothing for too long,
    /// are closed (the peer redials).
    pub fn keepalive(&mut self, registry: &Registry, now: u64) {
        let dead_after = self.dead_after_ms;
        let late: Vec<(usize, &'static str)> = self
            .inbound
            .iter()
            .filter_map(|(i, l)| {
                if l.node.is_none() && now >= l.opened_ms + HELLO_TIMEOUT_MS {
                    Some((i, "no hello in time"))
                } else if l.node.is_some() && now >= l.heard_ms + dead_after {
                    Some((i, "silent too long"))
                } else {
                    None
                }
            })
            .collect();
        for (idx, why) in late {
            self.close_inbound(registry, idx, why);
        }
    }

    /// Queues a frame for member `to`, written by [`flush`](Self::flush).
    /// Dropped when the link is down (Raft resends; forwards are retried).
    pub fn send(&mut self, to: u64, encode: impl FnOnce(&mut Vec<u8>)) {
        let Some(link) = self.outbound.iter_mut().find(|l| l.id == to) else {
            return;
        };
        if link.stream.is_none() {
            return;
        }
        encode(&mut link.output);
    }

    /// (Re)connects outbound links whose retry time has come.
    pub fn connect_due(
        &mut self,
        registry: &Registry,
        now: u64,
        token_of: impl Fn(usize) -> Token,
    ) {
        for (i, link) in self.outbound.iter_mut().enumerate() {
            if link.stream.is_some() || link.retry_at.is_none_or(|t| t > now) {
                continue;
            }
            let tls = match &self.tls {
                Some(t) => {
                    let name = rustls::pki_types::ServerName::IpAddress(link.addr.ip().into());
                    match rustls::ClientConnection::new(t.client.clone(), name) {
                        Ok(c) => Some(Box::new(rustls::Connection::Client(c))),
                        Err(e) => {
                            warn!("cannot start TLS to node {}: {e}", link.id);
                            link.retry_at = Some(now + RETRY_MAX_MS);
                            continue;
                        }
                    }
                }
                None => None,
            };
            match TcpStream::connect(link.addr) {
                Ok(mut s) => {
                    if registry
                        .register(&mut s, token_of(i), Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        link.retry_at = Some(now + link.backoff_ms);
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    set_user_timeout(&s, self.dead_after_ms);
                    link.stream = Some(PeerIo { tcp: s, tls });
                    link.connected = false;
                    link.retry_at = None;
                    link.output.clear();
                    link.written = 0;
                    link.output.extend_from_slice(&self.hello);
                }
                Err(e) => {
                    if !link.down_logged {
                        warn!("peer link to node {} ({}): {e}", link.id, link.addr);
                        link.down_logged = true;
                    }
                    link.retry_at = Some(now + link.backoff_ms);
                    link.backoff_ms = (link.backoff_ms * 2).min(RETRY_MAX_MS);
                }
            }
        }
    }

    /// An event on outbound link `i`: it connected, failed, or can write.
    pub fn on_outbound_event(&mut self, registry: &Registry, i: usize, now: u64) {
        let Some(link) = self.outbound.get_mut(i) else {
            return;
        };
        let Some(stream) = link.stream.as_mut() else {
            return;
        };
        if !link.connected {
            match stream.tcp.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let why = e.to_string();
                    Self::reset(registry, link, now, &why);
                    return;
                }
            }
            match stream.tcp.peer_addr() {
                Ok(_) => {
                    link.connected = true;
                    link.backoff_ms = RETRY_MIN_MS;
                    link.down_logged = false;
                    info!("peer link to node {} ({}) up", link.id, link.addr);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    let why = e.to_string();
                    Self::reset(registry, link, now, &why);
                    return;
                }
            }
        }
        // The peer never sends on this link: a readable event is its EOF.
        let mut byte = [0u8; 64];
        match stream.read(&mut byte) {
            Ok(0) => {
                Self::reset(registry, link, now, "closed by the peer");
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                let why = e.to_string();
                Self::reset(registry, link, now, &why);
                return;
            }
        }
        Self::flush_one(registry, link, now);
    }

    /// Writes what every connected outbound link has queued.
    pub fn flush(&mut self, registry: &Registry, now: u64) {
        for link in &mut self.outbound {
            Self::flush_one(registry, link, now);
        }
    }

    fn flush_one(registry: &Registry, link: &mut Outbound, now: u64) {
        if !link.connected || link.written == link.output.len() {
            return;
        }
        let Some(stream) = link.stream.as_mut() else {
            return;
        };
        while link.written < link.output.len() {
            match stream.write(&link.output[link.written..]) {
                Ok(0) => break,
                Ok(n) => link.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = e.to_string();
                    Self::reset(registry, link, now, &why);
                    return;
                }
            }
        }
        if link.written == link.output.len() {
            link.output.clear();
            link.written = 0;
        } else if link.output.len() - link.written > OUTBOUND_CAP {
            Self::reset(registry, link, now, "peer not reading");
        } else if link.written > link.output.len() / 2 {
            link.output.drain(..link.written);
            link.written = 0;
        }
    }

    fn reset(registry: &Registry, link: &mut Outbound, now: u64, why: &str) {
        if let Some(mut s) = link.stream.take() {
            let _ = registry.deregister(&mut s.tcp);
        }
        if link.connected || !link.down_logged {
            warn!("peer link to node {} ({}) down: {why}", link.id, link.addr);
            link.down_logged = true;
        }
        link.connected = false;
        link.output.clear();
        link.written = 0;
        link.retry_at = Some(now + link.backoff_ms);
        link.backoff_ms = (link.backoff_ms * 2).min(RETRY_MAX_MS);
    }

    /// Members with a working outbound link, for `stats`.
    pub fn connected(&self) -> usize {
        self.outbound.iter().filter(|l| l.connected).count()
    }
}

/// TCP_USER_TIMEOUT: the kernel fails the connection when sent data stays
/// unacknowledged this long (the pings keep data in flight), instead of
/// retransmitting with backoff for minutes.
fn set_user_timeout(s: &TcpStream, ms: u64) {
    use std::os::fd::AsRawFd;
    const TCP_USER_TIMEOUT: libc::c_int = 18;
    let v: libc::c_uint = ms.min(u32::MAX as u64) as libc::c_uint;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live
    // c_uint and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_USER_TIMEOUT,
            (&v as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}
