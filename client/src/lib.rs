//! A blocking client for the dflockd lock server.
//!
//! - [`Client`]: one connection, one method per protocol command (locks,
//!   semaphores, two-phase acquire, `stats`, signals).
//! - [`Lock`] and [`Semaphore`]: guards that renew their lease in a
//!   background thread, report a lost lease, and release on drop.
//! - [`Config`] and [`Servers`]: where the servers are (shards by CRC-32 of
//!   the key, as the Python and Go clients do; several addresses of one
//!   cluster), TLS ([`Tls`], rustls with ring) and the auth token.
//!
//! No async runtime: std sockets with timeouts. Errors are one enum,
//! [`Error`], with a variant per failing protocol status.
//!
//! ```no_run
//! use std::time::Duration;
//! use dflockd_client::{Config, GuardOptions, Lock};
//!
//! let cfg = Config::new("127.0.0.1:6388")?;
//! let lock = Lock::acquire(&cfg, "migrations", &GuardOptions::new().timeout(Duration::from_secs(60)))?;
//! // Pass the fence to the store you write to; it rejects stale holders.
//! let fence = lock.fence();
//! # let _ = fence;
//! lock.release()?;
//! # Ok::<(), dflockd_client::Error>(())
//! ```
#![warn(missing_docs)]

mod client;
mod config;
mod conn;
mod error;
mod guard;
mod shard;
mod stats;

pub use client::{Client, Enqueued, Grant, MAX_SECONDS, Signal, fence_of};
pub use config::{Config, DEFAULT_SERVER, Servers, Tls};
pub use error::{Error, Result};
pub use guard::{DEFAULT_KEEPALIVE, GuardOptions, Lock, LostReason, Semaphore};
pub use shard::{crc32, shard_index};
pub use stats::{ChannelStat, ClusterStat, IdleStat, LockStat, SemaphoreStat, Stats};
