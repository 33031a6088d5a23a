//! What a Raft entry carries: a batch of commands, encoded by hand.
//!
//! ```text
//! batch   = version u8 (1) | now u64 | entropy u64 | command*
//! command = tag u8 | body
//!   1 request     origin | conn u64 | len u32 | frame bytes (the client's three lines)
//!   2 disconnect  origin | conn u64
//!   3 join        origin
//!   4 node lost   node u64 | incarnation u64
//! origin  = node u64 | incarnation u64 | seq u64
//! ```
//!
//! Integers are little-endian. A follower forwards its commands to the leader
//! in the same encoding (without the batch header), and the leader copies
//! them into the batch it proposes. Decoding borrows from the entry: applying
//! a request does not copy it.

/// The version byte that starts every batch.
pub const BATCH_VERSION: u8 = 1;
/// Bytes of the batch header.
pub const BATCH_HEADER: usize = 17;
/// The largest client frame a request command may carry.
pub const MAX_FRAME: usize = crate::protocol::frame::FRAME_MAX;

const TAG_REQUEST: u8 = 1;
const TAG_DISCONNECT: u8 = 2;
const TAG_JOIN: u8 = 3;
const TAG_NODE_LOST: u8 = 4;

/// Where a command comes from: a node, the life of its process
/// (`incarnation`) and its place in that node's sequence of commands.
/// Commands of one origin node are applied in `seq` order, each once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub node: u64,
    pub incarnation: u64,
    pub seq: u64,
}

/// One decoded command, borrowing its frame from the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// A client request, applied with `Core::handle`.
    Request {
        origin: Origin,
        conn: u64,
        frame: &'a [u8],
    },
    /// A client connection closed.
    Disconnect { origin: Origin, conn: u64 },
    /// A node process started: its earlier incarnation's connections are gone.
    Join { origin: Origin },
    /// The leader has not heard from `node` for the node-loss margin: its
    /// connections of that incarnation are treated as closed.
    NodeLost { node: u64, incarnation: u64 },
}

impl Command<'_> {
    /// The origin of a command that has one.
    pub fn origin(&self) -> Option<Origin> {
        match *self {
            Command::Request { origin, .. }
            | Command::Disconnect { origin, .. }
            | Command::Join { origin } => Some(origin),
            Command::NodeLost { .. } => None,
        }
    }

    /// Appends the command's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Command::Request {
                origin,
                conn,
                frame,
            } => {
                out.push(TAG_REQUEST);
                put_origin(out, origin);
                out.extend_from_slice(&conn.to_le_bytes());
                out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                out.extend_from_slice(frame);
            }
            Command::Disconnect { origin, conn } => {
                out.push(TAG_DISCONNECT);
                put_origin(out, origin);
                out.extend_from_slice(&conn.to_le_bytes());
            }
            Command::Join { origin } => {
                out.push(TAG_JOIN);
                put_origin(out, origin);
            }
            Command::NodeLost { node, incarnation } => {
                out.push(TAG_NODE_LOST);
                out.extend_from_slice(&node.to_le_bytes());
                out.extend_from_slice(&incarnation.to_le_bytes());
            }
        }
    }
}

fn put_origin(out: &mut Vec<u8>, o: Origin) {
    out.extend_from_slice(&o.node.to_le_bytes());
    out.extend_from_slice(&o.incarnation.to_le_bytes());
    out.extend_from_slice(&o.seq.to_le_bytes());
}

/// Why bytes are not a valid batch or command list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    BadVersion(u8),
    BadTag(u8),
    FrameTooLong(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated"),
            DecodeError::BadVersion(v) => write!(f, "unknown batch version {v}"),
            DecodeError::BadTag(t) => write!(f, "unknown command tag {t}"),
            DecodeError::FrameTooLong(n) => write!(f, "request frame of {n} bytes"),
        }
    }
}

/// The header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Cluster time (ms) stamped by the leader that proposed the batch.
    pub now: u64,
    /// Fresh randomness for the tokens granted while applying it.
    pub entropy: u64,
}

/// Starts a batch in `out` (which is cleared).
pub fn begin_batch(out: &mut Vec<u8>, header: BatchHeader) {
    out.clear();
    out.push(BATCH_VERSION);
    out.extend_from_slice(&header.now.to_le_bytes());
    out.extend_from_slice(&header.entropy.to_le_bytes());
}

