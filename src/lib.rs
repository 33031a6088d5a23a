//! dflockd: a single-threaded distributed lock server.
//!
//! Layers, each knowing only the ones below it:
//! - [`net`]: sockets, the `mio` event loop, connection buffers;
//! - [`protocol`]: bytes to typed requests and typed replies to bytes;
//! - [`core`]: the lock and semaphore state machine (pure, takes `now`);
//! - [`timer`]: the timer wheel;
//! - [`storage`]: the durable log and snapshots of cluster mode.
//!
//! [`config`] turns flags and environment into settings.

pub mod cluster;
pub mod config;
pub mod core;
pub mod net;
pub mod protocol;
pub mod storage;
pub mod timer;
