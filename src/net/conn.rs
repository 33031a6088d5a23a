//! One client connection: its socket, buffered input and output, and the
//! bookkeeping of its timeouts. Nothing here knows about locks.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use rustls::ServerConnection;

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
    /// Failed authentication: answered `error_auth`; closed by a timer about
    /// 100 ms later, which slows down guessing without stalling anyone else.
    AuthFailed,
    /// A slow consumer: nothing more is sent; closed at the end of the turn.
    Dropped,
}

pub struct Conn {
    pub id: ConnId,
    pub stream: TcpStream,
    /// The TLS session, when the server has TLS configured.
    pub tls: Option<Box<ServerConnection>>,
    /// Authenticated, or no token is required.
    pub authed: bool,
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
    /// When the connection was accepted.
    pub opened_ms: u64,
    /// Cluster mode: a request of this connection went to the log, so its
    /// close must too.
    pub replicated: bool,
    pub read_timer: Option<TimerHandle>,
    /// Since when unsent output has made no progress.
    pub write_stalled_since: Option<u64>,
    pub write_timer: Option<TimerHandle>,
    pub linger_timer: Option<TimerHandle>,
    pub write_shut: bool,
    /// Bytes of requests read and replies written, for metrics.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Result of one read pass.
pub enum ReadOutcome {
    /// Got bytes (appended to `input`); there may be more.
    Data,
    /// Got fewer bytes than asked for: the socket is empty for now. A new
    /// arrival raises a new readiness event, so no `EAGAIN` read is needed.
    Drained,
    /// The socket has nothing more for now.
    WouldBlock,
    /// The input buffer is full; reading resumes when it drains.
    Full,
    /// The peer closed its side.
    Eof,
}

impl Conn {
    pub fn new(
        id: ConnId,
        stream: TcpStream,
        peer: SocketAddr,
        now: u64,
        tls: Option<Box<ServerConnection>>,
        authed: bool,
    ) -> Conn {
        Conn {
            id,
            stream,
            tls,
            authed,
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
            opened_ms: now,
            replicated: false,
            read_timer: None,
            write_stalled_since: None,
            write_timer: None,
            linger_timer: None,
            write_shut: false,
            bytes_read: 0,
            bytes_written: 0,
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
        if self.tls.is_some() {
            return self.read_tls(&mut scratch[..want]);
        }
        loop {
            return match self.stream.read(&mut scratch[..want]) {
                Ok(0) => Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.compact_input();
                    self.input.extend_from_slice(&scratch[..n]);
                    self.bytes_read += n as u64;
                    if n < want {
                        self.input_pending = false;
                        Ok(ReadOutcome::Drained)
                    } else {
                        Ok(ReadOutcome::Data)
                    }
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

    /// One `read_tls` (unless the session must write first), then the
    /// plaintext it yields (at most `scratch` bytes; the rest stays inside
    /// the session for the next call).
    fn read_tls(&mut self, scratch: &mut [u8]) -> io::Result<ReadOutcome> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(ReadOutcome::WouldBlock);
        };
        // `WouldBlock` here also covers "the session wants to write before it
        // reads more": the flush that follows re-reads the socket.
        let mut socket = ReadOutcome::WouldBlock;
        if tls.wants_read() {
            loop {
                match tls.read_tls(&mut self.stream) {
                    Ok(0) => socket = ReadOutcome::Eof,
                    Ok(_) => socket = ReadOutcome::Data,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.input_pending = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                break;
            }
        }
        if let Err(e) = tls.process_new_packets() {
            // Send the alert rustls queued, then give up on the connection.
            let _ = tls.write_tls(&mut self.stream);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        match tls.reader().read(scratch) {
            Ok(0) => Ok(ReadOutcome::Eof),
            Ok(n) => {
                self.compact_input();
                self.input.extend_from_slice(&scratch[..n]);
                self.bytes_read += n as u64;
                Ok(ReadOutcome::Data)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(ReadOutcome::Eof),
            Err(e) => Err(e),
        }
    }

    /// Whether the TLS session has records to send (handshake, alerts).
    pub fn tls_wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Whether the TLS handshake is still in progress.
    pub fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Queues a TLS close_notify before a half-close.
    pub fn send_close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut self.stream);
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
        if self.tls.is_some() {
            return self.flush_tls();
        }
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.bytes_written += n as u64;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(self.output_done())
    }

    /// Hands pending plaintext to the TLS session and writes its records.
    fn flush_tls(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(false);
        };
        // The session takes a bounded amount of plaintext at a time: feed it
        // and write its records until everything is out or the socket is full.
        loop {
            if self.written < self.output.len() && !tls.is_handshaking() {
                let n = tls.writer().write(&self.output[self.written..])?;
                self.written += n;
                self.bytes_written += n as u64;
            }
            let mut socket_full = false;
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        socket_full = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if socket_full || self.written == self.output.len() || tls.is_handshaking() {
                break;
            }
        }
        let records_left = tls.wants_write();
        Ok(self.output_done() || records_left)
    }

    /// Frees the output buffer once all of it is written; whether some is left.
    fn output_done(&mut self) -> bool {
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
            if self.output.capacity() > KEEP_CAPACITY {
                self.output = Vec::new();
            }
            false
        } else {
            true
        }
    }
}
