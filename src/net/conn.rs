//! One client connection: its socket, buffered input and output, and the
//! bookkeeping of its timeouts. Nothing here knows about locks.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::core::ConnId;
use crate::protocol::FrameDecoder;
use crate::protocol::frame::FRAME_MAX;
use crate::timer::TimerHandle;

/// Input buffered beyond this (only possible while a blocking command waits
/// or output is backed up) is left in the socket until there is room.
pub const MAX_BUFFERED_INPUT: usize = 2 * FRAME_MAX;
/// Unsent output above which the connection's further requests wait.
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Buffers larger than this are freed when they empty, so that an idle
/// connection costs little memory after a burst.
const KEEP_CAPACITY: usize = 4096;

/// Why a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Open and serving.
    No,
    /// Answered a read-level error: flushing, then half-closing and draining
    /// the peer's input until it closes (so the reply is not lost to a reset).
    AfterFlush,
}

pub struct Conn {
    pub id: ConnId,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub input: Vec<u8>,
    /// Bytes at the front of `input` already consumed.
    pub consumed: usize,
    pub decoder: FrameDecoder,
    pub output: Vec<u8>,
    /// Bytes at the front of `output` already written.
    pub written: usize,
    /// A blocking command (`l`, `sl`, `w`, `sw`) awaits its grant or timeout.
    pub blocked: bool,
    /// The last read stopped before `WouldBlock` because the input was full.
    pub input_pending: bool,
    pub closing: Closing,
    /// Queued for a flush at the end of this loop turn.
    pub dirty: bool,
    pub last_request_ms: u64,
    pub read_timer: Option<TimerHandle>,
    /// Since when unsent output has made no progress.
    pub write_stalled_since: Option<u64>,
    pub write_timer: Option<TimerHandle>,
    pub linger_timer: Option<TimerHandle>,
    pub write_shut: bool,
}

/// Result of one read pass.
pub enum ReadOutcome {
    /// Got bytes (appended to `input`); there may be more.
    Data,
    /// The socket has nothing more for now.
    WouldBlock,
    /// The input buffer is full; reading resumes when it drains.
    Full,
    /// The peer closed its side.
    Eof,
}

impl Conn {
    pub fn new(id: ConnId, stream: TcpStream, peer: SocketAddr, now: u64) -> Conn {
        Conn {
            id,
            stream,
            peer,
            input: Vec::new(),
            consumed: 0,
            decoder: FrameDecoder::new(),
            output: Vec::new(),
            written: 0,
            blocked: false,
            input_pending: false,
            closing: Closing::No,
            dirty: false,
            last_request_ms: now,
            read_timer: None,
            write_stalled_since: None,
            write_timer: None,
            linger_timer: None,
            write_shut: false,
        }
    }

    pub fn unread(&self) -> &[u8] {
        &self.input[self.consumed..]
    }

    pub fn unsent(&self) -> usize {
        self.output.len() - self.written
    }

    /// Reads once into `scratch` and appends what arrived to `input`.
    pub fn read_once(&mut self, scratch: &mut [u8]) -> io::Result<ReadOutcome> {
        let room = MAX_BUFFERED_INPUT.saturating_sub(self.input.len() - self.consumed);
        if room == 0 {
            self.input_pending = true;
            return Ok(ReadOutcome::Full);
        }
        let want = room.min(scratch.len());
        loop {
            return match self.stream.read(&mut scratch[..want]) {
                Ok(0) => Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.compact_input();
                    self.input.extend_from_slice(&scratch[..n]);
                    Ok(ReadOutcome::Data)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.input_pending = false;
                    Ok(ReadOutcome::WouldBlock)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// Drops consumed input from the front of the buffer.
    pub fn compact_input(&mut self) {
        if self.consumed == 0 {
            return;
        }
        if self.consumed == self.input.len() {
            self.input.clear();
            if self.input.capacity() > KEEP_CAPACITY {
                self.input = Vec::new();
            }
        } else {
            self.input.drain(..self.consumed);
        }
        self.consumed = 0;
    }

    /// Writes as much pending output as the socket takes, in one `write`
    /// (a short write leaves the rest for the next writable event).
    /// Returns whether anything is left unsent.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            if self.output.capacity() > KEEP_CAPACITY {
                self.output = Vec::new();
            }
            Ok(false)
        } else {
            Ok(true)
        }
    }
}
