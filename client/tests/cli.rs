//! The `dflock` command through the real server binary: locks around
//! commands, FIFO and exclusion across concurrent invocations, statuses,
//! signals, lost locks, TLS and auth, and bad input.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pki::{Pki, tls_server};
use common::{Server, fake_server, wait_for_stats};

/// A `dflock` command aimed at `server`, with the environment cleared of
/// the variables it reads.
fn dflock(server: &Server) -> Command {
    let mut c = bare();
    c.args(["-s", &server.addr()]);
    c
}

fn bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dflock"));
    for v in [
        "DFLOCK_SERVERS",
        "DFLOCK_AUTH_TOKEN",
        "DFLOCK_TLS_CA",
        "SSL_CERT_FILE",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs to completion within `t` (killed and failed otherwise).
fn run_within(mut cmd: Command, t: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn dflock");
    finish(child, t)
}

fn finish(mut child: Child, t: Duration) -> Output {
    let deadline = Instant::now() + t;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "dflock still running after {t:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn run(cmd: Command) -> Output {
    run_within(cmd, Duration::from_secs(20))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_status(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("dflock-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for_file(p: &Path, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "{} never written", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sh(script: &str) -> [&str; 4] {
    ["--", "sh", "-c", script]
}

#[test]
fn lock_runs_the_command_with_its_grant_and_exits_with_its_status() {
    let s = Server::start(&[]);
    let dir = TempDir::new("env");
    let f = dir.file("env");
    let script = format!(
        "echo \"$DFLOCK_KEY $DFLOCK_TOKEN $DFLOCK_FENCE $DFLOCK_LEASE\" > {}; exit 3",
        f.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "job", "--lease", "7"]).args(sh(&script));
    let out = run(c);
    assert_status(&out, 3);
    let env = std::fs::read_to_string(&f).unwrap();
    let fields: Vec<&str> = env.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{env}");
    assert_eq!(fields[0], "job");
    assert_eq!(fields[1].len(), 32);
    let fence = u64::from_str_radix(&fields[1][..16], 16).unwrap();
    assert_eq!(fields[2], fence.to_string());
    assert_eq!(fields[3], "7");
    // Released at exit: a try-once lock succeeds at once.
    let mut raw = s.connect();
    assert!(raw.cmd("l", "job", "0").starts_with("ok "));
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_its_number() {
    let s = Server::start(&[]);
    let mut c = dflock(&s);
    c.args(["lock", "k"]).args(sh("kill -KILL $$"));
    assert_status(&run(c), 137);
}

#[test]
fn concurrent_invocations_exclude_each_other_in_fifo_order() {
    let s = Server::start(&[]);
    let dir = TempDir::new("fifo");
    let log = dir.file("log");
    let mut watcher = s.connect();
    let mut children = Vec::new();
    const N: usize = 6;
    for i in 0..N {
        let script = format!(
            "echo \"start {i} $DFLOCK_FENCE\" >> {log}; sleep 0.15; echo \"end {i}\" >> {log}",
            log = log.display()
        );
        let mut c = dflock(&s);
        c.args(["lock", "fifo", "--timeout", "30"])
            .args(sh(&script))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.push(c.spawn().unwrap());
        // Each invocation is queued before the next one starts.
        if i == 0 {
            wait_for_stats(&mut watcher, "\"key\":\"fifo\"", Duration::from_secs(10));
        } else {
            wait_for_stats(
                &mut watcher,
                &format!("\"waiters\":{i}}}"),
                Duration::from_secs(10),
            );
        }
    }
    for child in children {
        assert_status(&finish(child, Duration::from_secs(30)), 0);
    }
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2 * N, "{lines:?}");
    let mut last_fence = 0u64;
    for i in 0..N {
        let start: Vec<&str> = lines[2 * i].split(' ').collect();
        assert_eq!(&start[..2], &["start", &i.to_string()], "{lines:?}");
        assert_eq!(lines[2 * i + 1], format!("end {i}"), "{lines:?}");
        let fence: u64 = start[2].parse().unwrap();
        assert!(fence > last_fence, "fences not increasing: {lines:?}");
        last_fence = fence;
    }
}

#[test]
fn a_semaphore_admits_limit_commands_at_once() {
    let s = Server::start(&[]);
    let dir = TempDir::new("sem");
    let log = dir.file("log");
    let script = format!(
        "echo in >> {log}; sleep 0.6; echo out >> {log}",
        log = log.display()
    );
    let children: Vec<Child> = (0..5)
        .map(|_| {
            let mut c = dflock(&s);
            c.args(["sem", "pool", "2", "-t", "30"])
                .args(sh(&script))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for child in children {
        assert_status(&finish(child, Duration::from_secs(30)), 0);
    }
    let (mut now, mut max) = (0i32, 0i32);
    for l in std::fs::read_to_string(&log).unwrap().lines() {
        now += if l == "in" { 1 } else { -1 };
        max = max.max(now);
    }
    assert_eq!(now, 0);
    assert_eq!(max, 2, "at most (and, here, exactly) two at once");
}

#[test]
fn a_timeout_exits_75_without_running_the_command() {
    let s = Server::start(&[]);
    let mut holder = s.connect();
    assert!(holder.cmd("l", "busy", "0").starts_with("ok "));
    let dir = TempDir::new("timeout");
    let marker = dir.file("ran");
    for t in ["0", "1"] {
        let mut c = dflock(&s);
        c.args(["lock", "busy", "--timeout", t, "--", "touch"])
            .arg(&marker);
        let out = run(c);
        assert_status(&out, 75);
        assert!(
            text(&out.stderr).contains("not granted within"),
            "{}",
            text(&out.stderr)
        );
        assert!(!marker.exists());
    }
}

#[test]
fn sigterm_to_dflock_reaches_the_command() {
    let s = Server::start(&[]);
    let dir = TempDir::new("sigterm");
    let (ready, got) = (dir.file("ready"), dir.file("got"));
    let script = format!(
        "trap 'echo TERM > {got}; exit 7' TERM; echo up > {ready}; while :; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "sig"]).args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_for_file(&ready, Duration::from_secs(10));
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = finish(child, Duration::from_secs(10));
    assert_status(&out, 7);
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "TERM\n");
    let mut raw = s.connect();
    assert!(
        raw.cmd("l", "sig", "0").starts_with("ok "),
        "released after"
    );
}

#[test]
fn a_lost_lock_stops_the_command_and_exits_79() {
    let s = Server::start(&[]);
    let dir = TempDir::new("lost");
    let (tok, got) = (dir.file("token"), dir.file("got"));
    let script = format!(
        "trap 'echo TERM > {got}; exit 5' TERM; echo $DFLOCK_TOKEN > {tok}; while :; do sleep 0.05; done",
        got = got.display(),
        tok = tok.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "lk", "--lease", "2", "--kill-after", "5"])
        .args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let token = wait_for_file(&tok, Duration::from_secs(10));
    // Someone else releases the holder's token: its next renewal is refused.
    let mut raw = s.connect();
    assert_eq!(raw.cmd("r", "lk", token.trim()), "ok");
    let out = finish(child, Duration::from_secs(10));
    assert_status(&out, 79);
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "TERM\n");
    let err = text(&out.stderr);
    assert!(err.contains("lost the lock on lk"), "{err}");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let mut s = Server::start(&[]);
    let dir = TempDir::new("grace");
    let ready = dir.file("ready");
    let script = format!(
        "trap '' TERM; echo up > {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "g", "--lease", "2", "--kill-after", "1"])
        .args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_for_file(&ready, Duration::from_secs(10));
    // The server goes away: the renewal cannot re-attach anywhere.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let out = finish(child, Duration::from_secs(15));
    assert_status(&out, 79);
    let err = text(&out.stderr);
    // Usually "connection lost"; "refused" if a parallel test's server got
    // the freed port first. Either way the lock is gone.
    assert!(err.contains("lost the lock on g"), "{err}");
    assert!(err.contains("SIGKILL"), "{err}");
}

#[test]
fn usage_errors_exit_64_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus", "ping"], "--bogus"),
        (&["lock", "k", "true"], "missing `--`"),
        (&["lock", "k", "--"], "no command after `--`"),
        (&["lock", "--", "true"], "usage: dflock lock"),
        (&["sem", "k", "--", "true"], "usage: dflock sem"),
        (&["sem", "k", "0", "--", "true"], "LIMIT"),
        (
            &["lock", "k", "--timeout", "soon", "--", "true"],
            "--timeout",
        ),
        (&["lock", "k", "--lease", "0", "--", "true"], "--lease"),
        (&["lock", "k", "--timeout"], "--timeout"),
        (&["ping", "extra"], "no arguments"),
        (&["ping", "--timeout", "1"], "--timeout"),
        (&["stats", "--group", "g"], "--group"),
        (&["ping", "--heartbeat", "1"], "--heartbeat"),
        (&["listen", "x", "--heartbeat", "0"], "--heartbeat"),
        (&["frobnicate"], "unknown command"),
        (&[], "no command"),
        (&["-s", "a b", "ping"], "--servers"),
        (&["--tls-insecure", "--tls-ca", "x", "ping"], "contradict"),
    ];
    for (args, needle) in cases {
        let mut c = bare();
        c.args(*args);
        let out = run(c);
        assert_status(&out, 64);
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Bad names are caught before anything is sent (port 1 is closed).
    for args in [
        &["signal", "a.*", "x"][..],
        &["lock", "a b", "--", "true"],
        &["listen", ""],
    ] {
        let mut c = bare();
        c.args(["-s", "127.0.0.1:1"]).args(args);
        let out = run(c);
        assert_status(&out, 64);
        assert!(!text(&out.stderr).contains("cannot reach"), "{args:?}");
    }
}

#[test]
fn help_documents_commands_variables_and_statuses() {
    let mut c = bare();
    c.arg("--help");
    let out = run(c);
    assert_status(&out, 0);
    let help = text(&out.stdout);
    for needle in [
        "lock KEY",
        "sem KEY LIMIT",
        "signal CHANNEL",
        "listen PATTERN",
        "stats",
        "ping",
        "DFLOCK_SERVERS",
        "DFLOCK_AUTH_TOKEN",
        "DFLOCK_TLS_CA",
        "--tls-insecure",
        "DFLOCK_FENCE",
        "DFLOCK_TOKEN",
        "DFLOCK_KEY",
    ] {
        assert!(help.contains(needle), "help lacks {needle}");
    }
    for code in [
        "64", "69", "70", "74", "75", "76", "77", "78", "79", "126", "127",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(code)),
            "help lacks status {code}"
        );
    }
}

