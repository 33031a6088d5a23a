//! One connection to one server address: TCP or TLS, the auth handshake,
//! request framing and reading reply lines with deadlines.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::config::{Config, host_of};
use crate::error::{Error, Result};

/// The longest line the server sends but for `stats`: a pushed signal
/// carries a channel (256 bytes) and a payload (64 KiB).
pub(crate) const MAX_LINE: usize = 64 * 1024 + 512;

/// The longest `stats` reply taken: one line of JSON listing every key.
pub(crate) const MAX_STATS_LINE: usize = 256 << 20;

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// What a read with a deadline found.
pub(crate) enum Line {
    /// A whole line, without its line ending.
    Line(String),
    /// The deadline passed first (any partial line stays buffered).
    TimedOut,
}

pub(crate) struct Conn {
    stream: Stream,
    addr: String,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    /// The longest line the next reads accept.
    pub(crate) max_line: usize,
}

impl Conn {
    /// Connects to `addr`, completes the TLS handshake and authenticates,
    /// all within the configured connect timeout.
    pub(crate) fn open(addr: &str, cfg: &Config) -> Result<Conn> {
        let deadline = deadline_after(cfg.connect_timeout);
        let tcp = connect_tcp(addr, cfg.connect_timeout)?;
        tcp.set_nodelay(true)?;
        keepalive(&tcp);
        tcp.set_write_timeout(Some(cfg.io_timeout.max(Duration::from_millis(1))))?;
        let stream = match &cfg.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => ServerName::try_from(host_of(addr).to_string())
                        .map_err(|_| Error::Tls(format!("no TLS server name in {addr:?}")))?,
                };
                let conn = ClientConnection::new(tls.config.clone(), name)
                    .map_err(|e| Error::Tls(e.to_string()))?;
                let mut s = StreamOwned::new(conn, tcp);
                while s.conn.is_handshaking() {
                    if !set_read_deadline(&s.sock, deadline)? {
                        return Err(Error::Tls(format!("handshake with {addr} timed out")));
                    }
                    s.conn
                        .complete_io(&mut s.sock)
                        .map_err(|e| tls_error(e, addr))?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        let mut conn = Conn {
            stream,
            addr: addr.to_string(),
            rbuf: Vec::with_capacity(4096),
            rpos: 0,
            wbuf: Vec::with_capacity(512),
            max_line: MAX_LINE,
        };
        if let Some(token) = &cfg.auth_token {
            if token.is_empty() || token.contains(['\n', '\r']) || token.len() > 64 * 1024 {
                return Err(Error::InvalidInput(
                    "an auth token is one line of 1 byte to 64 KiB".into(),
                ));
            }
            conn.send("auth", "_", token)?;
            match conn.read_line(deadline)? {
                Line::Line(l) if l == "ok" => {}
                Line::Line(l) if l == "error_auth" => return Err(Error::Auth),
                Line::Line(l) if l == "error" => {
                    return Err(Error::Protocol(format!(
                        "{addr} has no auth token configured but one was given"
                    )));
                }
                Line::Line(l) => return Err(unexpected("auth", &l)),
                Line::TimedOut => return Err(timed_out("auth")),
            }
        }
        Ok(conn)
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Writes one request. The caller has validated the fields.
    pub(crate) fn send(&mut self, cmd: &str, key: &str, arg: &str) -> Result<()> {
        self.wbuf.clear();
        for field in [cmd, key, arg] {
            self.wbuf.extend_from_slice(field.as_bytes());
            self.wbuf.push(b'\n');
        }
        self.stream.write_all(&self.wbuf)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Reads the next line, waiting until `deadline` (`None`: no limit).
    pub(crate) fn read_line(&mut self, deadline: Option<Instant>) -> Result<Line> {
        loop {
            if let Some(i) = self.rbuf[self.rpos..].iter().position(|&b| b == b'\n') {
                let end = self.rpos + i;
                let mut line = &self.rbuf[self.rpos..end];
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                let text = std::str::from_utf8(line)
                    .map_err(|_| Error::Protocol("reply is not UTF-8".into()))?
                    .to_string();
                self.rpos = end + 1;
                if self.rpos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rpos = 0;
                }
                return Ok(Line::Line(text));
            }
            if self.rbuf.len() - self.rpos > self.max_line {
                return Err(Error::Protocol(format!(
                    "reply line longer than {} bytes",
                    self.max_line
                )));
            }
            if self.rpos > 0 {
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
            }
            if let Some(d) = deadline {
                if !set_read_deadline(self.stream.tcp(), Some(d))? {
                    return Ok(Line::TimedOut);
                }
            } else {
                self.stream.tcp().set_read_timeout(None)?;
            }
            let len = self.rbuf.len();
            self.rbuf.resize(len + 4096, 0);
            let r = self.stream.read(&mut self.rbuf[len..]);
            match r {
                Ok(0) => {
                    self.rbuf.truncate(len);
                    return Err(Error::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} closed the connection", self.addr),
                    )));
                }
                Ok(n) => self.rbuf.truncate(len + n),
                Err(e) => {
                    self.rbuf.truncate(len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            return Ok(Line::TimedOut);
                        }
                        io::ErrorKind::Interrupted => {}
                        _ => return Err(Error::Io(e)),
                    }
                }
            }
        }
    }
}

/// `now + t`, or `None` (no deadline) when that is beyond what an
/// `Instant` can hold.
pub(crate) fn deadline_after(t: Duration) -> Option<Instant> {
    Instant::now().checked_add(t)
}

/// Sets the socket's read timeout to what is left until `deadline`;
/// `false` when it already passed.
fn set_read_deadline(tcp: &TcpStream, deadline: Option<Instant>) -> Result<bool> {
    match deadline {
        None => tcp.set_read_timeout(None)?,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        }
    }
    Ok(true)
}

/// TCP keepalive: a request that waits without limit (a lock with no
/// timeout, a listener) learns within about a minute that the server's
/// host is gone, instead of waiting forever. Best effort.
fn keepalive(tcp: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt(2) on a socket we own, with an int value.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let timeout = timeout.max(Duration::from_millis(1));
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {addr}: {e}")))?
        .collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(Error::Io(last))
}

fn tls_error(e: io::Error, addr: &str) -> Error {
    match e.kind() {
        io::ErrorKind::InvalidData => Error::Tls(format!("handshake with {addr} failed: {e}")),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::Tls(format!("handshake with {addr} timed out"))
        }
        _ => Error::Io(e),
    }
}

pub(crate) fn timed_out(what: &str) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no reply to {what} in time"),
    ))
}

pub(crate) fn unexpected(what: &str, line: &str) -> Error {
    let mut shown: String = line.chars().take(80).collect();
    if shown.len() < line.len() {
        shown.push('…');
    }
    Error::Protocol(format!("unexpected reply to {what}: {shown:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn sockopt(tcp: &TcpStream, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a local int.
        let r = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn client_sockets_have_tcp_keepalive() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conn = Conn::open(&addr, &Config::default()).unwrap();
        let tcp = conn.stream.tcp();
        assert_eq!(sockopt(tcp, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(sockopt(tcp, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(sockopt(tcp, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
    }
}
