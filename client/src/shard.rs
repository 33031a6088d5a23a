//! Which shard holds a key: CRC-32 (IEEE) of the key's UTF-8 bytes modulo
//! the number of shards, as the Python client's `stable_hash_shard` and the
//! Go client's `CRC32Shard` compute it.

/// The CRC-32 (IEEE 802.3, reflected, as zlib and Go's `crc32.ChecksumIEEE`)
/// of `bytes`.
///
/// ```
/// assert_eq!(dflockd_client::crc32(b"123456789"), 0xCBF4_3926);
/// ```
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// The index of the shard that holds `key` among `shards` (`0` when there
/// is at most one shard).
///
/// ```
/// assert_eq!(dflockd_client::shard_index("my-key", 1), 0);
/// assert!(dflockd_client::shard_index("my-key", 3) < 3);
/// ```
pub fn shard_index(key: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    (u64::from(crc32(key.as_bytes())) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Values from zlib.crc32.
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
        assert_eq!(
            crc32("ключ".as_bytes()),
            crc32(&[0xd0, 0xba, 0xd0, 0xbb, 0xd1, 0x8e, 0xd1, 0x87])
        );
    }

    #[test]
    fn index_is_crc_mod_n() {
        assert_eq!(shard_index("123456789", 7), (0xCBF4_3926u64 % 7) as usize);
        assert_eq!(shard_index("x", 0), 0);
    }
}