/// Splits a batch into its header and its commands.
pub fn decode_batch(data: &[u8]) -> Result<(BatchHeader, Commands<'_>), DecodeError> {
    let mut r = Reader(data);
    let version = r.u8()?;
    if version != BATCH_VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let now = r.u64()?;
    let entropy = r.u64()?;
    Ok((BatchHeader { now, entropy }, Commands(r)))
}

/// Reads the `now` of a batch without decoding its commands (None for an
/// entry that is not a batch, such as the empty entry of a new leader).
pub fn batch_now(data: &[u8]) -> Option<u64> {
    decode_batch(data).ok().map(|(h, _)| h.now)
}

/// The commands of a batch or of a forwarded list, decoded one at a time.
pub struct Commands<'a>(Reader<'a>);

impl<'a> Commands<'a> {
    /// A forwarded command list (no batch header).
    pub fn new(data: &'a [u8]) -> Self {
        Commands(Reader(data))
    }

    /// Checks that every command decodes.
    pub fn validate(data: &[u8]) -> Result<usize, DecodeError> {
        let mut n = 0;
        for c in Commands::new(data) {
            c?;
            n += 1;
        }
        Ok(n)
    }
}

impl<'a> Iterator for Commands<'a> {
    type Item = Result<Command<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.0.is_empty() {
            return None;
        }
        let item = self.0.command();
        if item.is_err() {
            // Stop after the first error.
            self.0.0 = &[];
        }
        Some(item)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn origin(&mut self) -> Result<Origin, DecodeError> {
        Ok(Origin {
            node: self.u64()?,
            incarnation: self.u64()?,
            seq: self.u64()?,
        })
    }

    fn command(&mut self) -> Result<Command<'a>, DecodeError> {
        match self.u8()? {
            TAG_REQUEST => {
                let origin = self.origin()?;
                let conn = self.u64()?;
                let len = self.u32()? as usize;
                if len > MAX_FRAME {
                    return Err(DecodeError::FrameTooLong(len));
                }
                let frame = self.take(len)?;
                Ok(Command::Request {
                    origin,
                    conn,
                    frame,
                })
            }
            TAG_DISCONNECT => Ok(Command::Disconnect {
                origin: self.origin()?,
                conn: self.u64()?,
            }),
            TAG_JOIN => Ok(Command::Join {
                origin: self.origin()?,
            }),
            TAG_NODE_LOST => Ok(Command::NodeLost {
                node: self.u64()?,
                incarnation: self.u64()?,
            }),
            t => Err(DecodeError::BadTag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(seq: u64) -> Origin {
        Origin {
            node: 2,
            incarnation: 77,
            seq,
        }
    }

    #[test]
    fn batch_round_trip() {
        let mut buf = Vec::new();
        begin_batch(
            &mut buf,
            BatchHeader {
                now: 12345,
                entropy: 0xdead_beef,
            },
        );
        let cmds = [
            Command::Request {
                origin: origin(1),
                conn: (2 << 48) | 5,
                frame: b"l\nk\n10\n",
            },
            Command::Disconnect {
                origin: origin(2),
                conn: 9,
            },
            Command::Join { origin: origin(3) },
            Command::NodeLost {
                node: 3,
                incarnation: 4,
            },
        ];
        for c in &cmds {
            c.encode(&mut buf);
        }
        let (h, it) = decode_batch(&buf).unwrap();
        assert_eq!(h.now, 12345);
        assert_eq!(h.entropy, 0xdead_beef);
        let back: Vec<Command> = it.map(Result::unwrap).collect();
        assert_eq!(back, cmds);
        assert_eq!(batch_now(&buf), Some(12345));
        assert_eq!(batch_now(&[]), None);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        Command::Request {
            origin: origin(1),
            conn: 1,
            frame: b"sl\nk\n1 3\n",
        }
        .encode(&mut buf);
        Command::Join { origin: origin(2) }.encode(&mut buf);
        assert_eq!(Commands::validate(&buf), Ok(2));
        for cut in 1..buf.len() {
            let r = Commands::validate(&buf[..cut]);
            assert!(r.is_err() || cut == buf.len() - 25, "cut {cut}: {r:?}");
        }
        assert_eq!(Commands::validate(&[9]), Err(DecodeError::BadTag(9)));
        let mut huge = vec![TAG_REQUEST];
        huge.extend_from_slice(&[0; 32]);
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(
            Commands::validate(&huge),
            Err(DecodeError::FrameTooLong(_))
        ));
        assert!(matches!(
            decode_batch(&[2, 0, 0]),
            Err(DecodeError::BadVersion(2))
        ));
    }
}
