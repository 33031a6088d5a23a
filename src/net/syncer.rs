//! The log's `fdatasync`, off the event loop.
//!
//! A cluster node writes its log records on the loop (a `write` into the
//! page cache) and hands the sync to this thread, which owns nothing but
//! the job it is given: a shared handle of the log file. The loop goes on
//! reading, proposing and applying meanwhile; the thread wakes it through
//! a `mio::Waker` when the sync is done. At most one job is out at a time
//! (the node sees to that), so one slot each way does, and nothing is
//! allocated per sync.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use mio::Waker;

use crate::storage::wal::SyncJob;

/// A finished job.
pub(super) struct Done {
    pub job: SyncJob,
    pub result: io::Result<()>,
    pub took_us: u64,
}

#[derive(Default)]
struct Slots {
    job: Option<SyncJob>,
    done: Option<Done>,
    stop: bool,
}

struct Shared {
    slots: Mutex<Slots>,
    work: Condvar,
}

pub(super) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread; it wakes the loop with `waker` after each job.
    pub fn start(waker: Waker) -> io::Result<Syncer> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(Slots::default()),
            work: Condvar::new(),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dflockd-sync".into())
            .spawn(move || run(&theirs, &waker))?;
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a job to the thread (the previous one must be collected).
    pub fn submit(&self, job: SyncJob) {
        let mut s = lock(&self.shared);
        debug_assert!(s.job.is_none() && s.done.is_none());
        s.job = Some(job);
        drop(s);
        self.shared.work.notify_one();
    }

    /// The finished job, if the thread has one.
    pub fn collect(&self) -> Option<Done> {
        lock(&self.shared).done.take()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Slots> {
    // The thread never panics holding the lock; a poisoned one still
    // holds consistent slots.
    shared.slots.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(shared: &Shared, waker: &Waker) {
    loop {
        let job = {
            let mut s = lock(shared);
            loop {
                if s.stop {
                    return;
                }
                if let Some(job) = s.job.take() {
                    break job;
                }
                s = shared.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let t = Instant::now();
        let result = job.run();
        let took_us = t.elapsed().as_micros() as u64;
        lock(shared).done = Some(Done {
            job,
            result,
            took_us,
        });
        if let Err(e) = waker.wake() {
            log::error!("the log sync thread cannot wake the event loop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::wal::{Identity, Wal};
    use mio::{Events, Poll, Token};
    use std::time::Duration;

    #[test]
    fn a_job_runs_on_the_thread_and_wakes_the_poll() {
        let dir = std::env::temp_dir().join(format!("dflockd-syncer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut wal, _) = Wal::open(
            &dir,
            Identity {
                node_id: 1,
                cluster_id: 1,
            },
        )
        .unwrap();
        let mut poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(7)).unwrap();
        let syncer = Syncer::start(waker).unwrap();
        let mut events = Events::with_capacity(4);
        for i in 1..=3u64 {
            wal.append(i, 1, b"x");
            let job = wal.write().unwrap().unwrap();
            assert!(wal.synced_size() < wal.size());
            syncer.submit(job);
            let done = loop {
                poll.poll(&mut events, Some(Duration::from_secs(10)))
                    .unwrap();
                assert!(events.iter().any(|e| e.token() == Token(7)), "woken");
                if let Some(d) = syncer.collect() {
                    break d;
                }
            };
            wal.synced(&done.job, done.result).unwrap();
            assert_eq!(wal.synced_size(), wal.size());
        }
        drop(syncer);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
