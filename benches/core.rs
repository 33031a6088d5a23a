//! The resource state machine: lock/release cycles through `Core::handle`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dflockd::core::{Config, Core, Outbox, SeededEntropy};
use dflockd::protocol::{Kind, Reply, Request};

fn acquire(key: &str) -> Request<'_> {
    Request::Acquire {
        key,
        timeout_s: 10,
        limit: 1,
        lease_s: None,
        kind: Kind::Lock,
    }
}

/// The 32 hex characters of a grant's token, as a client would see them.
fn token_hex(r: &Reply) -> [u8; 32] {
    let mut buf = [0u8; 64];
    let mut v = Vec::with_capacity(64);
    dflockd::protocol::encode_reply(r, &[], &mut v);
    buf[..v.len()].copy_from_slice(&v);
    let mut hex = [0u8; 32];
    hex.copy_from_slice(&buf[3..35]);
    hex
}

/// Acquires `key` for `conn` and returns the granted token's wire form.
fn grant(core: &mut Core, out: &mut Outbox, conn: u64, key: &str) -> Option<[u8; 32]> {
    let _ = core.handle(0, conn, &acquire(key), out);
    let mut found = None;
    for (c, r) in out.replies.drain(..) {
        if c == conn && matches!(r, Reply::Granted { .. }) {
            found = Some(token_hex(&r));
        }
    }
    found
}

fn release(core: &mut Core, out: &mut Outbox, conn: u64, key: &str, token: &[u8; 32]) {
    let token = std::str::from_utf8(token).unwrap();
    let _ = core.handle(0, conn, &Request::Release { key, token }, out);
    out.replies.clear();
}

fn core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));

    let mut core = Core::new(Config::default(), 1 << 40, Box::new(SeededEntropy(1)));
    let mut out = Outbox::default();
    core.connect(1);
    g.bench_function("l/r cycle, one key", |b| {
        b.iter(|| {
            let t = grant(&mut core, &mut out, 1, black_box("key-1")).unwrap();
            release(&mut core, &mut out, 1, "key-1", &t);
        })
    });

    let mut core = Core::new(
        Config {
            max_keys: 0,
            ..Config::default()
        },
        1 << 40,
        Box::new(SeededEntropy(1)),
    );
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    for c in 0..1000 {
        core.connect(c);
    }
    let mut i = 0;
    g.bench_function("l/r cycle, 1000 keys", |b| {
        b.iter(|| {
            i = (i + 1) % 1000;
            let t = grant(&mut core, &mut out, i as u64, &keys[i]).unwrap();
            release(&mut core, &mut out, i as u64, &keys[i], &t);
        })
    });

    // Hand-off: 100 connections queue on one key; each release grants the
    // next waiter, which then queues again behind the others.
    let mut core = Core::new(Config::default(), 1 << 40, Box::new(SeededEntropy(1)));
    for c in 0..100 {
        core.connect(c);
    }
    let mut holder = 0u64;
    let mut token = grant(&mut core, &mut out, 0, "hot").unwrap();
    for c in 1..100 {
        let _ = core.handle(0, c, &acquire("hot"), &mut out);
        out.replies.clear();
    }
    g.bench_function("contended hand-off, 100 waiters", |b| {
        b.iter(|| {
            let t = std::str::from_utf8(&token).unwrap();
            let _ = core.handle(
                0,
                holder,
                &Request::Release {
                    key: "hot",
                    token: t,
                },
                &mut out,
            );
            let mut next = None;
            for (c, r) in out.replies.drain(..) {
                if let Reply::Granted { .. } = r {
                    next = Some((c, token_hex(&r)));
                }
            }
            let (c, hex) = next.unwrap();
            // The old holder queues again at the tail.
            let _ = core.handle(0, holder, &acquire("hot"), &mut out);
            out.replies.clear();
            holder = c;
            token = hex;
        })
    });
    g.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);
