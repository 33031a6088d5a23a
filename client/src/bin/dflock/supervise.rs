//! `lock` and `sem`: hold, run the command, pass signals on, stop it when
//! the lock is lost, release when it exits.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dflockd_client::{Config, Error, GuardOptions, Lock, LostReason, Semaphore};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

use crate::{fail, say, status};

/// Signals passed on to the command.
const FORWARDED: [i32; 6] = [SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

enum Event {
    Signal(i32),
    Lost(LostReason),
}

enum Held {
    Lock(Lock),
    Semaphore(Semaphore),
}

impl Held {
    fn token(&self) -> &str {
        match self {
            Held::Lock(l) => l.token(),
            Held::Semaphore(s) => s.token(),
        }
    }

    fn fence(&self) -> Option<u64> {
        match self {
            Held::Lock(l) => l.fence(),
            Held::Semaphore(s) => s.fence(),
        }
    }

    fn lease(&self) -> Duration {
        match self {
            Held::Lock(l) => l.lease(),
            Held::Semaphore(s) => s.lease(),
        }
    }

    fn lost(&self) -> Option<LostReason> {
        match self {
            Held::Lock(l) => l.lost(),
            Held::Semaphore(s) => s.lost(),
        }
    }

    fn release(self) -> Result<(), Error> {
        match self {
            Held::Lock(l) => l.release(),
            Held::Semaphore(s) => s.release(),
        }
    }
}

pub fn run(
    cfg: &Config,
    key: &str,
    limit: Option<u64>,
    timeout: Duration,
    lease: Option<Duration>,
    kill_after: Duration,
    argv: &[OsString],
) -> u8 {
    let (tx, rx) = mpsc::channel::<Event>();
    let lost_tx = tx.clone();
    let mut opts = GuardOptions::new().timeout(timeout).on_lost(move |why| {
        let _ = lost_tx.send(Event::Lost(why.clone()));
    });
    if let Some(l) = lease {
        opts = opts.lease(l);
    }
    let held = match limit {
        None => Lock::acquire(cfg, key, &opts).map(Held::Lock),
        Some(n) => Semaphore::acquire(cfg, key, n, &opts).map(Held::Semaphore),
    };
    let what = match limit {
        None => format!("lock {key}"),
        Some(n) => format!("sem {key} (limit {n})"),
    };
    let held = match held {
        Ok(h) => h,
        Err(Error::Timeout) => {
            say!(
                "dflock: {what}: not granted within {}; command not run",
                human(timeout)
            );
            return status::TIMEOUT;
        }
        Err(e) => return fail(&what, &e),
    };

    // In the foreground of a terminal the command shares dflock's process
    // group, so ^C reaches the calling shell too and stops a script as it
    // would without dflock. Otherwise (cron, CI, background) it gets a
    // group of its own, and stopping it stops everything it started.
    let terminal = Terminal::foreground();
    let mut signals = match SignalsInfo::<WithOrigin>::new(FORWARDED.iter().chain(&[SIGCHLD])) {
        Ok(s) => s,
        Err(e) => {
            say!("dflock: cannot install signal handlers: {e}");
            let _ = held.release();
            return status::UNAVAILABLE;
        }
    };
    let handle = signals.handle();
    let sig_tx = tx;
    std::thread::spawn(move || {
        for origin in signals.forever() {
            // A terminal's ^C, ^\ or hang-up reached the whole foreground
            // group, the command included: don't send it twice.
            if terminal.0 && origin.signal != SIGCHLD && origin.cause == Cause::Kernel {
                continue;
            }
            if sig_tx.send(Event::Signal(origin.signal)).is_err() {
                break;
            }
        }
    });

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("DFLOCK_KEY", key)
        .env("DFLOCK_TOKEN", held.token())
        .env("DFLOCK_LEASE", held.lease().as_secs().to_string());
    match held.fence() {
        Some(f) => cmd.env("DFLOCK_FENCE", f.to_string()),
        None => cmd.env_remove("DFLOCK_FENCE"),
    };
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || prepare_child(terminal, parent));
    }
    let program = argv[0].to_string_lossy().into_owned();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            handle.close();
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => status::NOT_FOUND,
                _ => status::CANNOT_EXECUTE,
            };
            say!("dflock: cannot run {program}: {e}");
            if let Err(e) = held.release() {
                say!("dflock: releasing {key}: {e}");
            }
            return code;
        }
    };
    let pid = child.id() as libc::pid_t;
    // Signals go to the command's group when it has one of its own (set
    // from this side too, so it exists before the first kill).
    let target = if terminal.0 {
        pid
    } else {
        // SAFETY: setpgid(2) on our own child.
        unsafe {
            libc::setpgid(pid, pid);
        }
        -pid
    };
    let (exit, lost) = supervise(child, target, &rx, &program, key, kill_after);
    handle.close();
    // From here on a signal acts as if dflock had no handlers: a SIGTERM
    // during a slow release ends dflock (the server then frees the lock).
    for sig in FORWARDED {
        // SAFETY: restoring the default disposition.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let code = match exit.code() {
        Some(c) => c as u8,
        None => 128u8.wrapping_add(exit.signal().unwrap_or(0) as u8),
    };
    // A loss reported while the command was finishing still counts.
    if let Some(why) = lost.or_else(|| held.lost()) {
        say!(
            "dflock: {what} was lost while {program} ran ({why}); exiting with {}",
            status::LOST
        );
        // Whatever the command left running in its group goes too.
        if target < 0 {
            send(target, SIGKILL);
        }
        drop(held);
        return status::LOST;
    }
    if let Err(e) = held.release() {
        say!("dflock: releasing {key}: {e} (its lease will run out on its own)");
    }
    // A command ended by ^C or a termination signal ends dflock the same
    // way, so the calling shell stops too instead of running on.
    if let Some(sig) = exit
        .signal()
        .filter(|s| [SIGINT, SIGTERM, SIGHUP].contains(s))
    {
        // SAFETY: raise(2) with the default disposition restored above.
        unsafe {
            libc::raise(sig);
        }
    }
    code
}

