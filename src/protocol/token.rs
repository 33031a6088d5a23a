//! Fencing tokens: 128 bits shown as 32 lowercase hex characters.

use std::fmt;

/// A grant's token. The high 64 bits are the server's strictly increasing
/// fencing counter, the low 64 bits are random.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u128);

/// Length of a token on the wire.
pub const TOKEN_LEN: usize = 32;

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Token {
    /// The fencing counter part of the token.
    pub fn fence(self) -> u64 {
        (self.0 >> 64) as u64
    }

    /// Parses the wire form: exactly 32 lowercase hex characters.
    pub fn parse(s: &[u8]) -> Option<Token> {
        if s.len() != TOKEN_LEN {
            return None;
        }
        let mut v: u128 = 0;
        for &b in s {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => return None,
            };
            v = (v << 4) | d as u128;
        }
        Some(Token(v))
    }

    /// Writes the 32-character wire form.
    pub fn encode(self, out: &mut [u8; TOKEN_LEN]) {
        for (i, o) in out.iter_mut().enumerate() {
            let shift = (TOKEN_LEN - 1 - i) * 4;
            *o = HEX[((self.0 >> shift) & 0xf) as usize];
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = [0u8; TOKEN_LEN];
        self.encode(&mut b);
        // Always ASCII hex.
        f.write_str(std::str::from_utf8(&b).unwrap_or("?"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let t = Token(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        let mut b = [0u8; TOKEN_LEN];
        t.encode(&mut b);
        assert_eq!(&b, b"0123456789abcdeffedcba9876543210");
        assert_eq!(Token::parse(&b), Some(t));
        assert_eq!(t.fence(), 0x0123_4567_89ab_cdef);
        assert_eq!(Token::parse(b"0123456789ABCDEFfedcba9876543210"), None);
        assert_eq!(Token::parse(b"abc"), None);
        assert_eq!(Token::parse(b"0123456789abcdeffedcba98765432100"), None);
        assert_eq!(Token::parse(b"0123456789abcdeffedcba987654321g"), None);
    }
}
