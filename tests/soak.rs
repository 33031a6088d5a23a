//! Soak: many clients doing random lock, semaphore and two-phase work with
//! random disconnects against the real binary, checked by the clients
//! themselves. `SOAK_SECS` sets the length (default 5 s here; `make soak`
//! runs 60 s) and `SOAK_CLIENTS` the number of client threads.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Server, stats, token_of};

const LOCK_KEYS: usize = 6;
const SEM_KEYS: usize = 3;
const SEM_LIMIT: usize = 3;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Shared {
    /// How many clients believe they hold each key right now.
    holders: Mutex<HashMap<String, usize>>,
    violations: AtomicU64,
    protocol_errors: AtomicU64,
    ops: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn acquired(&self, key: &str, limit: usize) {
        let mut h = self.holders.lock().unwrap();
        let n = h.entry(key.to_string()).or_default();
        *n += 1;
        if *n > limit {
            self.violations.fetch_add(1, Ordering::Relaxed);
            eprintln!("VIOLATION: {n} holders of {key} (limit {limit})");
        }
    }

    fn releasing(&self, key: &str) {
        let mut h = self.holders.lock().unwrap();
        *h.get_mut(key).unwrap() -= 1;
    }

    fn error(&self, what: &str, reply: &str) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("unexpected reply to {what}: {reply:?}");
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client's life: connect, then random operations until told to stop.
fn client(port: u16, seed: u64, shared: Arc<Shared>) {
    let mut rng = Rng(seed | 1);
    let mut c = Client::connect(port);
    while !shared.stop.load(Ordering::Relaxed) {
        shared.ops.fetch_add(1, Ordering::Relaxed);
        let sem = rng.below(3) == 0;
        let (key, limit, acq, enq, rel, ren, wait) = if sem {
            (
                format!("soak-s{}", rng.below(SEM_KEYS as u64)),
                SEM_LIMIT,
                "sl",
                "se",
                "sr",
                "sn",
                "sw",
            )
        } else {
            (
                format!("soak-l{}", rng.below(LOCK_KEYS as u64)),
                1,
                "l",
                "e",
                "r",
                "n",
                "w",
            )
        };
        let limit_arg = if sem {
            format!(" {SEM_LIMIT}")
        } else {
            String::new()
        };
        let token = match rng.below(4) {
            // Blocking acquire (sometimes try-once).
            0 | 1 => {
                let timeout = rng.below(3);
                let r = c.cmd(acq, &key, &format!("{timeout}{limit_arg}"));
                if r == "timeout" {
                    continue;
                }
                if !r.starts_with("ok ") {
                    shared.error(acq, &r);
                    continue;
                }
                token_of(&r)
            }
            // Two-phase.
            2 => {
                let r = c.cmd(enq, &key, limit_arg.trim());
                if r.starts_with("acquired ") {
                    token_of(&r)
                } else if r == "queued" {
                    let w = c.cmd(wait, &key, "2");
                    if w == "timeout" {
                        continue;
                    }
                    if !w.starts_with("ok ") {
                        shared.error(wait, &w);
                        continue;
                    }
                    token_of(&w)
                } else {
                    shared.error(enq, &r);
                    continue;
                }
            }
            // Something harmless in between.
            _ => {
                let r = c.cmd("ping", "_", "");
                if r != "ok" {
                    shared.error("ping", &r);
                }
                continue;
            }
        };
        shared.acquired(&key, limit);
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        if rng.below(4) == 0 {
            let r = c.cmd(ren, &key, &token);
            if !r.starts_with("ok ") {
                shared.error(ren, &r);
            }
        }
        shared.releasing(&key);
        if rng.below(10) == 0 {
            // Abrupt disconnect while holding: the server must release.
            c.shutdown();
            c = Client::connect(port);
            continue;
        }
        let r = c.cmd(rel, &key, &token);
        if r != "ok" {
            shared.error(rel, &r);
        }
        if rng.below(50) == 0 {
            c.shutdown();
            c = Client::connect(port);
        }
    }
}

#[test]
fn soak_random_clients_keep_every_invariant() {
    let secs = env_or("SOAK_SECS", 5);
    let clients = env_or("SOAK_CLIENTS", 24);
    let s = Server::start(&["--gc-interval", "1", "--gc-max-idle", "1"]);
    let mut admin = s.connect();
    assert!(stats(&mut admin).starts_with("{\"connections\":1,"));
    let rss_start = rss_kib(s.child.id());
    let shared = Arc::new(Shared {
        holders: Mutex::new(HashMap::new()),
        violations: AtomicU64::new(0),
        protocol_errors: AtomicU64::new(0),
        ops: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let shared = shared.clone();
            let port = s.port;
            std::thread::spawn(move || client(port, 0x9E37_79B9 * (i + 1), shared))
        })
        .collect();
    let t0 = Instant::now();
    let mut rss_peak = rss_start;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        rss_peak = rss_peak.max(rss_kib(s.child.id()));
        // stats stays consistent with itself while the load runs.
        let j = stats(&mut admin);
        assert!(j.starts_with("{\"connections\":"), "{j}");
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread panicked");
    }
    let ops = shared.ops.load(Ordering::Relaxed);
    eprintln!(
        "soak: {ops} operations by {clients} clients in {secs} s; server RSS {rss_start} KiB at start, peak {rss_peak} KiB"
    );
    assert_eq!(
        shared.violations.load(Ordering::Relaxed),
        0,
        "mutual exclusion violated"
    );
    assert_eq!(
        shared.protocol_errors.load(Ordering::Relaxed),
        0,
        "unexpected replies"
    );
    assert!(ops > clients * 10, "the soak barely ran: {ops} operations");
    // Every key drains: nothing held, nobody waiting, and the clients agree.
    assert!(shared.holders.lock().unwrap().values().all(|&n| n == 0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = stats(&mut admin);
        if j.starts_with("{\"connections\":1,\"locks\":[],\"semaphores\":[],\"idle_locks\":[],\"idle_semaphores\":[]") {
            break;
        }
        assert!(Instant::now() < deadline, "state left behind: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_end = rss_kib(s.child.id());
    eprintln!("soak: server RSS {rss_end} KiB at the end");
    assert!(
        rss_end <= rss_start + 8 * 1024,
        "server RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
}
