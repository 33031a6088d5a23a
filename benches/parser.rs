//! The frame parser and request validation: bytes to a typed request.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dflockd::protocol::{FrameDecoder, parse_request};

const LOCK: &[u8] = b"l\nmy-resource-key\n10 30\n";
const RELEASE: &[u8] = b"r\nmy-resource-key\n0000010000000001a1b2c3d4e5f60718\n";

fn decode_all(buf: &[u8]) -> usize {
    let mut d = FrameDecoder::new();
    let mut at = 0;
    let mut n = 0;
    while let Some(frame) = d.decode(&buf[at..]).unwrap() {
        let req = parse_request(&buf[at..], &frame).unwrap();
        black_box(req);
        at += frame.len;
        n += 1;
    }
    n
}

fn parser(c: &mut Criterion) {
    let mut g = c.benchmark_group("parser");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode+parse l", |b| b.iter(|| decode_all(black_box(LOCK))));
    g.bench_function("decode+parse r", |b| {
        b.iter(|| decode_all(black_box(RELEASE)))
    });
    g.bench_function("decode only l", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            black_box(d.decode(black_box(LOCK)).unwrap())
        })
    });
    // A pipelined read: 32 l/r pairs in one buffer.
    let mut burst = Vec::new();
    for _ in 0..32 {
        burst.extend_from_slice(LOCK);
        burst.extend_from_slice(RELEASE);
    }
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode+parse 64 pipelined", |b| {
        b.iter(|| assert_eq!(decode_all(black_box(&burst)), 64))
    });
    // Input that trickles in a byte at a time (the decoder resumes its scan).
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode l byte by byte", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            let mut got = None;
            for end in 1..=LOCK.len() {
                got = d.decode(black_box(&LOCK[..end])).unwrap();
            }
            black_box(got.unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, parser);
criterion_main!(benches);
