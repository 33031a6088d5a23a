//! Fencing-token generation.
//!
//! The high half of a token is a counter that strictly increases with every
//! grant; it starts from the wall clock in nanoseconds (supplied by the
//! caller), so it keeps increasing across restarts. The low half is random,
//! drawn from an [`Entropy`] source in batches rather than one call per grant.

use crate::protocol::Token;

/// A source of random bytes (the OS CSPRNG in the server, a seeded generator
/// in tests and simulations).
pub trait Entropy {
    fn fill(&mut self, buf: &mut [u8]);
}

/// The operating system's CSPRNG.
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // Failure to read the OS CSPRNG leaves no safe way to issue tokens.
        getrandom::fill(buf).expect("the OS random number generator failed");
    }
}

/// A deterministic generator (xorshift64*) for tests and simulation.
pub struct SeededEntropy(pub u64);

impl Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0 | 1;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Tokens' random halves drawn from the entropy source at a time.
pub(super) const BATCH: usize = 256;

pub struct TokenSource {
    fence: u64,
    pool: [u8; BATCH * 8],
    pos: usize,
    entropy: Box<dyn Entropy>,
}

impl TokenSource {
    pub fn new(fence_seed: u64, entropy: Box<dyn Entropy>) -> Self {
        TokenSource {
            fence: fence_seed,
            pool: [0; BATCH * 8],
            pos: BATCH,
            entropy,
        }
    }

    /// What a snapshot records: the fence counter, the position in the pool
    /// (in tokens) and the pool's bytes not used yet.
    pub(super) fn parts(&self) -> (u64, usize, &[u8]) {
        (self.fence, self.pos, &self.pool[self.pos * 8..])
    }

    /// The source recorded by [`parts`](Self::parts), drawing from `entropy`
    /// once its pool is used up. `None` if `unused` does not fit `pos`.
    pub(super) fn from_parts(
        fence: u64,
        pos: usize,
        unused: &[u8],
        entropy: Box<dyn Entropy>,
    ) -> Option<Self> {
        if pos > BATCH || unused.len() != (BATCH - pos) * 8 {
            return None;
        }
        let mut pool = [0; BATCH * 8];
        pool[pos * 8..].copy_from_slice(unused);
        Some(TokenSource {
            fence,
            pool,
            pos,
            entropy,
        })
    }

    /// The fence of the last token issued.
    pub(super) fn fence(&self) -> u64 {
        self.fence
    }

    /// The next token; its fence is larger than every earlier token's.
    pub fn next_token(&mut self) -> Token {
        if self.pos == BATCH {
            self.entropy.fill(&mut self.pool);
            self.pos = 0;
        }
        let mut random = [0u8; 8];
        random.copy_from_slice(&self.pool[self.pos * 8..self.pos * 8 + 8]);
        self.pos += 1;
        self.fence = self.fence.wrapping_add(1);
        Token(((self.fence as u128) << 64) | u64::from_le_bytes(random) as u128)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_increase_and_randoms_differ() {
        let mut s = TokenSource::new(1_000, Box::new(OsEntropy));
        let mut last = s.next_token();
        assert_eq!(last.fence(), 1_001);
        let mut lows = std::collections::HashSet::new();
        for _ in 0..1000 {
            let t = s.next_token();
            assert!(t.fence() > last.fence());
            lows.insert(t.0 as u64);
            last = t;
        }
        assert!(lows.len() > 990, "random halves repeat");
    }
}
