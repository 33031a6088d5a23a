//! The signal subject index against a naive matcher: arbitrary sequences of
//! listen, unlisten, disconnect and publish over a small token alphabet; every
//! publish must reach exactly the connections a pattern-by-pattern reference
//! says it should, plain subscribers once each, each matching group once.
//! At the end, with every connection gone, the trie must be empty again.
//!
//! Input bytes drive the operations: one byte picks the operation, the next
//! few pick a connection, a subject (1-4 tokens from {a, b, c, *, >}) and a
//! group.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use dflockd::core::signals::{Signals, validate_channel, validate_pattern};
use libfuzzer_sys::fuzz_target;

const TOKENS: [&str; 5] = ["a", "b", "c", "*", ">"];
const GROUPS: [&str; 3] = ["", "g1", "g2"];
const CONNS: u64 = 6;

fn naive_match(pattern: &str, channel: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let c: Vec<&str> = channel.split('.').collect();
    for (i, tok) in p.iter().enumerate() {
        match *tok {
            ">" => return c.len() > i,
            "*" if i < c.len() => {}
            t if c.get(i) == Some(&t) => {}
            _ => return false,
        }
    }
    p.len() == c.len()
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn subject(&mut self, literal_only: bool) -> Option<String> {
        let len = 1 + (self.byte()? % 4) as usize;
        let mut toks = Vec::with_capacity(len);
        for _ in 0..len {
            let n = if literal_only { 3 } else { 5 };
            toks.push(TOKENS[(self.byte()? % n) as usize]);
        }
        Some(toks.join("."))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut index = Signals::new();
    // The reference: (pattern, group) -> members.
    let mut model: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    while let Some(op) = input.byte() {
        match op % 5 {
            0 | 1 => {
                let Some(conn) = input.byte().map(|b| b as u64 % CONNS) else { break };
                let Some(pattern) = input.subject(false) else { break };
                let Some(g) = input.byte() else { break };
                let group = GROUPS[g as usize % GROUPS.len()];
                if validate_pattern(&pattern).is_err() {
                    continue;
                }
                let new = model
                    .entry((pattern.clone(), group.to_string()))
                    .or_default()
                    .insert(conn);
                assert_eq!(index.listen(conn, &pattern, group), new, "listen {pattern} {group:?}");
            }
            2 => {
                let Some(conn) = input.byte().map(|b| b as u64 % CONNS) else { break };
                let Some(pattern) = input.subject(false) else { break };
                let Some(g) = input.byte() else { break };
                let group = GROUPS[g as usize % GROUPS.len()];
                let key = (pattern.clone(), group.to_string());
                let was = model.get_mut(&key).is_some_and(|m| m.remove(&conn));
                if model.get(&key).is_some_and(BTreeSet::is_empty) {
                    model.remove(&key);
                }
                assert_eq!(index.unlisten(conn, &pattern, group), was, "unlisten {pattern}");
            }
            3 => {
                let Some(conn) = input.byte().map(|b| b as u64 % CONNS) else { break };
                index.disconnect(conn);
                for members in model.values_mut() {
                    members.remove(&conn);
                }
                model.retain(|_, m| !m.is_empty());
            }
            _ => {
                let Some(channel) = input.subject(true) else { break };
                assert!(validate_channel(&channel).is_ok());
                let mut plain = BTreeSet::new();
                let mut groups: Vec<&BTreeSet<u64>> = Vec::new();
                for ((pattern, group), members) in &model {
                    if naive_match(pattern, &channel) {
                        if group.is_empty() {
                            plain.extend(members.iter().copied());
                        } else {
                            groups.push(members);
                        }
                    }
                }
                let mut got = Vec::new();
                let n = index.publish(&channel, &mut got);
                assert_eq!(n, got.len());
                assert_eq!(n, plain.len() + groups.len(), "deliveries on {channel}");
                // Plain receivers: exactly the matching plain subscribers.
                let got_set: BTreeSet<u64> = got.iter().copied().collect();
                assert!(plain.is_subset(&got_set), "a plain subscriber missed {channel}");
                // Every delivery goes to someone entitled to it.
                for c in &got {
                    assert!(plain.contains(c) || groups.iter().any(|g| g.contains(c)), "{c} got {channel}");
                }
            }
        }
        assert_eq!(index.subscription_count(), model.len());
    }
    for conn in 0..CONNS {
        index.disconnect(conn);
    }
    assert_eq!(index.subscription_count(), 0);
    assert_eq!(index.node_count(), 1, "the trie kept empty nodes");
});
