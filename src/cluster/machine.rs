//! The replicated state machine: committed batches applied to a [`Core`].
//!
//! Every node applies the same entries in the same order to its own `Core`
//! and reaches the same state: time comes from the batch header (stamped by
//! the leader), randomness from the header's entropy, and every command
//! names its origin so that each node's commands are applied once and in
//! that node's order, however often they were forwarded.
//!
//! A node's commands form one sequence per process lifetime (incarnation):
//! command `seq` is applied only right after `seq - 1`; duplicates and
//! commands after a gap are skipped (the node sends them again). A `Join`
//! with a new, larger incarnation ends the earlier one: its connections
//! died with the process. `NodeLost` ends an incarnation from outside.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{HashMap, HashSet};

use super::command::{Command, DecodeError, Origin, decode_batch};
use crate::core::{ConnId, Core, Entropy, Outbox, Outcome};
use crate::protocol::{FrameDecoder, Reply, parse_request};

/// The node a connection id belongs to (its top 16 bits).
pub fn node_of(conn: ConnId) -> u64 {
    conn >> 48
}

/// What applying an entry means for the local node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// One of this node's commands was applied. `outcome` is that of a
    /// request (`None` for other commands).
    Applied {
        incarnation: u64,
        seq: u64,
        outcome: Option<Outcome>,
    },
    /// One of this node's commands can never be applied: its incarnation
    /// is over (declared lost, or superseded). The node must start anew.
    Stale { incarnation: u64 },
    /// The state was replaced by a snapshot from the leader: requests this
    /// node had in flight will get no reply.
    Restored,
    /// A node's incarnation was declared lost (logged by every node).
    NodeLost {
        node: u64,
        incarnation: u64,
        connections: usize,
    },
}

#[derive(Debug, Default)]
struct Session {
    incarnation: u64,
    seq: u64,
    lost: bool,
    conns: HashSet<ConnId>,
}

/// Token randomness shared between the machine (which mixes in each
/// batch's entropy) and the core's token source (which draws from it).
/// A xorshift64* stream: the same on every node, unpredictable to clients
/// as long as the leaders' entropy is.
#[derive(Clone, Default)]
pub struct ReplicatedEntropy(Arc<AtomicU64>);

impl ReplicatedEntropy {
    fn mix(&self, v: u64) {
        let s = self.0.load(Ordering::Relaxed);
        self.0.store(
            (s ^ v).rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            Ordering::Relaxed,
        );
    }

    /// The generator's state (snapshots).
    pub fn state(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set_state(&self, s: u64) {
        self.0.store(s, Ordering::Relaxed);
    }
}

impl Entropy for ReplicatedEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        let mut x = self.0.load(Ordering::Relaxed);
        for chunk in buf.chunks_mut(8) {
            x |= 1;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.0.store(x, Ordering::Relaxed);
    }
}

/// See the module documentation. The `Core` is passed in by the caller
/// (the server answers `ping`, `stats` and `signal` from it directly).
pub struct Machine {
    local: u64,
    now: u64,
    applied: u64,
    sessions: HashMap<u64, Session>,
    entropy: ReplicatedEntropy,
    scratch: Vec<ConnId>,
}

impl Machine {
    /// `local` is this node's id; `entropy` must be the one given to the core.
    pub fn new(local: u64, entropy: ReplicatedEntropy) -> Machine {
        Machine {
            local,
            now: 0,
            applied: 0,
            sessions: HashMap::new(),
            entropy,
            scratch: Vec::new(),
        }
    }

    /// The randomness shared with the core.
    pub fn entropy(&self) -> ReplicatedEntropy {
        self.entropy.clone()
    }

    /// Cluster time of the last applied batch.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The Raft index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The live incarnation of `node` and its connection count, if any.
    pub fn session(&self, node: u64) -> Option<(u64, usize)> {
        self.sessions
            .get(&node)
            .filter(|s| !s.lost)
            .map(|s| (s.incarnation, s.conns.len()))
    }

    /// The incarnation last recorded for `node`, live or lost.
    pub fn last_incarnation(&self, node: u64) -> u64 {
        self.sessions.get(&node).map_or(0, |s| s.incarnation)
    }

    /// Appends the machine's own state (not the core's) to `out`: what a
    /// snapshot needs besides `Core::snapshot`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.now.to_le_bytes());
        out.extend_from_slice(&self.applied.to_le_bytes());
        out.extend_from_slice(&self.entropy.state().to_le_bytes());
        let mut nodes: Vec<(&u64, &Session)> = self.sessions.iter().collect();
        nodes.sort_unstable_by_key(|(n, _)| **n);
        out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
        for (node, s) in nodes {
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&s.incarnation.to_le_bytes());
            out.extend_from_slice(&s.seq.to_le_bytes());
            out.push(s.lost as u8);
            let mut conns: Vec<ConnId> = s.conns.iter().copied().collect();
            conns.sort_unstable();
            out.extend_from_slice(&(conns.len() as u32).to_le_bytes());
            for c in conns {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
    }

