//! The `stats` reply: one line of JSON describing every key.
//!
//! Keys with limit 1 are reported as locks and all others as semaphores,
//! whichever command created them (a lock is a semaphore of limit 1).

use super::{Core, Resource};
use crate::protocol::reply::push_u64;

impl Core {
    /// Writes the stats JSON object into `out`.
    pub fn write_stats(&self, now: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"connections\":");
        push_u64(out, self.conns.len() as u64);
        let busy_lock = |r: &Resource| r.limit == 1 && !r.is_unused();
        let busy_sem = |r: &Resource| r.limit != 1 && !r.is_unused();
        let idle_lock = |r: &Resource| r.limit == 1 && r.is_unused();
        let idle_sem = |r: &Resource| r.limit != 1 && r.is_unused();

        self.write_list(out, "locks", busy_lock, |out, r| {
            let holder = r.holders.first();
            out.extend_from_slice(b",\"owner_conn_id\":");
            push_u64(out, holder.map_or(0, |h| h.conn));
            out.extend_from_slice(b",\"lease_expires_in_s\":");
            push_seconds(out, holder.map_or(0, |h| h.expires_at.saturating_sub(now)));
            out.extend_from_slice(b",\"waiters\":");
            push_u64(out, r.waiters.len() as u64);
        });
        self.write_list(out, "semaphores", busy_sem, |out, r| {
            out.extend_from_slice(b",\"limit\":");
            push_u64(out, r.limit);
            out.extend_from_slice(b",\"holders\":");
            push_u64(out, r.holders.len() as u64);
            out.extend_from_slice(b",\"waiters\":");
            push_u64(out, r.waiters.len() as u64);
        });
        let idle_s = |out: &mut Vec<u8>, r: &Resource| {
            out.extend_from_slice(b",\"idle_s\":");
            push_seconds(out, now.saturating_sub(r.idle_since));
        };
        self.write_list(out, "idle_locks", idle_lock, idle_s);
        self.write_list(out, "idle_semaphores", idle_sem, idle_s);
        out.extend_from_slice(b",\"signal_channels\":[");
        for (i, (pattern, group, listeners)) in self.signals.channels().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"pattern\":");
            push_json_string(out, pattern);
            out.extend_from_slice(b",\"group\":");
            push_json_string(out, group);
            out.extend_from_slice(b",\"listeners\":");
            push_u64(out, listeners as u64);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
    }

    fn write_list(
        &self,
        out: &mut Vec<u8>,
        name: &str,
        select: impl Fn(&Resource) -> bool,
        fields: impl Fn(&mut Vec<u8>, &Resource),
    ) {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":[");
        let mut first = true;
        for (_, r) in self.resources.iter().filter(|(_, r)| select(r)) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(b"{\"key\":");
            push_json_string(out, &r.key);
            fields(out, r);
            out.push(b'}');
        }
        out.push(b']');
    }
}

/// Milliseconds as a JSON number of seconds (`33`, `32.5`, `0.001`).
pub fn push_seconds(out: &mut Vec<u8>, ms: u64) {
    push_u64(out, ms / 1000);
    let frac = ms % 1000;
    if frac != 0 {
        out.push(b'.');
        let digits = [
            (frac / 100) as u8,
            (frac / 10 % 10) as u8,
            (frac % 10) as u8,
        ];
        let keep = if digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        out.extend(digits[..keep].iter().map(|d| b'0' + d));
    }
}

/// `s` as a JSON string literal.
pub fn push_json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        for (ms, want) in [
            (0, "0"),
            (33_000, "33"),
            (32_500, "32.5"),
            (1, "0.001"),
            (1_010, "1.01"),
        ] {
            let mut v = Vec::new();
            push_seconds(&mut v, ms);
            assert_eq!(String::from_utf8(v).unwrap(), want);
        }
    }

    #[test]
    fn json_strings() {
        let mut v = Vec::new();
        push_json_string(&mut v, "a\"b\\c\u{1}\u{7f}é");
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "\"a\\\"b\\\\c\\u0001\\u007fé\""
        );
    }
}
