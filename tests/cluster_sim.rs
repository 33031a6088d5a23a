//! Deterministic simulation of cluster mode: several `cluster::node::Node`s
//! with the real `Core`, their logs on disk in a temporary directory, a
//! simulated network (delay, reorder, drop, partition) and a simulated
//! millisecond clock, all driven by one seeded PRNG.
//!
//! Checked at every step: at most one holder per lock across what clients
//! were told (a grant is believed from the moment its reply is delivered
//! until the holder's release is applied or its lease runs out in cluster
//! time), fences strictly increasing over grants, every node's applied state
//! equal at equal indexes (the `stats` body and the holder count), and no
//! acknowledged command applied twice (each origin sequence applied once).
//!
//! A failure prints the seed: `CLUSTER_SIM_SEED=<seed> cargo test --test
//! cluster_sim` replays it exactly.

use std::collections::{BTreeMap, HashMap, VecDeque};

use dflockd::cluster::machine::{Event, node_of};
use dflockd::cluster::node::{Node, NodeConfig, Outgoing, Standby};
use dflockd::cluster::raft_logger;
use dflockd::cluster::wire;
use dflockd::core::{Config, ConnId, Core, Outbox};
use dflockd::protocol::{Reply, encode_reply};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const HB: u64 = 10;
const ET: u64 = 100;

struct SimNode {
    node: Node,
    core: Core,
    outbox: Outbox,
}

/// A message in flight: bytes as they would cross a peer link.
struct InFlight {
    at: u64,
    from: u64,
    to: u64,
    bytes: Vec<u8>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    mono: u64,
    dir: std::path::PathBuf,
    ids: Vec<u64>,
    nodes: BTreeMap<u64, SimNode>,
    net: Vec<InFlight>,
    /// Pairs that cannot talk (both directions).
    cut: Vec<(u64, u64)>,
    drop_per_mille: u64,
    /// Replies delivered to each connection, as text lines.
    replies: HashMap<ConnId, VecDeque<String>>,
    logger: slog::Logger,
    incarnations: u64,
}

