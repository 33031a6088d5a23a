//! Requests and replies: `parse_request` never panics on any frame; every
//! request it accepts, written back in wire form, parses to the same request;
//! every reply `encode_reply` writes reads back as the same reply; a token
//! reads back as the same token.
//!
//! Input: a byte stream of requests (the corpus is readable protocol text).
//! Its bytes also choose a reply and a token to round-trip.

#![no_main]

use dflockd::protocol::reply::encode_signal;
use dflockd::protocol::{FrameDecoder, Kind, Reply, Request, Token, encode_reply, parse_request};
use libfuzzer_sys::fuzz_target;

/// A field that ends in `\r` needs a `\r\n` terminator: one trailing `\r` is
/// stripped from every line.
fn line(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(field);
    if field.last() == Some(&b'\r') {
        out.push(b'\r');
    }
    out.push(b'\n');
}

fn opt(lease: Option<u64>) -> String {
    lease.map(|l| format!(" {l}")).unwrap_or_default()
}

/// The canonical wire form of a request.
fn encode_request(req: &Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let (cmd, key, arg): (&str, &str, Vec<u8>) = match *req {
        Request::Acquire {
            key,
            timeout_s,
            limit,
            lease_s,
            kind: Kind::Lock,
        } => {
            assert_eq!(limit, 1, "a lock form with limit {limit}");
            (
                "l",
                key,
                format!("{timeout_s}{}", opt(lease_s)).into_bytes(),
            )
        }
        Request::Acquire {
            key,
            timeout_s,
            limit,
            lease_s,
            kind: Kind::Semaphore,
        } => (
            "sl",
            key,
            format!("{timeout_s} {limit}{}", opt(lease_s)).into_bytes(),
        ),
        Request::Release { key, token } => ("r", key, token.as_bytes().to_vec()),
        Request::Renew {
            key,
            token,
            lease_s,
        } => ("n", key, format!("{token}{}", opt(lease_s)).into_bytes()),
        Request::Enqueue {
            key,
            limit,
            lease_s,
            kind: Kind::Lock,
        } => {
            assert_eq!(limit, 1, "a lock form with limit {limit}");
            ("e", key, opt(lease_s).trim_start().as_bytes().to_vec())
        }
        Request::Enqueue {
            key,
            limit,
            lease_s,
            kind: Kind::Semaphore,
        } => ("se", key, format!("{limit}{}", opt(lease_s)).into_bytes()),
        Request::Wait { key, timeout_s } => ("w", key, timeout_s.to_string().into_bytes()),
        Request::Ping => ("ping", "_", Vec::new()),
        Request::Stats => ("stats", "_", b"_".to_vec()),
        Request::Auth { token } => ("auth", "_", token.to_vec()),
        Request::Listen { pattern, group } => ("listen", pattern, group.as_bytes().to_vec()),
        Request::Unlisten { pattern, group } => ("unlisten", pattern, group.as_bytes().to_vec()),
        Request::Signal { channel, payload } => ("signal", channel, payload.as_bytes().to_vec()),
    };
    line(&mut out, cmd.as_bytes());
    line(&mut out, key.as_bytes());
    line(&mut out, &arg);
    out
}

/// Reads a reply line back; `None` if it is not one `encode_reply` writes.
fn decode_reply(s: &[u8], json: &[u8], signal: &[u8]) -> Option<Reply> {
    if s == signal {
        return Some(Reply::Signal);
    }
    let s = std::str::from_utf8(s.strip_suffix(b"\n")?).ok()?;
    let (status, rest) = s.split_once(' ').unwrap_or((s, ""));
    let grant = |rest: &str| -> Option<(Token, u64)> {
        let (t, l) = rest.split_once(' ')?;
        Some((Token::parse(t.as_bytes())?, l.parse().ok()?))
    };
    Some(match status {
        "ok" if rest.is_empty() && !s.contains(' ') => Reply::Ok,
        "ok" if rest.as_bytes() == json => Reply::Stats,
        "ok" if rest.contains(' ') => {
            let (token, lease_s) = grant(rest)?;
            Reply::Granted { token, lease_s }
        }
        "ok" => Reply::OkNumber(rest.parse().ok()?),
        "acquired" => {
            let (token, lease_s) = grant(rest)?;
            Reply::Acquired { token, lease_s }
        }
        _ if !rest.is_empty() => return None,
        "queued" => Reply::Queued,
        "timeout" => Reply::Timeout,
        "error" => Reply::Error,
        "error_auth" => Reply::ErrorAuth,
        "error_max_locks" => Reply::ErrorMaxLocks,
        "error_max_waiters" => Reply::ErrorMaxWaiters,
        "error_limit_mismatch" => Reply::ErrorLimitMismatch,
        "error_not_enqueued" => Reply::ErrorNotEnqueued,
        "error_already_enqueued" => Reply::ErrorAlreadyEnqueued,
        "error_lease_expired" => Reply::ErrorLeaseExpired,
        "error_draining" => Reply::ErrorDraining,
        _ => return None,
    })
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fn replies(data: &[u8]) {
    let token = Token(((u64_at(data, 1) as u128) << 64) | u64_at(data, 9) as u128);
    let n = u64_at(data, 17);
    let all = [
        Reply::Ok,
        Reply::Granted { token, lease_s: n },
        Reply::Acquired { token, lease_s: n },
        Reply::OkNumber(n),
        Reply::Stats,
        Reply::Signal,
        Reply::Queued,
        Reply::Timeout,
        Reply::Error,
        Reply::ErrorAuth,
        Reply::ErrorMaxLocks,
        Reply::ErrorMaxWaiters,
        Reply::ErrorLimitMismatch,
        Reply::ErrorNotEnqueued,
        Reply::ErrorAlreadyEnqueued,
        Reply::ErrorLeaseExpired,
        Reply::ErrorDraining,
    ];
    let reply = all[data.first().map_or(0, |&b| b as usize) % all.len()];
    let json = format!("{{\"n\":{n}}}").into_bytes();
    let mut signal = Vec::new();
    encode_signal("a.b", "payload with spaces", &mut signal);
    let mut out = Vec::new();
    let body: &[u8] = match reply {
        Reply::Signal => &signal,
        _ => &json,
    };
    encode_reply(&reply, body, &mut out);
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "{out:?}");
    assert_eq!(decode_reply(&out, &json, &signal), Some(reply), "{out:?}");
    assert!(!reply.status().is_empty());

    let mut hex = [0u8; 32];
    token.encode(&mut hex);
    assert_eq!(Token::parse(&hex), Some(token));
    if let Some(t) = data.get(..32).and_then(Token::parse) {
        t.encode(&mut hex);
        assert_eq!(&hex[..], &data[..32], "tokens have one spelling");
    }
}

fuzz_target!(|data: &[u8]| {
    replies(data);
    let mut d = FrameDecoder::new();
    let mut pos = 0;
    while let Ok(Some(frame)) = d.decode(&data[pos..]) {
        let buf = &data[pos..pos + frame.len];
        pos += frame.len;
        let Ok(req) = parse_request(buf, &frame) else {
            continue;
        };
        let wire = encode_request(&req);
        let mut d2 = FrameDecoder::new();
        let f2 = d2
            .decode(&wire)
            .unwrap_or_else(|e| panic!("{req:?} re-encoded as {wire:?}: {e:?}"))
            .unwrap_or_else(|| panic!("{req:?} re-encoded as {wire:?}: incomplete"));
        assert_eq!(f2.len, wire.len());
        assert_eq!(parse_request(&wire, &f2), Ok(req), "re-encoded as {wire:?}");
        assert!(!req.name().is_empty());
    }
});
