//! Framing of peer links.
//!
//! ```text
//! frame   = len u32 LE (kind + payload) | kind u8 | payload
//!   0 hello    magic "DFLKPEER" | version u8 (1) | cluster id u64 | node id u64 | settings u64 | has state u8 | proof_len u16 | proof
//!   1 raft     a raft-rs message (protobuf)
//!   2 forward  commands for the leader (see `command`)
//!   3 deliver  conn u64 | a pushed `sig` line for that connection
//!   4 ping     stamp u64: the sender's clock (ms), every heartbeat interval
//!   5 echo     stamp u64: the last ping stamp received from the receiver
//! ```
//!
//! Pings keep every link busy, so that a link whose packets stopped getting
//! through is noticed; echoes tell a node that the leader hears it (see
//! `Node::leader_contact_ms`).
//!
//! Each node dials every other node and only sends on the connection it
//! dialled; what it receives comes on connections the others dialled. The
//! first frame of a connection is the dialler's hello: a wrong cluster id,
//! an unknown node or a wrong proof of the auth token closes it.

/// Largest frame accepted after the hello.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest hello (the proof is the auth token, at most 64 KiB).
pub const MAX_HELLO: usize = 8 + 1 + 8 + 8 + 8 + 1 + 2 + 65_535 + 1;
const MAGIC: &[u8; 8] = b"DFLKPEER";
const VERSION: u8 = 1;

const KIND_HELLO: u8 = 0;
const KIND_RAFT: u8 = 1;
const KIND_FORWARD: u8 = 2;
const KIND_DELIVER: u8 = 3;
const KIND_PING: u8 = 4;
const KIND_ECHO: u8 = 5;

/// One decoded frame, borrowing from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello {
        cluster_id: u64,
        node: u64,
        /// A digest of the settings that decide how commands apply (they
        /// must be the same on every node).
        settings: u64,
        /// The sender has a Raft log or term (it is not a new, empty node).
        has_state: bool,
        proof: &'a [u8],
    },
    Raft(&'a [u8]),
    Forward(&'a [u8]),
    Deliver {
        conn: u64,
        line: &'a [u8],
    },
    Ping(u64),
    Echo(u64),
}

/// Why a peer's bytes cannot be framed: the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    TooLarge(usize),
    Empty,
    UnknownKind(u8),
    BadHello,
    Truncated,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::TooLarge(n) => write!(f, "frame of {n} bytes"),
            WireError::Empty => write!(f, "empty frame"),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::BadHello => write!(f, "not a dflockd peer hello"),
            WireError::Truncated => write!(f, "truncated frame body"),
        }
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until it is all
/// there, else the frame and its length. `max` bounds the frame (use
/// [`MAX_HELLO`] before the hello has been accepted).
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    if len > max {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[5..4 + len];
    let frame = match buf[4] {
        KIND_HELLO => hello(body)?,
        KIND_RAFT => Frame::Raft(body),
        KIND_FORWARD => Frame::Forward(body),
        KIND_DELIVER => {
            if body.len() < 8 {
                return Err(WireError::Truncated);
            }
            Frame::Deliver {
                conn: u64::from_le_bytes(body[..8].try_into().unwrap()),
                line: &body[8..],
            }
        }
        KIND_PING | KIND_ECHO => {
            let stamp: [u8; 8] = body.try_into().map_err(|_| WireError::Truncated)?;
            let stamp = u64::from_le_bytes(stamp);
            if buf[4] == KIND_PING {
                Frame::Ping(stamp)
            } else {
                Frame::Echo(stamp)
            }
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    Ok(Some((frame, 4 + len)))
}

fn hello(body: &[u8]) -> Result<Frame<'_>, WireError> {
    if body.len() < 36 || &body[..8] != MAGIC || body[8] != VERSION || body[33] > 1 {
        return Err(WireError::BadHello);
    }
    let cluster_id = u64::from_le_bytes(body[9..17].try_into().unwrap());
    let node = u64::from_le_bytes(body[17..25].try_into().unwrap());
    let settings = u64::from_le_bytes(body[25..33].try_into().unwrap());
    let has_state = body[33] == 1;
    let n = u16::from_le_bytes(body[34..36].try_into().unwrap()) as usize;
    let proof = body.get(36..36 + n).ok_or(WireError::BadHello)?;
    if 36 + n != body.len() {
        return Err(WireError::BadHello);
    }
    Ok(Frame::Hello {
        cluster_id,
        node,
        settings,
        has_state,
        proof,
    })
}

fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    at
}

fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// What a hello says.
#[derive(Clone, Copy, Debug)]
pub struct Hello<'a> {
    pub cluster_id: u64,
    pub node: u64,
    pub settings: u64,
    pub has_state: bool,
    pub proof: &'a [u8],
}