#[test]
fn unreachable_servers_exit_69() {
    // Nothing listens on port 1 of loopback.
    let port = 1;
    for args in [&["ping"][..], &["lock", "k", "--", "true"], &["stats"]] {
        let mut c = bare();
        c.args(["-s", &format!("127.0.0.1:{port}")]).args(args);
        let out = run(c);
        assert_status(&out, 69);
        assert!(
            text(&out.stderr).contains("cannot reach"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_server_speaking_garbage_exits_76() {
    let addr = fake_server(Some("HTTP/1.1 400 Bad Request\r\n"));
    for args in [
        &["ping"][..],
        &["lock", "k", "--", "true"],
        &["signal", "c", "p"],
    ] {
        let mut c = bare();
        c.args(["-s", &addr]).args(args);
        let out = run(c);
        assert_status(&out, 76);
        assert!(
            text(&out.stderr).contains("protocol error"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn tls_and_auth_from_flags_and_environment() {
    let pki = Pki::new("cli");
    let s = tls_server(&pki, &["--auth-token", "s3cret"]);
    let ca = pki.s("a-ca.pem");
    // Flags.
    let mut c = dflock(&s);
    c.args([
        "--tls-ca",
        &ca,
        "--tls-server-name",
        "localhost",
        "-a",
        "s3cret",
    ])
    .args(["lock", "t", "--", "true"]);
    assert_status(&run(c), 0);
    // Environment; a flag beats its variable.
    let mut c = bare();
    c.env("DFLOCK_SERVERS", format!("localhost:{}", s.port))
        .env("DFLOCK_TLS_CA", &ca)
        .env("DFLOCK_AUTH_TOKEN", "wrong")
        .args(["-a", "s3cret", "ping"]);
    assert_status(&run(c), 0);
    // Wrong token.
    let mut c = bare();
    c.env("DFLOCK_SERVERS", format!("localhost:{}", s.port))
        .env("DFLOCK_TLS_CA", &ca)
        .env("DFLOCK_AUTH_TOKEN", "wrong")
        .args(["lock", "t", "--", "true"]);
    let out = run(c);
    assert_status(&out, 77);
    assert!(text(&out.stderr).contains("auth"), "{}", text(&out.stderr));
    // A token file.
    let dir = TempDir::new("tokfile");
    std::fs::write(dir.file("tok"), "s3cret\n").unwrap();
    let mut c = dflock(&s);
    c.args(["--tls-insecure", "--auth-token-file"])
        .arg(dir.file("tok"))
        .arg("ping");
    assert_status(&run(c), 0);
    // A CA that did not sign the server's certificate.
    pki.issue("b");
    let mut c = dflock(&s);
    c.args([
        "--tls-ca",
        &pki.s("b-ca.pem"),
        "--tls-server-name",
        "localhost",
    ])
    .args(["-a", "s3cret", "ping"]);
    let out = run(c);
    assert_status(&out, 69);
    assert!(text(&out.stderr).contains("TLS"), "{}", text(&out.stderr));
    // An unreadable CA file is a settings error.
    let mut c = dflock(&s);
    c.args(["--tls-ca", "/nonexistent/ca.pem", "ping"]);
    assert_status(&run(c), 78);
    // Plain TCP to a TLS server fails cleanly.
    let mut c = dflock(&s);
    c.args(["-a", "s3cret", "--connect-timeout", "2", "ping"]);
    let out = run(c);
    assert!(
        matches!(out.status.code(), Some(69 | 76)),
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
}

#[test]
fn signal_and_listen_with_groups() {
    let s = Server::start(&[]);
    let mut watcher = s.connect();
    let spawn_listener = |group: Option<&str>| {
        let mut c = dflock(&s);
        c.args(["listen", "jobs.*"]);
        if let Some(g) = group {
            c.args(["--group", g]);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let mut plain = spawn_listener(None);
    wait_for_stats(&mut watcher, "\"listeners\":1", Duration::from_secs(10));
    let mut g1 = spawn_listener(Some("workers"));
    let mut g2 = spawn_listener(Some("workers"));
    wait_for_stats(
        &mut watcher,
        "\"group\":\"workers\",\"listeners\":2",
        Duration::from_secs(10),
    );
    for i in 0..4 {
        let mut c = dflock(&s);
        c.args(["signal", "jobs.build", "hello", &format!("world {i}")]);
        let out = run(c);
        assert_status(&out, 0);
        // The plain listener and one member of the group.
        assert_eq!(text(&out.stdout), "2\n");
    }
    let read_lines = |child: &mut Child, n: usize| -> Vec<String> {
        let mut r = BufReader::new(child.stdout.take().unwrap());
        let lines: Vec<String> = (0..n)
            .map(|_| {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                l.trim_end().to_string()
            })
            .collect();
        child.kill().unwrap();
        child.wait().unwrap();
        lines
    };
    let got = read_lines(&mut plain, 4);
    let want: Vec<String> = (0..4)
        .map(|i| format!("jobs.build hello world {i}"))
        .collect();
    assert_eq!(got, want);
    // Round-robin: two each.
    let a = read_lines(&mut g1, 2);
    let b = read_lines(&mut g2, 2);
    let mut all = [a, b].concat();
    all.sort();
    assert_eq!(all, want);
}

#[test]
fn listen_ends_quietly_when_its_reader_goes_away() {
    let s = Server::start(&[]);
    let mut watcher = s.connect();
    let mut c = dflock(&s);
    c.args(["listen", ">"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_stats(&mut watcher, "\"listeners\":1", Duration::from_secs(10));
    drop(child.stdout.take()); // `| head -0`
    let mut sender = s.connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "listen kept running");
        sender.cmd("signal", "x", "payload");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_status(&out, 0);
}

#[test]
fn stats_table_and_json() {
    let s = Server::start(&[]);
    let mut holder = s.connect();
    assert!(holder.cmd("l", "held-key", "0").starts_with("ok "));
    assert!(holder.cmd("sl", "pool", "0 3").starts_with("ok "));
    let mut c = dflock(&s);
    c.arg("stats");
    let out = run(c);
    assert_status(&out, 0);
    let table = text(&out.stdout);
    assert!(table.contains("2 connection(s)"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("held-key"))
        .expect(&table);
    assert!(row.contains("lock") && row.contains("1/1"), "{row}");
    let row = table.lines().find(|l| l.starts_with("pool")).expect(&table);
    assert!(row.contains("semaphore") && row.contains("1/3"), "{row}");

    let mut c = dflock(&s);
    c.args(["stats", "--json"]);
    let out = run(c);
    assert_status(&out, 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["locks"][0]["key"], "held-key");
    assert_eq!(v["semaphores"][0]["limit"], 3);
}

#[test]
fn ping_checks_every_shard() {
    let a = Server::start(&[]);
    let b = Server::start(&[]);
    let mut c = bare();
    c.args(["-s", &format!("{},{}", a.addr(), b.addr()), "ping"]);
    let out = run(c);
    assert_status(&out, 0);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains(&a.addr()) && stdout.contains(&b.addr()));
    drop(b);
    let mut c = bare();
    c.args(["-s", &format!("{},127.0.0.1:1", a.addr()), "ping"]);
    let out = run(c);
    assert_status(&out, 69);
    assert!(text(&out.stdout).contains(&a.addr()));
}

#[test]
fn a_cluster_address_list_skips_a_dead_member() {
    let s = Server::start(&[]);
    let mut c = bare();
    c.args(["-s", &format!("127.0.0.1:1|{}", s.addr())])
        .args(["lock", "k", "--", "true"]);
    assert_status(&run(c), 0);
}

#[test]
fn shard_prints_where_each_key_lives() {
    let mut c = bare();
    c.args(["-s", "a:1,b:2,c:3", "shard", "123456789", "x"]);
    let out = run(c);
    assert_status(&out, 0);
    // crc32("123456789") = 0xCBF43926 = 3421780262; % 3 = 2.
    // crc32("x") = 0x8CDC1683 = 2363233923; % 3 = 0.
    assert_eq!(text(&out.stdout), "123456789 2 c:3\nx 0 a:1\n");
}

#[test]
fn a_missing_command_exits_127_and_releases() {
    let s = Server::start(&[]);
    let mut c = dflock(&s);
    c.args(["lock", "k", "--", "/nonexistent/program"]);
    let out = run(c);
    assert_status(&out, 127);
    let mut raw = s.connect();
    assert!(raw.cmd("l", "k", "0").starts_with("ok "));
}

#[test]
fn a_holder_paused_past_its_lease_stops_its_command_when_it_wakes() {
    let s = Server::start(&[]);
    let dir = TempDir::new("paused");
    let (ready, got) = (dir.file("ready"), dir.file("got"));
    let script = format!(
        "trap 'echo TERM > {got}; exit 5' TERM; echo up > {ready}; while :; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "paused", "--lease", "1"]).args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_for_file(&ready, Duration::from_secs(10));
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    // Freeze dflock (not its command) past the lease: the server lets the
    // lease run out and grants the lock to the next in line.
    kill("-STOP");
    let mut next = s.connect();
    let reply = next.cmd("l", "paused", "5");
    assert!(reply.starts_with("ok "), "{reply}");
    kill("-CONT");
    let out = finish(child, Duration::from_secs(10));
    assert_status(&out, 79);
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "TERM\n");
}

#[test]
fn listen_keeps_its_connection_while_signals_flow() {
    // The server drops connections that send nothing for 2 s; signals
    // arriving do not count, the heartbeat does.
    let s = Server::start(&["--read-timeout", "2"]);
    let mut watcher = s.connect();
    let mut c = dflock(&s);
    c.args(["listen", "tick", "--heartbeat", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_stats(&mut watcher, "\"listeners\":1", Duration::from_secs(10));
    let mut sender = s.connect();
    for i in 0..14 {
        assert_eq!(
            sender.cmd("signal", "tick", &format!("n{i}")),
            "ok 1",
            "signal {i}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(child.try_wait().unwrap().is_none(), "listen exited");
    let mut r = BufReader::new(child.stdout.take().unwrap());
    for i in 0..14 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, format!("tick n{i}\n"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn output_to_a_closed_pipe_or_a_full_disk() {
    // A reader that goes away after one line: not an error.
    let keys: Vec<String> = (0..20_000).map(|i| format!("key-{i}")).collect();
    let mut c = bare();
    c.arg("shard")
        .args(&keys)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap(); // the reader is dropped here
    assert!(first.starts_with("key-0 0 "), "{first}");
    let out = finish(child, Duration::from_secs(10));
    assert_status(&out, 0);
    // A full disk: status 74, no panic.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut c = bare();
    c.arg("--help").stdout(full).stderr(Stdio::piped());
    let out = finish(c.spawn().unwrap(), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(74), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("panicked"));
}

fn alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; a zombie is as good as gone.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn a_lost_lock_stops_what_the_command_started_too() {
    let s = Server::start(&[]);
    let dir = TempDir::new("group");
    let (tok, grandchild) = (dir.file("token"), dir.file("grandchild"));
    // The command starts a background job that ignores SIGTERM.
    let script = format!(
        "(trap '' TERM; while :; do sleep 0.05; done) & echo $! > {gc}; echo $DFLOCK_TOKEN > {tok}; wait",
        gc = grandchild.display(),
        tok = tok.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "grp", "--lease", "2", "--kill-after", "1"])
        .args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let token = wait_for_file(&tok, Duration::from_secs(10));
    let gc = wait_for_file(&grandchild, Duration::from_secs(10))
        .trim()
        .to_string();
    assert!(alive(&gc));
    let mut raw = s.connect();
    assert_eq!(raw.cmd("r", "grp", token.trim()), "ok");
    let out = finish(child, Duration::from_secs(10));
    assert_status(&out, 79);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(&gc) {
        assert!(
            Instant::now() < deadline,
            "the background job {gc} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_command_is_stopped_when_dflock_is_killed() {
    let s = Server::start(&[]);
    let dir = TempDir::new("orphan");
    let (ready, got) = (dir.file("ready"), dir.file("got"));
    let script = format!(
        "trap 'echo TERM > {got}; exit 0' TERM; echo up > {ready}; while :; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let mut c = dflock(&s);
    c.args(["lock", "orphan"]).args(sh(&script));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_file(&ready, Duration::from_secs(10));
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert_eq!(wait_for_file(&got, Duration::from_secs(5)), "TERM\n");
    // The server freed the lock when dflock's connection closed.
    let mut raw = s.connect();
    assert!(raw.cmd("l", "orphan", "5").starts_with("ok "));
}

#[test]
fn a_command_ended_by_sigterm_ends_dflock_the_same_way() {
    use std::os::unix::process::ExitStatusExt;
    let s = Server::start(&[]);
    let mut c = dflock(&s);
    c.args(["lock", "t"]).args(sh("kill -TERM $$"));
    let out = run(c);
    assert_eq!(
        out.status.signal(),
        Some(15),
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    // Released before dflock re-raised the signal.
    let mut raw = s.connect();
    assert!(raw.cmd("l", "t", "0").starts_with("ok "));
}

/// Runs `script` under `bash -c` in a new pseudo-terminal (via Python's
/// pty module), types ^C once `ready` was printed, and returns (output,
/// how bash ended: exit code or -signal).
fn in_terminal(script: &str, ready: &str) -> (String, i32) {
    let py = r#"
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("bash", ["bash", "-c", sys.argv[1]])
out = b""
end = time.time() + 15
while sys.argv[2].encode() not in out and time.time() < end:
    out += os.read(fd, 4096)
os.write(fd, b"\x03")
while time.time() < end:
    try:
        d = os.read(fd, 4096)
    except OSError:
        break
    if not d:
        break
    out += d
_, st = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
print("\nEND", -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))
"#;
    let out = Command::new("python3")
        .args(["-c", py, script, ready])
        .output()
        .expect("python3");
    let stdout = text(&out.stdout);
    let (body, end) = stdout.rsplit_once("\nEND ").expect(&stdout);
    (body.to_string(), end.trim().parse().unwrap())
}

#[test]
fn ctrl_c_in_a_terminal_stops_the_command_and_the_script() {
    let s = Server::start(&[]);
    let script = format!(
        "for i in 1 2; do {bin} -s {addr} lock tty -- sh -c 'echo hel\"\"d; exec sleep 10'; echo after $i; done; echo end",
        bin = env!("CARGO_BIN_EXE_dflock"),
        addr = s.addr()
    );
    let t0 = Instant::now();
    // ^C once the command runs under the lock ("held" only appears in the
    // output, not in the echoed command line).
    let (out, end) = in_terminal(&script, "held");
    // The command, dflock and the shell all stop at ^C, as they would
    // without dflock: no "after 1", no second round.
    assert_eq!(end, -2, "{out}");
    assert!(!out.contains("after"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(8));
    let mut raw = s.connect();
    assert!(raw.cmd("l", "tty", "5").starts_with("ok "), "released");
}
