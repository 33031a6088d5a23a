//! Counters kept by the event loop, and their Prometheus text exposition.
//!
//! Everything is a plain integer bumped in the loop; a scrape reads them
//! together with the state machine's own counters. `stats` and `/metrics` are
//! two views of the same numbers.

use std::time::Duration;

use crate::core::Core;
use crate::protocol::reply::push_u64;
use crate::protocol::{Kind, ParseError, Request};

/// Command labels, in the order of [`command_index`]. `sr`, `sn` and `sw`
/// are counted with `r`, `n` and `w`: they are the same operations.
pub const COMMANDS: [&str; 13] = [
    "l", "sl", "r", "n", "e", "se", "w", "ping", "stats", "auth", "listen", "unlisten", "signal",
];

/// Index of `req` in [`COMMANDS`].
pub fn command_index(req: &Request<'_>) -> usize {
    match req {
        Request::Acquire {
            kind: Kind::Lock, ..
        } => 0,
        Request::Acquire { .. } => 1,
        Request::Release { .. } => 2,
        Request::Renew { .. } => 3,
        Request::Enqueue {
            kind: Kind::Lock, ..
        } => 4,
        Request::Enqueue { .. } => 5,
        Request::Wait { .. } => 6,
        Request::Ping => 7,
        Request::Stats => 8,
        Request::Auth { .. } => 9,
        Request::Listen { .. } => 10,
        Request::Unlisten { .. } => 11,
        Request::Signal { .. } => 12,
    }
}

/// Protocol error kinds, in the order of [`ErrorKind`].
const ERROR_KINDS: [&str; 11] = [
    "unknown_command",
    "invalid_utf8",
    "bad_key",
    "arg_count",
    "not_a_number",
    "number_too_large",
    "zero",
    "bad_subject",
    "empty_payload",
    "line_too_long",
    "read_timeout",
];

/// A protocol error as counted.
#[derive(Clone, Copy, Debug)]
pub enum ErrorKind {
    Parse(ParseError),
    LineTooLong,
    ReadTimeout,
}

impl ErrorKind {
    fn index(self) -> usize {
        match self {
            ErrorKind::Parse(p) => match p {
                ParseError::UnknownCommand => 0,
                ParseError::InvalidUtf8 => 1,
                ParseError::BadKey => 2,
                ParseError::ArgCount => 3,
                ParseError::NotANumber => 4,
                ParseError::NumberTooLarge => 5,
                ParseError::Zero => 6,
                ParseError::BadSubject => 7,
                ParseError::EmptyPayload => 8,
            },
            ErrorKind::LineTooLong => 9,
            ErrorKind::ReadTimeout => 10,
        }
    }
}

/// Upper bounds of the loop-turn histogram, in microseconds.
const TURN_BUCKETS_US: [u64; 10] = [
    10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000,
];

#[derive(Default)]
pub struct Metrics {
    pub accepted: u64,
    pub rejected: u64,
    pub auth_failures: u64,
    pub slow_consumers: u64,
    /// Bytes moved by connections that have since closed.
    pub closed_bytes_read: u64,
    pub closed_bytes_written: u64,
    pub commands: [u64; COMMANDS.len()],
    errors: [u64; ERROR_KINDS.len()],
    turn_buckets: [u64; TURN_BUCKETS_US.len() + 1],
    turn_sum_ns: u64,
    turn_count: u64,
}

/// Live figures the loop supplies at scrape time.
pub struct Live {
    pub connections: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub draining: bool,
    /// Cluster mode's figures.
    pub cluster: Option<ClusterFigures>,
}

/// Raft figures of a cluster node, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterFigures {
    pub node_id: u64,
    pub term: u64,
    pub leader_id: u64,
    pub is_leader: bool,
    pub peers_connected: u64,
    pub stats: crate::cluster::node::NodeStats,
}

impl Metrics {
    pub fn count_command(&mut self, req: &Request<'_>) {
        self.commands[command_index(req)] += 1;
    }

    pub fn count_error(&mut self, kind: ErrorKind) {
        self.errors[kind.index()] += 1;
    }

    pub fn observe_turn(&mut self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = TURN_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(TURN_BUCKETS_US.len());
        self.turn_buckets[i] += 1;
        self.turn_sum_ns += d.as_nanos() as u64;
        self.turn_count += 1;
    }

