//! `doppel-receiver`: the target-host daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use doppel_receiver::{serve, Config};

#[derive(Parser)]
#[command(
    name = "doppel-receiver",
    version,
    about = "Receives live file changes from doppel agents and applies them beneath replica roots",
    after_help = "Examples:\n  \
        doppel-receiver keygen --out /etc/doppel/receiver\n  \
        doppel-receiver run --config /etc/doppel/receiver.toml\n  \
        RUST_LOG=doppel_receiver=debug doppel-receiver run --config receiver.toml"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the receiver's certificate and key, and print the fingerprint that
    /// agents pin in their `[[target]]` entry.
    #[command(
        after_help = "Example:\n  doppel-receiver keygen --out /etc/doppel/receiver --name backup1"
    )]
    Keygen {
        /// Directory for cert.pem and key.pem (created if missing; existing files are kept).
        #[arg(long)]
        out: PathBuf,
        /// Name put in the certificate (informational: peers pin the fingerprint).
        #[arg(long, default_value = "doppel-receiver")]
        name: String,
    },
    /// Run the receiver until SIGINT or SIGTERM.
    #[command(after_help = "Example:\n  doppel-receiver run --config /etc/doppel/receiver.toml")]
    Run {
        /// Path of receiver.toml (see receiver/README.md for every key).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show each source's health (heartbeats), connection and failover state.
    #[command(
        after_help = "Examples:\n  doppel-receiver status --config /etc/doppel/receiver.toml\n  \
        doppel-receiver status --config /etc/doppel/receiver.toml --json"
    )]
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take over a source's identity: drain its changes, check it is really gone (split-
    /// brain guard), take its addresses and hostname, start its services. Exit status 0
    /// when every step succeeded, 1 when one refused or failed, 2 when it could not run.
    #[command(after_help = "Examples:\n  \
        doppel-receiver failover --config /etc/doppel/receiver.toml --source web1 --dry-run\n  \
        doppel-receiver failover --config /etc/doppel/receiver.toml --source web1\n  \
        doppel-receiver failover --config /etc/doppel/receiver.toml --source web1 --force --json")]
    Failover {
        #[arg(long, short)]
        config: PathBuf,
        /// The [[source]] name to take over.
        #[arg(long)]
        source: String,
        /// Show what each step would do; only the probes of the split-brain guard run.
        #[arg(long)]
        dry_run: bool,
        /// Go on although the source still answers heartbeats or its addresses still
        /// answer probes. Only when you know it can no longer serve: fencing is then yours.
        #[arg(long)]
        force: bool,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Give a failed-over source its data and identity back: copy what changed here
    /// back to it (block checksums, through a temporary doppel-agent and the receiver on
    /// the source host named in [source.failback]), stop the services, drop the
    /// addresses, restore the hostname, accept the source again. Exit status as failover.
    #[command(after_help = "Examples:\n  \
        doppel-receiver failback --config /etc/doppel/receiver.toml --source web1 --dry-run\n  \
        doppel-receiver failback --config /etc/doppel/receiver.toml --source web1")]
    Failback {
        #[arg(long, short)]
        config: PathBuf,
        /// The [[source]] name to give back.
        #[arg(long)]
        source: String,
        /// Show the steps without doing them.
        #[arg(long)]
        dry_run: bool,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Cmd::Status { .. } | Cmd::Failover { .. } | Cmd::Failback { .. } = cli.cmd {
        // Commands: their output is the answer; only warnings go to stderr.
        return match commands(cli.cmd) {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("doppel-receiver: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("doppel-receiver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Keygen { out, name } => {
            let fp = doppel_transport::keygen(&out, &name)?;
            println!(
                "wrote {} and {} (keep the key secret)",
                out.join("cert.pem").display(),
                out.join("key.pem").display()
            );
            println!("fingerprint: {fp}");
            eprintln!("pin it in each agent's [[target]] `fingerprint`");
            Ok(())
        }
        Cmd::Run { config } => {
            let config = Config::load(&config)?;
            doppel_control::log::init(&config.log)?;
            raise_fd_limit();
            keep_freed_memory();
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(serve(config, shutdown_signal()))
        }
        Cmd::Status { .. } | Cmd::Failover { .. } | Cmd::Failback { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn commands(cmd: Cmd) -> anyhow::Result<u8> {
    use doppel_receiver::control::{call, Reply, Request};
    let (config, req, json) = match cmd {
        Cmd::Status { config, json } => (config, Request::Status, json),
        Cmd::Failover {
            config,
            source,
            dry_run,
            force,
            json,
        } => (
            config,
            Request::Failover {
                source,
                dry_run,
                force,
            },
            json,
        ),
        Cmd::Failback {
            config,
            source,
            dry_run,
            json,
        } => (config, Request::Failback { source, dry_run }, json),
        _ => unreachable!("only commands reach here"),
    };
    let config = Config::load(&config)?;
    let mut reply = None;
    call(&doppel_control::socket_path(&config.state_dir), &req, |r| {
        reply = Some(r)
    })?;
    match reply {
        Some(Reply::Error(e)) => anyhow::bail!("{e}"),
        Some(Reply::Status(s)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        Some(Reply::Report(r)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_report(&r);
            }
            Ok(if r.ok { 0 } else { 1 })
        }
        None => anyhow::bail!("the receiver answered nothing; see its log"),
    }
}

fn print_status(s: &doppel_receiver::control::Status) {
    println!(
        "{:<16} {:<12} {:<9} {:>10} {:>8} {:<6} failed over",
        "SOURCE", "HEALTH", "SESSION", "LAST BEAT", "RTT", "AUTO"
    );
    for x in &s.sources {
        let beat = x
            .last_beat_ms
            .map_or("-".to_string(), |m| format!("{m} ms"));
        let rtt = x.rtt_ms.map_or("-".to_string(), |m| format!("{m:.2} ms"));
        let fo = x.failed_over_at_ms.map_or("no".to_string(), |t| {
            format!("yes, {} s ago", (unix_ms().saturating_sub(t)) / 1000)
        });
        println!(
            "{:<16} {:<12} {:<9} {:>10} {:>8} {:<6} {fo}",
            x.source,
            x.health.to_string(),
            if x.connected { "up" } else { "down" },
            beat,
            rtt,
            if x.auto_failover { "on" } else { "off" },
        );
        println!(
            "  applied {} records ({} bytes of data) in {} sessions; {} apply errors, {} failed sessions; heartbeats {} sent, {} answered",
            x.records_applied,
            x.data_bytes_applied,
            x.sessions,
            x.apply_errors,
            x.session_errors,
            x.heartbeats_sent,
            x.heartbeats_answered
        );
        for a in &x.sets {
            println!(
                "  set {}: applied up to record {} of epoch {:x}",
                a.set, a.applied, a.epoch
            );
        }
        if let Some(e) = &x.last_error {
            let ago = x.last_error_at_ms.map_or(String::new(), |t| {
                format!(" ({} s ago)", unix_ms().saturating_sub(t) / 1000)
            });
            println!("  last error{ago}: {e}");
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn print_report(r: &doppel_receiver::failover::Report) {
    use doppel_receiver::failover::Outcome;
    let what = if r.dry_run { " (dry run)" } else { "" };
    println!("{} of {}{what}", r.action, r.source);
    for s in &r.steps {
        let mark = match s.outcome {
            Outcome::Done => "ok",
            Outcome::Skipped => "skip",
            Outcome::Would => "would",
            Outcome::Refused => "REFUSED",
            Outcome::Failed => "FAILED",
        };
        println!(
            "  {:<10} {:<8} {:>8.1} ms  {}",
            s.name, mark, s.ms, s.detail
        );
    }
    let verdict = if r.ok { "done" } else { "NOT done" };
    println!("{} {verdict} in {:.1} ms", r.action, r.total_ms);
}

/// Each session keeps a few files per set open; the default soft limit (1024) is low for
/// a receiver serving many sources, and the hard limit is what the admin allows.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!("cannot raise the open file limit: {e}");
        }
    }
    doppel_receiver::dirty::set_budget(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX));
}

/// A bulk copy allocates a megabyte or so of write data per batch while decoding and
/// frees it on the thread that applied it. With its default, self-adjusting thresholds
/// glibc's malloc hands such memory back to the kernel (heap trimming, or a mapping per
/// allocation) and the next batch faults it in again: about 0.2 CPU-s per GiB, 15 % of
/// the receiver. Fixed thresholds keep up to 64 MiB free per heap for reuse.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters, under glibc's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
