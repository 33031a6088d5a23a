//! One cluster member: raft-rs's `RawNode`, the durable log, the replicated
//! machine, and this node's queue of commands on their way to the leader.
//!
//! No sockets and no clock here: the event loop passes in peer messages and
//! a monotonic `mono` time in milliseconds, and takes out the messages to
//! send. That keeps the whole node drivable by a deterministic simulation.
//!
//! A turn of the loop calls, in this order: [`Node::step`] for every peer
//! message read, [`Node::submit`] for client commands, [`Node::tick`] when
//! the Raft tick timer fires, then [`Node::drive`] once: it forwards or
//! batches the turn's commands, proposes one batch if leader, and handles
//! raft-rs's `Ready` in the order the library requires (send, apply
//! committed entries, append and sync the log once, send what needed the
//! sync, advance).

use hashbrown::HashMap;
use log::{info, warn};
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};

use super::command::{BatchHeader, Command, Commands, Origin, begin_batch};
use super::machine::{Event, Machine, ReplicatedEntropy};
use super::queue::Queue;
use super::store::Store;
use crate::core::{ConnId, Core, Outbox};
use crate::storage::wal::{self, Identity, Wal};

/// A snapshot is taken once this many entries follow the last one (or the
/// log file passes [`SNAPSHOT_LOG_BYTES`]).
pub const SNAPSHOT_ENTRIES: u64 = 10_000;
pub const SNAPSHOT_LOG_BYTES: u64 = 64 << 20;

/// What [`Node::drive`] calls before each log sync with the messages
/// queued so far (see there).
pub type BeforeSync<'a> = dyn FnMut(&mut Vec<(u64, Outgoing)>) + 'a;

/// The file that marks a data dir whose node is recovering a lost log.
pub const RECOVERING_MARKER: &str = "recovering";

/// Settings of a member.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    pub voters: Vec<u64>,
    pub cluster_id: u64,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    /// For simulations: a fixed election timeout in ticks (raft-rs draws a
    /// random one in `[election, 2 x election)` from a thread-local RNG).
    pub fixed_election_ticks: Option<usize>,
}

impl NodeConfig {
    pub fn election_ticks(&self) -> usize {
        (self.election_ms / self.heartbeat_ms.max(1)).max(2) as usize
    }
}

/// What a node sends to another.
#[derive(Debug)]
pub enum Outgoing {
    Raft(Box<Message>),
    /// Encoded commands for the leader.
    Forward(Vec<u8>),
    /// This node's clock, every heartbeat interval.
    Ping(u64),
    /// The last ping stamp received from the receiver.
    Echo(u64),
}

/// Why the node cannot go on.
#[derive(Debug)]
pub enum NodeError {
    Storage(wal::Error),
    Raft(raft::Error),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Storage(e) => write!(f, "{e}"),
            NodeError::Raft(e) => write!(f, "raft: {e}"),
        }
    }
}

/// Figures for `stats` and `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeStats {
    pub leader_changes: u64,
    pub proposals: u64,
    pub proposed_commands: u64,
    pub forwarded_commands: u64,
    pub fsyncs: u64,
    pub fsync_us_total: u64,
    pub log_bytes: u64,
    pub applied: u64,
    pub commit: u64,
    /// This node's commands applied, and their queue-to-apply time.
    pub commits: u64,
    pub commit_us_total: u64,
    pub snapshot_index: u64,
    pub snapshot_bytes: u64,
}

/// Whether a node may vote and campaign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standby {
    /// It may.
    Active,
    /// Its data dir was empty: is the cluster new, or did this node lose
    /// its log (and with it the votes it cast)? Peers' hellos will tell.
    Undecided { fresh_peers: Vec<u64> },
    /// A peer has state, so this node lost its log: it neither votes nor
    /// campaigns until it has caught up from a leader.
    Recovering,
}