    /// Writes the Prometheus text exposition (format 0.0.4).
    pub fn encode(&self, core: &Core, live: &Live, out: &mut Vec<u8>) {
        let c = core.counters();
        let (locks, sems) = core.keys_by_kind();
        let mut w = Writer { out };
        w.single(
            "dflockd_connections",
            "gauge",
            "Open client connections.",
            live.connections as u64,
        );
        w.single(
            "dflockd_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            self.accepted,
        );
        w.single(
            "dflockd_connections_rejected_total",
            "counter",
            "Connections closed at once by --max-connections or --max-connections-per-ip.",
            self.rejected,
        );
        w.header(
            "dflockd_keys",
            "gauge",
            "Known keys (held, waited on or idle) by kind.",
        );
        w.labelled("dflockd_keys", "kind", "lock", locks as u64);
        w.labelled("dflockd_keys", "kind", "semaphore", sems as u64);
        w.single(
            "dflockd_holders",
            "gauge",
            "Lock and semaphore holders.",
            core.holders() as u64,
        );
        w.single(
            "dflockd_waiters",
            "gauge",
            "Queued waiters.",
            core.waiters() as u64,
        );
        w.single("dflockd_grants_total", "counter", "Grants made.", c.grants);
        w.single(
            "dflockd_releases_total",
            "counter",
            "Holdings released (explicitly or on disconnect).",
            c.releases,
        );
        w.single(
            "dflockd_acquire_timeouts_total",
            "counter",
            "Acquires and waits that timed out.",
            c.acquire_timeouts,
        );
        w.single(
            "dflockd_lease_expiries_total",
            "counter",
            "Leases that ran out.",
            c.lease_expiries,
        );
        w.header(
            "dflockd_protocol_errors_total",
            "counter",
            "Requests answered `error` by kind.",
        );
        for (kind, n) in ERROR_KINDS.iter().zip(self.errors) {
            w.labelled("dflockd_protocol_errors_total", "kind", kind, n);
        }
        w.header("dflockd_commands_total", "counter", "Requests by command.");
        for (name, n) in COMMANDS.iter().zip(self.commands) {
            w.labelled("dflockd_commands_total", "command", name, n);
        }
        w.single(
            "dflockd_auth_failures_total",
            "counter",
            "Failed authentications.",
            self.auth_failures,
        );
        w.single(
            "dflockd_signals_published_total",
            "counter",
            "Signals published.",
            c.signals_published,
        );
        w.single(
            "dflockd_signals_delivered_total",
            "counter",
            "Signal deliveries made.",
            c.signals_delivered,
        );
        w.single(
            "dflockd_slow_consumer_disconnects_total",
            "counter",
            "Listeners disconnected for not reading their signals.",
            self.slow_consumers,
        );
        w.single(
            "dflockd_bytes_read_total",
            "counter",
            "Request bytes read from clients.",
            live.bytes_read,
        );
        w.single(
            "dflockd_bytes_written_total",
            "counter",
            "Reply bytes written to clients.",
            live.bytes_written,
        );
        w.single(
            "dflockd_draining",
            "gauge",
            "1 while draining after SIGTERM/SIGINT.",
            u64::from(live.draining),
        );
        let name = "dflockd_loop_turn_seconds";
        w.header(name, "histogram", "Time to handle one event-loop turn.");
        let mut cumulative = 0;
        for (i, n) in self.turn_buckets.iter().enumerate() {
            cumulative += n;
            w.out.extend_from_slice(name.as_bytes());
            w.out.extend_from_slice(b"_bucket{le=\"");
            match TURN_BUCKETS_US.get(i) {
                Some(&us) => push_micros_as_seconds(w.out, us),
                None => w.out.extend_from_slice(b"+Inf"),
            }
            w.out.extend_from_slice(b"\"} ");
            push_u64(w.out, cumulative);
            w.out.push(b'\n');
        }
        w.out.extend_from_slice(name.as_bytes());
        w.out.extend_from_slice(b"_sum ");
        push_nanos_as_seconds(w.out, self.turn_sum_ns);
        w.out.push(b'\n');
        w.out.extend_from_slice(name.as_bytes());
        w.out.extend_from_slice(b"_count ");
        push_u64(w.out, self.turn_count);
        w.out.push(b'\n');
        if let Some(cf) = &live.cluster {
            encode_cluster(&mut w, cf);
        }
    }
}

