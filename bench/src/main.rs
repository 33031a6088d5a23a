//! `dflockd-bench`: a closed-loop load generator for dflockd (and Redis).
//!
//! ```text
//! dflockd-bench [run] --addr 127.0.0.1:6388 --mode lock --connections 100 \
//!     --duration 3 --warmup 1 [--keys K] [--depth D] [--server-pid PID] [--json]
//! dflockd-bench --mode signal --connections 10 --listeners 10 [--pattern 'bench.>']
//! dflockd-bench --mode etcd-lock --endpoints 127.0.0.1:2379,127.0.0.1:22379 -c 100
//! dflockd-bench report --input runs.jsonl --output latest.json --svg chart.svg
//! ```
//!
//! The `etcd-*` modes (etcd's v3 lock service) exist in a build with
//! `--features etcd` only.

#[cfg(feature = "etcd")]
mod etcd;
mod failover;
mod load;
mod procstat;
mod report;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use lexopt::prelude::*;

const USAGE: &str = "\
usage: dflockd-bench [run] [options]
       dflockd-bench report --input RUNS.jsonl [--output FILE.json] [--svg FILE.svg]
                            [--machine TEXT] [--command TEXT]
       dflockd-bench failover --help    (kill -9 failover driver)

run options:
  --addr HOST:PORT      server address (default 127.0.0.1:6388; etcd modes:
                        127.0.0.1:2379, or a list H:P,H:P,... as with --endpoints);
                        dflockd modes take a list too: connection i goes to
                        address i mod n (the nodes of a cluster)
  --endpoints H:P,...   etcd modes: the cluster's client URLs (http://), every
                        connection gets the whole list and balances over it
  --connections N       closed-loop client connections (default 10)
  --duration SECS       measured time (default 5)
  --warmup SECS         unmeasured time before it (default 1)
  --keys K              shared keys of `contended`, `sem` and `etcd-contended`
                        (default 1)
  --mode MODE           lock | contended | sem | twophase | renew | pipeline |
                        redis-lock | signal | etcd-lock | etcd-contended
                        (default lock). etcd-lock: each connection (its own
                        etcd client) loops Lock(<prefix>k<i>, its lease) then
                        Unlock; etcd-contended: the same on the --keys shared
                        names <prefix>c<i mod K>. Built with --features etcd only
  --client-threads N    etcd modes: 1 = one current-thread tokio runtime,
                        N > 1 = a multi-thread one with N workers (default 1)
  --depth D             independent requests in flight per connection, for
                        `pipeline` and `redis-lock` (default 32 for pipeline, 1 else)
  --server-pid PID      report the server's CPU time per operation and its RSS
  --label NAME          name of the server in the output (default: the mode's protocol)
  --key-prefix P        prefix of every key (default bench-)
  --acquire-timeout S   timeout sent with l/sl/w (default 60)
  --variant NAME        tells apart runs of one server/mode/connections in the
                        report (e.g. metrics-off-a, metrics-on-a)
  --listeners L         `signal`: listener connections (default 10); the
                        --connections are the publishers, each on its own
                        channel <root>.<i>.evt (<root>: the key prefix without
                        its trailing `-`, so `bench` by default)
  --pattern P           `signal`: the listeners' pattern (default <root>.*.evt;
                        it must match every publisher's channel)
  --payload-bytes N     `signal`: payload length (default 16; `<seq>:<ns>`
                        padded with `x`, never shorter than that)
  --json                print one JSON object (the table goes to stderr)
  --quiet               no progress line
";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dflockd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<(), String> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match args.first().and_then(|a| a.to_str()) {
        Some("report") => {
            args.remove(0);
            return report_main(args);
        }
        Some("failover") => {
            args.remove(0);
            return failover::main(args);
        }
        Some("run") => {
            args.remove(0);
        }
        _ => {}
    }
    run_main(args)
}

fn val(parser: &mut lexopt::Parser) -> Result<String, String> {
    parser
        .value()
        .map_err(|e| e.to_string())?
        .string()
        .map_err(|e| e.to_string())
}