impl Sim {
    fn new(seed: u64, n: u64) -> Sim {
        let dir = std::env::temp_dir().join(format!(
            "dflockd-cluster-sim-{}-{seed:x}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            mono: 1,
            dir,
            ids: (1..=n).collect(),
            nodes: BTreeMap::new(),
            net: Vec::new(),
            cut: Vec::new(),
            drop_per_mille: 0,
            replies: HashMap::new(),
            logger: raft_logger(),
            incarnations: 0,
        };
        for id in 1..=n {
            sim.start(id);
        }
        sim
    }

    fn start(&mut self, id: u64) {
        self.incarnations += 1;
        let cfg = NodeConfig {
            id,
            voters: self.ids.clone(),
            cluster_id: 99,
            heartbeat_ms: HB,
            election_ms: ET,
            fixed_election_ticks: Some((ET / HB) as usize + self.rng.below(ET / HB) as usize),
        };
        let dir = self.dir.join(id.to_string());
        let (mut node, _) =
            Node::open(cfg, &dir, self.incarnations, self.mono, &self.logger).expect("open");
        node.reincarnate(0);
        let core = Core::new(Config::default(), 0, Box::new(node.entropy()));
        self.nodes.insert(
            id,
            SimNode {
                node,
                core,
                outbox: Outbox::default(),
            },
        );
    }

    fn crash(&mut self, id: u64) {
        self.nodes.remove(&id);
        for (c, q) in self.replies.iter_mut() {
            if node_of(*c) == id {
                q.clear();
            }
        }
    }

    fn linked(&self, a: u64, b: u64) -> bool {
        !self.cut.contains(&(a, b)) && !self.cut.contains(&(b, a))
    }

    /// One simulated millisecond.
    fn step(&mut self) {
        self.mono += 1;
        let mono = self.mono;
        // Deliver what is due, in a shuffled order among equals.
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= mono {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|m| (m.at, m.from, m.to));
        for m in due {
            if !self.linked(m.from, m.to) {
                continue;
            }
            let Some(n) = self.nodes.get_mut(&m.to) else {
                continue;
            };
            let (frame, _) = wire::decode(&m.bytes, wire::MAX_FRAME).unwrap().unwrap();
            match frame {
                wire::Frame::Raft(body) => {
                    n.node.step(mono, wire::decode_raft(body).unwrap());
                }
                wire::Frame::Forward(cmds) => {
                    n.node.on_forward(mono, m.from, cmds);
                }
                _ => unreachable!(),
            }
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        // Hellos: a node started with an empty log learns from its peers
        // whether the cluster is new (as the peer links' hellos tell it).
        let states: Vec<(u64, bool)> = ids
            .iter()
            .map(|&i| (i, self.nodes[&i].node.has_state()))
            .collect();
        for &id in &ids {
            if !matches!(self.nodes[&id].node.standby(), Standby::Undecided { .. }) {
                continue;
            }
            for &(peer, has_state) in &states {
                if peer != id && self.linked(id, peer) {
                    self.nodes
                        .get_mut(&id)
                        .unwrap()
                        .node
                        .peer_hello(peer, has_state);
                }
            }
        }
        for id in ids {
            let n = self.nodes.get_mut(&id).unwrap();
            if mono % HB == 0 {
                n.node.tick();
            }
            n.node.drive(mono, &mut n.core, &mut n.outbox).unwrap();
            let replies = std::mem::take(&mut n.outbox.replies);
            for (conn, reply) in replies {
                if node_of(conn) != id {
                    continue;
                }
                let mut line = Vec::new();
                encode_reply(&reply, n.outbox.body(&reply), &mut line);
                if reply != Reply::Signal {
                    self.replies
                        .entry(conn)
                        .or_default()
                        .push_back(String::from_utf8(line).unwrap());
                }
            }
            n.outbox.clear();
            let events = std::mem::take(&mut n.node.events);
            if events.iter().any(|e| matches!(e, Event::Stale { .. })) {
                n.node.reincarnate(0);
            }
            let out = std::mem::take(&mut n.node.out);
            for (to, msg) in out {
                if self.drop_per_mille > 0 && self.rng.chance(self.drop_per_mille) {
                    continue;
                }
                let mut bytes = Vec::new();
                match msg {
                    Outgoing::Raft(m) => wire::encode_raft(&mut bytes, &m),
                    Outgoing::Forward(c) => wire::encode_forward(&mut bytes, &c),
                }
                let at = mono + 1 + self.rng.below(3);
                self.net.push(InFlight {
                    at,
                    from: id,
                    to,
                    bytes,
                });
            }
        }
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, n)| n.node.is_leader())
            .map(|(id, _)| *id)
    }

    fn request(&mut self, node: u64, conn: ConnId, line: &str) {
        let n = self.nodes.get_mut(&node).unwrap();
        n.node.submit_request(conn, line.as_bytes());
    }

    fn reply(&mut self, conn: ConnId) -> Option<String> {
        self.replies.get_mut(&conn).and_then(|q| q.pop_front())
    }

    /// Runs until `conn` has a reply, at most `ms`.
    fn await_reply(&mut self, conn: ConnId, ms: u64) -> Option<String> {
        for _ in 0..ms {
            if let Some(r) = self.reply(conn) {
                return Some(r);
            }
            self.step();
        }
        self.reply(conn)
    }

    fn holders(&self) -> Vec<(u64, usize)> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, n.core.holders()))
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn conn(node: u64, n: u64) -> ConnId {
    (node << 48) | n
}

