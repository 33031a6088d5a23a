//! Held locks and semaphore slots that renew their own lease and release on
//! drop: [`Lock`] and [`Semaphore`].
//!
//! Each guard has its own connection and a renewal thread. The thread
//! renews when `renew_ratio` of the lease has passed (half, by default).
//! A lost lease is reported, never hidden: [`Lock::lost`] says why, the
//! `on_lost` callback is called once, and [`Lock::wait_lost`] wakes.
//!
//! When the connection breaks, the thread reconnects at once (to the next
//! address of a cluster first) and renews with its token, which re-attaches
//! the holding if the server kept it (a cluster node, or a server run with
//! `--no-auto-release-on-disconnect`). If no address answers, or the server
//! refuses the renewal, the lease is lost: a single server releases a
//! disconnected client's holdings at once, so holding on would overlap the
//! next holder.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, Grant};
use crate::config::Config;
use crate::error::{Error, Result};

/// Why a guard's lease was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The server refused the renewal: the lease had run out, or the token
    /// was released by someone else.
    Refused,
    /// The connection broke and no address of the server could be reached
    /// to re-attach (the text says why).
    Disconnected(String),
    /// No renewal succeeded before the lease ran out (the server kept
    /// answering `error_unavailable` or `error_draining`).
    Expired,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::Refused => f.write_str("the server refused to renew the lease"),
            LostReason::Disconnected(why) => write!(f, "connection lost: {why}"),
            LostReason::Expired => f.write_str("the lease ran out before a renewal succeeded"),
        }
    }
}

type LostCallback = Arc<dyn Fn(&LostReason) + Send + Sync>;

/// The longest a guard's connection stays silent: the server closes
/// connections idle for its read timeout (23 s by default), which releases
/// what they hold.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

/// How a guard acquires and renews.
#[derive(Clone)]
pub struct GuardOptions {
    timeout: Duration,
    lease: Option<Duration>,
    renew_ratio: f64,
    keepalive: Duration,
    on_lost: Option<LostCallback>,
}

impl Default for GuardOptions {
    fn default() -> GuardOptions {
        GuardOptions {
            timeout: Duration::from_secs(10),
            lease: None,
            renew_ratio: 0.5,
            keepalive: DEFAULT_KEEPALIVE,
            on_lost: None,
        }
    }
}

impl fmt::Debug for GuardOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardOptions")
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .field("renew_ratio", &self.renew_ratio)
            .field("keepalive", &self.keepalive)
            .field("on_lost", &self.on_lost.is_some())
            .finish()
    }
}

impl GuardOptions {
    /// Defaults: wait up to 10 s, the server's default lease, renew at half.
    pub fn new() -> GuardOptions {
        GuardOptions::default()
    }

    /// How long to wait for the grant (rounded up to whole seconds; zero
    /// tries once; `Duration::MAX` waits without limit).
    pub fn timeout(mut self, t: Duration) -> GuardOptions {
        self.timeout = t;
        self
    }

    /// The lease to ask for, and to renew with (whole seconds, at least 1).
    pub fn lease(mut self, lease: Duration) -> GuardOptions {
        self.lease = Some(lease);
        self
    }

    /// The fraction of the lease after which to renew, in `0.05..=0.9`
    /// (clamped). Default 0.5.
    pub fn renew_ratio(mut self, r: f64) -> GuardOptions {
        self.renew_ratio = if r.is_nan() { 0.5 } else { r.clamp(0.05, 0.9) };
        self
    }

    /// The longest time between two renewals, whatever the lease: keeps
    /// the connection from looking idle to the server, whose read timeout
    /// (23 s by default) would close it and release the holding. Default
    /// 10 s; at least 100 ms.
    pub fn keepalive(mut self, every: Duration) -> GuardOptions {
        self.keepalive = every.max(Duration::from_millis(100));
        self
    }

    /// Called once, from the renewal thread, when the lease is lost.
    pub fn on_lost(mut self, f: impl Fn(&LostReason) + Send + Sync + 'static) -> GuardOptions {
        self.on_lost = Some(Arc::new(f));
        self
    }
}

struct State {
    stop: bool,
    lost: Option<LostReason>,
    renewals: u64,
}

