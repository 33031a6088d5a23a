//! Typed requests and the parse-level validation of a frame's three lines.

use super::frame::Frame;
use crate::core::signals::{validate_channel, validate_pattern};

/// Whether a command came in its lock form (`l`, `r`, ...) or its semaphore
/// form (`sl`, `sr`, ...). Both act on the same resources; the kind only
/// decides how the limit is given and how `stats` names a new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Lock,
    Semaphore,
}

/// A validated request. Strings borrow from the connection's read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `l key "<timeout> [<lease>]"`, `sl key "<timeout> <limit> [<lease>]"`.
    Acquire {
        key: &'a str,
        timeout_s: u64,
        limit: u64,
        lease_s: Option<u64>,
        kind: Kind,
    },
    /// `r key <token>`, `sr key <token>`.
    Release {
        key: &'a str,
        token: &'a str,
    },
    /// `n key "<token> [<lease>]"`, `sn key "<token> [<lease>]"`.
    Renew {
        key: &'a str,
        token: &'a str,
        lease_s: Option<u64>,
    },
    /// `e key "[<lease>]"`, `se key "<limit> [<lease>]"`.
    Enqueue {
        key: &'a str,
        limit: u64,
        lease_s: Option<u64>,
        kind: Kind,
    },
    /// `w key <timeout>`, `sw key <timeout>`.
    Wait {
        key: &'a str,
        timeout_s: u64,
    },
    Ping,
    Stats,
    /// `auth _ <token>`; the token may be up to 64 KiB and is kept verbatim
    /// apart from surrounding whitespace.
    Auth {
        token: &'a [u8],
    },
    /// `listen <pattern> <group>`; an empty group is a plain subscription.
    Listen {
        pattern: &'a str,
        group: &'a str,
    },
    /// `unlisten <pattern> <group>`.
    Unlisten {
        pattern: &'a str,
        group: &'a str,
    },
    /// `signal <channel> <payload>`: the payload is the whole arg line.
    Signal {
        channel: &'a str,
        payload: &'a str,
    },
}

impl Request<'_> {
    /// The command's wire name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Acquire {
                kind: Kind::Lock, ..
            } => "l",
            Request::Acquire { .. } => "sl",
            Request::Release { .. } => "r",
            Request::Renew { .. } => "n",
            Request::Enqueue {
                kind: Kind::Lock, ..
            } => "e",
            Request::Enqueue { .. } => "se",
            Request::Wait { .. } => "w",
            Request::Ping => "ping",
            Request::Stats => "stats",
            Request::Auth { .. } => "auth",
            Request::Listen { .. } => "listen",
            Request::Unlisten { .. } => "unlisten",
            Request::Signal { .. } => "signal",
        }
    }
}

/// Why a complete frame was rejected. The connection stays usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    UnknownCommand,
    InvalidUtf8,
    BadKey,
    /// Wrong number of whitespace-separated fields in the arg line.
    ArgCount,
    /// A field that should be a non-negative integer is not one.
    NotANumber,
    /// Above [`MAX_NUMBER`].
    NumberTooLarge,
    /// A lease or limit of zero.
    Zero,
    /// A malformed `listen` pattern or a `signal` channel with a wildcard.
    BadSubject,
    /// A `signal` payload that is empty or only whitespace.
    EmptyPayload,
}

/// Largest number accepted in any numeric field (seconds that still fit in
/// a signed 64-bit count of nanoseconds).
pub const MAX_NUMBER: u64 = 9_223_372_036;