    /// Restores what [`encode`](Self::encode) wrote; returns the bytes used.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let mut at = 0usize;
        let u64_ = |at: &mut usize| -> Result<u64, DecodeError> {
            let b = bytes.get(*at..*at + 8).ok_or(DecodeError::Truncated)?;
            *at += 8;
            Ok(u64::from_le_bytes(b.try_into().unwrap()))
        };
        let now = u64_(&mut at)?;
        let applied = u64_(&mut at)?;
        let entropy = u64_(&mut at)?;
        let u32_ = |at: &mut usize| -> Result<usize, DecodeError> {
            let b = bytes.get(*at..*at + 4).ok_or(DecodeError::Truncated)?;
            *at += 4;
            Ok(u32::from_le_bytes(b.try_into().unwrap()) as usize)
        };
        let n = u32_(&mut at)?;
        let mut sessions = HashMap::new();
        for _ in 0..n {
            let node = u64_(&mut at)?;
            let incarnation = u64_(&mut at)?;
            let seq = u64_(&mut at)?;
            let lost = *bytes.get(at).ok_or(DecodeError::Truncated)? != 0;
            at += 1;
            let k = u32_(&mut at)?;
            if k > (bytes.len() - at) / 8 {
                return Err(DecodeError::Truncated);
            }
            let mut conns = HashSet::with_capacity(k);
            for _ in 0..k {
                conns.insert(u64_(&mut at)?);
            }
            sessions.insert(
                node,
                Session {
                    incarnation,
                    seq,
                    lost,
                    conns,
                },
            );
        }
        self.now = now;
        self.applied = applied;
        self.entropy.set_state(entropy);
        self.sessions = sessions;
        Ok(at)
    }

    /// Applies the entry at `index`. Empty entries (a new leader's) only
    /// advance the index. A batch that does not decode is applied up to the
    /// bad command and reported; every node sees the same bytes, so every
    /// node stops at the same place.
    pub fn apply(
        &mut self,
        core: &mut Core,
        index: u64,
        data: &[u8],
        out: &mut Outbox,
        events: &mut Vec<Event>,
    ) -> Result<(), DecodeError> {
        self.applied = index;
        if data.is_empty() {
            return Ok(());
        }
        let (header, commands) = decode_batch(data)?;
        self.now = self.now.max(header.now);
        self.entropy.mix(header.entropy);
        core.tick(self.now, out);
        for cmd in commands {
            self.command(core, cmd?, out, events);
        }
        Ok(())
    }

    fn command(
        &mut self,
        core: &mut Core,
        cmd: Command<'_>,
        out: &mut Outbox,
        ev: &mut Vec<Event>,
    ) {
        let now = self.now;
        if let Command::NodeLost { node, incarnation } = cmd {
            let Some(s) = self.sessions.get_mut(&node) else {
                return;
            };
            if s.incarnation != incarnation || s.lost {
                return;
            }
            s.lost = true;
            let n = s.conns.len();
            self.end_session(core, node, out);
            ev.push(Event::NodeLost {
                node,
                incarnation,
                connections: n,
            });
            return;
        }
        let origin = cmd.origin().expect("every other command has an origin");
        if !self.admit(core, origin, out, ev) {
            return;
        }
        let local = origin.node == self.local;
        let mut outcome = None;
        match cmd {
            Command::Request { conn, frame, .. } => {
                let s = self.sessions.get_mut(&origin.node).unwrap();
                if s.conns.insert(conn) {
                    core.connect(conn);
                }
                let mut decoder = FrameDecoder::new();
                let o = match decoder.decode(frame) {
                    Ok(Some(f)) => match parse_request(frame, &f) {
                        Ok(req) => core.handle(now, conn, &req, out),
                        Err(_) => {
                            out.replies.push((conn, Reply::Error));
                            Outcome::Replied
                        }
                    },
                    _ => {
                        out.replies.push((conn, Reply::Error));
                        Outcome::Replied
                    }
                };
                outcome = Some(o);
            }
            Command::Disconnect { conn, .. } => {
                let s = self.sessions.get_mut(&origin.node).unwrap();
                if s.conns.remove(&conn) {
                    core.disconnect(now, conn, out);
                }
            }
            Command::Join { .. } | Command::NodeLost { .. } => {}
        }
        if local {
            ev.push(Event::Applied {
                incarnation: origin.incarnation,
                seq: origin.seq,
                outcome,
            });
        }
    }

    /// Whether `origin`'s command is the next one of a live incarnation;
    /// starts a new incarnation on its first command.
    fn admit(
        &mut self,
        core: &mut Core,
        origin: Origin,
        out: &mut Outbox,
        ev: &mut Vec<Event>,
    ) -> bool {
        let local = origin.node == self.local;
        let s = self.sessions.entry(origin.node).or_default();
        if origin.incarnation < s.incarnation || (origin.incarnation == s.incarnation && s.lost) {
            if local {
                ev.push(Event::Stale {
                    incarnation: origin.incarnation,
                });
            }
            return false;
        }
        if origin.incarnation > s.incarnation {
            if origin.seq != 1 {
                return false; // a gap: the node sends again from 1
            }
            self.end_session(core, origin.node, out);
            let s = self.sessions.get_mut(&origin.node).unwrap();
            s.incarnation = origin.incarnation;
            s.seq = 1;
            s.lost = false;
            return true;
        }
        if origin.seq != s.seq + 1 {
            return false; // a duplicate or a gap
        }
        s.seq = origin.seq;
        true
    }

    /// Disconnects every connection of `node`'s current incarnation, in id
    /// order (the same on every node).
    fn end_session(&mut self, core: &mut Core, node: u64, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&node) else {
            return;
        };
        self.scratch.clear();
        self.scratch.extend(s.conns.drain());
        self.scratch.sort_unstable();
        for &conn in &self.scratch {
            core.disconnect(self.now, conn, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::command::{BatchHeader, begin_batch};
    use super::*;
    use crate::core::Config;

    fn core(e: &ReplicatedEntropy) -> Core {
        Core::new(Config::default(), 0, Box::new(e.clone()))
    }

    fn o(node: u64, inc: u64, seq: u64) -> Origin {
        Origin {
            node,
            incarnation: inc,
            seq,
        }
    }

    fn batch(now: u64, cmds: &[Command]) -> Vec<u8> {
        let mut b = Vec::new();
        begin_batch(&mut b, BatchHeader { now, entropy: now });
        for c in cmds {
            c.encode(&mut b);
        }
        b
    }

    struct Node {
        m: Machine,
        core: Core,
        out: Outbox,
        ev: Vec<Event>,
        index: u64,
    }

    impl Node {
        fn new(local: u64) -> Node {
            let e = ReplicatedEntropy::default();
            Node {
                m: Machine::new(local, e.clone()),
                core: core(&e),
                out: Outbox::default(),
                ev: Vec::new(),
                index: 0,
            }
        }

        fn apply(&mut self, data: &[u8]) -> Vec<(ConnId, String)> {
            self.index += 1;
            self.m
                .apply(
                    &mut self.core,
                    self.index,
                    data,
                    &mut self.out,
                    &mut self.ev,
                )
                .unwrap();
            let r = self
                .out
                .replies
                .drain(..)
                .map(|(c, r)| {
                    let mut v = Vec::new();
                    crate::protocol::encode_reply(&r, &[], &mut v);
                    (c, String::from_utf8(v).unwrap())
                })
                .collect();
            self.out.clear();
            r
        }
    }

    const A: ConnId = (1 << 48) | 1;
    const B: ConnId = (2 << 48) | 1;

    #[test]
    fn requests_apply_once_in_origin_order_and_replies_match_on_every_node() {
        let mut n1 = Node::new(1);
        let mut n2 = Node::new(2);
        let l = Command::Request {
            origin: o(1, 5, 1),
            conn: A,
            frame: b"l\nk\n10\n",
        };
        let wait = Command::Request {
            origin: o(2, 9, 1),
            conn: B,
            frame: b"l\nk\n10\n",
        };
        // The second copy of node 1's seq 1 is a duplicate; node 2's seq 2
        // before its seq 1 is a gap.
        let gap = Command::Disconnect {
            origin: o(2, 9, 2),
            conn: B,
        };
        let b1 = batch(100, &[l, gap, l, wait]);
        let r1 = n1.apply(&b1);
        let r2 = n2.apply(&b1);
        assert_eq!(r1, r2, "identical replies on both nodes");
        assert_eq!(r1.len(), 1);
        assert_eq!(r1[0].0, A);
        assert!(r1[0].1.starts_with("ok "), "{r1:?}");
        assert_eq!(
            n1.ev,
            vec![Event::Applied {
                incarnation: 5,
                seq: 1,
                outcome: Some(Outcome::Replied)
            }]
        );
        assert_eq!(
            n2.ev,
            vec![Event::Applied {
                incarnation: 9,
                seq: 1,
                outcome: Some(Outcome::Blocked)
            }]
        );
        // Node 1 disconnects: node 2's waiter is granted, on both nodes.
        let b2 = batch(
            200,
            &[Command::Disconnect {
                origin: o(1, 5, 2),
                conn: A,
            }],
        );
        let r1 = n1.apply(&b2);
        assert_eq!(r1, n2.apply(&b2));
        assert_eq!(r1.len(), 1);
        assert_eq!(r1[0].0, B);
        assert!(r1[0].1.starts_with("ok "));
    }

    #[test]
    fn a_new_incarnation_ends_the_old_ones_connections_and_stale_commands_are_reported() {
        let mut n = Node::new(1);
        let l = |inc, seq, conn| Command::Request {
            origin: o(1, inc, seq),
            conn,
            frame: b"l\nk\n0\n",
        };
        let r = n.apply(&batch(1, &[l(5, 1, A), l(6, 2, A + 1)]));
        assert_eq!(r.len(), 1, "seq 2 of a new incarnation is a gap: {r:?}");
        assert_eq!(n.core.holders(), 1);
        n.ev.clear();
        // The process restarted: its Join ends the held lock.
        n.apply(&batch(2, &[Command::Join { origin: o(1, 6, 1) }]));
        assert_eq!(n.core.holders(), 0);
        // A late command of the old incarnation is stale.
        n.apply(&batch(3, &[l(5, 2, A)]));
        assert_eq!(n.core.holders(), 0);
        assert_eq!(
            n.ev,
            vec![
                Event::Applied {
                    incarnation: 6,
                    seq: 1,
                    outcome: None
                },
                Event::Stale { incarnation: 5 }
            ]
        );
    }

    #[test]
    fn node_lost_releases_its_connections_and_makes_its_incarnation_stale() {
        let mut n = Node::new(2);
        let l = |seq, conn| Command::Request {
            origin: o(1, 5, seq),
            conn,
            frame: b"l\nk\n0\n",
        };
        n.apply(&batch(1, &[l(1, A)]));
        let waiter = Command::Request {
            origin: o(2, 1, 1),
            conn: B,
            frame: b"l\nk\n10\n",
        };
        assert!(n.apply(&batch(2, &[waiter])).is_empty());
        let lost = Command::NodeLost {
            node: 1,
            incarnation: 5,
        };
        let r = n.apply(&batch(3, &[lost, lost]));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, B, "the waiter on node 2 is granted");
        assert!(n.ev.contains(&Event::NodeLost {
            node: 1,
            incarnation: 5,
            connections: 1
        }));
        assert_eq!(n.m.session(1), None);
        // Node 1's late commands of that incarnation do nothing.
        assert!(n.apply(&batch(4, &[l(2, A + 1)])).is_empty());
        assert_eq!(n.core.holders(), 1);
    }

    #[test]
    fn time_comes_from_batches_and_never_goes_back() {
        let mut n = Node::new(1);
        let l = Command::Request {
            origin: o(1, 1, 1),
            conn: A,
            frame: b"l\nk\n0 1\n",
        };
        n.apply(&batch(1_000, &[l]));
        assert_eq!(n.core.holders(), 1);
        n.apply(&batch(500, &[]));
        assert_eq!(n.m.now(), 1_000);
        n.apply(&batch(1_999, &[]));
        assert_eq!(n.core.holders(), 1, "the 1 s lease has not run out");
        n.apply(&batch(2_001, &[]));
        assert_eq!(n.core.holders(), 0, "expired at cluster time 2000");
    }

    #[test]
    fn machine_state_round_trips() {
        let mut n = Node::new(1);
        let l = Command::Request {
            origin: o(2, 3, 1),
            conn: B,
            frame: b"l\nk\n0\n",
        };
        n.apply(&batch(77, &[l, Command::Join { origin: o(1, 4, 1) }]));
        let mut bytes = Vec::new();
        n.m.encode(&mut bytes);
        let mut m2 = Machine::new(1, ReplicatedEntropy::default());
        assert_eq!(m2.restore(&bytes), Ok(bytes.len()));
        let mut again = Vec::new();
        m2.encode(&mut again);
        assert_eq!(bytes, again);
        assert_eq!(m2.session(2), Some((3, 1)));
        assert_eq!(m2.now(), 77);
        for cut in 0..bytes.len() {
            let mut m3 = Machine::new(1, ReplicatedEntropy::default());
            assert!(m3.restore(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn bad_frames_get_error_on_every_node() {
        let mut n = Node::new(1);
        let bad = Command::Request {
            origin: o(1, 1, 1),
            conn: A,
            frame: b"zz\nk\n0\n",
        };
        let r = n.apply(&batch(1, &[bad]));
        assert_eq!(r, vec![(A, "error\n".to_string())]);
        let mut trunc = batch(1, &[]);
        trunc.push(1);
        assert!(
            n.m.apply(&mut n.core, 9, &trunc, &mut n.out, &mut n.ev)
                .is_err()
        );
    }
}
