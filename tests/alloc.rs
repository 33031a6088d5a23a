//! Steady state does no heap allocation per command: 100,000 `l`/`r` cycles
//! through the real decode (FrameDecoder + parse_request) → Core::handle →
//! encode_reply path, on in-memory buffers, with a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use dflockd::core::{Config, Core, OsEntropy, Outbox};
use dflockd::protocol::{FrameDecoder, encode_reply, parse_request};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only the test's own thread is counted (the harness allocates too).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One connection's worth of buffers, driven like the event loop drives them.
struct Pipe {
    core: Core,
    outbox: Outbox,
    decoder: FrameDecoder,
    input: Vec<u8>,
    output: Vec<u8>,
    now: u64,
}

const CONN: u64 = 1;

impl Pipe {
    /// Decodes every complete request in `input`, applies it, encodes the
    /// replies into `output`.
    fn turn(&mut self) {
        let mut consumed = 0;
        while let Some(frame) = self.decoder.decode(&self.input[consumed..]).unwrap() {
            let buf = &self.input[consumed..];
            let req = parse_request(buf, &frame).expect("valid request");
            let _ = self.core.handle(self.now, CONN, &req, &mut self.outbox);
            for (_, reply) in self.outbox.replies.drain(..) {
                encode_reply(&reply, &self.outbox.json, &mut self.output);
            }
            consumed += frame.len;
        }
        self.input.drain(..consumed);
    }

    fn cycle(&mut self, key: &[u8]) {
        self.input.extend_from_slice(b"l\n");
        self.input.extend_from_slice(key);
        self.input.extend_from_slice(b"\n10\n");
        self.turn();
        // `ok <32 hex> <lease>\n`
        assert!(
            self.output.starts_with(b"ok "),
            "{:?}",
            String::from_utf8_lossy(&self.output)
        );
        let mut token = [0u8; 32];
        token.copy_from_slice(&self.output[3..35]);
        self.output.clear();
        self.input.extend_from_slice(b"r\n");
        self.input.extend_from_slice(key);
        self.input.push(b'\n');
        self.input.extend_from_slice(&token);
        self.input.push(b'\n');
        self.turn();
        assert_eq!(self.output, b"ok\n");
        self.output.clear();
    }
}

#[test]
fn lock_release_cycles_do_not_allocate() {
    let mut core = Core::new(Config::default(), 1 << 40, Box::new(OsEntropy));
    core.connect(CONN);
    let mut p = Pipe {
        core,
        outbox: Outbox::default(),
        decoder: FrameDecoder::new(),
        input: Vec::with_capacity(4096),
        output: Vec::with_capacity(4096),
        now: 0,
    };
    let keys: [&[u8]; 4] = [b"alpha", b"beta", b"gamma", b"delta"];
    let run = |p: &mut Pipe, cycles: usize| {
        for i in 0..cycles {
            p.cycle(keys[i % keys.len()]);
            if i % 1000 == 999 {
                // Time moves on: the timers (leases, idle-key GC) run too.
                p.now += 1;
                p.core.tick(p.now, &mut p.outbox);
                assert!(p.outbox.replies.is_empty());
            }
        }
    };
    // Warm-up: buffers, maps and the timer slab reach their working size.
    run(&mut p, 1_000);

    COUNTING.with(|c| c.set(true));
    // The counter itself works.
    let probe = ALLOCATIONS.load(Ordering::Relaxed);
    drop(std::hint::black_box(Vec::<u8>::with_capacity(16)));
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), probe + 1);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    run(&mut p, 100_000);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNTING.with(|c| c.set(false));

    assert!(
        allocations < 100,
        "{allocations} heap allocations in 100,000 l/r cycles after warm-up"
    );
}
