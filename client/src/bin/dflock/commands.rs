//! The commands other than `lock` and `sem`.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use dflockd_client::{Client, Config, Stats, shard_index};

use crate::args::{Command, Invocation};
use crate::{fail, status, supervise};

/// How often `listen` pings an idle connection, well inside the server's
/// idle read timeout (23 s by default).
const HEARTBEAT: Duration = Duration::from_secs(5);

pub fn run(inv: Invocation) -> u8 {
    let cfg = inv.cfg;
    match inv.command {
        Command::Hold {
            key,
            limit,
            timeout,
            lease,
            kill_after,
            argv,
        } => supervise::run(&cfg, &key, limit, timeout, lease, kill_after, &argv),
        Command::Signal { channel, payload } => signal(&cfg, &channel, &payload),
        Command::Listen { pattern, group } => listen(&cfg, &pattern, group.as_deref()),
        Command::Stats { json } => stats(&cfg, json),
        Command::Ping => ping(&cfg),
        Command::Shard { keys } => shard(&cfg, &keys),
    }
}

fn signal(cfg: &Config, channel: &str, payload: &str) -> u8 {
    // Signals are not sharded: publishers and listeners meet on the first
    // shard, whatever the channel.
    let r = Client::connect(cfg).and_then(|mut c| c.signal(channel, payload));
    match r {
        Ok(n) => {
            println!("{n}");
            0
        }
        Err(e) => fail(&format!("signal {channel}"), &e),
    }
}

fn listen(cfg: &Config, pattern: &str, group: Option<&str>) -> u8 {
    let mut c = match Client::connect(cfg) {
        Ok(c) => c,
        Err(e) => return fail("listen", &e),
    };
    if let Err(e) = c.listen(pattern, group) {
        return fail(&format!("listen {pattern}"), &e);
    }
    let stdout = io::stdout();
    loop {
        match c.next_signal(Some(HEARTBEAT)) {
            Ok(Some(sig)) => {
                let mut out = stdout.lock();
                let w = writeln!(out, "{} {}", sig.channel, sig.payload).and_then(|()| out.flush());
                if let Err(e) = w {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        return 0; // the reader is gone (`| head -1`): done
                    }
                    eprintln!("dflock: listen: writing stdout: {e}");
                    return status::OUTPUT;
                }
            }
            Ok(None) => {
                if let Err(e) = c.ping() {
                    return fail("listen: heartbeat", &e);
                }
            }
            Err(e) => return fail("listen", &e),
        }
    }
}

fn stats(cfg: &Config, json: bool) -> u8 {
    let mut worst = 0;
    for shard in cfg.servers().shards() {
        let r = Client::connect_to(cfg, shard).and_then(|mut c| {
            let raw = c.stats_json()?;
            let addr = c.peer().unwrap_or_default().to_string();
            Ok((addr, raw))
        });
        let (addr, raw) = match r {
            Ok(x) => x,
            Err(e) => {
                worst = worst.max(fail(&format!("stats {}", shard.join("|")), &e));
                continue;
            }
        };
        if json {
            println!("{raw}");
            continue;
        }
        match Stats::parse(&raw) {
            Ok(s) => print_table(&addr, &s),
            Err(e) => worst = worst.max(fail(&format!("stats {addr}"), &e)),
        }
    }
    worst
}

fn print_table(addr: &str, s: &Stats) {
    println!("server {addr}: {} connection(s)", s.connections);
    if let Some(c) = &s.cluster {
        println!(
            "cluster: node {}, leader {}, term {}",
            c.node_id, c.leader_id, c.term
        );
    }
    let mut rows: Vec<[String; 5]> = Vec::new();
    for l in &s.locks {
        rows.push([
            l.key.clone(),
            "lock".into(),
            "1/1".into(),
            l.waiters.to_string(),
            format!("lease {:.1}s left", l.lease_expires_in_s),
        ]);
    }
    for m in &s.semaphores {
        rows.push([
            m.key.clone(),
            "semaphore".into(),
            format!("{}/{}", m.holders, m.limit),
            m.waiters.to_string(),
            String::new(),
        ]);
    }
    for (list, kind) in [(&s.idle_locks, "lock"), (&s.idle_semaphores, "semaphore")] {
        for i in list {
            rows.push([
                i.key.clone(),
                kind.into(),
                "0".into(),
                "0".into(),
                format!("idle {:.1}s", i.idle_s),
            ]);
        }
    }
    table(&["KEY", "KIND", "HELD", "WAITERS", "STATE"], &rows);
    if !s.signal_channels.is_empty() {
        let rows: Vec<[String; 3]> = s
            .signal_channels
            .iter()
            .map(|c| {
                [
                    c.pattern.clone(),
                    if c.group.is_empty() {
                        "-".into()
                    } else {
                        c.group.clone()
                    },
                    c.listeners.to_string(),
                ]
            })
            .collect();
        table(&["PATTERN", "GROUP", "LISTENERS"], &rows);
    }
}

fn table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) {
    if rows.is_empty() {
        println!("(no {})", head[0].to_lowercase() + "s");
        return;
    }
    let mut width = head.map(str::len);
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head);
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
}

fn ping(cfg: &Config) -> u8 {
    let mut worst = 0;
    for shard in cfg.servers().shards() {
        let r = Client::connect_to(cfg, shard).and_then(|mut c| {
            let t = Instant::now();
            c.ping()?;
            Ok((c.peer().unwrap_or_default().to_string(), t.elapsed()))
        });
        match r {
            Ok((addr, rtt)) => println!("{addr} ok {:.3} ms", rtt.as_secs_f64() * 1e3),
            Err(e) => worst = worst.max(fail(&format!("ping {}", shard.join("|")), &e)),
        }
    }
    worst
}

fn shard(cfg: &Config, keys: &[String]) -> u8 {
    let shards = cfg.servers().shards();
    for key in keys {
        let i = shard_index(key, shards.len());
        println!("{key} {i} {}", shards[i].join("|"));
    }
    0
}
