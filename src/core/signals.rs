//! Pub/sub signals: a subject index shaped as a token trie, in the manner of
//! the NATS sublist.
//!
//! Patterns are dot-separated tokens; `*` matches one token and `>` one or
//! more trailing tokens. Each trie node has literal children plus one `*` and
//! one `>` child, so matching a channel walks only branches that can match:
//! its cost grows with the channel's tokens and the matching subscriptions,
//! not with the number of patterns. Removing the last subscription of a
//! pattern prunes the nodes it no longer needs.
//!
//! A subscription is a (pattern, group) pair with its member connections.
//! With an empty group every member receives each signal (once per connection
//! however many of its plain subscriptions match); with a group, each signal
//! goes to one member, round-robin.

use hashbrown::HashMap;
use slab::Slab;

use super::ConnId;
use super::snapshot::{
    Reader, SnapshotError, bad, build_slab, put_len, put_str, put_u32, put_u64, read_vacant,
};

const ROOT: u32 = 0;
const NONE: u32 = u32::MAX;

#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, u32>,
    star: Option<u32>,
    gt: Option<u32>,
    /// Subscriptions whose pattern ends at this node.
    subs: Vec<u32>,
    parent: u32,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.gt.is_none() && self.subs.is_empty()
    }
}

struct Subscription {
    pattern: Box<str>,
    group: Box<str>,
    node: u32,
    members: Vec<ConnId>,
    /// Round-robin position for groups.
    next: usize,
}

/// Why a pattern or channel was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectError {
    EmptyToken,
    /// A wildcard mixed with other characters, `>` not last, or a wildcard in
    /// a channel.
    BadWildcard,
}