struct Shared {
    client: Mutex<Client>,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What both guards share: the grant, the renewal thread, the release.
struct Holding {
    grant: Grant,
    semaphore: bool,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    released: bool,
}

impl Holding {
    fn acquire(
        cfg: &Config,
        key: &str,
        limit: Option<u64>,
        opts: &GuardOptions,
    ) -> Result<Holding> {
        let mut client = Client::connect_for_key(cfg, key)?;
        let grant = match limit {
            None => client.lock(key, opts.timeout, opts.lease)?,
            Some(l) => client.sem_acquire(key, l, opts.timeout, opts.lease)?,
        };
        // The server answers the moment it grants, so the lease started a
        // network delay ago; renewing at a fraction of it absorbs that.
        let granted_at = Instant::now();
        let shared = Arc::new(Shared {
            client: Mutex::new(client),
            state: Mutex::new(State {
                stop: false,
                lost: None,
                renewals: 0,
            }),
            cond: Condvar::new(),
        });
        let (panic_shared, panic_cb) = (shared.clone(), opts.on_lost.clone());
        let renewer = Renewer {
            shared: shared.clone(),
            key: key.to_string(),
            token: grant.token.clone(),
            cmd: if limit.is_some() { "sn" } else { "n" },
            lease: opts.lease,
            ratio: opts.renew_ratio,
            keepalive: opts.keepalive,
            on_lost: opts.on_lost.clone(),
        };
        let first = grant.lease;
        let thread = std::thread::Builder::new()
            .name("dflock-renew".into())
            .spawn(move || {
                let renewer = std::panic::AssertUnwindSafe(renewer);
                let run = std::panic::catch_unwind(move || {
                    let r = renewer;
                    r.0.run(granted_at, first);
                });
                if run.is_err() {
                    // Never leave a holder believing it still holds.
                    let why = LostReason::Disconnected("the renewal thread failed".into());
                    report_lost(&panic_shared, panic_cb.as_ref(), why);
                }
            })
            .map_err(Error::Io)?;
        Ok(Holding {
            grant,
            semaphore: limit.is_some(),
            shared,
            thread: Some(thread),
            released: false,
        })
    }

    fn lost(&self) -> Option<LostReason> {
        self.shared.state().lost.clone()
    }

    fn renewals(&self) -> u64 {
        self.shared.state().renewals
    }