fn secs(v: &str, flag: &str) -> Result<Duration, String> {
    let f: f64 = v
        .parse()
        .map_err(|_| format!("{flag}: not a number of seconds: {v:?}"))?;
    if !(0.0..=86_400.0).contains(&f) {
        return Err(format!("{flag}: out of range: {v}"));
    }
    Ok(Duration::from_secs_f64(f))
}

fn num<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a valid number: {v:?}"))
}

/// The mode given to `run`: one of the load generator's, or an etcd one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunMode {
    Load(load::Mode),
    /// `etcd-lock` (false) or `etcd-contended` (true).
    Etcd {
        contended: bool,
    },
}

impl RunMode {
    fn parse(s: &str) -> Option<RunMode> {
        match s {
            "etcd-lock" => Some(RunMode::Etcd { contended: false }),
            "etcd-contended" => Some(RunMode::Etcd { contended: true }),
            _ => load::Mode::parse(s).map(RunMode::Load),
        }
    }
}

fn run_main(args: Vec<std::ffi::OsString>) -> Result<(), String> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut addr: Option<String> = None;
    let mut connections = 10usize;
    let mut duration = Duration::from_secs(5);
    let mut warmup = Duration::from_secs(1);
    let mut keys = 1usize;
    let mut mode = RunMode::Load(load::Mode::Lock);
    let mut client_threads = 1usize;
    let mut depth: Option<usize> = None;
    let mut server_pid = None;
    let mut json = false;
    let mut label = None;
    let mut key_prefix = "bench-".to_string();
    let mut acquire_timeout_s = 60u64;
    let mut progress = true;
    let mut variant = None;
    let mut listeners = 10usize;
    let mut pattern = None;
    let mut payload_bytes = 16usize;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("addr") | Long("endpoints") => addr = Some(val(&mut parser)?),
            Long("client-threads") => {
                client_threads = num(&val(&mut parser)?, "--client-threads")?;
                if !(1..=64).contains(&client_threads) {
                    return Err("--client-threads: 1 to 64".into());
                }
            }
            Long("connections") | Short('c') => {
                connections = num(&val(&mut parser)?, "--connections")?;
            }
            Long("duration") | Short('d') => duration = secs(&val(&mut parser)?, "--duration")?,
            Long("warmup") => warmup = secs(&val(&mut parser)?, "--warmup")?,
            Long("keys") => keys = num(&val(&mut parser)?, "--keys")?,
            Long("mode") | Short('m') => {
                let v = val(&mut parser)?;
                mode = RunMode::parse(&v).ok_or_else(|| format!("--mode: unknown mode {v:?}"))?;
            }
            Long("depth") => depth = Some(num(&val(&mut parser)?, "--depth")?),
            Long("server-pid") => server_pid = Some(num(&val(&mut parser)?, "--server-pid")?),
            Long("label") => label = Some(val(&mut parser)?),
            Long("key-prefix") => key_prefix = val(&mut parser)?,
            Long("acquire-timeout") => {
                acquire_timeout_s = num(&val(&mut parser)?, "--acquire-timeout")?
            }
            Long("variant") => variant = Some(val(&mut parser)?),
            Long("listeners") => listeners = num(&val(&mut parser)?, "--listeners")?,
            Long("pattern") => pattern = Some(val(&mut parser)?),
            Long("payload-bytes") => {
                payload_bytes = num(&val(&mut parser)?, "--payload-bytes")?;
                if payload_bytes > 60_000 {
                    return Err("--payload-bytes: at most 60000".into());
                }
            }
            Long("json") => json = true,
            Long("quiet") | Short('q') => progress = false,
            Long("help") | Short('h') => {
                print!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("{}\n{USAGE}", arg.unexpected())),
        }
    }
    let mode = match mode {
        RunMode::Load(m) => m,
        RunMode::Etcd { contended } => {
            return etcd_main(EtcdArgs {
                endpoints: addr,
                contended,
                connections,
                duration,
                warmup,
                keys,
                server_pid,
                json,
                label,
                key_prefix,
                progress,
                variant,
                client_threads,
            });
        }
    };
    let addr = addr.unwrap_or_else(|| "127.0.0.1:6388".to_string());
    // A list spreads the connections: connection i goes to address i mod n
    // (the nodes of a cluster).
    let addrs = addr
        .split(',')
        .map(|a| {
            a.to_socket_addrs()
                .map_err(|e| format!("--addr {a}: {e}"))?
                .next()
                .ok_or_else(|| format!("--addr {a}: no address"))
        })
        .collect::<Result<Vec<SocketAddr>, String>>()?;
    let depth = depth.unwrap_or(if mode == load::Mode::Pipeline { 32 } else { 1 });
    let label = label.unwrap_or_else(|| {
        if mode == load::Mode::RedisLock {
            "redis".into()
        } else {
            "dflockd".into()
        }
    });
    let opts = load::Opts {
        addrs,
        connections,
        duration,
        warmup,
        keys,
        mode,
        depth,
        server_pid,
        json,
        label,
        key_prefix,
        acquire_timeout_s,
        progress,
        variant,
        listeners,
        pattern,
        payload_bytes,
    };
    let result = load::run(&opts)?;
    print_result(&result, opts.json);
    Ok(())
}

