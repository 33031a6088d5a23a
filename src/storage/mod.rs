//! Durable state for cluster mode: the write-ahead log of Raft entries and
//! hard state, and the snapshot that bounds it. Plain files, checksummed
//! records, one `fdatasync` per loop turn.
//!
//! Why not raft-engine (TiKV's log store)? Measured here: it adds 44 crates
//! and about 0.5 MB to the stripped binary, compiles lz4 from C, starts a
//! metrics thread and a recovery thread pool, and forces the `log` crate's
//! compile-time level features on the whole build. A lock server's log is
//! small (snapshots bound it by the lock state) and written by one thread,
//! which a few hundred lines of append-only records serve.

mod crc;
pub mod wal;

pub use crc::crc32c;