    fn wait_lost(&self, timeout: Option<Duration>) -> Option<LostReason> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.shared.state();
        loop {
            if st.lost.is_some() || st.stop {
                return st.lost.clone();
            }
            st = match deadline {
                None => self.shared.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.shared
                        .cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    fn release(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        self.shared.state().stop = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            // Dropped from its own on_lost callback: nothing to wait for.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let mut client = self.shared.client();
        let (key, token) = (&self.grant.key, &self.grant.token);
        let release = |c: &mut Client| {
            if self.semaphore {
                c.sem_release(key, token)
            } else {
                c.release(key, token)
            }
        };
        match release(&mut client) {
            // Tokens work from any connection: where the server kept the
            // holding (a cluster, no auto-release), free it for the next.
            Err(e) if e.is_connection() && self.lost().is_none() => {
                client.reconnect()?;
                release(&mut client)
            }
            r => r,
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

struct Renewer {
    shared: Arc<Shared>,
    key: String,
    token: String,
    cmd: &'static str,
    lease: Option<Duration>,
    ratio: f64,
    keepalive: Duration,
    on_lost: Option<LostCallback>,
}

/// `t + d`, or a time too far away to matter when that overflows.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 86_400))
}

/// Records the loss (once, unless the guard is being released), wakes
/// `wait_lost` and calls the callback.
fn report_lost(shared: &Shared, cb: Option<&LostCallback>, why: LostReason) {
    {
        let mut st = shared.state();
        if st.stop || st.lost.is_some() {
            return;
        }
        st.lost = Some(why.clone());
    }
    shared.cond.notify_all();
    if let Some(f) = cb {
        f(&why);
    }
}

impl Renewer {
    /// When to renew a lease of `l` renewed at `at`.
    fn due(&self, at: Instant, l: Duration) -> Instant {
        later(at, l.mul_f64(self.ratio).min(self.keepalive))
    }

    fn run(self, granted_at: Instant, lease: Duration) {
        let mut expires = later(granted_at, lease);
        let mut next = self.due(granted_at, lease);
        // One reconnect per renewal: a server that keeps failing after a
        // fresh connection is not retried in a loop.
        let mut reconnected = false;
        loop {
            if !self.sleep_until(next) {
                return;
            }
            let sent = Instant::now();
            if sent >= expires {
                return self.lose(LostReason::Expired);
            }
            let within = expires - sent;
            let r = self.shared.client().renew_cmd(
                self.cmd,
                &self.key,
                &self.token,
                self.lease,
                Some(within),
            );
            match r {
                Ok(l) => {
                    expires = later(sent, l);
                    next = self.due(sent, l);
                    reconnected = false;
                    self.shared.state().renewals += 1;
                }
                Err(Error::Refused | Error::LeaseExpired) => return self.lose(LostReason::Refused),
                Err(Error::Unavailable | Error::Draining) => {
                    // A cluster electing a leader: try again soon.
                    next = Instant::now()
                        + (within / 8).clamp(Duration::from_millis(20), Duration::from_millis(500));
                }
                Err(e) if e.is_connection() && !reconnected => {
                    let mut c = self.shared.client();
                    if let Err(e) = c.reconnect() {
                        drop(c);
                        return self.lose(LostReason::Disconnected(e.to_string()));
                    }
                    reconnected = true;
                    next = Instant::now(); // renew on the new connection now
                }
                Err(e) => return self.lose(LostReason::Disconnected(e.to_string())),
            }
        }
    }

    /// Sleeps until `t`; false when asked to stop.
    fn sleep_until(&self, t: Instant) -> bool {
        let mut st = self.shared.state();
        loop {
            if st.stop {
                return false;
            }
            let left = t.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn lose(&self, why: LostReason) {
        report_lost(&self.shared, self.on_lost.as_ref(), why);
    }
}

macro_rules! guard_methods {
    () => {
        /// The key.
        pub fn key(&self) -> &str {
            &self.0.grant.key
        }

        /// The token.
        pub fn token(&self) -> &str {
            &self.0.grant.token
        }

        /// The fencing number (see [`Grant::fence`]).
        pub fn fence(&self) -> Option<u64> {
            self.0.grant.fence()
        }

        /// The lease granted at acquisition.
        pub fn lease(&self) -> Duration {
            self.0.grant.lease
        }

        /// The grant.
        pub fn grant(&self) -> &Grant {
            &self.0.grant
        }

        /// Why the lease was lost, or `None` while it is held.
        pub fn lost(&self) -> Option<LostReason> {
            self.0.lost()
        }

        /// Successful renewals so far.
        pub fn renewals(&self) -> u64 {
            self.0.renewals()
        }

        /// Blocks until the lease is lost (returning why) or `timeout`
        /// passes (`None`; `timeout` `None` waits without limit).
        pub fn wait_lost(&self, timeout: Option<Duration>) -> Option<LostReason> {
            self.0.wait_lost(timeout)
        }

        /// Stops renewing and releases. An error means the release was
        /// not confirmed; the lease then runs out on its own.
        pub fn release(mut self) -> Result<()> {
            self.0.release()
        }
    };
}

/// A held lock that renews its lease and is released when dropped.
///
/// ```no_run
/// use std::time::Duration;
/// use dflockd_client::{Config, GuardOptions, Lock};
///
/// let cfg = Config::from_env()?;
/// let opts = GuardOptions::new().timeout(Duration::from_secs(30));
/// let lock = Lock::acquire(&cfg, "nightly-report", &opts)?;
/// println!("holding with fence {:?}", lock.fence());
/// // ... work; the lease is renewed in the background ...
/// if let Some(why) = lock.lost() {
///     eprintln!("lost the lock: {why}");
/// }
/// lock.release()?;
/// # Ok::<(), dflockd_client::Error>(())
/// ```
pub struct Lock(Holding);

impl Lock {
    /// Connects to the shard of `key` and waits for the lock.
    pub fn acquire(cfg: &Config, key: &str, opts: &GuardOptions) -> Result<Lock> {
        Holding::acquire(cfg, key, None, opts).map(Lock)
    }

    guard_methods!();
}

/// A held semaphore slot that renews its lease and is released when
/// dropped.
///
/// ```no_run
/// use dflockd_client::{Config, GuardOptions, Semaphore};
///
/// let cfg = Config::from_env()?;
/// let slot = Semaphore::acquire(&cfg, "downloads", 4, &GuardOptions::new())?;
/// // ... at most four of these run at once ...
/// drop(slot);
/// # Ok::<(), dflockd_client::Error>(())
/// ```
pub struct Semaphore(Holding);

impl Semaphore {
    /// Connects to the shard of `key` and waits for one of `limit` slots.
    pub fn acquire(cfg: &Config, key: &str, limit: u64, opts: &GuardOptions) -> Result<Semaphore> {
        Holding::acquire(cfg, key, Some(limit), opts).map(Semaphore)
    }

    guard_methods!();
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("grant", &self.0.grant)
            .finish()
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("grant", &self.0.grant)
            .finish()
    }
}