pub struct Node {
    cfg: NodeConfig,
    raw: RawNode<Store>,
    wal: Wal,
    machine: Machine,
    incarnation: u64,
    next_seq: u64,
    /// This node's commands not yet applied, oldest first.
    outstanding: Queue,
    /// Highest seq sent to the current leader (or batched, as leader).
    sent_upto: u64,
    /// Highest seq of this node applied.
    applied_seq: u64,
    progress_ms: u64,
    leader: u64,
    term: u64,
    role: StateRole,
    /// Leader: commands to propose this turn.
    batch: Vec<u8>,
    batch_cmds: usize,
    /// Where cluster time started counting in this leadership:
    /// (cluster ms, mono ms).
    clock_base: (u64, u64),
    /// Leader: index of a proposed tick not yet applied.
    tick_inflight: u64,
    last_heard: HashMap<u64, u64>,
    lost_proposed: HashMap<u64, u64>,
    leader_contact_ms: u64,
    /// The `mono` of the current call.
    mono: u64,
    became_leader_ms: u64,
    pub out: Vec<(u64, Outgoing)>,
    pub events: Vec<Event>,
    pub stats: NodeStats,
    failed: Option<String>,
    standby: Standby,
    /// This incarnation's `Join` has been applied.
    joined: bool,
    /// `<data-dir>/recovering`: present while this node recovers a lost log,
    /// so that a restart before it has caught up does not make it vote.
    marker: std::path::PathBuf,
    /// Leader: when a snapshot was last sent to each peer still installing it.
    snapshot_sent: HashMap<u64, u64>,
    /// The snapshot the data dir held, until [`Node::make_core`] takes it.
    restored: Option<Vec<u8>>,
    snapshot_entries: u64,
    scratch_times: Vec<u64>,
    /// The latest ping stamp received from each peer, to echo.
    echo_due: HashMap<u64, u64>,
}

