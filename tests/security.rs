//! TLS, token authentication, per-IP limits and SIGHUP reload through the
//! real binary, with certificates made at test time.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::pki::{Pki, TlsClient, client_config, tls_server};
use common::{Client, Server, token_of};

#[test]
fn every_command_over_tls() {
    let pki = Pki::new("cmds");
    let s = tls_server(&pki, &[]);
    let mut a = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    let mut b = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(a.cmd("ping", "_", ""), "ok");
    let t = token_of(&a.cmd("l", "k", "0"));
    assert_eq!(b.cmd("l", "k", "0"), "timeout");
    assert_eq!(a.cmd("n", "k", &t), "ok 33");
    assert_eq!(b.cmd("e", "k", ""), "queued");
    assert_eq!(a.cmd("r", "k", &t), "ok");
    assert!(b.cmd("w", "k", "1").starts_with("ok "));
    assert!(a.cmd("sl", "s", "0 2").starts_with("ok "));
    assert_eq!(a.cmd("listen", "x.*", ""), "ok");
    assert_eq!(b.cmd("signal", "x.y", "hi"), "ok 1");
    let mut push = String::new();
    a.reader.read_line(&mut push).unwrap();
    assert_eq!(push, "sig x.y hi\n");
    assert!(
        a.cmd("stats", "_", "_")
            .starts_with("ok {\"connections\":2,")
    );
    // A 64 KiB signal payload crosses several TLS records.
    let big = "p".repeat(65536);
    assert_eq!(b.cmd("signal", "x.big", &big), "ok 1");
    let mut line = String::new();
    a.reader.read_line(&mut line).unwrap();
    assert_eq!(line.len(), "sig x.big ".len() + 65536 + 1);
}

#[test]
fn tls12_is_accepted() {
    let pki = Pki::new("tls12");
    let s = tls_server(&pki, &[]);
    let mut c =
        TlsClient::connect_with(s.port, client_config(&pki.path("a-ca.pem"), true)).unwrap();
    assert_eq!(c.cmd("ping", "_", ""), "ok");
    let (_, conn) = (
        c.reader.get_ref().sock.peer_addr(),
        &c.reader.get_ref().conn,
    );
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[test]
fn a_client_trusting_another_ca_is_rejected() {
    let pki = Pki::new("wrongca");
    pki.issue("b");
    let s = tls_server(&pki, &[]);
    assert!(TlsClient::connect(s.port, &pki.path("b-ca.pem")).is_err());
    // The server is unaffected.
    let mut ok = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(ok.cmd("ping", "_", ""), "ok");
}

#[test]
fn plaintext_to_a_tls_port_is_closed() {
    let pki = Pki::new("plain");
    let s = tls_server(&pki, &[]);
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"l\nk\n0\n").unwrap();
    let mut buf = Vec::new();
    // The server answers with a TLS alert at most, then closes.
    let _ = c.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("ok"), "{buf:?}");
    let mut ok = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(ok.cmd("ping", "_", ""), "ok");
}

#[test]
fn a_stalled_handshake_is_closed_after_the_read_timeout() {
    let pki = Pki::new("stall");
    let s = tls_server(&pki, &["--read-timeout", "1"]);
    let mut stalled = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    // Half a ClientHello record header, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let t0 = Instant::now();
    let mut good = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(good.cmd("ping", "_", ""), "ok");
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected a close");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let mut fresh = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(fresh.cmd("ping", "_", ""), "ok");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let pki = Pki::new("reload");
    pki.issue("b");
    let cert = pki.s("live-cert.pem");
    let key = pki.s("live-key.pem");
    std::fs::copy(pki.path("a-cert.pem"), &cert).unwrap();
    std::fs::copy(pki.path("a-key.pem"), &key).unwrap();
    let s = Server::start(&["--tls-cert", &cert, "--tls-key", &key]);
    let mut old = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    let t = token_of(&old.cmd("l", "held", "0"));
    std::fs::copy(pki.path("b-cert.pem"), &cert).unwrap();
    std::fs::copy(pki.path("b-key.pem"), &key).unwrap();
    s.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut c) = TlsClient::connect(s.port, &pki.path("b-ca.pem")) {
            assert_eq!(c.cmd("ping", "_", ""), "ok");
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(TlsClient::connect(s.port, &pki.path("a-ca.pem")).is_err());
    assert_eq!(old.cmd("r", "held", &t), "ok");
    // A broken reload keeps the current material.
    std::fs::write(&key, "not a key").unwrap();
    s.signal("HUP");
    std::thread::sleep(Duration::from_millis(200));
    let mut c = TlsClient::connect(s.port, &pki.path("b-ca.pem")).unwrap();
    assert_eq!(c.cmd("ping", "_", ""), "ok");
    let log = s.drain_log().join("\n");
    assert!(log.contains("TLS reload failed"), "{log}");
}