fn encode_cluster(w: &mut Writer<'_>, cf: &ClusterFigures) {
    let st = &cf.stats;
    w.single(
        "dflockd_cluster_node_id",
        "gauge",
        "This node's id.",
        cf.node_id,
    );
    w.single(
        "dflockd_cluster_term",
        "gauge",
        "The current Raft term.",
        cf.term,
    );
    w.single(
        "dflockd_cluster_leader_id",
        "gauge",
        "The leader this node knows (0: none).",
        cf.leader_id,
    );
    w.single(
        "dflockd_cluster_is_leader",
        "gauge",
        "1 while this node is the leader.",
        cf.is_leader as u64,
    );
    w.single(
        "dflockd_cluster_peers_connected",
        "gauge",
        "Peers this node's outbound links reach.",
        cf.peers_connected,
    );
    w.single(
        "dflockd_cluster_leader_changes_total",
        "counter",
        "Times this node saw a new leader.",
        st.leader_changes,
    );
    w.single(
        "dflockd_cluster_proposals_total",
        "counter",
        "Batches proposed while leader.",
        st.proposals,
    );
    w.single(
        "dflockd_cluster_proposed_commands_total",
        "counter",
        "Commands in those batches.",
        st.proposed_commands,
    );
    w.single(
        "dflockd_cluster_commit_index",
        "gauge",
        "The highest log index known committed.",
        st.commit,
    );
    w.single(
        "dflockd_cluster_applied_index",
        "gauge",
        "The highest log index applied.",
        st.applied,
    );
    w.single(
        "dflockd_cluster_fsyncs_total",
        "counter",
        "fdatasync calls on the log (one per loop turn that appended).",
        st.fsyncs,
    );
    w.single(
        "dflockd_cluster_fsync_seconds_sum_micros",
        "counter",
        "Time spent in those fdatasync calls, in microseconds.",
        st.fsync_us_total,
    );
    w.single(
        "dflockd_cluster_commit_latency_micros_sum",
        "counter",
        "Time from queuing a command to applying it, summed over this node's commands, in microseconds.",
        st.commit_us_total,
    );
    w.single(
        "dflockd_cluster_commits_total",
        "counter",
        "This node's commands applied.",
        st.commits,
    );
    w.single(
        "dflockd_cluster_log_bytes",
        "gauge",
        "Size of the log file.",
        st.log_bytes,
    );
    w.single(
        "dflockd_cluster_snapshot_index",
        "gauge",
        "Index of the latest snapshot (0: none).",
        st.snapshot_index,
    );
    w.single(
        "dflockd_cluster_snapshot_bytes",
        "gauge",
        "Size of the latest snapshot's state.",
        st.snapshot_bytes,
    );
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        for part in [
            b"# HELP ".as_slice(),
            name.as_bytes(),
            b" ",
            help.as_bytes(),
            b"\n# TYPE ",
            name.as_bytes(),
            b" ",
            kind.as_bytes(),
            b"\n",
        ] {
            self.out.extend_from_slice(part);
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.header(name, kind, help);
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b' ');
        push_u64(self.out, v);
        self.out.push(b'\n');
    }

    fn labelled(&mut self, name: &str, label: &str, value: &str, v: u64) {
        for part in [
            name.as_bytes(),
            b"{",
            label.as_bytes(),
            b"=\"",
            value.as_bytes(),
            b"\"} ",
        ] {
            self.out.extend_from_slice(part);
        }
        push_u64(self.out, v);
        self.out.push(b'\n');
    }
}

fn push_micros_as_seconds(out: &mut Vec<u8>, us: u64) {
    push_fraction(out, us, 1_000_000, 6);
}

fn push_nanos_as_seconds(out: &mut Vec<u8>, ns: u64) {
    push_fraction(out, ns, 1_000_000_000, 9);
}

/// `v / unit` in decimal with up to `digits` fractional digits, trailing
/// zeros trimmed.
fn push_fraction(out: &mut Vec<u8>, v: u64, unit: u64, digits: usize) {
    push_u64(out, v / unit);
    let mut frac = v % unit;
    if frac == 0 {
        return;
    }
    let mut buf = [b'0'; 9];
    for i in (0..digits).rev() {
        buf[i] = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    let mut end = digits;
    while end > 0 && buf[end - 1] == b'0' {
        end -= 1;
    }
    out.push(b'.');
    out.extend_from_slice(&buf[..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() {
        let f = |v, unit, d| {
            let mut o = Vec::new();
            push_fraction(&mut o, v, unit, d);
            String::from_utf8(o).unwrap()
        };
        assert_eq!(f(10, 1_000_000, 6), "0.00001");
        assert_eq!(f(500_000, 1_000_000, 6), "0.5");
        assert_eq!(f(2_000_000, 1_000_000, 6), "2");
        assert_eq!(f(1_234_567_891, 1_000_000_000, 9), "1.234567891");
    }

    #[test]
    fn exposition_is_well_formed() {
        let core = Core::new(
            Default::default(),
            1,
            Box::new(crate::core::SeededEntropy(1)),
        );
        let mut m = Metrics::default();
        m.observe_turn(Duration::from_micros(30));
        m.observe_turn(Duration::from_secs(2));
        m.count_error(ErrorKind::LineTooLong);
        let mut out = Vec::new();
        m.encode(
            &core,
            &Live {
                connections: 2,
                bytes_read: 5,
                bytes_written: 7,
                draining: false,
                cluster: Some(ClusterFigures {
                    node_id: 2,
                    term: 7,
                    leader_id: 3,
                    ..Default::default()
                }),
            },
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("dflockd_connections 2\n"));
        assert!(text.contains("dflockd_cluster_term 7\n"));
        assert!(text.contains("dflockd_cluster_leader_id 3\n"));
        assert!(text.contains("# TYPE dflockd_cluster_fsyncs_total counter\n"));
        assert!(text.contains("dflockd_protocol_errors_total{kind=\"line_too_long\"} 1\n"));
        assert!(text.contains("dflockd_loop_turn_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert!(text.contains("dflockd_loop_turn_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("dflockd_loop_turn_seconds_count 2\n"));
        // Every sample line is `name[{labels}] value`, every family has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let family = name.split('{').next().unwrap();
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {base} "))
                    || text.contains(&format!("# TYPE {family} ")),
                "{line}"
            );
        }
    }
}
