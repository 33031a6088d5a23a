//! Incremental framing: finds the three lines of a request in buffered input.
//!
//! A push parser in the manner of httparse: given the unconsumed bytes of a
//! connection it answers "a frame of N bytes", "need more" or a read-level
//! error, and never copies the input. It remembers how far it has scanned, so
//! input that trickles in a byte at a time costs O(n) overall, not O(n^2).

use std::ops::Range;

/// Longest ordinary line, before its `\n` (a trailing `\r` counts).
pub const LINE_MAX: usize = 256;
/// Longest `arg` line of `auth` and `signal`.
pub const LONG_LINE_MAX: usize = 64 * 1024;
/// The most bytes a single frame can occupy, newlines included.
pub const FRAME_MAX: usize = 2 * (LINE_MAX + 1) + LONG_LINE_MAX + 1;

/// A read-level error: the connection cannot be framed any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A line exceeded its limit before its newline arrived.
    LineTooLong,
}

/// One complete request: the byte ranges of its lines (without `\r\n`) in the
/// buffer handed to [`FrameDecoder::decode`], and its total length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: Range<usize>,
    pub key: Range<usize>,
    pub arg: Range<usize>,
    /// Bytes to consume from the front of the buffer.
    pub len: usize,
}

/// Framing state carried between reads of one connection.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    /// Offsets one past each newline found so far in the current frame.
    line_ends: [usize; 2],
    lines_found: u8,
    /// Bytes of the current line already scanned without finding a newline.
    scanned: usize,
    long_arg: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether part of a frame has been seen (a request is incomplete).
    pub fn in_progress(&self, buffered: usize) -> bool {
        buffered > 0
    }

    /// Looks for the next frame at the start of `buf`, which must begin at a
    /// frame boundary and be the same bytes (possibly extended) as on the
    /// previous call until a frame is returned. After `Ok(Some(frame))` the
    /// caller removes `frame.len` bytes from the front of its buffer.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<Frame>, FrameError> {
        loop {
            let line = self.lines_found as usize;
            let start = if line == 0 {
                0
            } else {
                self.line_ends[line - 1]
            };
            let limit = if line == 2 && self.long_arg {
                LONG_LINE_MAX
            } else {
                LINE_MAX
            };
            let from = start + self.scanned;
            // Never look further than the limit allows: an over-long line is
            // rejected as soon as it is known to be over-long.
            let window_end = buf.len().min(start + limit + 1);
            let found = buf[from.min(window_end)..window_end]
                .iter()
                .position(|&b| b == b'\n');
            let Some(pos) = found else {
                if buf.len() > start + limit {
                    return Err(FrameError::LineTooLong);
                }
                self.scanned = buf.len() - start;
                return Ok(None);
            };
            let nl = from + pos;
            self.scanned = 0;
            if line < 2 {
                self.line_ends[line] = nl + 1;
                self.lines_found += 1;
                if line == 0 {
                    let cmd = strip_cr(&buf[..nl]);
                    self.long_arg = cmd == b"auth" || cmd == b"signal";
                }
                continue;
            }
            let ends = self.line_ends;
            *self = FrameDecoder::default();
            return Ok(Some(Frame {
                command: trim_range(buf, 0, ends[0] - 1),
                key: trim_range(buf, ends[0], ends[1] - 1),
                arg: trim_range(buf, ends[1], nl),
                len: nl + 1,
            }));
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_range(buf: &[u8], start: usize, newline: usize) -> Range<usize> {
    if newline > start && buf[newline - 1] == b'\r' {
        start..newline - 1
    } else {
        start..newline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(buf: &'a [u8], f: &Frame) -> (&'a [u8], &'a [u8], &'a [u8]) {
        (
            &buf[f.command.clone()],
            &buf[f.key.clone()],
            &buf[f.arg.clone()],
        )
    }

    type Lines = (Vec<u8>, Vec<u8>, Vec<u8>);

    /// Decodes a whole stream fed in pieces of `step` bytes.
    fn decode_split(input: &[u8], step: usize) -> (Vec<Lines>, Option<FrameError>) {
        let mut d = FrameDecoder::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            buf.extend_from_slice(chunk);
            loop {
                match d.decode(&buf) {
                    Ok(Some(f)) => {
                        let (c, k, a) = parts(&buf, &f);
                        out.push((c.to_vec(), k.to_vec(), a.to_vec()));
                        buf.drain(..f.len);
                    }
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
            assert!(buf.len() <= FRAME_MAX, "buffered more than a frame");
        }
        (out, None)
    }

    fn v(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn table() {
        let long = "x".repeat(LINE_MAX);
        let too_long = "x".repeat(LINE_MAX + 1);
        let long_cr = format!("{}\r", "x".repeat(LINE_MAX - 1));
        let payload = "p".repeat(LONG_LINE_MAX);
        let cases: Vec<(String, Vec<Lines>, Option<FrameError>)> = vec![
            ("l\nk\n10\n".into(), vec![(v("l"), v("k"), v("10"))], None),
            (
                "l\r\nk\r\n10\r\n".into(),
                vec![(v("l"), v("k"), v("10"))],
                None,
            ),
            ("e\nk\n\n".into(), vec![(v("e"), v("k"), v(""))], None),
            ("e\nk\n\r\n".into(), vec![(v("e"), v("k"), v(""))], None),
            ("l\nk\n10".into(), vec![], None),
            (
                "l\nk\n1\nr\nk\nt\n".into(),
                vec![(v("l"), v("k"), v("1")), (v("r"), v("k"), v("t"))],
                None,
            ),
            (
                format!("l\n{long}\n1\n"),
                vec![(v("l"), v(&long), v("1"))],
                None,
            ),
            (
                format!("l\n{long_cr}\n1\n"),
                vec![(v("l"), v(&long[..LINE_MAX - 1]), v("1"))],
                None,
            ),
            (
                format!("l\n{too_long}\n1\n"),
                vec![],
                Some(FrameError::LineTooLong),
            ),
            (too_long.clone(), vec![], Some(FrameError::LineTooLong)),
            (
                format!("l\nk\n{too_long}\n"),
                vec![],
                Some(FrameError::LineTooLong),
            ),
            (
                format!("signal\nc\n{payload}\n"),
                vec![(v("signal"), v("c"), v(&payload))],
                None,
            ),
            (
                format!("auth\n_\n{payload}x\n"),
                vec![],
                Some(FrameError::LineTooLong),
            ),
            // Only the arg line of auth/signal may be long.
            (
                format!("signal\n{too_long}\nx\n"),
                vec![],
                Some(FrameError::LineTooLong),
            ),
            ("\n\n\n".into(), vec![(v(""), v(""), v(""))], None),
            ("l\0\nk\n1\n".into(), vec![(v("l\0"), v("k"), v("1"))], None),
        ];
        for (input, want, err) in cases {
            for step in [input.len().max(1), 1, 2, 3, 7, 64] {
                let (got, e) = decode_split(input.as_bytes(), step);
                assert_eq!(
                    got,
                    want,
                    "input {:?} step {step}",
                    &input[..input.len().min(40)]
                );
                assert_eq!(
                    e,
                    err,
                    "input {:?} step {step}",
                    &input[..input.len().min(40)]
                );
            }
        }
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let input = b"l\r\nkey1\r\n10 5\r\nr\nkey1\n0123456789abcdef0123456789abcdef\nping\n_\n\nstats\n_\n_\n";
        let (whole, e) = decode_split(input, input.len());
        assert!(e.is_none());
        assert_eq!(whole.len(), 4);
        for split in 1..input.len() {
            let mut d = FrameDecoder::new();
            let mut buf = input[..split].to_vec();
            let mut got = Vec::new();
            let mut fed_rest = false;
            loop {
                match d.decode(&buf).unwrap() {
                    Some(f) => {
                        let (c, k, a) = parts(&buf, &f);
                        got.push((c.to_vec(), k.to_vec(), a.to_vec()));
                        buf.drain(..f.len);
                    }
                    None if !fed_rest => {
                        buf.extend_from_slice(&input[split..]);
                        fed_rest = true;
                    }
                    None => break,
                }
            }
            assert_eq!(got, whole, "split at {split}");
        }
    }

    #[test]
    fn over_long_line_is_rejected_without_buffering_it_whole() {
        let mut d = FrameDecoder::new();
        let mut buf = Vec::new();
        let mut err = None;
        for _ in 0..(1 << 20) {
            buf.extend_from_slice(b"a");
            match d.decode(&buf) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("frame from garbage"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err, Some(FrameError::LineTooLong));
        assert_eq!(buf.len(), LINE_MAX + 1);
    }
}