#[test]
fn bad_tls_material_is_a_startup_error() {
    let pki = Pki::new("bad");
    pki.issue("b");
    let bin = env!("CARGO_BIN_EXE_dflockd");
    for (args, needle) in [
        (
            vec!["--tls-cert", &pki.s("a-cert.pem")][..].to_vec(),
            "--tls-key",
        ),
        (vec!["--tls-key", &pki.s("a-key.pem")], "--tls-cert"),
        (
            vec![
                "--tls-cert",
                &pki.s("missing.pem"),
                "--tls-key",
                &pki.s("a-key.pem"),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--tls-cert",
                &pki.s("a-cert.pem"),
                "--tls-key",
                &pki.s("b-key.pem"),
            ],
            "does not fit",
        ),
    ] {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn sec1_and_pkcs8_keys_load() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no openssl command to convert keys");
        return;
    }
    let pki = Pki::new("keys");
    let sec1 = pki.s("a-key-sec1.pem");
    let ok = std::process::Command::new("openssl")
        .args(["ec", "-in", &pki.s("a-key.pem"), "-out", &sec1])
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok);
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    let s = Server::start(&["--tls-cert", &pki.s("a-cert.pem"), "--tls-key", &sec1]);
    let mut c = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(c.cmd("ping", "_", ""), "ok");
}

#[test]
fn rsa_pkcs1_keys_load() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no openssl command to make an RSA certificate");
        return;
    }
    let pki = Pki::new("rsa");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&pki.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&["genrsa", "-traditional", "-out", "rsa-key.pem", "2048"]);
    openssl(&[
        "req",
        "-x509",
        "-key",
        "rsa-key.pem",
        "-out",
        "rsa-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
    ]);
    let key = std::fs::read_to_string(pki.path("rsa-key.pem")).unwrap();
    assert!(key.contains("BEGIN RSA PRIVATE KEY"), "not PKCS#1: {key}");
    let s = Server::start(&[
        "--tls-cert",
        &pki.s("rsa-cert.pem"),
        "--tls-key",
        &pki.s("rsa-key.pem"),
    ]);
    // The self-signed certificate is its own trust anchor.
    let mut c = TlsClient::connect(s.port, &pki.path("rsa-cert.pem")).unwrap();
    assert_eq!(c.cmd("ping", "_", ""), "ok");
}

fn auth_fails_and_closes(c: &mut Client, cmd: &str, arg: &str) {
    let t0 = Instant::now();
    assert_eq!(c.cmd(cmd, "_", arg), "error_auth");
    assert!(c.closed_within(Duration::from_secs(2)));
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(80), "closed after {took:?}");
}

#[test]
fn auth_missing_wrong_and_right() {
    let s = Server::start(&["--auth-token", "correct horse"]);
    let mut none = s.connect();
    auth_fails_and_closes(&mut none, "l", "0");
    let mut wrong = s.connect();
    auth_fails_and_closes(&mut wrong, "auth", "correct horsE");
    for other in ["", "c", "correct horse battery", &"x".repeat(60_000)] {
        let mut c = s.connect();
        auth_fails_and_closes(&mut c, "auth", other);
    }
    let mut right = s.connect();
    assert_eq!(right.cmd("auth", "_", "correct horse"), "ok");
    assert!(right.cmd("l", "k", "0").starts_with("ok "));
    let log = s.drain_log().join("\n");
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("correct horse"), "the token was logged");
}