/// Appends a hello. The proof is at most 65,535 bytes.
pub fn encode_hello(out: &mut Vec<u8>, h: &Hello<'_>) {
    let Hello {
        cluster_id,
        node,
        settings,
        has_state,
        proof,
    } = *h;
    let at = begin(out, KIND_HELLO);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&cluster_id.to_le_bytes());
    out.extend_from_slice(&node.to_le_bytes());
    out.extend_from_slice(&settings.to_le_bytes());
    out.push(has_state as u8);
    let n = proof.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&proof[..n]);
    finish(out, at);
}

/// Appends a raft message.
pub fn encode_raft(out: &mut Vec<u8>, msg: &raft::prelude::Message) {
    use prost::Message as _;
    let at = begin(out, KIND_RAFT);
    // Encoding into a Vec cannot fail.
    let _ = msg.encode(out);
    finish(out, at);
}

/// Appends forwarded commands.
pub fn encode_forward(out: &mut Vec<u8>, cmds: &[u8]) {
    let at = begin(out, KIND_FORWARD);
    out.extend_from_slice(cmds);
    finish(out, at);
}

/// Appends a signal line for a connection of the receiving node.
pub fn encode_deliver(out: &mut Vec<u8>, conn: u64, line: &[u8]) {
    let at = begin(out, KIND_DELIVER);
    out.extend_from_slice(&conn.to_le_bytes());
    out.extend_from_slice(line);
    finish(out, at);
}

/// Appends a ping carrying the sender's clock.
pub fn encode_ping(out: &mut Vec<u8>, stamp: u64) {
    let at = begin(out, KIND_PING);
    out.extend_from_slice(&stamp.to_le_bytes());
    finish(out, at);
}

/// Appends the echo of a ping stamp.
pub fn encode_echo(out: &mut Vec<u8>, stamp: u64) {
    let at = begin(out, KIND_ECHO);
    out.extend_from_slice(&stamp.to_le_bytes());
    finish(out, at);
}

/// Decodes a raft message body.
pub fn decode_raft(body: &[u8]) -> Option<raft::prelude::Message> {
    use prost::Message as _;
    raft::prelude::Message::decode(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_arrive_in_pieces() {
        let mut buf = Vec::new();
        encode_hello(
            &mut buf,
            &Hello {
                cluster_id: 7,
                node: 2,
                settings: 5,
                has_state: true,
                proof: b"secret",
            },
        );
        let m = raft::prelude::Message {
            from: 2,
            to: 1,
            term: 9,
            ..Default::default()
        };
        encode_raft(&mut buf, &m);
        encode_forward(&mut buf, b"xyz");
        encode_deliver(&mut buf, 42, b"sig a b\n");
        encode_ping(&mut buf, 77);
        encode_echo(&mut buf, 78);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            // Every prefix of the next frame is "not yet".
            let (f, n) = decode(&buf[at..], MAX_FRAME)
                .unwrap()
                .expect("a whole frame");
            for cut in 0..n {
                assert_eq!(decode(&buf[at..at + cut], MAX_FRAME), Ok(None));
            }
            frames.push(f);
            at += n;
        }
        assert_eq!(
            frames[0],
            Frame::Hello {
                cluster_id: 7,
                node: 2,
                settings: 5,
                has_state: true,
                proof: b"secret"
            }
        );
        let Frame::Raft(body) = frames[1] else {
            panic!()
        };
        let back = decode_raft(body).unwrap();
        assert_eq!((back.from, back.to, back.term), (2, 1, 9));
        assert_eq!(frames[2], Frame::Forward(b"xyz"));
        assert_eq!(
            frames[3],
            Frame::Deliver {
                conn: 42,
                line: b"sig a b\n"
            }
        );
        assert_eq!(frames[4], Frame::Ping(77));
        assert_eq!(frames[5], Frame::Echo(78));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n", MAX_HELLO),
            Err(WireError::TooLarge(u32::from_le_bytes(*b"GET ") as usize))
        );
        assert_eq!(decode(&[0, 0, 0, 0], MAX_FRAME), Err(WireError::Empty));
        assert_eq!(
            decode(&[1, 0, 0, 0, 9], MAX_FRAME),
            Err(WireError::UnknownKind(9))
        );
        assert_eq!(
            decode(&[3, 0, 0, 0, 0, b'x', b'y'], MAX_FRAME),
            Err(WireError::BadHello)
        );
        assert_eq!(
            decode(&[3, 0, 0, 0, 3, 1, 2], MAX_FRAME),
            Err(WireError::Truncated)
        );
        let mut h = Vec::new();
        encode_hello(
            &mut h,
            &Hello {
                cluster_id: 1,
                node: 1,
                settings: 0,
                has_state: false,
                proof: b"t",
            },
        );
        h[4 + 1 + 8 + 1 + 24 + 1] = 200; // proof length past the end
        assert_eq!(decode(&h, MAX_HELLO), Err(WireError::BadHello));
        assert!(decode_raft(&[0xff, 0xff, 0xff]).is_none());
    }
}