fn seed() -> u64 {
    std::env::var("CLUSTER_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC1u64 << 32 | 7)
}

#[test]
fn three_nodes_elect_and_replicate_a_lock_taken_through_a_follower() {
    let seed = seed();
    let mut sim = Sim::new(seed, 3);
    sim.run(3 * ET);
    let leader = sim
        .leader()
        .unwrap_or_else(|| panic!("seed {seed}: no leader"));
    let follower = sim.ids.iter().copied().find(|&i| i != leader).unwrap();
    let a = conn(follower, 1);
    sim.request(follower, a, "l\nk\n0\n");
    let r = sim.await_reply(a, 200).expect("a reply");
    assert!(r.starts_with("ok "), "seed {seed}: {r}");
    sim.run(20);
    for (id, h) in sim.holders() {
        assert_eq!(h, 1, "seed {seed}: node {id} sees {h} holders");
    }
    // A waiter on the leader is granted when the follower's holder leaves.
    let b = conn(leader, 1);
    sim.request(leader, b, "l\nk\n5\n");
    sim.run(50);
    assert_eq!(sim.reply(b), None, "still waiting");
    let sim_follower = sim.nodes.get_mut(&follower).unwrap();
    sim_follower
        .node
        .submit(|origin| dflockd::cluster::command::Command::Disconnect { origin, conn: a });
    let r = sim.await_reply(b, 200).expect("the waiter's grant");
    assert!(r.starts_with("ok "), "seed {seed}: {r}");
}

#[test]
fn a_holder_keeps_its_lock_through_a_leader_crash() {
    let seed = seed() ^ 1;
    let mut sim = Sim::new(seed, 3);
    sim.run(3 * ET);
    let leader = sim.leader().expect("a leader");
    let follower = sim.ids.iter().copied().find(|&i| i != leader).unwrap();
    let a = conn(follower, 1);
    sim.request(follower, a, "l\nk\n0 2\n");
    let r = sim.await_reply(a, 200).expect("granted");
    let token = r.split_whitespace().nth(1).unwrap().to_string();
    sim.crash(leader);
    // Renewals keep it across the election.
    for i in 0..6 {
        sim.run(300);
        sim.request(follower, a, &format!("n\nk\n{token} 2\n"));
        let r = sim
            .await_reply(a, 10 * ET)
            .unwrap_or_else(|| panic!("seed {seed}: renewal {i} unanswered"));
        assert!(r.starts_with("ok"), "seed {seed}: renewal {i}: {r}");
    }
    let new_leader = sim.leader().expect("a new leader");
    assert_ne!(new_leader, leader);
    // The crashed node restarts, catches up from the others' logs.
    sim.start(leader);
    sim.run(10 * ET);
    assert_eq!(sim.nodes[&leader].core.holders(), 1, "seed {seed}");
}

#[test]
fn a_wiped_node_neither_votes_nor_campaigns_until_it_has_caught_up() {
    let seed = seed() ^ 2;
    let mut sim = Sim::new(seed, 3);
    sim.run(3 * ET);
    let leader = sim.leader().expect("a leader");
    let a = conn(leader, 1);
    sim.request(leader, a, "l\nk\n0\n");
    assert!(sim.await_reply(a, 200).unwrap().starts_with("ok "));
    let wiped = sim.ids.iter().copied().find(|&i| i != leader).unwrap();
    sim.crash(wiped);
    std::fs::remove_dir_all(sim.dir.join(wiped.to_string())).unwrap();
    // Alone with nobody to tell it, it stays undecided and never campaigns.
    let others: Vec<u64> = sim.ids.iter().copied().filter(|&i| i != wiped).collect();
    for &o in &others {
        sim.cut.push((wiped, o));
    }
    sim.start(wiped);
    sim.run(10 * ET);
    assert!(matches!(
        sim.nodes[&wiped].node.standby(),
        Standby::Undecided { .. }
    ));
    assert_eq!(sim.nodes[&wiped].node.term(), 0, "it never campaigned");
    // Reconnected: a peer has state, so it recovers, then votes again.
    sim.cut.clear();
    sim.step();
    sim.step();
    assert_eq!(sim.nodes[&wiped].node.standby(), &Standby::Recovering);
    sim.run(10 * ET);
    assert_eq!(sim.nodes[&wiped].node.standby(), &Standby::Active);
    assert_eq!(
        sim.nodes[&wiped].core.holders(),
        1,
        "caught up: seed {seed}"
    );
}
