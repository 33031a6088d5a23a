//! `dflock`: a distributed flock(1). Runs a command while holding a dflockd
//! lock or semaphore slot, and speaks the rest of the protocol from shells.

mod args;
mod commands;
mod supervise;

use std::io::Write;
use std::process::ExitCode;

use dflockd_client::Error;

/// `eprintln!` that never panics (stderr may be closed or full).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use say;

/// Exit statuses of dflock itself (a command run under a lock exits with
/// its own status, or 128 + N when signal N killed it).
pub mod status {
    /// Bad flags or arguments.
    pub const USAGE: u8 = 64;
    /// No server address could be reached, or the connection broke.
    pub const UNAVAILABLE: u8 = 69;
    /// Writing the output failed.
    pub const OUTPUT: u8 = 74;
    /// The server refused the request (limits, limit mismatch, draining,
    /// no leader).
    pub const REFUSED: u8 = 70;
    /// The lock was not granted within `--timeout`; the command did not run.
    pub const TIMEOUT: u8 = 75;
    /// The server answered something that is not the dflockd protocol.
    pub const PROTOCOL: u8 = 76;
    /// The auth token was refused.
    pub const AUTH: u8 = 77;
    /// Unusable settings (an unreadable CA file, a bad server list).
    pub const CONFIG: u8 = 78;
    /// The lock was lost while the command ran; it was stopped.
    pub const LOST: u8 = 79;
    /// The command was found but could not be run.
    pub const CANNOT_EXECUTE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// The exit status for a failed call.
pub fn status_for(e: &Error) -> u8 {
    match e {
        Error::Timeout => status::TIMEOUT,
        Error::Auth => status::AUTH,
        Error::InvalidInput(_) => status::USAGE,
        Error::Protocol(_) => status::PROTOCOL,
        Error::Unreachable { last, .. } if matches!(**last, Error::Protocol(_)) => status::PROTOCOL,
        Error::Unreachable { .. } | Error::Io(_) | Error::NotConnected | Error::Tls(_) => {
            status::UNAVAILABLE
        }
        _ => status::REFUSED,
    }
}

/// Prints `dflock: <context>: <error>` and returns its exit status.
pub fn fail(context: &str, e: &Error) -> u8 {
    say!("dflock: {context}: {e}");
    status_for(e)
}

/// Writes `text` to standard output: 0, or [`status::OUTPUT`] when that
/// fails. A reader that went away (`| head -1`) is not a failure.
pub fn emit(text: &str) -> u8 {
    write_out(text).unwrap_or(0)
}

/// Writes `text` to standard output: `None` when written, else the status
/// to stop with (0 when the reader went away).
pub fn write_out(text: &str) -> Option<u8> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(0),
        Err(e) => {
            say!("dflock: writing standard output: {e}");
            Some(status::OUTPUT)
        }
    }
}

fn main() -> ExitCode {
    let invocation = match args::parse(std::env::args_os().skip(1).collect()) {
        Ok(inv) => inv,
        Err(args::Exit::Usage(msg)) => {
            say!("dflock: {msg}\nTry 'dflock --help'.");
            return ExitCode::from(status::USAGE);
        }
        Err(args::Exit::Config(msg)) => {
            say!("dflock: {msg}");
            return ExitCode::from(status::CONFIG);
        }
        Err(args::Exit::Print(text)) => return ExitCode::from(emit(&text)),
    };
    ExitCode::from(commands::run(invocation))
}
