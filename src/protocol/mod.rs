//! The dflockd wire protocol: bytes in, typed requests out; typed replies in,
//! bytes out. Nothing here knows about sockets, time or lock state.
//!
//! A request is three `\n`-terminated lines (`command`, `key`, `arg`); a reply
//! is one line. [`frame`] finds request boundaries in a connection's buffered
//! input, [`request`] turns a frame into a [`Request`], and [`reply`] writes a
//! [`Reply`] into an output buffer without allocating.

pub mod frame;
pub mod reply;
pub mod request;
mod token;

pub use frame::{Frame, FrameDecoder, FrameError};
pub use reply::{Reply, encode_reply};
pub use request::{Kind, ParseError, Request, parse_request};
pub use token::Token;