impl Node {
    /// Opens (or creates) the data directory and replays its log.
    /// `incarnation` must be larger than any earlier run's (the server uses
    /// the wall clock in nanoseconds).
    pub fn open(
        cfg: NodeConfig,
        dir: &std::path::Path,
        incarnation: u64,
        mono: u64,
        logger: &slog::Logger,
    ) -> Result<(Node, wal::Recovered), NodeError> {
        let identity = Identity {
            node_id: cfg.id,
            cluster_id: cfg.cluster_id,
        };
        let (wal, recovered) = Wal::open(dir, identity).map_err(NodeError::Storage)?;
        let mut store = Store::new(&cfg.voters);
        let mut restored = None;
        if let Some(snap) = &recovered.snapshot {
            store.apply_snapshot(raft_snapshot(
                snap.index,
                snap.term,
                &cfg.voters,
                snap.data.clone(),
            ));
            restored = Some(snap.data.clone());
        }
        let entries: Vec<Entry> = recovered
            .entries
            .iter()
            .map(|e| raft_entry(e.index, e.term, e.data.clone()))
            .collect();
        store.append(&entries);
        let hs = recovered.hard_state;
        store.set_hard_state(HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit.min(store.last()),
        });
        let mut rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks(),
            heartbeat_tick: 1,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            applied: store.snapshot_index(),
            ..Default::default()
        };
        if let Some(t) = cfg.fixed_election_ticks {
            rc.election_tick = t;
            rc.min_election_tick = t;
            rc.max_election_tick = t + 1;
        }
        rc.validate().map_err(NodeError::Raft)?;
        let raw = RawNode::new(&rc, store, logger).map_err(NodeError::Raft)?;
        let entropy = ReplicatedEntropy::default();
        let mut machine = Machine::new(cfg.id, entropy);
        if let Some(data) = &restored {
            let corrupt = |what: String| {
                NodeError::Storage(wal::Error::Corrupt {
                    file: dir.join("snapshot"),
                    offset: 0,
                    what,
                })
            };
            let (mbytes, cbytes) =
                split_state(data).ok_or_else(|| corrupt("the snapshot is truncated".into()))?;
            machine
                .restore(mbytes)
                .map_err(|e| corrupt(format!("the snapshot's state does not decode: {e}")))?;
            restored = Some(cbytes.to_vec());
        }
        let marker = dir.join(RECOVERING_MARKER);
        let standby = if marker.exists() {
            warn!(
                "node {}: still recovering a lost log (restarted before catching up): it will not vote or campaign until it has",
                cfg.id
            );
            Standby::Recovering
        } else if recovered.fresh && cfg.voters.len() > 1 {
            Standby::Undecided {
                fresh_peers: Vec::new(),
            }
        } else {
            Standby::Active
        };
        let node = Node {
            marker,
            standby,
            joined: false,
            restored,
            scratch_times: Vec::new(),
            echo_due: HashMap::new(),
            snapshot_entries: SNAPSHOT_ENTRIES,
            snapshot_sent: HashMap::new(),
            machine,
            cfg,
            raw,
            wal,
            incarnation,
            next_seq: 1,
            outstanding: Queue::default(),
            sent_upto: 0,
            applied_seq: 0,
            progress_ms: mono,
            leader: 0,
            term: 0,
            role: StateRole::Follower,
            batch: Vec::new(),
            batch_cmds: 0,
            clock_base: (0, mono),
            tick_inflight: 0,
            last_heard: HashMap::new(),
            lost_proposed: HashMap::new(),
            leader_contact_ms: mono,
            mono,
            became_leader_ms: mono,
            out: Vec::new(),
            events: Vec::new(),
            stats: NodeStats::default(),
            failed: None,
        };
        Ok((node, recovered))
    }

    /// The entropy the local `Core` must be built with.
    pub fn entropy(&self) -> ReplicatedEntropy {
        self.machine.entropy()
    }

    /// The `Core` this node applies to: restored from the data dir's
    /// snapshot if it had one, else empty.
    pub fn make_core(&mut self, cfg: crate::core::Config) -> Result<Core, NodeError> {
        match self.restored.take() {
            Some(bytes) => Core::restore(cfg, &bytes, Box::new(self.entropy())).map_err(|e| {
                NodeError::Storage(wal::Error::Corrupt {
                    file: std::path::PathBuf::from("snapshot"),
                    offset: 0,
                    what: format!("the snapshot's lock state does not decode: {e}"),
                })
            }),
            None => Ok(Core::new(cfg, 0, Box::new(self.entropy()))),
        }
    }

    /// Takes a snapshot every `n` applied entries (tests use small values).
    pub fn set_snapshot_every(&mut self, n: u64) {
        self.snapshot_entries = n.max(1);
    }

    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The known leader (0: none).
    pub fn leader(&self) -> u64 {
        self.leader
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn is_leader(&self) -> bool {
        self.role == StateRole::Leader
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Where the records of this node's log file end (the file is
    /// zero-filled after them).
    pub fn log_end(&self) -> u64 {
        self.wal.size()
    }

    /// Where the records of the log's last sync begin (they end at
    /// [`Node::log_end`]).
    pub fn last_sync_at(&self) -> u64 {
        self.wal.last_sync_at()
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The last moment this node was sure that a leader heard it: as
    /// leader, when it had last heard from a majority; as follower, the send
    /// time of its latest ping the leader echoed (so a link that works only
    /// from the leader to this node is no contact: the leader, not hearing
    /// this node, will declare it lost).
    pub fn leader_contact_ms(&self) -> u64 {
        self.leader_contact_ms
    }

    /// Whether this node has applied everything it knows committed.
    pub fn caught_up(&self) -> bool {
        self.leader != 0 && self.machine.applied() >= self.raw.raft.raft_log.committed
    }

    /// Commands waiting to be applied.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// A storage failure that stopped this node acknowledging anything.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Queues one of this node's commands; `make` builds it from its origin.
    /// Returns its seq.
    pub fn submit(&mut self, make: impl FnOnce(Origin) -> Command<'static>) -> u64 {
        let origin = Origin {
            node: self.cfg.id,
            incarnation: self.incarnation,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.outstanding
            .push(origin.seq, |buf| make(origin).encode(buf));
        origin.seq
    }

    /// Queues a client request (its three lines, as received).
    pub fn submit_request(&mut self, conn: ConnId, frame: &[u8]) -> u64 {
        let origin = Origin {
            node: self.cfg.id,
            incarnation: self.incarnation,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.outstanding.push(origin.seq, |buf| {
            Command::Request {
                origin,
                conn,
                frame,
            }
            .encode(buf)
        });
        origin.seq
    }

    /// Starts a new incarnation: everything queued is dropped (the caller
    /// has closed every client connection) and a `Join` announces it.
    pub fn reincarnate(&mut self, at_least: u64) {
        self.incarnation = self
            .incarnation
            .max(at_least)
            .max(self.machine.last_incarnation(self.cfg.id))
            + 1;
        self.outstanding.clear();
        self.next_seq = 1;
        self.sent_upto = 0;
        self.applied_seq = 0;
        self.joined = false;
        self.submit(|origin| Command::Join { origin });
    }

    /// Starts an election at once (a one-node cluster need not wait).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    /// Whether some of this node's commands wait to be sent or batched.
    pub fn has_unsent(&self) -> bool {
        self.leader != 0
            && self
                .outstanding
                .back_seq()
                .is_some_and(|s| s > self.sent_upto)
    }

    /// Whether this process's `Join` has been applied. Until then, what the
    /// node applies (its log replayed at start, or entries caught up) is
    /// about connections of its earlier processes: their replies must not
    /// reach the new connections that may reuse their ids.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// Whether this node has a log or a term (its hellos say so).
    pub fn has_state(&self) -> bool {
        self.raw.raft.term > 0 || self.raw.store().last() > 0
    }

    pub fn standby(&self) -> &Standby {
        &self.standby
    }

    /// A peer's hello: whether it has state decides whether this node,
    /// started with an empty data dir, joins a new cluster or recovers.
    pub fn peer_hello(&mut self, from: u64, has_state: bool) {
        if !has_state && self.role == StateRole::Leader {
            // The peer restarted with an empty log: what this leader knows
            // it had replicated there is gone. Probe it from the start, or
            // Raft would ignore its rejections as stale forever.
            if let Some(pr) = self.raw.raft.mut_prs().get_mut(from)
                && pr.matched > 0
            {
                warn!(
                    "node {}: node {from} lost its log (it had up to index {}); replicating to it again",
                    self.cfg.id, pr.matched
                );
                pr.matched = 0;
                pr.become_probe();
            }
        }
        let majority = self.cfg.voters.len() / 2 + 1;
        let Standby::Undecided { fresh_peers } = &mut self.standby else {
            return;
        };
        if has_state {
            warn!(
                "node {}: the data dir was empty but node {from} has state: this node lost its log, so it will not vote or campaign until it has caught up from the leader",
                self.cfg.id
            );
            self.standby = Standby::Recovering;
            if let Err(e) = write_marker(&self.marker) {
                self.failed = Some(format!("cannot write {}: {e}", self.marker.display()));
            }
            return;
        }
        if !fresh_peers.contains(&from) {
            fresh_peers.push(from);
        }
        if fresh_peers.len() + 1 >= majority {
            info!(
                "node {}: a majority of members are new and empty: bootstrapping a new cluster",
                self.cfg.id
            );
            self.standby = Standby::Active;
        }
    }

    /// A message from peer `from`.
    pub fn step(&mut self, mono: u64, mut msg: Message) {
        let from = msg.from;
        if msg.get_msg_type() == MessageType::MsgHeartbeat {
            // A leader that matched this node's log before it was wiped
            // announces a commit index past its (now empty) log; raft-rs
            // would panic. The next append finds the gap and refills it.
            msg.commit = msg.commit.min(self.raw.raft.raft_log.last_index());
        }
        self.last_heard.insert(from, mono);
        let t = msg.get_msg_type();
        if self.standby != Standby::Active
            && matches!(
                t,
                MessageType::MsgRequestVote
                    | MessageType::MsgRequestPreVote
                    | MessageType::MsgTimeoutNow
            )
        {
            return;
        }
        let _ = self.raw.step(msg);
    }

    /// Commands forwarded by peer `from` (dropped unless leader: the
    /// origin sends them again to the leader it learns of).
    pub fn on_forward(&mut self, mono: u64, from: u64, cmds: &[u8]) -> bool {
        self.last_heard.insert(from, mono);
        match Commands::validate(cmds) {
            Ok(n) => {
                // Raft's own state: this node may have become leader in
                // this turn, before `drive` has noticed.
                if self.raw.raft.state == StateRole::Leader && self.failed.is_none() {
                    if self.role != StateRole::Leader {
                        self.observe_leadership(mono);
                    }
                    self.batch.extend_from_slice(cmds);
                    self.batch_cmds += n;
                    self.stats.forwarded_commands += n as u64;
                }
                true
            }
            Err(e) => {
                warn!("node {from} forwarded undecodable commands ({e}); dropped");
                false
            }
        }
    }

    /// The Raft tick (every heartbeat interval). A node in standby does
    /// not tick: it would campaign. Every peer gets a ping and the echo of
    /// its last ping.
    pub fn tick(&mut self) {
        if self.standby == Standby::Active {
            self.raw.tick();
        }
        let me = self.cfg.id;
        for &peer in &self.cfg.voters {
            if peer == me {
                continue;
            }
            self.out.push((peer, Outgoing::Ping(self.mono)));
            if let Some(&stamp) = self.echo_due.get(&peer) {
                self.out.push((peer, Outgoing::Echo(stamp)));
            }
        }
    }

    /// A peer's ping: it is alive, and its stamp goes back in an echo.
    pub fn on_ping(&mut self, mono: u64, from: u64, stamp: u64) {
        self.last_heard.insert(from, mono);
        self.echo_due.insert(from, stamp);
    }

    /// A peer echoed one of this node's ping stamps: it heard this node at
    /// least until then. From the leader, that is contact.
    pub fn on_echo(&mut self, mono: u64, from: u64, stamp: u64) {
        self.last_heard.insert(from, mono);
        if from == self.raw.raft.leader_id
            && stamp <= mono
            && self.raw.raft.state != StateRole::Leader
        {
            self.leader_contact_ms = self.leader_contact_ms.max(stamp);
        }
    }

    /// Cluster time as this leader stamps it: the newest time in its log
    /// when it was elected, plus the time since. The election's own
    /// duration is not counted, which gives every lease a grace period as
    /// long as the election.
    pub fn cluster_now(&self, mono: u64) -> u64 {
        self.clock_base.0 + mono.saturating_sub(self.clock_base.1)
    }

    /// One turn's work; see the module documentation. Applied replies go
    /// to `outbox`, this node's events to [`Node::events`], messages to
    /// [`Node::out`].
    ///
    /// `before_sync` is called with [`Node::out`] just before each log
    /// sync while it holds messages: everything in it may leave before the
    /// sync (raft-rs's `messages`, forwards, pings, and what earlier syncs
    /// of this turn released), so the caller can put it on the wire and
    /// the followers write and sync their copy while the leader syncs its
    /// own, instead of after. Taking nothing out is correct too: the rest
    /// is left in [`Node::out`] for after the turn.
    pub fn drive(
        &mut self,
        mono: u64,
        core: &mut Core,
        outbox: &mut Outbox,
        before_sync: &mut BeforeSync<'_>,
    ) -> Result<(), NodeError> {
        self.mono = mono;
        self.observe_leadership(mono);
        self.send_commands(mono);
        if self.role == StateRole::Leader {
            self.leader_duties(mono, core);
            self.propose(mono);
        }
        while self.raw.has_ready() {
            self.handle_ready(core, outbox, before_sync)?;
            self.observe_leadership(mono);
        }
        if self.standby == Standby::Recovering
            && self.leader != 0
            && self.raw.store().last() > 0
            && self.machine.applied() >= self.raw.raft.raft_log.committed
        {
            info!(
                "node {}: caught up from leader node {} (index {}); voting again",
                self.cfg.id,
                self.leader,
                self.machine.applied()
            );
            // What it caught up is durable (synced in this drive) before
            // the marker goes.
            if let Err(e) = remove_marker(&self.marker) {
                self.failed = Some(format!("cannot remove {}: {e}", self.marker.display()));
                return Err(NodeError::Storage(wal::Error::Io {
                    context: format!("removing {}", self.marker.display()),
                    source: e,
                }));
            }
            self.standby = Standby::Active;
        }
        Ok(())
    }

    fn observe_leadership(&mut self, mono: u64) {
        let leader = self.raw.raft.leader_id;
        let term = self.raw.raft.term;
        let role = self.raw.raft.state;
        if role == StateRole::Leader {
            self.leader_contact_ms = self.quorum_contact(mono);
        }
        if leader == self.leader && term == self.term && role == self.role {
            return;
        }
        if leader != self.leader && leader != 0 {
            self.stats.leader_changes += 1;
            info!(
                "node {}: leader is now node {leader} (term {term})",
                self.cfg.id
            );
        } else if leader == 0 && self.leader != 0 {
            info!(
                "node {}: lost contact with leader node {} (term {term})",
                self.cfg.id, self.leader
            );
        }
        let became_leader = role == StateRole::Leader && self.role != StateRole::Leader;
        self.leader = leader;
        self.term = term;
        self.role = role;
        // Everything not yet applied goes again to the new leader.
        self.sent_upto = self.applied_seq;
        self.batch.clear();
        self.batch_cmds = 0;
        self.tick_inflight = 0;
        self.lost_proposed.clear();
        if became_leader {
            // From the time of what it has applied, not the newest time in
            // its log: a deposed leader's log may hold entries it stamped
            // itself that were never committed, and counting from them
            // would end leases early. Committed entries it has not applied
            // yet may be later: applying takes the larger time, so the
            // clock then stands still until this leader's catches up, which
            // only lengthens leases.
            self.clock_base = (self.machine.now(), mono);
            self.became_leader_ms = mono;
        }
    }

    /// A leader's contact with the cluster: the latest moment by which it had
    /// heard from a majority (itself included). A leader cut off from the
    /// others stops being in contact at the cut, not when Raft's quorum
    /// check makes it step down (up to two election timeouts later).
    fn quorum_contact(&mut self, mono: u64) -> u64 {
        let mut times = std::mem::take(&mut self.scratch_times);
        times.clear();
        times.extend(self.cfg.voters.iter().map(|&v| {
            if v == self.cfg.id {
                mono
            } else {
                // Heard from since this leadership began, or not at all.
                self.last_heard
                    .get(&v)
                    .copied()
                    .unwrap_or(0)
                    .max(self.became_leader_ms.min(mono))
            }
        }));
        times.sort_unstable_by(|a, b| b.cmp(a));
        let at = times[self.cfg.voters.len() / 2];
        self.scratch_times = times;
        at
    }

    /// Sends (or, as leader, batches) this node's commands not yet sent.
    fn send_commands(&mut self, mono: u64) {
        if self.outstanding.is_empty() || self.leader == 0 || self.failed.is_some() {
            return;
        }
        if mono.saturating_sub(self.progress_ms) > self.cfg.election_ms {
            // No progress for a while: the leader may have dropped them.
            self.sent_upto = self.applied_seq;
            self.progress_ms = mono;
        }
        let Some(last) = self.outstanding.back_seq() else {
            return;
        };
        if last <= self.sent_upto {
            return;
        }
        let first = self.sent_upto;
        if self.role == StateRole::Leader {
            for (seq, cmd) in self.outstanding.iter() {
                if seq > first {
                    self.batch.extend_from_slice(cmd);
                    self.batch_cmds += 1;
                }
            }
        } else {
            let mut buf = Vec::new();
            for (seq, cmd) in self.outstanding.iter() {
                if seq > first {
                    buf.extend_from_slice(cmd);
                }
            }
            self.out.push((self.leader, Outgoing::Forward(buf)));
        }
        self.sent_upto = last;
    }

    /// Time-driven decisions of the leader: a tick when the state machine
    /// has a deadline due, and the loss of nodes not heard from.
    fn leader_duties(&mut self, mono: u64, core: &Core) {
        let now = self.cluster_now(mono);
        if self.tick_inflight <= self.machine.applied()
            && core.next_deadline().is_some_and(|d| d <= now)
        {
            self.tick_inflight = u64::MAX; // set to the index once proposed
        }
        // A snapshot lost on the way (the peer restarted, the link broke)
        // leaves raft-rs waiting for it forever: after 2 election timeouts
        // without the peer reaching it, report it failed so it is sent again.
        let give_up = 2 * self.cfg.election_ms;
        let mut failed = Vec::new();
        self.snapshot_sent.retain(|&peer, &mut at| {
            let waiting = self
                .raw
                .raft
                .prs()
                .get(peer)
                .is_some_and(|pr| pr.state == ProgressState::Snapshot);
            if waiting && mono.saturating_sub(at) >= give_up {
                failed.push(peer);
            }
            waiting && mono.saturating_sub(at) < give_up
        });
        for peer in failed {
            info!(
                "node {}: the snapshot sent to node {peer} was not installed; sending it again",
                self.cfg.id
            );
            self.raw.report_snapshot(peer, SnapshotStatus::Failure);
        }
        let margin = 6 * self.cfg.election_ms;
        for &peer in &self.cfg.voters {
            if peer == self.cfg.id {
                continue;
            }
            let heard = self
                .last_heard
                .get(&peer)
                .copied()
                .unwrap_or(0)
                .max(self.became_leader_ms);
            if mono.saturating_sub(heard) < margin {
                continue;
            }
            let Some((inc, _)) = self.machine.session(peer) else {
                continue;
            };
            if self.lost_proposed.get(&peer) == Some(&inc) {
                continue;
            }
            warn!(
                "node {}: no word from node {peer} for {} ms; declaring its connections lost",
                self.cfg.id,
                mono - heard
            );
            self.lost_proposed.insert(peer, inc);
            Command::NodeLost {
                node: peer,
                incarnation: inc,
            }
            .encode(&mut self.batch);
            self.batch_cmds += 1;
        }
    }

    fn propose(&mut self, mono: u64) {
        let tick = self.tick_inflight == u64::MAX;
        if self.batch.is_empty() && !tick {
            return;
        }
        let mut data = Vec::with_capacity(self.batch.len() + 17);
        let mut entropy = [0u8; 8];
        let _ = getrandom::fill(&mut entropy);
        begin_batch(
            &mut data,
            BatchHeader {
                now: self.cluster_now(mono),
                entropy: u64::from_le_bytes(entropy),
            },
        );
        data.extend_from_slice(&self.batch);
        self.batch.clear();
        self.stats.proposed_commands += self.batch_cmds as u64;
        self.batch_cmds = 0;
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                self.stats.proposals += 1;
                if tick {
                    self.tick_inflight = self.raw.raft.raft_log.last_index();
                }
            }
            Err(e) => {
                // Lost commands are sent again (see send_commands).
                warn!("node {}: proposal dropped: {e}", self.cfg.id);
                self.tick_inflight = 0;
            }
        }
    }

    fn handle_ready(
        &mut self,
        core: &mut Core,
        outbox: &mut Outbox,
        before_sync: &mut BeforeSync<'_>,
    ) -> Result<(), NodeError> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), core)?;
        }
        self.apply(core, rd.take_committed_entries(), outbox);
        if !rd.entries().is_empty() {
            for e in rd.entries() {
                self.wal.append(e.index, e.term, &e.data);
            }
            self.raw.mut_store().append(rd.entries());
        }
        if let Some(hs) = rd.hs() {
            // Term and vote must be durable before anything is sent; the
            // commit index need not be (Raft learns it again), so a change
            // of it alone costs no fsync: it is recorded with the next
            // entries or vote.
            let prev = self.raw.store().hard_state();
            let must = hs.term != prev.term || hs.vote != prev.vote;
            if must || !rd.entries().is_empty() {
                self.wal.set_hard_state(&wal::HardState {
                    term: hs.term,
                    vote: hs.vote,
                    commit: hs.commit,
                });
            }
            self.raw.mut_store().set_hard_state(hs.clone());
        }
        if self.wal.pending() > 0 && !self.out.is_empty() {
            before_sync(&mut self.out);
        }
        self.sync()?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply(core, light.take_committed_entries(), outbox);
        self.raw.advance_apply();
        self.maybe_compact(core)?;
        self.stats.applied = self.machine.applied();
        self.stats.commit = self.raw.raft.raft_log.committed;
        self.stats.log_bytes = self.wal.size();
        Ok(())
    }

    /// The state a snapshot carries: the machine's, then the core's.
    fn state_bytes(&self, core: &Core) -> Vec<u8> {
        let mut m = Vec::new();
        self.machine.encode(&mut m);
        let mut data = Vec::with_capacity(m.len() + 4096);
        data.extend_from_slice(&(m.len() as u32).to_le_bytes());
        data.extend_from_slice(&m);
        core.snapshot(&mut data);
        data
    }

    /// Compacts the log into a snapshot when it has grown enough.
    fn maybe_compact(&mut self, core: &Core) -> Result<(), NodeError> {
        let applied = self.machine.applied();
        let since = applied.saturating_sub(self.raw.store().snapshot_index());
        if since == 0 || (since < self.snapshot_entries && self.wal.size() < SNAPSHOT_LOG_BYTES) {
            return Ok(());
        }
        let data = self.state_bytes(core);
        let bytes = data.len() as u64;
        let Some(snap) = self.raw.mut_store().compact(applied, data) else {
            return Ok(());
        };
        let meta = snap.get_metadata();
        let wsnap = wal::Snapshot {
            index: meta.index,
            term: meta.term,
            meta: Vec::new(),
            data: snap.data.clone(),
        };
        self.persist_snapshot(&wsnap)?;
        self.stats.snapshot_index = wsnap.index;
        self.stats.snapshot_bytes = bytes;
        log::debug!(
            "node {}: snapshot at index {} ({bytes} bytes); log compacted",
            self.cfg.id,
            wsnap.index
        );
        Ok(())
    }

    /// Writes `snap` and the entries after it as the new log.
    fn persist_snapshot(&mut self, snap: &wal::Snapshot) -> Result<(), NodeError> {
        let store = self.raw.store();
        let keep: Vec<wal::Entry> = store
            .entries_after_snapshot()
            .iter()
            .map(|e| wal::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            })
            .collect();
        let hs = store.hard_state();
        let hs = wal::HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        };
        if let Err(e) = self.wal.install_snapshot(snap, &keep, &hs) {
            self.failed = Some(e.to_string());
            return Err(NodeError::Storage(e));
        }
        Ok(())
    }

    /// A snapshot from the leader: this node was too far behind for the
    /// log. The machine and core are replaced by its state.
    fn install_snapshot(&mut self, snap: Snapshot, core: &mut Core) -> Result<(), NodeError> {
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let data = &snap.data;
        let bad = |what: String| {
            NodeError::Storage(wal::Error::Corrupt {
                file: std::path::PathBuf::from("snapshot from the leader"),
                offset: 0,
                what,
            })
        };
        let (mbytes, cbytes) = split_state(data).ok_or_else(|| bad("truncated".into()))?;
        let mut machine = Machine::new(self.cfg.id, self.machine.entropy());
        let state_before = self.machine.entropy().state();
        if let Err(e) = machine.restore(mbytes) {
            self.machine.entropy().set_state(state_before);
            return Err(bad(format!("machine state: {e}")));
        }
        let restored =
            match Core::restore(core.config().clone(), cbytes, Box::new(machine.entropy())) {
                Ok(c) => c,
                Err(e) => {
                    self.machine.entropy().set_state(state_before);
                    return Err(bad(format!("lock state: {e}")));
                }
            };
        self.raw.mut_store().apply_snapshot(snap.clone());
        self.persist_snapshot(&wal::Snapshot {
            index,
            term,
            meta: Vec::new(),
            data: snap.data.clone(),
        })?;
        *core = restored;
        self.machine = machine;
        self.stats.snapshot_index = index;
        self.stats.snapshot_bytes = snap.data.len() as u64;
        // This node's commands the snapshot covers are done; those in flight
        // get no reply (the server closes their connections).
        if let Some((inc, _)) = self.machine.session(self.cfg.id)
            && inc == self.incarnation
        {
            self.joined = true;
        }
        self.events.push(Event::Restored);
        info!(
            "node {}: installed a snapshot from the leader at index {index} ({} bytes)",
            self.cfg.id,
            snap.data.len()
        );
        Ok(())
    }

    fn sync(&mut self) -> Result<(), NodeError> {
        if self.wal.pending() == 0 {
            return Ok(());
        }
        let t = std::time::Instant::now();
        match self.wal.sync() {
            Ok(_) => {
                self.stats.fsyncs += 1;
                self.stats.fsync_us_total += t.elapsed().as_micros() as u64;
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(NodeError::Storage(e))
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshot_sent.insert(m.to, self.mono);
            }
            self.out.push((m.to, Outgoing::Raft(Box::new(m))));
        }
    }

    fn apply(&mut self, core: &mut Core, entries: Vec<Entry>, outbox: &mut Outbox) {
        for e in entries {
            if e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            if let Err(err) = self
                .machine
                .apply(core, e.index, &e.data, outbox, &mut self.events)
            {
                warn!(
                    "node {}: entry {} does not decode ({err}); applied up to the damage",
                    self.cfg.id, e.index
                );
            }
        }
        // Drop what was applied from the queue.
        let before = self.applied_seq;
        for ev in &self.events {
            if let Event::Applied {
                incarnation, seq, ..
            } = *ev
            {
                if incarnation == self.incarnation {
                    self.applied_seq = self.applied_seq.max(seq);
                    self.joined = true;
                }
            }
        }
        if self.applied_seq > before {
            while self
                .outstanding
                .front_seq()
                .is_some_and(|s| s <= self.applied_seq)
            {
                if let Some((_, at)) = self.outstanding.pop_front() {
                    self.stats.commits += 1;
                    self.stats.commit_us_total += at.elapsed().as_micros() as u64;
                }
            }
            self.progress_ms = self.mono;
        }
    }
}

/// Creates the recovering marker durably (file and directory entry synced).
fn write_marker(path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.sync_all()?;
    sync_parent(path)
}

fn remove_marker(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A snapshot's state: (the machine's, the core's).
fn split_state(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let mlen = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let m = data.get(4..4usize.checked_add(mlen)?)?;
    Some((m, &data[4 + mlen..]))
}

fn raft_snapshot(index: u64, term: u64, voters: &[u64], data: Vec<u8>) -> Snapshot {
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(ConfState::from((voters.to_vec(), Vec::<u64>::new())));
    snap.data = data;
    snap
}

fn raft_entry(index: u64, term: u64, data: Vec<u8>) -> Entry {
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryNormal);
    e.index = index;
    e.term = term;
    e.data = data;
    e
}
