//! The in-memory view of the Raft log that raft-rs reads (`raft::Storage`):
//! the latest snapshot (metadata and data), the entries after it, the hard
//! state and the membership. The durable copy is the WAL (`storage::wal`);
//! the node writes both.
//!
//! raft-rs's own `MemStorage` cannot serve here: it compacts without
//! remembering the term at the compaction point and hands out snapshots
//! without their data.

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

#[derive(Default)]
pub struct Store {
    hs: HardState,
    cs: ConfState,
    /// Index 0: no snapshot yet (the log starts at 1).
    snap: Snapshot,
    /// Contiguous, the first one at `snap.index + 1`.
    entries: Vec<Entry>,
}

impl Store {
    pub fn new(voters: &[u64]) -> Store {
        let mut s = Store {
            cs: ConfState::from((voters.to_vec(), Vec::<u64>::new())),
            ..Default::default()
        };
        s.snap.mut_metadata().set_conf_state(s.cs.clone());
        s
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hs
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hs = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hs.commit = commit;
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snap.get_metadata().index
    }

    pub fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    pub fn last(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// The entries after the snapshot.
    pub fn entries_after_snapshot(&self) -> &[Entry] {
        &self.entries
    }

    /// Appends entries, replacing any from the first one's index on (Raft
    /// truncating a follower's divergent tail).
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else {
            return;
        };
        let from = first.index;
        if from <= self.snapshot_index() {
            // Older than the snapshot: keep only what follows it.
            let skip = (self.snapshot_index() + 1 - from) as usize;
            if skip < ents.len() {
                self.entries.clear();
                self.entries.extend_from_slice(&ents[skip..]);
            }
            return;
        }
        let keep = (from - self.first()) as usize;
        self.entries.truncate(keep.min(self.entries.len()));
        self.entries.extend_from_slice(ents);
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, snap: Snapshot) {
        let meta = snap.get_metadata();
        let index = meta.index;
        if index <= self.snapshot_index() {
            return;
        }
        // Keep entries after the snapshot that agree with it.
        let keep_from = if index < self.last() && self.term_of(index) == Some(meta.term) {
            (index + 1 - self.first()) as usize
        } else {
            self.entries.len()
        };
        self.entries.drain(..keep_from);
        if self.entries.is_empty() {
            // nothing after it
        }
        self.hs.term = self.hs.term.max(meta.term);
        self.hs.commit = self.hs.commit.max(index);
        self.cs = meta.get_conf_state().clone();
        self.snap = snap;
    }

    /// Compacts the log up to `index` (applied) into a snapshot with `data`.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Option<&Snapshot> {
        if index <= self.snapshot_index() || index > self.last() {
            return None;
        }
        let term = self.term_of(index)?;
        let n = (index + 1 - self.first()) as usize;
        self.entries.drain(..n);
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.cs.clone());
        snap.data = data;
        self.snap = snap;
        Some(&self.snap)
    }

    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snap
    }

    fn term_of(&self, idx: u64) -> Option<u64> {
        if idx == self.snapshot_index() {
            return Some(self.snap.get_metadata().term);
        }
        if idx < self.first() || idx > self.last() {
            return None;
        }
        Some(self.entries[(idx - self.first()) as usize].term)
    }
}

impl Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hs.clone(), self.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index || self.snapshot_index() == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snap.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_and_compaction_keeps_the_term() {
        let mut s = Store::new(&[1, 2, 3]);
        s.append(&[e(1, 1), e(2, 1), e(3, 1)]);
        assert_eq!((s.first(), s.last()), (1, 3));
        s.append(&[e(3, 2), e(4, 2)]);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.last(), 4);
        s.compact(3, b"state".to_vec()).unwrap();
        assert_eq!((s.first(), s.last()), (4, 4));
        assert_eq!(s.term(3).unwrap(), 2, "the compaction point's term");
        assert!(s.term(2).is_err());
        assert!(
            s.entries(3, 5, None, GetEntriesContext::empty(false))
                .is_err()
        );
        assert_eq!(
            s.entries(4, 5, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
        let snap = s.snapshot(3, 2).unwrap();
        assert_eq!(snap.data, b"state");
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn a_snapshot_from_the_leader_replaces_the_log() {
        let mut s = Store::new(&[1, 2, 3]);
        s.append(&[e(1, 1), e(2, 1)]);
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        s.apply_snapshot(snap);
        assert_eq!((s.first(), s.last()), (11, 10));
        assert_eq!(s.term(10).unwrap(), 3);
        assert_eq!(s.hard_state().commit, 10);
        s.append(&[e(11, 3)]);
        assert_eq!(s.last(), 11);
    }
}
