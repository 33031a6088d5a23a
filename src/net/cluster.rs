//! The event loop's cluster-mode duties: the Raft node, peer links, and the
//! rules that keep a node from answering for a cluster it cannot reach.
//!
//! Client requests that change state are not applied here: they go to the
//! node's queue (`Node::submit_request`), are committed through the leader,
//! and are answered when the local node applies them. `ping`, `stats` and
//! `signal` are answered from the local state at once.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use mio::Token;

use super::peer::Links;
use super::{NetTimer, Server};
use crate::cluster::command::Command;
use crate::cluster::machine::{Event, node_of};
use crate::cluster::node::{Node, NodeConfig, Outgoing};
use crate::cluster::wire::{self, Frame};
use crate::config::ClusterSettings;
use crate::core::{ConnId, Core};
use crate::protocol::{Reply, Request, encode_reply};

pub(super) const PEER_LISTENER: Token = Token(usize::MAX - 4);
/// Inbound peer links use tokens from here up, outbound ones from
/// [`PEER_OUT_BASE`] (both far above client and monitoring tokens).
pub(super) const PEER_IN_BASE: usize = 1 << 41;
pub(super) const PEER_OUT_BASE: usize = 1 << 42;

/// A node-loss and unavailability margin, in election timeouts.
const UNAVAILABLE_AFTER: u64 = 3;

pub(super) struct Cluster {
    pub node: Node,
    pub links: Option<Links>,
    pub settings: ClusterSettings,
    /// This node has closed its clients for want of a leader, and not
    /// heard from one since.
    pub leaderless: bool,
    failed_logged: bool,
    /// What this node's hellos say (see `Node::has_state`).
    hello_has_state: bool,
    /// Whether the node had rejoined at the end of the last turn.
    was_joined: bool,
    deliveries: Vec<(ConnId, Vec<u8>)>,
}

/// Encodes the node's outgoing messages into the peer links' buffers,
/// emptying `out` (its allocation is kept for the next turn).
fn send_out(links: &mut Links, out: &mut Vec<(u64, Outgoing)>) {
    for (to, msg) in out.drain(..) {
        match msg {
            Outgoing::Raft(m) => links.send(to, |b| wire::encode_raft(b, &m)),
            Outgoing::Forward(cmds) => links.send(to, |b| wire::encode_forward(b, &cmds)),
            Outgoing::Ping(stamp) => links.send(to, |b| wire::encode_ping(b, stamp)),
            Outgoing::Echo(stamp) => links.send(to, |b| wire::encode_echo(b, stamp)),
        }
    }
}

/// Whether a request changes replicated state (and so goes through the log).
pub(super) fn replicated(req: &Request<'_>) -> bool {
    !matches!(
        req,
        Request::Ping | Request::Stats | Request::Signal { .. } | Request::Auth { .. }
    )
}

/// A digest of the settings that decide how a command applies: nodes that
/// disagree on them would reach different states from the same log, so
/// peers compare it in their hellos.
pub fn settings_digest(c: &crate::core::Config) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [
        c.default_lease_ms,
        c.max_keys as u64,
        c.max_waiters as u64,
        c.gc_interval_ms,
        c.gc_max_idle_ms,
        c.auto_release_on_disconnect as u64,
        c.max_subscriptions as u64,
        c.max_holds_per_conn as u64,
    ] {
        for b in v.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Cluster {
    /// Opens the data directory, binds the peer listener and builds the
    /// core the node applies to.
    pub fn open(
        settings: &ClusterSettings,
        core_cfg: &crate::core::Config,
        auth: Option<super::security::AuthToken>,
        tls: Option<&(
            std::sync::Arc<rustls::ServerConfig>,
            super::security::TlsSource,
        )>,
    ) -> Result<(Cluster, Core), String> {
        let peer_tls = match tls {
            Some((server, source)) => Some(super::peer::PeerTls {
                server: server.clone(),
                client: super::security::peer_client_config(source)?,
            }),
            None => None,
        };
        let cfg = NodeConfig {
            id: settings.node_id,
            voters: settings.voters(),
            cluster_id: settings.cluster_id(),
            heartbeat_ms: settings.heartbeat_interval_ms,
            election_ms: settings.election_timeout_ms,
            fixed_election_ticks: None,
        };
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
            format!(
                "cannot create --data-dir {}: {e}",
                settings.data_dir.display()
            )
        })?;
        let (mut node, recovered) = Node::open(
            cfg,
            &settings.data_dir,
            wall_ns(),
            0,
            &crate::cluster::raft_logger(),
        )
        .map_err(|e| format!("--data-dir {}: {e}", settings.data_dir.display()))?;
        if recovered.torn_bytes > 0 {
            warn!(
                "--data-dir {}: cut a torn record of {} bytes off the end of the log (a crash mid-write)",
                settings.data_dir.display(),
                recovered.torn_bytes
            );
        }
        info!(
            "cluster node {} of {:?}, data dir {} ({} log entries recovered{})",
            settings.node_id,
            settings.voters(),
            settings.data_dir.display(),
            recovered.entries.len(),
            if recovered.fresh { ", new" } else { "" }
        );
        node.set_snapshot_every(settings.snapshot_entries);
        node.reincarnate(0);
        if settings.peers.is_empty() {
            node.campaign();
        }
        let core = node
            .make_core(core_cfg.clone())
            .map_err(|e| format!("--data-dir {}: {e}", settings.data_dir.display()))?;
        let links = match settings.own_addr() {
            Some(addr) => {
                let peers: Vec<(u64, SocketAddr)> =
                    settings.peers.iter().map(|p| (p.id, p.addr)).collect();
                Some(
                    Links::bind(
                        addr,
                        settings.election_timeout_ms,
                        settings.node_id,
                        settings.cluster_id(),
                        &peers,
                        settings_digest(core_cfg),
                        auth,
                        peer_tls,
                    )
                    .map_err(|e| format!("cannot listen for peers on {addr}: {e}"))?,
                )
            }
            None => None,
        };
        let hello_has_state = node.has_state();
        let mut links = links;
        if let Some(l) = links.as_mut() {
            l.set_has_state(hello_has_state);
        }
        Ok((
            Cluster {
                node,
                links,
                settings: settings.clone(),
                leaderless: false,
                failed_logged: false,
                hello_has_state,
                was_joined: false,
                deliveries: Vec::new(),
            },
            core,
        ))
    }

    fn election_ms(&self) -> u64 {
        self.settings.election_timeout_ms
    }
}