/// Validates a frame (whose ranges index `buf`) into a request.
pub fn parse_request<'a>(buf: &'a [u8], frame: &Frame) -> Result<Request<'a>, ParseError> {
    let command = &buf[frame.command.clone()];
    let key_bytes = &buf[frame.key.clone()];
    let arg_bytes = &buf[frame.arg.clone()];
    // Auth's token is compared as bytes and never needs to be text.
    if command == b"auth" {
        return Ok(Request::Auth {
            token: arg_bytes.trim_ascii(),
        });
    }
    let key = std::str::from_utf8(key_bytes).map_err(|_| ParseError::InvalidUtf8)?;
    let arg = std::str::from_utf8(arg_bytes).map_err(|_| ParseError::InvalidUtf8)?;
    match command {
        b"listen" | b"unlisten" => {
            let pattern = valid_key(key)?;
            validate_pattern(pattern).map_err(|_| ParseError::BadSubject)?;
            let group = arg.trim();
            if group.chars().any(char::is_whitespace) {
                return Err(ParseError::ArgCount);
            }
            return Ok(if command == b"listen" {
                Request::Listen { pattern, group }
            } else {
                Request::Unlisten { pattern, group }
            });
        }
        b"signal" => {
            let channel = valid_key(key)?;
            validate_channel(channel).map_err(|_| ParseError::BadSubject)?;
            if arg.trim().is_empty() {
                return Err(ParseError::EmptyPayload);
            }
            return Ok(Request::Signal {
                channel,
                payload: arg,
            });
        }
        _ => {}
    }
    let mut fields = Fields::split(arg)?;
    let req = match command {
        b"ping" => Request::Ping,
        b"stats" => Request::Stats,
        b"l" | b"sl" => {
            let kind = kind_of(command);
            let key = valid_key(key)?;
            let timeout_s = number(fields.next())?;
            let limit = match kind {
                Kind::Lock => 1,
                Kind::Semaphore => positive(fields.next())?,
            };
            let lease_s = fields.optional_positive()?;
            fields.end()?;
            Request::Acquire {
                key,
                timeout_s,
                limit,
                lease_s,
                kind,
            }
        }
        b"r" | b"sr" => {
            let key = valid_key(key)?;
            let token = fields.next().ok_or(ParseError::ArgCount)?;
            fields.end()?;
            Request::Release { key, token }
        }
        b"n" | b"sn" => {
            let key = valid_key(key)?;
            let token = fields.next().ok_or(ParseError::ArgCount)?;
            let lease_s = fields.optional_positive()?;
            fields.end()?;
            Request::Renew {
                key,
                token,
                lease_s,
            }
        }
        b"e" | b"se" => {
            let kind = kind_of(command);
            let key = valid_key(key)?;
            let limit = match kind {
                Kind::Lock => 1,
                Kind::Semaphore => positive(fields.next())?,
            };
            let lease_s = fields.optional_positive()?;
            fields.end()?;
            Request::Enqueue {
                key,
                limit,
                lease_s,
                kind,
            }
        }
        b"w" | b"sw" => {
            let key = valid_key(key)?;
            let timeout_s = number(fields.next())?;
            fields.end()?;
            Request::Wait { key, timeout_s }
        }
        _ => return Err(ParseError::UnknownCommand),
    };
    Ok(req)
}

fn kind_of(command: &[u8]) -> Kind {
    if command.first() == Some(&b's') {
        Kind::Semaphore
    } else {
        Kind::Lock
    }
}

fn valid_key(key: &str) -> Result<&str, ParseError> {
    if key.is_empty() || key.chars().any(char::is_whitespace) {
        Err(ParseError::BadKey)
    } else {
        Ok(key)
    }
}

/// Whitespace-separated fields of an arg line. At most four fields are ever
/// meaningful, so they are kept in a fixed array (no allocation).
struct Fields<'a> {
    items: [&'a str; 4],
    len: usize,
    pos: usize,
}

impl<'a> Fields<'a> {
    fn split(arg: &'a str) -> Result<Self, ParseError> {
        let mut f = Fields {
            items: [""; 4],
            len: 0,
            pos: 0,
        };
        for item in arg.split_whitespace() {
            if f.len == f.items.len() {
                return Err(ParseError::ArgCount);
            }
            f.items[f.len] = item;
            f.len += 1;
        }
        Ok(f)
    }

    fn next(&mut self) -> Option<&'a str> {
        let item = (self.pos < self.len).then(|| self.items[self.pos]);
        self.pos += 1;
        item
    }

    fn optional_positive(&mut self) -> Result<Option<u64>, ParseError> {
        match self.next() {
            None => Ok(None),
            some => positive(some).map(Some),
        }
    }

    fn end(&self) -> Result<(), ParseError> {
        if self.pos >= self.len {
            Ok(())
        } else {
            Err(ParseError::ArgCount)
        }
    }
}

