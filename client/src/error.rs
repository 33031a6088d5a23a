//! The client's error type: one variant per failing protocol status, plus
//! the ways a connection can fail before or between replies.

use std::fmt;
use std::io;

/// Everything a call can fail with.
///
/// The server's statuses map one to one onto variants
/// ([`Error::from_status`], [`Error::status`]); the successful statuses
/// (`ok`, `acquired`, `queued`) are the `Ok` values of the calls.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `timeout`: the acquire or wait ran out before a grant.
    Timeout,
    /// `error`: the server refused the request: the token does not hold the
    /// key (or its lease already ran out), the request was malformed, or the
    /// server has no auth token configured and got `auth`.
    Refused,
    /// `error_auth`: the auth token was missing or wrong.
    Auth,
    /// `error_max_locks`: the server's key cap, or this connection's cap on
    /// holdings, is reached.
    MaxLocks,
    /// `error_max_waiters`: the key's queue is full.
    MaxWaiters,
    /// `error_limit_mismatch`: the key exists with another holder limit (a
    /// lock is a semaphore of limit 1).
    LimitMismatch,
    /// `error_not_enqueued`: `wait` without a matching `enqueue`.
    NotEnqueued,
    /// `error_already_enqueued`: `enqueue` twice on one key.
    AlreadyEnqueued,
    /// `error_lease_expired`: the grant made while enqueued ran out before
    /// `wait` collected it.
    LeaseExpired,
    /// `error_draining`: the server is shutting down and takes no new work.
    Draining,
    /// `error_unavailable`: a cluster node could not reach a leader in time.
    Unavailable,
    /// An argument the protocol cannot carry (an empty key, whitespace in a
    /// key, a newline in a payload, a line over its limit). Nothing was sent.
    InvalidInput(String),
    /// The peer answered something that is not the dflockd protocol.
    Protocol(String),
    /// No address of the server could be reached; `last` is the last
    /// attempt's error.
    Unreachable {
        /// The addresses tried, in order.
        addrs: Vec<String>,
        /// Why the last one failed.
        last: Box<Error>,
    },
    /// The TLS set-up (certificates, server name) or handshake failed.
    Tls(String),
    /// The connection broke (or a reply did not come in time). The client
    /// must [`reconnect`](crate::Client::reconnect) before its next call;
    /// server-side state tied to the old connection (waiters, two-phase
    /// entries, subscriptions, and holdings unless the server keeps them)
    /// is gone.
    Io(io::Error),
    /// A call on a client whose connection broke earlier.
    NotConnected,
}

impl Error {
    /// The error a failing status line stands for (`None` for statuses that
    /// are not errors, and for text that is no status).
    pub fn from_status(status: &str) -> Option<Error> {
        Some(match status {
            "timeout" => Error::Timeout,
            "error" => Error::Refused,
            "error_auth" => Error::Auth,
            "error_max_locks" => Error::MaxLocks,
            "error_max_waiters" => Error::MaxWaiters,
            "error_limit_mismatch" => Error::LimitMismatch,
            "error_not_enqueued" => Error::NotEnqueued,
            "error_already_enqueued" => Error::AlreadyEnqueued,
            "error_lease_expired" => Error::LeaseExpired,
            "error_draining" => Error::Draining,
            "error_unavailable" => Error::Unavailable,
            _ => return None,
        })
    }

    /// The protocol status of an error the server sent, `None` for errors
    /// raised by the client itself.
    pub fn status(&self) -> Option<&'static str> {
        Some(match self {
            Error::Timeout => "timeout",
            Error::Refused => "error",
            Error::Auth => "error_auth",
            Error::MaxLocks => "error_max_locks",
            Error::MaxWaiters => "error_max_waiters",
            Error::LimitMismatch => "error_limit_mismatch",
            Error::NotEnqueued => "error_not_enqueued",
            Error::AlreadyEnqueued => "error_already_enqueued",
            Error::LeaseExpired => "error_lease_expired",
            Error::Draining => "error_draining",
            Error::Unavailable => "error_unavailable",
            _ => return None,
        })
    }

    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout)
    }

    /// True when the connection is unusable: it broke, was never made, or
    /// the peer spoke something else. Such a client must reconnect.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Error::Io(_)
                | Error::NotConnected
                | Error::Unreachable { .. }
                | Error::Protocol(_)
                | Error::Tls(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Timeout => f.write_str("timed out waiting for the grant"),
            Error::Refused => f.write_str("refused by the server (not held, or lease expired)"),
            Error::Auth => f.write_str("authentication failed (missing or wrong auth token)"),
            Error::MaxLocks => f.write_str("too many locks (server or connection cap reached)"),
            Error::MaxWaiters => f.write_str("too many waiters on this key"),
            Error::LimitMismatch => f.write_str("the key exists with a different holder limit"),
            Error::NotEnqueued => f.write_str("wait without a matching enqueue"),
            Error::AlreadyEnqueued => f.write_str("already enqueued on this key"),
            Error::LeaseExpired => f.write_str("the lease expired before wait collected it"),
            Error::Draining => f.write_str("the server is shutting down"),
            Error::Unavailable => f.write_str("the cluster has no reachable leader"),
            Error::InvalidInput(why) => write!(f, "invalid argument: {why}"),
            Error::Protocol(what) => write!(f, "protocol error: {what}"),
            Error::Unreachable { addrs, last } => {
                write!(f, "cannot reach {}: {last}", addrs.join(", "))
            }
            Error::Tls(why) => write!(f, "TLS: {why}"),
            Error::Io(e) => write!(f, "connection: {e}"),
            Error::NotConnected => {
                f.write_str("not connected (an earlier call broke the connection)")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Unreachable { last, .. } => Some(last.as_ref()),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// The client's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_status_round_trips() {
        for s in [
            "timeout",
            "error",
            "error_auth",
            "error_max_locks",
            "error_max_waiters",
            "error_limit_mismatch",
            "error_not_enqueued",
            "error_already_enqueued",
            "error_lease_expired",
            "error_draining",
            "error_unavailable",
        ] {
            let e = Error::from_status(s).unwrap_or_else(|| panic!("{s} not mapped"));
            assert_eq!(e.status(), Some(s));
        }
        for s in ["ok", "acquired", "queued", "sig", "", "errors"] {
            assert!(Error::from_status(s).is_none(), "{s}");
        }
    }
}