/// The id a new client connection gets. In cluster mode this node's id is
/// in the top 16 bits, so that every node can tell whose connection an id
/// names.
pub(super) fn conn_id(node: Option<u64>, generation: u32, idx: usize) -> ConnId {
    match node {
        Some(node) => {
            (node << 48)
                | (((generation & 0xff_ffff) as u64) << 24)
                | (idx as u64 & CLUSTER_IDX_MASK)
        }
        None => ((generation as u64) << 32) | idx as u64,
    }
}

/// The slab index bits of a cluster-mode connection id (24: at most 16 M
/// connections per node; 24 bits of generation make reuse of an id take 16 M
/// connections on one slot).
pub(super) const CLUSTER_IDX_MASK: u64 = 0xff_ffff;

impl Server {
    /// Queues a replicated request of connection `idx` (its frame is
    /// `input[start..start + len]`).
    pub(super) fn submit(&mut self, idx: usize, start: usize, len: usize) {
        let cl = self.cluster.as_mut().expect("cluster mode");
        let c = &mut self.conns[idx];
        c.replicated = true;
        cl.node.submit_request(c.id, &c.input[start..start + len]);
    }

    /// A connection is gone: the cluster must hear of it if it ever sent
    /// a replicated request.
    pub(super) fn cluster_disconnect(&mut self, id: ConnId, replicated: bool) {
        if !replicated {
            return;
        }
        if let Some(cl) = self.cluster.as_mut() {
            cl.node
                .submit(|origin| Command::Disconnect { origin, conn: id });
        }
    }

    /// Appends the `cluster` object to a `stats` body.
    pub(super) fn cluster_stats(&mut self) {
        let Some(cl) = self.cluster.as_ref() else {
            return;
        };
        let json = &mut self.outbox.json;
        if json.last() != Some(&b'}') {
            return;
        }
        json.pop();
        let st = cl.node.stats;
        let peers = cl.links.as_ref().map_or(0, |l| l.connected());
        use std::io::Write;
        let _ = write!(
            json,
            ",\"cluster\":{{\"node_id\":{},\"leader_id\":{},\"term\":{},\"role\":\"{}\",\"voters\":{},\"peers_connected\":{},\"commit_index\":{},\"applied_index\":{},\"leader_changes\":{},\"proposals\":{},\"fsyncs\":{},\"log_bytes\":{},\"snapshot_index\":{}}}}}",
            cl.node.id(),
            cl.node.leader(),
            cl.node.term(),
            if cl.node.is_leader() {
                "leader"
            } else {
                "follower"
            },
            cl.settings.voters().len(),
            peers,
            st.commit,
            st.applied,
            st.leader_changes,
            st.proposals,
            st.fsyncs,
            st.log_bytes,
            st.snapshot_index,
        );
    }

