//! The commands other than `lock` and `sem`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use dflockd_client::{Client, Config, Stats, shard_index};

use crate::args::{Command, Invocation};
use crate::{emit, fail, supervise, write_out};

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
        Command::Listen {
            pattern,
            group,
            heartbeat,
        } => listen(&cfg, &pattern, group.as_deref(), heartbeat),
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
        Ok(n) => emit(&format!("{n}\n")),
        Err(e) => fail(&format!("signal {channel}"), &e),
    }
}

/// Prints signals until interrupted, pinging every `heartbeat` (well
/// inside the server's idle read timeout, 23 s by default).
fn listen(cfg: &Config, pattern: &str, group: Option<&str>, heartbeat: Duration) -> u8 {
    let mut c = match Client::connect(cfg) {
        Ok(c) => c,
        Err(e) => return fail("listen", &e),
    };
    if let Err(e) = c.listen(pattern, group) {
        return fail(&format!("listen {pattern}"), &e);
    }
    // Signals are pushed, not requested: they do not count as activity for
    // the server's idle timeout, so ping on a clock, not only when quiet.
    let mut last_request = Instant::now();
    loop {
        let quiet = heartbeat.saturating_sub(last_request.elapsed());
        if quiet.is_zero() {
            if let Err(e) = c.ping() {
                return fail("listen: heartbeat", &e);
            }
            last_request = Instant::now();
            continue;
        }
        match c.next_signal(Some(quiet)) {
            Ok(Some(sig)) => {
                // Stops when the reader is gone (`| head -1`), with 0.
                if let Some(st) = write_out(&format!("{} {}\n", sig.channel, sig.payload)) {
                    return st;
                }
            }
            Ok(None) => {}
            Err(e) => return fail("listen", &e),
        }
    }
}

fn stats(cfg: &Config, json: bool) -> u8 {
    let mut worst = 0;
    let mut out = String::new();
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
            out.push_str(&raw);
            out.push('\n');
            continue;
        }
        match Stats::parse(&raw) {
            Ok(s) => print_table(&mut out, &addr, &s),
            Err(e) => worst = worst.max(fail(&format!("stats {addr}"), &e)),
        }
    }
    worst.max(emit(&out))
}

fn print_table(out: &mut String, addr: &str, s: &Stats) {
    let _ = writeln!(out, "server {addr}: {} connection(s)", s.connections);
    if let Some(c) = &s.cluster {
        let _ = writeln!(
            out,
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
    table(out, &["KEY", "KIND", "HELD", "WAITERS", "STATE"], &rows);
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
        table(out, &["PATTERN", "GROUP", "LISTENERS"], &rows);
    }
}

fn table<const N: usize>(out: &mut String, head: &[&str; N], rows: &[[String; N]]) {
    if rows.is_empty() {
        let _ = writeln!(out, "(no {}s)", head[0].to_lowercase());
        return;
    }
    let mut width = head.map(str::len);
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = width[i]);
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(head);
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
}

fn ping(cfg: &Config) -> u8 {
    let mut worst = 0;
    let mut out = String::new();
    for shard in cfg.servers().shards() {
        let r = Client::connect_to(cfg, shard).and_then(|mut c| {
            let t = Instant::now();
            c.ping()?;
            Ok((c.peer().unwrap_or_default().to_string(), t.elapsed()))
        });
        match r {
            Ok((addr, rtt)) => {
                let _ = writeln!(out, "{addr} ok {:.3} ms", rtt.as_secs_f64() * 1e3);
            }
            Err(e) => worst = worst.max(fail(&format!("ping {}", shard.join("|")), &e)),
        }
    }
    worst.max(emit(&out))
}

fn shard(cfg: &Config, keys: &[String]) -> u8 {
    let shards = cfg.servers().shards();
    let mut out = String::new();
    for key in keys {
        let i = shard_index(key, shards.len());
        let _ = writeln!(out, "{key} {i} {}", shards[i].join("|"));
    }
    emit(&out)
}
