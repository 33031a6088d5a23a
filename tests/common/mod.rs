//! Shared helpers for the integration tests: start the real binary on an
//! ephemeral port and talk to it over raw TCP.
#![allow(dead_code)]

pub mod pki;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The server binary. Cargo names it for this package's tests; the tests of
/// other workspace crates (the client) find it beside their own test
/// binary, in the same target directory, and build it there if missing.
pub fn server_bin() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_dflockd") {
        return p.into();
    }
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary in <target>/<profile>/deps");
    let bin = profile_dir.join("dflockd");
    BUILD.call_once(|| {
        if bin.exists() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "dflockd", "--bin", "dflockd"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "could not build the dflockd binary");
    });
    bin
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: mpsc::Receiver<String>,
    /// What the server logged before its `listening on` line.
    pub startup_log: Vec<String>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    #[allow(clippy::zombie_processes)] // waited for in Drop
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(server_bin());
        cmd.args(["--port", "0"]).args(args);
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::from_command(cmd)
    }

    /// Starts a server from a prepared command (which must pass `--port 0`).
    #[allow(clippy::zombie_processes)] // waited for in Drop
    pub fn from_command(mut cmd: Command) -> Server {
        cmd.env_remove("RUST_LOG");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dflockd");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut startup_log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("server did not log its address");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let port = rest.trim().rsplit(':').next().unwrap().parse().unwrap();
                return Server {
                    child,
                    port,
                    log: rx,
                    startup_log,
                };
            }
            startup_log.push(line);
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Log lines printed so far: until none has come for 200 ms (at most
    /// 5 s). A line the server wrote just before a reply the test has
    /// seen may still be on its way through the pipe and the reader
    /// thread; taking only what had arrived raced with it.
    pub fn drain_log(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut lines = Vec::new();
        while let Ok(l) = self.log.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
            if Instant::now() > deadline {
                break;
            }
        }
        lines
    }

    /// Every log line up to the end of the server's output (after it exited).
    pub fn final_log(&self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(l) = self.log.recv_timeout(Duration::from_secs(5)) {
            lines.push(l);
        }
        lines
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the process to exit, returning its code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_cmd(&mut self, cmd: &str, key: &str, arg: &str) {
        self.send(format!("{cmd}\n{key}\n{arg}\n").as_bytes());
    }

    /// Reads one reply line (without its newline); panics on timeout.
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).expect("read reply");
        assert!(n > 0, "server closed the connection");
        s.trim_end_matches('\n').to_string()
    }

    /// Reads a line or EOF (None) within `t`.
    pub fn line_within(&mut self, t: Duration) -> Result<Option<String>, std::io::Error> {
        self.stream.set_read_timeout(Some(t)).unwrap();
        let mut s = String::new();
        let r = self.reader.read_line(&mut s);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match r? {
            0 => Ok(None),
            _ => Ok(Some(s.trim_end_matches('\n').to_string())),
        }
    }

    pub fn cmd(&mut self, cmd: &str, key: &str, arg: &str) -> String {
        self.send_cmd(cmd, key, arg);
        self.line()
    }

    /// `l` and return the token (panics unless granted).
    pub fn lock(&mut self, key: &str, arg: &str) -> String {
        let r = self.cmd("l", key, arg);
        token_of(&r)
    }

    /// True once the server has closed the connection (EOF within `t`).
    pub fn closed_within(&mut self, t: Duration) -> bool {
        self.stream.set_read_timeout(Some(t)).unwrap();
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + t;
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The token of an `ok <token> <lease>` or `acquired <token> <lease>` reply.
pub fn token_of(reply: &str) -> String {
    let f: Vec<&str> = reply.split(' ').collect();
    assert!(
        f.len() == 3 && (f[0] == "ok" || f[0] == "acquired") && f[1].len() == 32,
        "not a grant: {reply:?}"
    );
    f[1].to_string()
}

/// The stats JSON (after `ok `).
pub fn stats(c: &mut Client) -> String {
    let r = c.cmd("stats", "_", "_");
    r.strip_prefix("ok ").expect("stats reply").to_string()
}

/// Polls `stats` until it contains `needle`, failing after `within`.
pub fn wait_for_stats(c: &mut Client, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = stats(c);
        if s.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed {needle}: {s}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fake server on loopback: it answers every request (three lines) with
/// `reply` (which ends with its own newline), or with `None` closes every
/// connection at once. Returns its address.
pub fn fake_server(reply: Option<&'static str>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Some(reply) = reply else {
                drop(conn);
                continue;
            };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut lines = 0;
                for line in BufReader::new(conn).lines() {
                    if line.is_err() {
                        break;
                    }
                    lines += 1;
                    if lines % 3 == 0 && w.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
