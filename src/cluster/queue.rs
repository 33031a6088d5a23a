//! A node's commands not yet applied, oldest first, encoded back to back in
//! one byte buffer: queuing a command allocates nothing once the buffer
//! has grown to the load's size (a `Vec` per command would be one
//! allocation per client request on the replicated path).

use std::collections::VecDeque;
use std::time::Instant;

/// The prefix of applied commands is dropped from the buffer once it is
/// past half of it and at least this long (so the move is amortized).
const COMPACT_AT: usize = 4096;

#[derive(Default)]
pub struct Queue {
    bytes: Vec<u8>,
    /// The stream offset of `bytes[0]` (offsets only grow).
    base: u64,
    /// The stream offset where the first queued command starts.
    head: u64,
    /// Per command: its seq, the stream offset where it ends (it starts
    /// where the one before ends, or at `head`), and when it was queued.
    items: VecDeque<(u64, u64, Instant)>,
}

impl Queue {
    /// Queues the command `encode` writes, under `seq` (increasing).
    pub fn push(&mut self, seq: u64, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.bytes);
        let end = self.base + self.bytes.len() as u64;
        self.items.push_back((seq, end, Instant::now()));
    }

    /// Drops the oldest command; its seq and when it was queued.
    pub fn pop_front(&mut self) -> Option<(u64, Instant)> {
        let (seq, end, at) = self.items.pop_front()?;
        self.head = end;
        let dead = (self.head - self.base) as usize;
        if self.items.is_empty() {
            self.bytes.clear();
            self.base = self.head;
        } else if dead >= COMPACT_AT && dead > self.bytes.len() / 2 {
            self.bytes.drain(..dead);
            self.base = self.head;
        }
        Some((seq, at))
    }

    /// Drops every command.
    pub fn clear(&mut self) {
        self.base += self.bytes.len() as u64;
        self.head = self.base;
        self.bytes.clear();
        self.items.clear();
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn front_seq(&self) -> Option<u64> {
        self.items.front().map(|&(seq, ..)| seq)
    }

    pub fn back_seq(&self) -> Option<u64> {
        self.items.back().map(|&(seq, ..)| seq)
    }

    /// Every queued command, oldest first: its seq and its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut start = self.head;
        self.items.iter().map(move |&(seq, end, _)| {
            let s = (start - self.base) as usize;
            let e = (end - self.base) as usize;
            start = end;
            (seq, &self.bytes[s..e])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(q: &Queue) -> Vec<(u64, Vec<u8>)> {
        q.iter().map(|(s, b)| (s, b.to_vec())).collect()
    }

    #[test]
    fn commands_come_back_in_order_with_their_bytes() {
        let mut q = Queue::default();
        q.push(1, |b| b.extend_from_slice(b"one"));
        q.push(2, |b| b.extend_from_slice(b"two!"));
        q.push(3, |_| {});
        assert_eq!(q.len(), 3);
        assert_eq!((q.front_seq(), q.back_seq()), (Some(1), Some(3)));
        assert_eq!(
            contents(&q),
            vec![(1, b"one".to_vec()), (2, b"two!".to_vec()), (3, vec![])]
        );
        assert_eq!(q.pop_front().map(|(s, _)| s), Some(1));
        assert_eq!(contents(&q), vec![(2, b"two!".to_vec()), (3, vec![])]);
        q.clear();
        assert!(q.is_empty() && q.pop_front().is_none() && q.back_seq().is_none());
        q.push(9, |b| b.extend_from_slice(b"again"));
        assert_eq!(contents(&q), vec![(9, b"again".to_vec())]);
    }

    #[test]
    fn a_never_empty_queue_stays_bounded_and_allocates_nothing_in_steady_state() {
        let mut q = Queue::default();
        let mut seq = 0;
        let mut next_pop = 1;
        // Always 50 commands in flight, as under steady load.
        for _ in 0..50 {
            seq += 1;
            q.push(seq, |b| b.extend_from_slice(&[seq as u8; 60]));
        }
        let mut cap_after_warmup = 0;
        for round in 0..100_000u64 {
            let (s, _) = q.pop_front().unwrap();
            assert_eq!(s, next_pop);
            next_pop += 1;
            seq += 1;
            q.push(seq, |b| b.extend_from_slice(&[seq as u8; 60]));
            if round == 1_000 {
                cap_after_warmup = q.bytes.capacity();
            }
            if round > 1_000 {
                assert_eq!(
                    q.bytes.capacity(),
                    cap_after_warmup,
                    "grew at round {round}"
                );
            }
            assert!(q.bytes.len() <= 2 * COMPACT_AT + 51 * 60);
        }
        // The bytes still match their seqs after all the compactions.
        for (s, b) in q.iter() {
            assert_eq!(b, &[s as u8; 60][..]);
        }
    }
}