/// The table, and with `--json` the JSON object on stdout (table on stderr).
fn print_result(result: &serde_json::Value, json: bool) {
    let table = report::table(std::slice::from_ref(result));
    if json {
        eprint!("{table}");
        println!("{result}");
    } else {
        print!("{table}");
    }
}

/// The `run` options of an etcd mode.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
struct EtcdArgs {
    /// `--addr`/`--endpoints`, a comma-separated list.
    endpoints: Option<String>,
    contended: bool,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    keys: usize,
    server_pid: Option<u32>,
    json: bool,
    label: Option<String>,
    key_prefix: String,
    progress: bool,
    variant: Option<String>,
    client_threads: usize,
}

#[cfg(not(feature = "etcd"))]
fn etcd_main(_args: EtcdArgs) -> Result<(), String> {
    Err(
        "built without the etcd feature: cargo build --release -p dflockd-bench --features etcd"
            .into(),
    )
}

#[cfg(feature = "etcd")]
fn etcd_main(a: EtcdArgs) -> Result<(), String> {
    let list = a.endpoints.as_deref().unwrap_or(etcd::DEFAULT_ENDPOINT);
    let opts = etcd::Opts {
        endpoints: etcd::parse_endpoints(list).map_err(|e| format!("--endpoints: {e}"))?,
        connections: a.connections,
        duration: a.duration,
        warmup: a.warmup,
        keys: a.keys,
        mode: if a.contended {
            etcd::Mode::Contended
        } else {
            etcd::Mode::Lock
        },
        server_pid: a.server_pid,
        label: a.label.unwrap_or_else(|| "etcd".into()),
        key_prefix: a.key_prefix,
        progress: a.progress,
        variant: a.variant,
        client_threads: a.client_threads,
    };
    let result = etcd::run(&opts)?;
    print_result(&result, a.json);
    Ok(())
}

fn report_main(args: Vec<std::ffi::OsString>) -> Result<(), String> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut input = None;
    let mut output = None;
    let mut svg = None;
    let mut machine = String::new();
    let mut command = String::new();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("input") => input = Some(val(&mut parser)?),
            Long("output") => output = Some(val(&mut parser)?),
            Long("svg") => svg = Some(val(&mut parser)?),
            Long("machine") => machine = val(&mut parser)?,
            Long("command") => command = val(&mut parser)?,
            Long("help") | Short('h') => {
                print!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("{}\n{USAGE}", arg.unexpected())),
        }
    }
    let input = input.ok_or("report: --input is required")?;
    report::report(
        &input,
        output.as_deref(),
        svg.as_deref(),
        &machine,
        &command,
    )
}
