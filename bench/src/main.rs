//! `dflockd-bench`: a closed-loop load generator for dflockd (and Redis).
//!
//! ```text
//! dflockd-bench [run] --addr 127.0.0.1:6388 --mode lock --connections 100 \
//!     --duration 3 --warmup 1 [--keys K] [--depth D] [--server-pid PID] [--json]
//! dflockd-bench --mode signal --connections 10 --listeners 10 [--pattern 'bench.>']
//! dflockd-bench report --input runs.jsonl --output latest.json --svg chart.svg
//! ```

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

run options:
  --addr HOST:PORT      server address (default 127.0.0.1:6388)
  --connections N       closed-loop client connections (default 10)
  --duration SECS       measured time (default 5)
  --warmup SECS         unmeasured time before it (default 1)
  --keys K              shared keys of `contended` and `sem` (default 1)
  --mode MODE           lock | contended | sem | twophase | renew | pipeline |
                        redis-lock | signal (default lock)
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

fn run_main(args: Vec<std::ffi::OsString>) -> Result<(), String> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut addr = "127.0.0.1:6388".to_string();
    let mut connections = 10usize;
    let mut duration = Duration::from_secs(5);
    let mut warmup = Duration::from_secs(1);
    let mut keys = 1usize;
    let mut mode = load::Mode::Lock;
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
            Long("addr") => addr = val(&mut parser)?,
            Long("connections") | Short('c') => {
                connections = num(&val(&mut parser)?, "--connections")?;
            }
            Long("duration") | Short('d') => duration = secs(&val(&mut parser)?, "--duration")?,
            Long("warmup") => warmup = secs(&val(&mut parser)?, "--warmup")?,
            Long("keys") => keys = num(&val(&mut parser)?, "--keys")?,
            Long("mode") | Short('m') => {
                let v = val(&mut parser)?;
                mode =
                    load::Mode::parse(&v).ok_or_else(|| format!("--mode: unknown mode {v:?}"))?;
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
    let addr: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--addr {addr}: no address"))?;
    let depth = depth.unwrap_or(if mode == load::Mode::Pipeline { 32 } else { 1 });
    let label = label.unwrap_or_else(|| {
        if mode == load::Mode::RedisLock {
            "redis".into()
        } else {
            "dflockd".into()
        }
    });
    let opts = load::Opts {
        addr,
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
    let table = report::table(std::slice::from_ref(&result));
    if opts.json {
        eprint!("{table}");
        println!("{result}");
    } else {
        print!("{table}");
    }
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
