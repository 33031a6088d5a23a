//! The timer wheel with a million timers: insert, cancel, and advancing time
//! until every one has fired.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dflockd::timer::TimerWheel;

const N: u64 = 1_000_000;

/// Deadlines spread over about ten minutes, in a scrambled order.
fn deadline(i: u64) -> u64 {
    1 + (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) % 600_000
}

fn filled() -> (TimerWheel<u64>, Vec<dflockd::timer::TimerHandle>) {
    let mut w = TimerWheel::new();
    let handles = (0..N).map(|i| w.insert(deadline(i), i)).collect();
    (w, handles)
}

fn timer(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer wheel 1M");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N));
    g.bench_function("insert 1M", |b| {
        b.iter_batched(
            TimerWheel::<u64>::new,
            |mut w| {
                for i in 0..N {
                    black_box(w.insert(deadline(i), i));
                }
                w
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("cancel 1M", |b| {
        b.iter_batched(
            filled,
            |(mut w, handles)| {
                for h in &handles {
                    black_box(w.cancel(*h));
                }
                (w, handles)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("advance through 1M (1 ms steps)", |b| {
        b.iter_batched(
            filled,
            |(mut w, handles)| {
                let mut fired = Vec::with_capacity(4096);
                let mut now = 0;
                let mut total = 0;
                while !w.is_empty() {
                    now += 1;
                    w.expire(now, &mut fired);
                    total += fired.len();
                    fired.clear();
                }
                assert_eq!(total as u64, N);
                (w, handles)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // The steady state of a busy server: a million armed timers, one
    // insert and one cancel per operation.
    let mut g = c.benchmark_group("timer wheel steady");
    g.throughput(Throughput::Elements(1));
    let (mut w, _) = filled();
    let mut i = N;
    g.bench_function("insert+cancel with 1M armed", |b| {
        b.iter(|| {
            i += 1;
            let h = w.insert(deadline(i), i);
            black_box(w.cancel(h))
        })
    });
    g.finish();
}

criterion_group!(benches, timer);
criterion_main!(benches);
