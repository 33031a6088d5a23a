//! The monitoring endpoint: plain HTTP/1.1 on its own listener, served by the
//! same event loop. One request per connection (`Connection: close`), bounded
//! in size and time, so a slow or hostile scraper costs a few kilobytes and a
//! timer, never a stall.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::timer::TimerHandle;

/// Largest request head accepted.
pub const MAX_REQUEST: usize = 8 * 1024;
/// A scraper must send its request within this long.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Most monitoring connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

pub struct HttpConn {
    pub id: u64,
    pub stream: TcpStream,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
    pub written: usize,
    pub responded: bool,
    pub timer: TimerHandle,
}

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    Ready,
    NotFound,
    MethodNotAllowed,
    /// `/metrics` without the right bearer token.
    Unauthorized,
    BadRequest,
    TooLarge,
}

/// Result of feeding bytes to a connection.
pub enum Progress {
    /// Need more bytes.
    Partial,
    /// Ready to answer.
    Request(Route),
    /// The peer closed or failed.
    Closed,
}

impl HttpConn {
    /// Reads what is available and parses the request head.
    /// `authorized` says whether a given `Authorization` value is accepted.
    pub fn read(&mut self, authorized: &dyn Fn(Option<&[u8]>) -> bool) -> Progress {
        let mut buf = [0u8; 2048];
        loop {
            match self.stream.read(&mut buf) {
                // A client may half-close after its request: answer it.
                Ok(0) => {
                    return match route(&self.input, authorized) {
                        Progress::Request(r) => Progress::Request(r),
                        _ => Progress::Closed,
                    };
                }
                Ok(n) => {
                    if self.input.len() + n > MAX_REQUEST {
                        return Progress::Request(Route::TooLarge);
                    }
                    self.input.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Closed,
            }
        }
        route(&self.input, authorized)
    }

    /// Writes the response; true once all of it is out.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Parses a request head with `httparse` and picks the route.
pub fn route(input: &[u8], authorized: &dyn Fn(Option<&[u8]>) -> bool) -> Progress {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Partial) => Progress::Partial,
        Err(_) => Progress::Request(Route::BadRequest),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("/");
            let path = path.split('?').next().unwrap_or(path);
            let route = match (req.method, path) {
                (Some("GET" | "HEAD"), "/metrics") => {
                    let auth = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                        .map(|h| h.value);
                    if authorized(auth) {
                        Route::Metrics
                    } else {
                        Route::Unauthorized
                    }
                }
                (Some("GET" | "HEAD"), "/health") => Route::Health,
                (Some("GET" | "HEAD"), "/ready") => Route::Ready,
                (Some("GET" | "HEAD"), _) => Route::NotFound,
                _ => Route::MethodNotAllowed,
            };
            Progress::Request(route)
        }
    }
}

/// Writes a complete response with `Connection: close`.
pub fn respond(out: &mut Vec<u8>, status: &str, content_type: &str, extra: &str, body: &[u8]) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    crate::protocol::reply::push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(input: &str, token_ok: bool) -> Option<Route> {
        let auth = move |h: Option<&[u8]>| !token_ok || h == Some(b"Bearer t".as_slice());
        match route(input.as_bytes(), &auth) {
            Progress::Request(r) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn routes() {
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false),
            Some(Route::Metrics)
        );
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\n\r\n", true),
            Some(Route::Unauthorized)
        );
        assert_eq!(
            r(
                "GET /metrics HTTP/1.1\r\nauthorization: Bearer t\r\n\r\n",
                true
            ),
            Some(Route::Metrics)
        );
        assert_eq!(r("GET /health HTTP/1.1\r\n\r\n", true), Some(Route::Health));
        assert_eq!(
            r("GET /ready?x=1 HTTP/1.0\r\n\r\n", true),
            Some(Route::Ready)
        );
        assert_eq!(
            r("GET /nope HTTP/1.1\r\n\r\n", false),
            Some(Route::NotFound)
        );
        assert_eq!(
            r("POST /metrics HTTP/1.1\r\n\r\n", false),
            Some(Route::MethodNotAllowed)
        );
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost: x\r\n", false), None);
        assert_eq!(r("\x01\x02garbage\r\n\r\n", false), Some(Route::BadRequest));
    }
}