/// Validates a `listen` pattern.
pub fn validate_pattern(pattern: &str) -> Result<(), SubjectError> {
    let mut tokens = pattern.split('.').peekable();
    while let Some(tok) = tokens.next() {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        let last = tokens.peek().is_none();
        match tok {
            "*" => {}
            ">" if last => {}
            _ if tok.contains(['*', '>']) => return Err(SubjectError::BadWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a `signal` channel: literal tokens only.
pub fn validate_channel(channel: &str) -> Result<(), SubjectError> {
    for tok in channel.split('.') {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        if tok.contains(['*', '>']) {
            return Err(SubjectError::BadWildcard);
        }
    }
    Ok(())
}

/// The subscription index.
pub struct Signals {
    nodes: Slab<Node>,
    subs: Slab<Subscription>,
    by_name: HashMap<(Box<str>, Box<str>), u32>,
    /// Subscriptions each connection belongs to.
    by_conn: HashMap<ConnId, Vec<u32>>,
    matched: Vec<u32>,
    plain: Vec<ConnId>,
    /// The vacant slots of `subs`, the next one to be reused last (a
    /// subscription's slot decides its place in `stats`).
    vacant: Vec<u32>,
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

impl Signals {
    pub fn new() -> Self {
        let mut nodes = Slab::new();
        nodes.insert(Node {
            parent: NONE,
            ..Node::default()
        });
        Signals {
            nodes,
            subs: Slab::new(),
            by_name: HashMap::new(),
            by_conn: HashMap::new(),
            matched: Vec::new(),
            plain: Vec::new(),
            vacant: Vec::new(),
        }
    }

    /// Subscriptions `conn` holds.
    pub fn count_for(&self, conn: ConnId) -> usize {
        self.by_conn.get(&conn).map_or(0, Vec::len)
    }

    /// Whether `conn` is a member of (pattern, group).
    pub fn is_member(&self, conn: ConnId, pattern: &str, group: &str) -> bool {
        self.by_name
            .get(&(Box::from(pattern), Box::from(group)))
            .is_some_and(|&s| self.subs[s as usize].members.contains(&conn))
    }

    /// Number of trie nodes (the root included), for memory checks.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Adds `conn` to (pattern, group); a repeat is a no-op. The pattern must
    /// have passed [`validate_pattern`]. Returns whether it was new.
    pub fn listen(&mut self, conn: ConnId, pattern: &str, group: &str) -> bool {
        let sub = match self.by_name.get(&(Box::from(pattern), Box::from(group))) {
            Some(&s) => s,
            None => {
                let node = self.node_for(pattern);
                let s = self.subs.insert(Subscription {
                    pattern: pattern.into(),
                    group: group.into(),
                    node,
                    members: Vec::new(),
                    next: 0,
                }) as u32;
                let reused = self.vacant.pop();
                debug_assert!(reused.is_none_or(|v| v == s));
                self.nodes[node as usize].subs.push(s);
                self.by_name.insert((pattern.into(), group.into()), s);
                s
            }
        };
        let members = &mut self.subs[sub as usize].members;
        if members.contains(&conn) {
            return false;
        }
        members.push(conn);
        self.by_conn.entry(conn).or_default().push(sub);
        true
    }

    /// Removes `conn` from (pattern, group). Returns whether it was a member.
    pub fn unlisten(&mut self, conn: ConnId, pattern: &str, group: &str) -> bool {
        let Some(&sub) = self.by_name.get(&(Box::from(pattern), Box::from(group))) else {
            return false;
        };
        let Some(list) = self.by_conn.get_mut(&conn) else {
            return false;
        };
        let Some(i) = list.iter().position(|&s| s == sub) else {
            return false;
        };
        list.swap_remove(i);
        if list.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.leave(conn, sub);
        true
    }

    /// Removes every subscription of `conn`.
    pub fn disconnect(&mut self, conn: ConnId) {
        let Some(list) = self.by_conn.remove(&conn) else {
            return;
        };
        for sub in list {
            self.leave(conn, sub);
        }
    }

    /// Finds the receivers of a signal on `channel`: pushes each receiving
    /// connection onto `out` (a connection may appear more than once only
    /// through distinct groups) and returns the number of deliveries.
    pub fn publish(&mut self, channel: &str, out: &mut Vec<ConnId>) -> usize {
        let mut matched = std::mem::take(&mut self.matched);
        let mut plain = std::mem::take(&mut self.plain);
        matched.clear();
        plain.clear();
        self.collect(ROOT, Some(channel), &mut matched);
        let before = out.len();
        for &s in &matched {
            let sub = &mut self.subs[s as usize];
            if sub.group.is_empty() {
                plain.extend_from_slice(&sub.members);
            } else if !sub.members.is_empty() {
                let i = sub.next % sub.members.len();
                sub.next = (i + 1) % sub.members.len();
                out.push(sub.members[i]);
            }
        }
        plain.sort_unstable();
        plain.dedup();
        out.extend_from_slice(&plain);
        self.matched = matched;
        self.plain = plain;
        out.len() - before
    }

    /// (pattern, group, listeners) of every subscription.
    pub fn channels(&self) -> impl Iterator<Item = (&str, &str, usize)> {
        self.subs
            .iter()
            .map(|(_, s)| (&*s.pattern, &*s.group, s.members.len()))
    }

    fn collect(&self, node: u32, rest: Option<&str>, out: &mut Vec<u32>) {
        let n = &self.nodes[node as usize];
        let Some(rest) = rest else {
            out.extend_from_slice(&n.subs);
            return;
        };
        let (token, next) = match rest.split_once('.') {
            Some((t, r)) => (t, Some(r)),
            None => (rest, None),
        };
        if let Some(&child) = n.literal.get(token) {
            self.collect(child, next, out);
        }
        if let Some(star) = n.star {
            self.collect(star, next, out);
        }
        if let Some(gt) = n.gt {
            out.extend_from_slice(&self.nodes[gt as usize].subs);
        }
    }

    fn node_for(&mut self, pattern: &str) -> u32 {
        let mut node = ROOT;
        for tok in pattern.split('.') {
            let existing = match tok {
                "*" => self.nodes[node as usize].star,
                ">" => self.nodes[node as usize].gt,
                _ => self.nodes[node as usize].literal.get(tok).copied(),
            };
            node = match existing {
                Some(child) => child,
                None => {
                    let child = self.nodes.insert(Node {
                        parent: node,
                        ..Node::default()
                    }) as u32;
                    let n = &mut self.nodes[node as usize];
                    match tok {
                        "*" => n.star = Some(child),
                        ">" => n.gt = Some(child),
                        _ => {
                            n.literal.insert(tok.into(), child);
                        }
                    }
                    child
                }
            };
        }
        node
    }

    fn leave(&mut self, conn: ConnId, sub: u32) {
        let s = &mut self.subs[sub as usize];
        if let Some(i) = s.members.iter().position(|&c| c == conn) {
            // Keep member order (the round-robin rotation stays fair).
            s.members.remove(i);
            if i < s.next {
                s.next -= 1;
            }
        }
        if !s.members.is_empty() {
            return;
        }
        let s = self.subs.remove(sub as usize);
        self.vacant.push(sub);
        self.by_name.remove(&(s.pattern.clone(), s.group.clone()));
        let node = &mut self.nodes[s.node as usize];
        node.subs.retain(|&x| x != sub);
        self.prune(s.node);
    }

    /// Removes empty nodes from `node` up towards the root.
    fn prune(&mut self, mut node: u32) {
        while node != ROOT && self.nodes[node as usize].is_empty() {
            let parent = self.nodes[node as usize].parent;
            self.nodes.remove(node as usize);
            let p = &mut self.nodes[parent as usize];
            if p.star == Some(node) {
                p.star = None;
            } else if p.gt == Some(node) {
                p.gt = None;
            } else {
                p.literal.retain(|_, &mut c| c != node);
            }
            node = parent;
        }
    }
}

// ---- snapshots ----
//
// u32 subscription slots, count + u32s: vacant slots (reused last first)
// count + patterns, in the order of their lowest subscription slot:
//     str pattern, count + subscriptions in the pattern node's order:
//         u32 slot, str group, u32 round-robin cursor, count + u64 members
// count + connections, ascending: u64 conn, count + u32 subscription slots
//
// The trie is rebuilt from the patterns: its node numbers are never seen.

impl Signals {
    pub(super) fn write_snapshot(&self, out: &mut Vec<u8>) {
        put_len(out, self.subs.len() + self.vacant.len());
        put_len(out, self.vacant.len());
        for &v in &self.vacant {
            put_u32(out, v);
        }
        // A pattern's subscriptions are listed where its lowest slot is.
        let first_of_node = |s: usize, sub: &Subscription| {
            let list = &self.nodes[sub.node as usize].subs;
            list.iter().min() == Some(&(s as u32))
        };
        let patterns = self
            .subs
            .iter()
            .filter(|&(s, sub)| first_of_node(s, sub))
            .count();
        put_len(out, patterns);
        for (s, sub) in &self.subs {
            if !first_of_node(s, sub) {
                continue;
            }
            put_str(out, &sub.pattern);
            let list = &self.nodes[sub.node as usize].subs;
            put_len(out, list.len());
            for &i in list {
                let sub = &self.subs[i as usize];
                put_u32(out, i);
                put_str(out, &sub.group);
                put_len(out, sub.next);
                put_len(out, sub.members.len());
                for &m in &sub.members {
                    put_u64(out, m);
                }
            }
        }
        let mut conns: Vec<(&ConnId, &Vec<u32>)> = self.by_conn.iter().collect();
        conns.sort_unstable_by_key(|(c, _)| **c);
        put_len(out, conns.len());
        for (&conn, list) in conns {
            put_u64(out, conn);
            put_len(out, list.len());
            for &s in list {
                put_u32(out, s);
            }
        }
    }

    pub(super) fn read_snapshot(r: &mut Reader<'_>) -> Result<Signals, SnapshotError> {
        // Slot, empty group, cursor, one member.
        const SUB_SIZE: usize = 4 + 4 + 4 + 4 + 8;
        let slots = r.u32()? as usize;
        let (vacant, is_vacant) = read_vacant(r, slots, SUB_SIZE)?;
        let mut items: Vec<Option<Subscription>> = (0..slots).map(|_| None).collect();
        let mut filled = 0;
        // (subscription, member) pairs not yet found among the listeners.
        let mut memberships = hashbrown::HashSet::new();
        let mut sig = Signals::new();
        let patterns = r.count(4 + 4)?;
        for _ in 0..patterns {
            let pattern = r.str()?;
            if validate_pattern(pattern).is_err() {
                return bad(format!("bad pattern {pattern:?}"));
            }
            let node = sig.node_for(pattern);
            if !sig.nodes[node as usize].subs.is_empty() {
                return bad(format!("pattern {pattern:?} twice"));
            }
            let n = r.count(SUB_SIZE)?;
            if n == 0 {
                return bad(format!("pattern {pattern:?} without subscriptions"));
            }
            for _ in 0..n {
                let s = r.u32()?;
                let group = r.str()?;
                let next = r.u32()? as usize;
                let m = r.count(8)?;
                let mut members = Vec::with_capacity(m);
                for _ in 0..m {
                    let c = r.u64()?;
                    if !memberships.insert((s, c)) {
                        return bad(format!("{pattern:?}: conn {c} listed twice"));
                    }
                    members.push(c);
                }
                if members.is_empty() || next > members.len() {
                    return bad(format!("{pattern:?}: no members or cursor out of range"));
                }
                let occupied = is_vacant.get(s as usize) == Some(&false);
                match items.get_mut(s as usize) {
                    Some(slot @ None) if occupied => {
                        *slot = Some(Subscription {
                            pattern: pattern.into(),
                            group: group.into(),
                            node,
                            members,
                            next,
                        });
                    }
                    _ => return bad(format!("subscription slot {s} vacant or repeated")),
                }
                filled += 1;
                if sig
                    .by_name
                    .insert((pattern.into(), group.into()), s)
                    .is_some()
                {
                    return bad(format!("subscription ({pattern:?}, {group:?}) twice"));
                }
                sig.nodes[node as usize].subs.push(s);
            }
        }
        if filled + vacant.len() != slots {
            return bad("subscription slots left empty");
        }
        let n = r.count(8 + 4 + 4)?;
        let mut last = None;
        for _ in 0..n {
            let conn = r.u64()?;
            if last.is_some_and(|l| l >= conn) {
                return bad("listeners out of order");
            }
            last = Some(conn);
            let m = r.count(4)?;
            if m == 0 {
                return bad(format!("conn {conn}: an empty subscription list"));
            }
            let mut list = Vec::with_capacity(m);
            for _ in 0..m {
                let s = r.u32()?;
                if !memberships.remove(&(s, conn)) {
                    return bad(format!("conn {conn}: subscription {s} is not its own"));
                }
                list.push(s);
            }
            sig.by_conn.insert(conn, list);
        }
        if !memberships.is_empty() {
            return bad("a subscription member is not listening");
        }
        sig.subs = build_slab(items, &vacant, || Subscription {
            pattern: "".into(),
            group: "".into(),
            node: ROOT,
            members: Vec::new(),
            next: 0,
        });
        sig.vacant = vacant;
        Ok(sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference matcher: pattern against channel, token by token.
    pub fn naive_match(pattern: &str, channel: &str) -> bool {
        let p: Vec<&str> = pattern.split('.').collect();
        let c: Vec<&str> = channel.split('.').collect();
        for (i, tok) in p.iter().enumerate() {
            match *tok {
                ">" => return c.len() > i,
                "*" => {
                    if i >= c.len() {
                        return false;
                    }
                }
                t => {
                    if c.get(i) != Some(&t) {
                        return false;
                    }
                }
            }
        }
        p.len() == c.len()
    }

    #[test]
    fn validation() {
        for ok in ["a", "a.b", "*", ">", "a.*", "a.>", "*.b.>", "a.*.c"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        for bad in ["a*", "a.>.b", ">.a", "a..b", ".a", "a.", "", "a.b*", "*>"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_channel("a.b.c"), Ok(()));
        for bad in ["a.*", "a.>", "a*", "a..b", ""] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_dedup_and_counts() {
        let mut s = Signals::new();
        s.listen(1, "orders.*", "");
        s.listen(1, "orders.>", "");
        s.listen(2, "orders.eu", "");
        s.listen(3, ">", "");
        let mut out = Vec::new();
        assert_eq!(s.publish("orders.eu", &mut out), 3);
        out.sort();
        assert_eq!(out, vec![1, 2, 3]);
        out.clear();
        assert_eq!(
            s.publish("orders", &mut out),
            1,
            "`>` needs a token after the prefix"
        );
        assert_eq!(out, vec![3]);
        out.clear();
        assert_eq!(s.publish("orders.eu.x", &mut out), 2);
    }

    #[test]
    fn groups_rotate_and_deliver_independently() {
        let mut s = Signals::new();
        for c in 1..=3 {
            s.listen(c, "jobs.*", "workers");
        }
        s.listen(9, "jobs.*", "audit");
        let mut counts = [0usize; 10];
        for _ in 0..30 {
            let mut out = Vec::new();
            assert_eq!(s.publish("jobs.x", &mut out), 2);
            for c in out {
                counts[c as usize] += 1;
            }
        }
        assert_eq!(&counts[1..4], &[10, 10, 10]);
        assert_eq!(counts[9], 30);
    }

    #[test]
    fn unlisten_and_disconnect_prune_the_trie() {
        let mut s = Signals::new();
        assert!(s.listen(1, "a.b.c", ""));
        assert!(!s.listen(1, "a.b.c", ""));
        s.listen(1, "a.*.>", "g");
        s.listen(2, "a.b.c", "");
        assert_eq!(s.count_for(1), 2);
        assert!(s.unlisten(1, "a.b.c", ""));
        assert!(!s.unlisten(1, "a.b.c", ""));
        assert!(!s.unlisten(1, "x", ""));
        s.disconnect(2);
        s.disconnect(1);
        assert_eq!(s.node_count(), 1);
        assert_eq!(s.subscription_count(), 0);
        assert!(s.by_name.is_empty() && s.by_conn.is_empty());
    }

    #[test]
    fn random_patterns_agree_with_the_naive_matcher() {
        let tokens = ["a", "b", "c", "*", ">"];
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut s = Signals::new();
        let mut live: Vec<(ConnId, String)> = Vec::new();
        for round in 0..2000 {
            let len = 1 + rnd(4);
            let pat: Vec<&str> = (0..len).map(|_| tokens[rnd(5)]).collect();
            let pat = pat.join(".");
            if validate_pattern(&pat).is_ok() {
                let conn = rnd(20) as ConnId;
                if s.listen(conn, &pat, "") {
                    live.push((conn, pat));
                }
            }
            if rnd(3) == 0 && !live.is_empty() {
                let (c, p) = live.swap_remove(rnd(live.len()));
                assert!(s.unlisten(c, &p, ""));
            }
            let clen = 1 + rnd(4);
            let ch: Vec<&str> = (0..clen).map(|_| tokens[rnd(3)]).collect();
            let ch = ch.join(".");
            let mut want: Vec<ConnId> = live
                .iter()
                .filter(|(_, p)| naive_match(p, &ch))
                .map(|(c, _)| *c)
                .collect();
            want.sort();
            want.dedup();
            let mut got = Vec::new();
            let n = s.publish(&ch, &mut got);
            got.sort();
            assert_eq!(n, got.len());
            assert_eq!(got, want, "round {round} channel {ch}");
        }
        for (c, p) in live.drain(..) {
            s.unlisten(c, &p, "");
        }
        assert_eq!(s.node_count(), 1);
    }
}
