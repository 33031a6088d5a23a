//! Replies and their wire encoding, written straight into a connection's
//! output buffer: no `format!`, no allocation beyond the buffer's own growth.

use super::token::{TOKEN_LEN, Token};

/// One reply line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    /// `ok <token> <lease_s>`: a grant from `l`, `sl`, `w`, `sw`.
    Granted {
        token: Token,
        lease_s: u64,
    },
    /// `acquired <token> <lease_s>`: `e`/`se` granted at once.
    Acquired {
        token: Token,
        lease_s: u64,
    },
    /// `ok <n>`: a renewal's lease in seconds.
    OkNumber(u64),
    /// `ok <json>`: the JSON is supplied separately by the caller.
    Stats,
    /// A pushed `sig <channel> <payload>` line, supplied separately by the
    /// caller; not an answer to the receiver's own request.
    Signal,
    Queued,
    Timeout,
    Error,
    ErrorAuth,
    ErrorMaxLocks,
    ErrorMaxWaiters,
    ErrorLimitMismatch,
    ErrorNotEnqueued,
    ErrorAlreadyEnqueued,
    ErrorLeaseExpired,
    ErrorDraining,
    /// Cluster mode: no leader could be reached in time.
    ErrorUnavailable,
}

impl Reply {
    /// The reply's status word.
    pub fn status(&self) -> &'static str {
        match self {
            Reply::Ok | Reply::Granted { .. } | Reply::OkNumber(_) | Reply::Stats => "ok",
            Reply::Signal => "sig",
            Reply::Acquired { .. } => "acquired",
            Reply::Queued => "queued",
            Reply::Timeout => "timeout",
            Reply::Error => "error",
            Reply::ErrorAuth => "error_auth",
            Reply::ErrorMaxLocks => "error_max_locks",
            Reply::ErrorMaxWaiters => "error_max_waiters",
            Reply::ErrorLimitMismatch => "error_limit_mismatch",
            Reply::ErrorNotEnqueued => "error_not_enqueued",
            Reply::ErrorAlreadyEnqueued => "error_already_enqueued",
            Reply::ErrorLeaseExpired => "error_lease_expired",
            Reply::ErrorDraining => "error_draining",
            Reply::ErrorUnavailable => "error_unavailable",
        }
    }
}

/// Appends `reply` and its newline to `out`. For [`Reply::Stats`], `body` is
/// the JSON; for [`Reply::Signal`] it is the whole line made by
/// [`encode_signal`]; it is ignored otherwise.
pub fn encode_reply(reply: &Reply, body: &[u8], out: &mut Vec<u8>) {
    if let Reply::Signal = reply {
        out.extend_from_slice(body);
        return;
    }
    out.extend_from_slice(reply.status().as_bytes());
    match *reply {
        Reply::Granted { token, lease_s } | Reply::Acquired { token, lease_s } => {
            let mut hex = [0u8; TOKEN_LEN];
            token.encode(&mut hex);
            out.push(b' ');
            out.extend_from_slice(&hex);
            out.push(b' ');
            push_u64(out, lease_s);
        }
        Reply::OkNumber(n) => {
            out.push(b' ');
            push_u64(out, n);
        }
        Reply::Stats => {
            out.push(b' ');
            out.extend_from_slice(body);
        }
        _ => {}
    }
    out.push(b'\n');
}

impl Reply {
    /// Whether this line is pushed rather than answering a request.
    pub fn is_push(&self) -> bool {
        matches!(self, Reply::Signal)
    }
}

/// Encodes the pushed line of a signal, once per publish.
pub fn encode_signal(channel: &str, payload: &str, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"sig ");
    out.extend_from_slice(channel.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.as_bytes());
    out.push(b'\n');
}

/// Appends the decimal form of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: Reply) -> String {
        let mut v = Vec::new();
        encode_reply(&r, b"{\"a\":1}", &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn table() {
        let t = Token(0x0000_0000_0000_00ff_0000_0000_0000_0001);
        let cases = [
            (Reply::Ok, "ok\n"),
            (
                Reply::Granted {
                    token: t,
                    lease_s: 33,
                },
                "ok 00000000000000ff0000000000000001 33\n",
            ),
            (
                Reply::Acquired {
                    token: t,
                    lease_s: 5,
                },
                "acquired 00000000000000ff0000000000000001 5\n",
            ),
            (Reply::OkNumber(0), "ok 0\n"),
            (Reply::OkNumber(u64::MAX), "ok 18446744073709551615\n"),
            (Reply::Stats, "ok {\"a\":1}\n"),
            (Reply::Queued, "queued\n"),
            (Reply::Timeout, "timeout\n"),
            (Reply::Error, "error\n"),
            (Reply::ErrorAuth, "error_auth\n"),
            (Reply::ErrorMaxLocks, "error_max_locks\n"),
            (Reply::ErrorMaxWaiters, "error_max_waiters\n"),
            (Reply::ErrorLimitMismatch, "error_limit_mismatch\n"),
            (Reply::ErrorNotEnqueued, "error_not_enqueued\n"),
            (Reply::ErrorAlreadyEnqueued, "error_already_enqueued\n"),
            (Reply::ErrorLeaseExpired, "error_lease_expired\n"),
            (Reply::ErrorDraining, "error_draining\n"),
        ];
        for (r, want) in cases {
            assert_eq!(enc(r), want);
        }
    }
}
