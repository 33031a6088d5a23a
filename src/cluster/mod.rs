//! Cluster mode: the lock state replicated over Raft (raft-rs).
//!
//! - [`command`]: what a log entry carries (a batch of client requests,
//!   disconnects and node events), encoded by hand;
//! - [`machine`]: applies committed batches to a `Core`, once each and in
//!   each node's order;
//! - [`node`]: raft-rs's `RawNode`, the durable log and the queue of this
//!   node's commands, driven by the event loop without sockets or clocks;
//! - [`wire`]: the framing of peer links.
//!
//! The design is in `docs/CLUSTER.md`.

pub mod command;
pub mod machine;
pub mod node;
pub mod queue;
pub mod store;
pub mod wire;

/// Routes raft-rs's `slog` records into the `log` crate (target `raft`).
pub struct LogDrain;

impl slog::Drain for LogDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => log::Level::Error,
            slog::Level::Warning => log::Level::Warn,
            // raft-rs logs every election step at info; they are debug
            // detail here (the node logs leader changes itself).
            slog::Level::Info | slog::Level::Debug => log::Level::Debug,
            slog::Level::Trace => log::Level::Trace,
        };
        if !log::log_enabled!(target: "raft", level) {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        log::log!(target: "raft", level, "{}{}", record.msg(), kv.0);
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

/// A logger for raft-rs that writes through `log`.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(LogDrain, slog::o!())
}
