//! Framing: an arbitrary byte stream, fed to `FrameDecoder` whole and split
//! at many different points, must never panic, never leave more than
//! `FRAME_MAX` bytes buffered, and give the same frames and the same error as
//! a plain reference implementation of the framing rules, however it is cut.
//!
//! Input: the stream itself, so the corpus is readable protocol text. The
//! byte `0xff` followed by two bytes `b n` stands for `b` repeated
//! `(n + 1) * 300` times (while the stream is under a frame's worth), so
//! that lines longer than 64 KiB fit in a small input.

#![no_main]

use dflockd::protocol::frame::{FRAME_MAX, LINE_MAX, LONG_LINE_MAX};
use dflockd::protocol::{FrameDecoder, FrameError, parse_request};
use libfuzzer_sys::fuzz_target;

/// A frame as absolute byte ranges of the stream: command, key and arg
/// (each without its line end). Ranges, not copies, so that inputs with tens
/// of thousands of tiny frames stay cheap.
type Lines = [std::ops::Range<usize>; 3];

fn expand(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        // About two frames' worth at most: enough for every limit, cheap
        // enough to keep the fuzzer fast.
        if data[i] == 0xff && i + 2 < data.len() && out.len() < FRAME_MAX {
            let (b, n) = (data[i + 1], data[i + 2] as usize);
            out.extend(std::iter::repeat_n(b, (n + 1) * 300));
            i += 3;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The framing rules, written as plainly as possible.
fn reference(s: &[u8]) -> (Vec<Lines>, Option<FrameError>) {
    let mut frames = Vec::new();
    let mut pos = 0;
    loop {
        let mut lines: Vec<std::ops::Range<usize>> = Vec::with_capacity(3);
        let mut p = pos;
        for i in 0..3 {
            let long = i == 2 && matches!(&s[lines[0].clone()], b"auth" | b"signal");
            let limit = if long { LONG_LINE_MAX } else { LINE_MAX };
            match s[p..].iter().position(|&b| b == b'\n') {
                Some(n) if n <= limit => {
                    let len = strip_cr(&s[p..p + n]).len();
                    lines.push(p..p + len);
                    p += n + 1;
                }
                Some(_) => return (frames, Some(FrameError::LineTooLong)),
                None if s.len() - p > limit => return (frames, Some(FrameError::LineTooLong)),
                None => return (frames, None),
            }
        }
        frames.push([lines[0].clone(), lines[1].clone(), lines[2].clone()]);
        pos = p;
    }
}

/// Feeds `s` in the pieces that end at `cuts` (sorted), decoding as a
/// connection does: append, take every complete frame, keep the rest.
fn decode(s: &[u8], cuts: &[usize]) -> (Vec<Lines>, Option<FrameError>) {
    let mut d = FrameDecoder::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    let mut from = 0;
    // Stream offset of `buf[0]`, and the bytes of `buf` already framed (the
    // event loop compacts its buffer once per read, not once per frame).
    let mut base = 0;
    let mut consumed = 0;
    for &to in cuts.iter().chain(std::iter::once(&s.len())) {
        let to = to.clamp(from, s.len());
        buf.extend_from_slice(&s[from..to]);
        from = to;
        loop {
            let rest = &buf[consumed..];
            match d.decode(rest) {
                Ok(Some(f)) => {
                    assert!(f.len <= FRAME_MAX, "a frame of {} bytes", f.len);
                    assert!(f.len <= rest.len());
                    // Parsing never panics on whatever framing lets through.
                    let _ = parse_request(rest, &f);
                    let off = base + consumed;
                    let at = |r: &std::ops::Range<usize>| off + r.start..off + r.end;
                    frames.push([at(&f.command), at(&f.key), at(&f.arg)]);
                    consumed += f.len;
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        buf.drain(..consumed);
        base += consumed;
        consumed = 0;
        assert!(
            buf.len() <= FRAME_MAX,
            "{} bytes buffered without a frame or an error",
            buf.len()
        );
    }
    (frames, None)
}

/// A small deterministic generator for cut points.
fn cuts_from(seed: u64, len: usize, count: usize) -> Vec<usize> {
    let mut x = seed | 1;
    let mut cuts: Vec<usize> = (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (len as u64 + 1)) as usize
        })
        .collect();
    cuts.sort_unstable();
    cuts
}

fuzz_target!(|data: &[u8]| {
    let s = expand(data);
    let want = reference(&s);
    let whole = decode(&s, &[]);
    assert_eq!(whole, want, "in one piece");
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    // Small steps on small streams; a few thousand pieces at most on big ones.
    let step = (1 + data.first().map_or(0, |&b| b as usize % 13)).max(s.len() / 2048);
    let mut plans: Vec<Vec<usize>> = vec![
        (1..s.len()).step_by(step).collect(),
        cuts_from(hash, s.len(), 3),
        cuts_from(hash.rotate_left(17), s.len(), 16),
    ];
    // Byte at a time, for inputs small enough.
    if s.len() <= 4096 {
        plans.push((1..s.len()).collect());
    }
    for cuts in plans {
        let got = decode(&s, &cuts);
        assert_eq!(got, want, "cut at {:?}", &cuts[..cuts.len().min(20)]);
    }
});