    /// Raft figures for `/metrics`.
    pub(super) fn cluster_figures(&self) -> Option<super::metrics::ClusterFigures> {
        let cl = self.cluster.as_ref()?;
        Some(super::metrics::ClusterFigures {
            node_id: cl.settings.node_id,
            term: cl.node.term(),
            leader_id: cl.node.leader(),
            is_leader: cl.node.is_leader(),
            peers_connected: cl.links.as_ref().map_or(0, |l| l.connected()) as u64,
            stats: cl.node.stats,
        })
    }

    /// Whether this node is ready to serve (for `/ready`).
    pub(super) fn cluster_ready(&self) -> Result<(), &'static str> {
        match &self.cluster {
            None => Ok(()),
            Some(cl) if cl.node.failed().is_some() => Err("storage failed"),
            Some(cl) if cl.node.leader() == 0 => Err("no leader"),
            Some(cl) if !cl.node.caught_up() => Err("catching up"),
            Some(_) => Ok(()),
        }
    }

    pub(super) fn on_peer_event(&mut self, token: usize) {
        let now = self.now;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(links) = cl.links.as_mut() else {
            return;
        };
        let registry = self.poll.registry();
        if token == PEER_LISTENER.0 {
            links.accept(registry, now, |i| Token(PEER_IN_BASE + i));
        } else if token >= PEER_OUT_BASE {
            links.on_outbound_event(registry, token - PEER_OUT_BASE, now);
        } else {
            let node = &mut cl.node;
            let deliveries = &mut cl.deliveries;
            links.read_inbound(
                registry,
                now,
                token - PEER_IN_BASE,
                |from, frame| match frame {
                    Frame::Raft(body) => match wire::decode_raft(body) {
                        Some(msg) if msg.from == from => {
                            node.step(now, msg);
                            true
                        }
                        _ => false,
                    },
                    Frame::Forward(cmds) => node.on_forward(now, from, cmds),
                    Frame::Deliver { conn, line } => {
                        if node_of(conn) == node.id() && line.len() <= wire::MAX_FRAME {
                            deliveries.push((conn, line.to_vec()));
                        }
                        true
                    }
                    Frame::Ping(stamp) => {
                        node.on_ping(now, from, stamp);
                        true
                    }
                    Frame::Echo(stamp) => {
                        node.on_echo(now, from, stamp);
                        true
                    }
                    Frame::Hello {
                        node: peer,
                        has_state,
                        ..
                    } => {
                        node.peer_hello(peer, has_state);
                        true
                    }
                },
            );
        }
        self.deliver_signals();
    }

    /// Pushes signal lines other nodes sent for our connections.
    fn deliver_signals(&mut self) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let mut deliveries = std::mem::take(&mut cl.deliveries);
        if !cl.node.joined() {
            // For connections of an earlier process (see `cluster_turn`).
            deliveries.clear();
        }
        for (conn, line) in &deliveries {
            self.outbox.signal.clear();
            self.outbox.signal.extend_from_slice(line);
            self.outbox.replies.push((*conn, Reply::Signal));
            self.dispatch(None);
        }
        if let Some(cl) = self.cluster.as_mut() {
            cl.deliveries = deliveries;
            cl.deliveries.clear();
        }
    }

    /// A signal for a connection of another node: sent over the peer link.
    pub(super) fn forward_signal(&mut self, conn: ConnId) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let to = node_of(conn);
        if to == cl.settings.node_id {
            return;
        }
        let line = &self.outbox.signal;
        if let Some(links) = cl.links.as_mut() {
            links.send(to, |out| wire::encode_deliver(out, conn, line));
        }
    }

    /// Every heartbeat interval: the Raft tick, peer reconnects, the hello
    /// deadline, and the no-leader rule.
    pub(super) fn on_raft_tick(&mut self) {
        let now = self.now;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        cl.node.tick();
        if let Some(links) = cl.links.as_mut() {
            let registry = self.poll.registry();
            links.connect_due(registry, now, |i| Token(PEER_OUT_BASE + i));
            links.keepalive(registry, now);
        }
        let every = cl.settings.heartbeat_interval_ms;
        self.timers.insert(now + every, NetTimer::RaftTick);
        self.enforce_leader_contact();
    }

    /// A node that has heard from no leader for 3 election timeouts closes
    /// its client connections: their holders must not go on believing they
    /// hold, since the others will give their locks away (at 6 timeouts).
    /// Requests that waited that long for a leader get `error_unavailable`.
    fn enforce_leader_contact(&mut self) {
        let now = self.now;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let contact = cl.node.leader_contact_ms();
        let margin = UNAVAILABLE_AFTER * cl.election_ms();
        if now < contact + margin {
            if cl.leaderless {
                info!("in contact with a leader again (node {})", cl.node.leader());
                cl.leaderless = false;
            }
            return;
        }
        if !cl.leaderless {
            cl.leaderless = true;
            warn!(
                "no leader for {} ms: closing {} client connections (their locks will be released by the cluster)",
                now - contact,
                self.conns.len()
            );
        }
        let doomed: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let waiting = c.blocked || c.consumed < c.input.len();
                c.opened_ms <= contact || (waiting && c.last_request_ms + margin <= now)
            })
            .map(|(i, c)| (i, c.blocked || c.consumed < c.input.len()))
            .collect();
        for (idx, blocked) in doomed {
            if blocked {
                let c = &mut self.conns[idx];
                encode_reply(&Reply::ErrorUnavailable, &[], &mut c.output);
                let _ = c.flush();
            }
            self.close(idx, "no leader");
        }
    }

    /// Drives the node once: proposals, `Ready`, applied replies, and the
    /// messages for peers.
    pub(super) fn cluster_turn(&mut self) {
        let now = self.now;
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if cl.node.failed().is_some() {
            return;
        }
        // Messages go on the wire before each log sync, so followers sync
        // their copy while the leader syncs its own.
        let links = &mut cl.links;
        let registry = self.poll.registry();
        let result = cl
            .node
            .drive(now, &mut self.core, &mut self.outbox, &mut |out| {
                if let Some(links) = links.as_mut() {
                    send_out(links, out);
                    links.flush(registry, now);
                }
            });
        // Applied replies reach only connections waiting for one. Others
        // are for connections of an earlier process of this node (its log
        // replayed) whose ids a new connection may have reused; a new
        // connection submits nothing before this process's `Join` is
        // applied, and after it the earlier connections are gone.
        let me = cl.settings.node_id;
        let conns = &self.conns;
        self.outbox.replies.retain(|&(id, _)| {
            node_of(id) != me
                || conns
                    .get((id & CLUSTER_IDX_MASK) as usize)
                    .is_some_and(|c| c.id == id && c.blocked)
        });
        let now_joined = cl.node.joined() && !cl.was_joined;
        cl.was_joined = cl.node.joined();
        if let Err(e) = result {
            if !cl.failed_logged {
                cl.failed_logged = true;
                error!(
                    "cluster node {} stops acknowledging: {e}",
                    cl.settings.node_id
                );
            }
        }
        if !cl.hello_has_state && cl.node.has_state() {
            cl.hello_has_state = true;
            if let Some(links) = cl.links.as_mut() {
                links.set_has_state(true);
            }
        }
        let events = std::mem::take(&mut cl.node.events);
        let mut stale = false;
        let mut restored = false;
        for ev in &events {
            match *ev {
                Event::Stale { incarnation } => {
                    if incarnation == cl.node.incarnation() {
                        stale = true;
                    }
                }
                Event::NodeLost {
                    node,
                    incarnation,
                    connections,
                } => warn!(
                    "node {node} (incarnation {incarnation}) declared lost: its {connections} client connections were closed by the cluster"
                ),
                Event::Applied { .. } => {}
                Event::Restored => restored = true,
            }
        }
        // Messages for peers.
        match cl.links.as_mut() {
            Some(links) => send_out(links, &mut cl.node.out),
            None => cl.node.out.clear(),
        }
        self.dispatch(None);
        if now_joined {
            // Connections accepted meanwhile may have requests waiting.
            let waiting: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| !c.input.is_empty())
                .map(|(i, _)| i)
                .collect();
            self.ready.extend(waiting);
        }
        if restored {
            // Requests in flight may have been applied inside the snapshot,
            // their replies never made here: their clients must not wait.
            let blocked: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.blocked)
                .map(|(i, _)| i)
                .collect();
            for idx in blocked {
                self.close(idx, "state replaced by a snapshot while waiting");
            }
        }
        if stale {
            self.restart_incarnation();
        }
    }

    /// The cluster declared this node's process lost (it was cut off):
    /// every client connection is closed and the node starts afresh.
    fn restart_incarnation(&mut self) {
        warn!(
            "the cluster declared this node lost: closing {} client connections",
            self.conns.len()
        );
        let ids: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in ids {
            if let Some(c) = self.conns.get_mut(idx) {
                c.replicated = false;
            }
            self.close(idx, "node declared lost");
        }
        if let Some(cl) = self.cluster.as_mut() {
            cl.node.reincarnate(wall_ns());
        }
    }

    /// Writes what peer links have queued.
    pub(super) fn flush_peers(&mut self) {
        let now = self.now;
        if let Some(links) = self.cluster.as_mut().and_then(|c| c.links.as_mut()) {
            links.flush(self.poll.registry(), now);
        }
    }

    /// Whether the node has work another drive would do now.
    pub(super) fn cluster_pending(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|cl| cl.node.failed().is_none() && cl.node.has_unsent())
    }
}