/// Runs in the child before exec: a process group of its own unless
/// dflock is in the foreground of a terminal, and SIGTERM if dflock
/// (`parent`) dies, since its lock dies with it.
fn prepare_child(terminal: Terminal, parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: async-signal-safe calls on this process only.
    unsafe {
        if !terminal.0 && libc::setpgid(0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            libc::raise(libc::SIGTERM);
        }
    }
    Ok(())
}

/// Whether dflock runs in the foreground process group of a terminal.
#[derive(Clone, Copy)]
struct Terminal(bool);

impl Terminal {
    fn foreground() -> Terminal {
        // SAFETY: isatty, tcgetpgrp and getpgrp only read process state.
        Terminal(unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() })
    }
}

/// Waits for the command, passing signals on and stopping it when the lock
/// is lost. Returns how it exited and the loss, if any.
fn supervise(
    mut child: Child,
    target: libc::pid_t,
    rx: &mpsc::Receiver<Event>,
    program: &str,
    key: &str,
    kill_after: Duration,
) -> (ExitStatus, Option<LostReason>) {
    let pid = child.id() as libc::pid_t;
    let mut lost = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (st, lost),
            Ok(None) => {}
            Err(e) => {
                say!("dflock: waiting for {program}: {e}");
                let st = child
                    .wait()
                    .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
                return (st, lost);
            }
        }
        // SIGCHLD wakes us; the poll is a fallback.
        let mut wait = Duration::from_millis(250);
        if let Some(t) = kill_at {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        match rx.recv_timeout(wait) {
            Ok(Event::Signal(SIGCHLD)) | Err(_) => {}
            Ok(Event::Signal(sig)) => send(target, sig),
            Ok(Event::Lost(why)) => {
                if lost.is_none() {
                    say!(
                        "dflock: lost the lock on {key} ({why}); sending SIGTERM to {program} (pid {pid}), SIGKILL in {}",
                        human(kill_after)
                    );
                    send(target, SIGTERM);
                    kill_at = Some(Instant::now() + kill_after);
                    lost = Some(why);
                }
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            if matches!(child.try_wait(), Ok(None)) {
                say!("dflock: {program} (pid {pid}) still running; sending SIGKILL");
                send(target, SIGKILL);
            }
            kill_at = None;
        }
    }
}

/// Sends `sig` to a process (or, negative, a process group). The command
/// is not yet reaped when this is called, so its pid, which is also its
/// group's id, cannot have been reused.
fn send(pid: libc::pid_t, sig: i32) {
    // SAFETY: kill(2) with a valid signal number.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn human(d: Duration) -> String {
    if d == Duration::MAX || d.as_secs() >= dflockd_client::MAX_SECONDS {
        "no limit".into()
    } else if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
