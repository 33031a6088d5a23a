//! Crash consistency of the write-ahead log: a child process appends and
//! syncs as fast as it can (compacting now and then), printing each index
//! once `sync` returned; the test kills it with SIGKILL at a random moment,
//! reopens the log, and checks that every acknowledged entry is there,
//! intact and contiguous. Many rounds on one directory, so each recovery
//! also starts from the previous one's repairs.
//!
//! `WAL_CRASH_ROUNDS` sets the rounds (default 25); `WAL_CRASH_SEED` replays.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dflockd::storage::wal::{Entry, HardState, Identity, Snapshot, Wal};

const ID: Identity = Identity {
    node_id: 3,
    cluster_id: 0xc0ffee,
};

/// The payload of entry `i` in term `t`: its length and bytes depend on
/// both, so a torn or misplaced record cannot pass for another.
fn payload(i: u64, t: u64) -> Vec<u8> {
    let n = (i.wrapping_mul(2654435761) % 700) as usize + 1;
    (0..n)
        .map(|k| (i as usize + k * 31 + t as usize) as u8)
        .collect()
}

/// The child: appends forever. Runs only when the test spawns it.
#[test]
#[ignore = "run by wal_survives_kill_9 in a child process"]
fn wal_crash_child() {
    let Some(dir) = std::env::var_os("WAL_CRASH_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (mut wal, rec) = Wal::open(&dir, ID).unwrap();
    let mut entries = rec.entries;
    let mut next = entries
        .last()
        .map(|e| e.index + 1)
        .or(rec.snapshot.as_ref().map(|s| s.index + 1))
        .unwrap_or(1);
    let term = rec.hard_state.term + 1;
    let mut seed = next.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let batch = seed % 40 + 1;
        for _ in 0..batch {
            let data = payload(next, term);
            wal.append(next, term, &data);
            entries.push(Entry {
                index: next,
                term,
                data,
            });
            next += 1;
        }
        let hs = HardState {
            term,
            vote: 3,
            commit: next - 1,
        };
        wal.set_hard_state(&hs);
        wal.sync().unwrap();
        println!("acked {}", next - 1);
        if seed % 50 == 0 && entries.len() > 100 {
            // Compact: snapshot at some index, keep the rest.
            let at = entries[entries.len() - 20].index;
            let snap = Snapshot {
                index: at,
                term,
                meta: b"members 1,2,3".to_vec(),
                data: at.to_le_bytes().to_vec(),
            };
            entries.retain(|e| e.index > at);
            wal.install_snapshot(&snap, &entries, &hs).unwrap();
            println!("acked {}", next - 1);
        }
    }
}

/// Reopens the log and checks it; returns (last index, snapshot index).
fn check(dir: &Path, acked: u64) -> (u64, u64) {
    let (_, rec) = Wal::open(dir, ID).unwrap_or_else(|e| panic!("reopen failed: {e}"));
    let mut expect = rec.snapshot.as_ref().map_or(1, |s| {
        assert_eq!(s.data, s.index.to_le_bytes(), "snapshot content");
        s.index + 1
    });
    for e in &rec.entries {
        assert_eq!(e.index, expect, "entries not contiguous");
        assert_eq!(
            e.data,
            payload(e.index, e.term),
            "entry {} damaged",
            e.index
        );
        expect += 1;
    }
    let last = expect - 1;
    assert!(
        last >= acked,
        "acknowledged up to {acked}, recovered only up to {last}"
    );
    assert!(rec.hard_state.commit <= last);
    (last, rec.snapshot.map_or(0, |s| s.index))
}

#[test]
fn wal_survives_kill_9() {
    let rounds: u32 = std::env::var("WAL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let mut seed: u64 = std::env::var("WAL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    println!("WAL_CRASH_SEED={seed}");
    let dir = std::env::temp_dir().join(format!("dflockd-wal-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().unwrap();
    let mut total_acked = 0;
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(20 + seed % 180);
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "wal_crash_child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("WAL_CRASH_DIR", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("acked ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        let start = Instant::now();
        let mut acked = total_acked;
        // Wait until the child acknowledged something, then let it run.
        while let Ok(n) = rx.recv_timeout(Duration::from_secs(20)) {
            acked = acked.max(n);
            if start.elapsed() >= run_for {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        // Acknowledgements printed before the kill count too.
        while let Ok(n) = rx.try_recv() {
            acked = acked.max(n);
        }
        assert!(
            acked > total_acked,
            "round {round}: the child acknowledged nothing new"
        );
        let (last, snap) = check(&dir, acked);
        total_acked = acked;
        println!("round {round}: acknowledged {acked}, recovered {last}, snapshot at {snap}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
