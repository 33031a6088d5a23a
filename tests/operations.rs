//! Operations through the real binary: graceful drain on SIGTERM/SIGINT,
//! file-descriptor exhaustion, many connections and slow clients.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, Server, stats, wait_for_stats};

/// The load tests below each open hundreds or thousands of sockets; running
/// them one at a time keeps them from starving each other on a small machine.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn drain_with_no_holders_exits_at_once() {
    let mut s = Server::start(&[]);
    let mut idle = s.connect();
    assert_eq!(idle.cmd("ping", "_", ""), "ok");
    let t0 = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(idle.closed_within(Duration::from_secs(2)));
}

#[test]
fn drain_lets_holders_finish_and_refuses_new_acquisitions() {
    let mut s = Server::start(&[]);
    let mut holder = s.connect();
    let mut other = s.connect();
    let t = holder.lock("job", "0");
    let mut waiter = s.connect();
    waiter.send_cmd("l", "job", "30");
    std::thread::sleep(Duration::from_millis(50));
    s.signal("TERM");
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.is_running());
    // New acquisitions are refused; the holder keeps working.
    assert_eq!(other.cmd("l", "new", "0"), "error_draining");
    assert_eq!(other.cmd("e", "new", ""), "error_draining");
    assert_eq!(other.cmd("listen", "x", ""), "error_draining");
    assert_eq!(holder.cmd("n", "job", &t), "ok 33");
    // No new connections.
    assert!(TcpStream::connect(("127.0.0.1", s.port)).is_err());
    // The release hands the lock to the queued waiter, who then releases.
    assert_eq!(holder.cmd("r", "job", &t), "ok");
    let t2 = common::token_of(&waiter.line());
    assert!(s.is_running(), "exited while the waiter held the lock");
    let t0 = Instant::now();
    assert_eq!(waiter.cmd("r", "job", &t2), "ok");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(1));
    let log = s.final_log().join("\n");
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained"), "{log}");
}

#[test]
fn drain_times_out_and_logs_what_was_held() {
    let mut s = Server::start(&["--shutdown-timeout", "1"]);
    let mut holder = s.connect();
    holder.lock("stuck", "0");
    let t0 = Instant::now();
    s.signal("INT");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let log = s.drain_log().join("\n");
    assert!(log.contains("still held at exit: key \"stuck\""), "{log}");
    assert!(holder.closed_within(Duration::from_secs(2)));
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut s = Server::start(&["--shutdown-timeout", "0"]);
    let mut holder = s.connect();
    holder.lock("stuck", "0");
    s.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.is_running());
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(3)), Some(1));
}

/// CPU time (user + system, in clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn fd_exhaustion_pauses_accepting_without_spinning() {
    let _serial = heavy();
    // Run the server under a low descriptor limit.
    let mut cmd = std::process::Command::new("bash");
    cmd.args([
        "-c",
        &format!(
            "ulimit -n 64 && exec {} --port 0",
            env!("CARGO_BIN_EXE_dflockd")
        ),
    ]);
    let s = Server::from_command(cmd);
    let mut clients: Vec<TcpStream> = Vec::new();
    for _ in 0..100 {
        clients.push(TcpStream::connect(("127.0.0.1", s.port)).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(s.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(s.child.id()) - before;
    // 100 ticks = one full core for a second; a spinning accept loop uses it all.
    assert!(
        used < 20,
        "server burned {used} ticks while out of descriptors"
    );
    let log = s.drain_log().join("\n");
    assert!(log.contains("out of file descriptors"), "{log}");
    assert_eq!(
        log.matches("out of file descriptors").count(),
        1,
        "logged more than once per episode"
    );
    // Closing connections lets new ones in (including ones already queued).
    clients.truncate(10);
    std::thread::sleep(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        let mut c = Client::connect(s.port);
        c.send_cmd("ping", "_", "");
        if let Ok(Some(l)) = c.line_within(Duration::from_millis(1500)) {
            assert_eq!(l, "ok");
            break c;
        }
        assert!(Instant::now() < deadline, "never accepted again");
    };
    assert!(fresh.cmd("l", "after", "0").starts_with("ok "));
}

#[test]
fn ten_thousand_idle_connections_and_a_fresh_one_is_served() {
    let _serial = heavy();
    let s = Server::start(&[]);
    let mut conns = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        conns.push(TcpStream::connect(("127.0.0.1", s.port)).unwrap());
    }
    let mut fresh = s.connect();
    wait_for_stats(
        &mut fresh,
        "{\"connections\":10001,",
        Duration::from_secs(60),
    );
    assert!(fresh.cmd("l", "k", "0").starts_with("ok "));
    // Every one of them is live.
    for c in conns.iter_mut().step_by(500) {
        c.write_all(b"ping\n_\n\n").unwrap();
    }
}

#[test]
fn slowloris_connections_do_not_stall_a_normal_client() {
    let _serial = heavy();
    let s = Server::start(&["--read-timeout", "30"]);
    let mut slow: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(("127.0.0.1", s.port)).unwrap())
        .collect();
    let request = b"l\nslow-key\n0\n";
    let mut normal = s.connect();
    let mut worst = Duration::ZERO;
    // Each slow client sends one byte per round; the normal client works
    // between rounds.
    for round in 0..request.len() - 1 {
        for c in slow.iter_mut() {
            c.write_all(&request[round..round + 1]).unwrap();
        }
        let t0 = Instant::now();
        let t = normal.lock("normal", "0");
        assert_eq!(normal.cmd("r", "normal", &t), "ok");
        worst = worst.max(t0.elapsed());
    }
    // Not a benchmark: only that the normal client was never held up for
    // anything like the slow clients' pace.
    assert!(
        worst < Duration::from_secs(1),
        "normal client stalled {worst:?}"
    );
    assert!(stats(&mut normal).starts_with("{\"connections\":1001,"));
}