fn number(field: Option<&str>) -> Result<u64, ParseError> {
    let s = field.ok_or(ParseError::ArgCount)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::NotANumber);
    }
    // Leading zeros are allowed; anything longer than 20 digits overflows.
    let v = s.parse::<u64>().map_err(|_| ParseError::NumberTooLarge)?;
    if v > MAX_NUMBER {
        return Err(ParseError::NumberTooLarge);
    }
    Ok(v)
}

fn positive(field: Option<&str>) -> Result<u64, ParseError> {
    match number(field)? {
        0 => Err(ParseError::Zero),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrameDecoder;

    fn parse(input: &str) -> Result<Request<'_>, ParseError> {
        parse_bytes(input.as_bytes())
    }

    fn parse_bytes(input: &[u8]) -> Result<Request<'_>, ParseError> {
        let frame = FrameDecoder::new().decode(input).unwrap().unwrap();
        assert_eq!(frame.len, input.len());
        parse_request(input, &frame)
    }

    use Kind::*;
    use ParseError::*;

    #[test]
    fn table() {
        let cases: &[(&str, Result<Request<'static>, ParseError>)] = &[
            (
                "l\nk\n10\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 10,
                    limit: 1,
                    lease_s: None,
                    kind: Lock,
                }),
            ),
            (
                "l\nk\n10 5\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 10,
                    limit: 1,
                    lease_s: Some(5),
                    kind: Lock,
                }),
            ),
            (
                "l\nk\n  0   7 \n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 0,
                    limit: 1,
                    lease_s: Some(7),
                    kind: Lock,
                }),
            ),
            (
                "l\nk\n9223372036\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: MAX_NUMBER,
                    limit: 1,
                    lease_s: None,
                    kind: Lock,
                }),
            ),
            ("l\nk\n9223372037\n", Err(NumberTooLarge)),
            ("l\nk\n99999999999999999999999\n", Err(NumberTooLarge)),
            ("l\nk\n-1\n", Err(NotANumber)),
            ("l\nk\n+1\n", Err(NotANumber)),
            ("l\nk\n1.5\n", Err(NotANumber)),
            ("l\nk\nabc\n", Err(NotANumber)),
            ("l\nk\n\n", Err(ArgCount)),
            ("l\nk\n1 2 3\n", Err(ArgCount)),
            ("l\nk\n1 0\n", Err(Zero)),
            ("l\n\n1\n", Err(BadKey)),
            ("l\na b\n1\n", Err(BadKey)),
            ("l\na\tb\n1\n", Err(BadKey)),
            ("l\nk\u{3000}x\n1\n", Err(BadKey)),
            (
                "l\nключ\n1\n",
                Ok(Request::Acquire {
                    key: "ключ",
                    timeout_s: 1,
                    limit: 1,
                    lease_s: None,
                    kind: Lock,
                }),
            ),
            (
                "sl\nk\n5 3\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 5,
                    limit: 3,
                    lease_s: None,
                    kind: Semaphore,
                }),
            ),
            (
                "sl\nk\n5 3 9\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 5,
                    limit: 3,
                    lease_s: Some(9),
                    kind: Semaphore,
                }),
            ),
            ("sl\nk\n5\n", Err(ArgCount)),
            ("sl\nk\n5 0\n", Err(Zero)),
            ("sl\nk\n5 3 9 1\n", Err(ArgCount)),
            (
                "r\nk\ntok\n",
                Ok(Request::Release {
                    key: "k",
                    token: "tok",
                }),
            ),
            (
                "sr\nk\ntok\n",
                Ok(Request::Release {
                    key: "k",
                    token: "tok",
                }),
            ),
            ("r\nk\n\n", Err(ArgCount)),
            ("r\nk\na b\n", Err(ArgCount)),
            (
                "n\nk\ntok\n",
                Ok(Request::Renew {
                    key: "k",
                    token: "tok",
                    lease_s: None,
                }),
            ),
            (
                "sn\nk\ntok 60\n",
                Ok(Request::Renew {
                    key: "k",
                    token: "tok",
                    lease_s: Some(60),
                }),
            ),
            ("n\nk\ntok 0\n", Err(Zero)),
            (
                "e\nk\n\n",
                Ok(Request::Enqueue {
                    key: "k",
                    limit: 1,
                    lease_s: None,
                    kind: Lock,
                }),
            ),
            (
                "e\nk\n20\n",
                Ok(Request::Enqueue {
                    key: "k",
                    limit: 1,
                    lease_s: Some(20),
                    kind: Lock,
                }),
            ),
            ("e\nk\n20 1\n", Err(ArgCount)),
            (
                "se\nk\n3\n",
                Ok(Request::Enqueue {
                    key: "k",
                    limit: 3,
                    lease_s: None,
                    kind: Semaphore,
                }),
            ),
            (
                "se\nk\n3 20\n",
                Ok(Request::Enqueue {
                    key: "k",
                    limit: 3,
                    lease_s: Some(20),
                    kind: Semaphore,
                }),
            ),
            ("se\nk\n\n", Err(ArgCount)),
            (
                "w\nk\n10\n",
                Ok(Request::Wait {
                    key: "k",
                    timeout_s: 10,
                }),
            ),
            (
                "sw\nk\n0\n",
                Ok(Request::Wait {
                    key: "k",
                    timeout_s: 0,
                }),
            ),
            ("w\nk\n\n", Err(ArgCount)),
            ("ping\n_\n\n", Ok(Request::Ping)),
            ("ping\n\n\n", Ok(Request::Ping)),
            ("stats\n_\n_\n", Ok(Request::Stats)),
            (
                "auth\n_\n secret \n",
                Ok(Request::Auth { token: b"secret" }),
            ),
            (
                "listen\na.*\n\n",
                Ok(Request::Listen {
                    pattern: "a.*",
                    group: "",
                }),
            ),
            (
                "listen\na.>\n g1 \n",
                Ok(Request::Listen {
                    pattern: "a.>",
                    group: "g1",
                }),
            ),
            (
                "unlisten\na.b\ng\n",
                Ok(Request::Unlisten {
                    pattern: "a.b",
                    group: "g",
                }),
            ),
            ("listen\na.>.b\n\n", Err(BadSubject)),
            ("listen\na*\n\n", Err(BadSubject)),
            ("listen\na..b\n\n", Err(BadSubject)),
            ("listen\n\n\n", Err(BadKey)),
            ("listen\na\ng h\n", Err(ArgCount)),
            (
                "signal\na.b\nhello  world \n",
                Ok(Request::Signal {
                    channel: "a.b",
                    payload: "hello  world ",
                }),
            ),
            ("signal\na.*\nx\n", Err(BadSubject)),
            ("signal\na.b\n   \n", Err(EmptyPayload)),
            ("signal\na.b\n\n", Err(EmptyPayload)),
            ("x\nk\n1\n", Err(UnknownCommand)),
            ("L\nk\n1\n", Err(UnknownCommand)),
            ("\n\n\n", Err(UnknownCommand)),
            (
                "l\r\nk\r\n3\r\n",
                Ok(Request::Acquire {
                    key: "k",
                    timeout_s: 3,
                    limit: 1,
                    lease_s: None,
                    kind: Lock,
                }),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input), want, "input {input:?}");
        }
    }

    #[test]
    fn invalid_utf8_and_nul() {
        assert_eq!(parse_bytes(b"l\n\xff\xfe\n1\n"), Err(InvalidUtf8));
        assert_eq!(parse_bytes(b"l\nk\n\xc3\n"), Err(InvalidUtf8));
        assert_eq!(parse_bytes(b"l\0\nk\n1\n"), Err(UnknownCommand));
        assert_eq!(parse_bytes(b"l\nk\x00\n1\n").map(|_| ()), Ok(()));
    }
}