#[test]
fn failing_auth_does_not_delay_other_clients() {
    let s = Server::start(&["--auth-token", "tok"]);
    let mut good = s.connect();
    assert_eq!(good.cmd("auth", "_", "tok"), "ok");
    let mut bad: Vec<Client> = (0..50).map(|_| s.connect()).collect();
    for b in bad.iter_mut() {
        b.send_cmd("auth", "_", "nope");
    }
    // While fifty connections wait out their 100 ms, the good client is
    // served: the delay is a timer, not a sleep (fifty sleeps in the loop
    // would hold it up for five seconds).
    let t0 = Instant::now();
    for _ in 0..20 {
        assert_eq!(good.cmd("ping", "_", ""), "ok");
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    for b in bad.iter_mut() {
        assert_eq!(b.line(), "error_auth");
    }
}

#[test]
fn a_read_error_before_auth_is_an_auth_error() {
    let s = Server::start(&["--auth-token", "tok"]);
    let mut c = s.connect();
    c.send(format!("auth\n{}\n", "k".repeat(300)).as_bytes());
    assert_eq!(c.line(), "error_auth");
}

#[test]
fn without_a_token_auth_is_an_error() {
    let s = Server::start(&[]);
    let mut c = s.connect();
    assert_eq!(c.cmd("auth", "_", "anything"), "error");
    assert_eq!(c.cmd("ping", "_", ""), "ok");
}

#[test]
fn token_from_file_env_precedence_and_reload() {
    let dir = std::env::temp_dir().join(format!("dflockd-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "  first-token\n").unwrap();
    let f = file.to_string_lossy().into_owned();
    // The file flag beats the variable.
    let s = Server::start_with_env(
        &["--auth-token-file", &f],
        &[("DFLOCKD_AUTH_TOKEN", "from-env")],
    );
    let mut c = s.connect();
    assert_eq!(c.cmd("auth", "_", "first-token"), "ok");
    std::fs::write(&file, "second-token").unwrap();
    s.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut n = s.connect();
        if n.cmd("auth", "_", "second-token") == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "token never reloaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The established connection keeps working.
    assert_eq!(c.cmd("ping", "_", ""), "ok");
    drop(s);
    // The explicit flag beats everything; the variable works alone.
    let s = Server::start_with_env(&["--auth-token", "flag"], &[("DFLOCKD_AUTH_TOKEN", "env")]);
    assert_eq!(s.connect().cmd("auth", "_", "flag"), "ok");
    drop(s);
    let s = Server::start_with_env(&[], &[("DFLOCKD_AUTH_TOKEN_FILE", &f)]);
    assert_eq!(s.connect().cmd("auth", "_", "second-token"), "ok");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn auth_over_tls() {
    let pki = Pki::new("auth");
    let s = tls_server(&pki, &["--auth-token", "tls-secret"]);
    let mut c = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(c.cmd("ping", "_", ""), "error_auth");
    let mut c = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(c.cmd("auth", "_", "tls-secret"), "ok");
    assert!(c.cmd("l", "k", "0").starts_with("ok "));
}

#[test]
fn per_ip_connection_cap() {
    let s = Server::start(&["--max-connections-per-ip", "2"]);
    let mut a = s.connect();
    let mut b = s.connect();
    assert_eq!(a.cmd("ping", "_", ""), "ok");
    assert_eq!(b.cmd("ping", "_", ""), "ok");
    for _ in 0..5 {
        let mut c = s.connect();
        assert!(c.closed_within(Duration::from_secs(2)));
    }
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    let mut d = s.connect();
    assert_eq!(d.cmd("ping", "_", ""), "ok");
    let log = s.drain_log().join("\n");
    assert_eq!(
        log.matches("--max-connections-per-ip 2 reached").count(),
        1,
        "{log}"
    );
}

#[test]
fn connections_that_close_during_the_handshake_leave_the_server_up() {
    let pki = Pki::new("early-close");
    let mut s = tls_server(&pki, &[]);
    for i in 0..20 {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        if i % 2 == 1 {
            // Half a ClientHello, then gone.
            c.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap();
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.is_running(), "the server died");
    let mut ok = TlsClient::connect(s.port, &pki.path("a-ca.pem")).unwrap();
    assert_eq!(ok.cmd("ping", "_", ""), "ok");
}
