//! `doppel-agent`: command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(
    name = "doppel-agent",
    version,
    about = "Keeps a live copy of chosen directories on another host (source side).",
    after_help = "Example:\n  doppel-agent keygen --out /etc/doppel/agent\n  doppel-agent run --config /etc/doppel/agent.toml"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this agent's private key and self-signed certificate, print its fingerprint.
    #[command(
        after_help = "Example:\n  doppel-agent keygen --out /etc/doppel/agent --name web1\n\nPin the printed fingerprint in the receiver's [[source]] entry."
    )]
    Keygen {
        /// Directory for cert.pem and key.pem (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Name written into the certificate.
        #[arg(long, default_value = "doppel-agent")]
        name: String,
    },
    /// Run the daemon: capture changes under every set's root and replicate them.
    #[command(
        after_help = "Example:\n  doppel-agent run --config /etc/doppel/agent.toml\n\nLog level: RUST_LOG=debug (default info)."
    )]
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare the sets with every target's replica, changing nothing (unless --repair),
    /// and list the files and byte ranges that differ.
    #[command(
        after_help = "Examples:\n  doppel-agent verify --config /etc/doppel/agent.toml\n  doppel-agent verify --config /etc/doppel/agent.toml --set www --json\n  doppel-agent verify --config /etc/doppel/agent.toml --repair\n\nThe running daemon does the comparison, in sequence with live changes, so replication\nlag is not reported as a difference. Progress goes to stderr (a bar on a terminal).\nExit status: 0 identical (or repaired), 1 differences found, 2 the verify could not run."
    )]
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this set (default: every set).
        #[arg(long)]
        set: Option<String>,
        /// Print progress and the report as JSON lines on stdout.
        #[arg(long)]
        json: bool,
        /// Send what differs (only the differing blocks, then the attributes).
        #[arg(long)]
        repair: bool,
    },
    /// Show where every set stands with every target: state, queue, lag, rate, mirror
    /// progress, last error. See agent/README.md for the columns.
    #[command(
        after_help = "Examples:\n  doppel-agent status --config /etc/doppel/agent.toml\n  doppel-agent status --config /etc/doppel/agent.toml --json\n  doppel-agent status --config /etc/doppel/agent.toml --watch"
    )]
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Follow the mirror and verify progress (a bar on a terminal) until every change
        /// is acknowledged, then show the table. With --json, one status per line.
        #[arg(long)]
        watch: bool,
    },
    /// Preflight: kernel features (BTF, tracefs, BPF permission), the configuration,
    /// keys, set roots, and each target (reachable, certificate pinned both ways). Every
    /// failed item comes with what to do. Exit status 0 when all pass, 1 otherwise.
    #[command(
        after_help = "Examples:\n  doppel-agent check --config /etc/doppel/agent.toml\n  doppel-agent check --config /etc/doppel/agent.toml --json"
    )]
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// For `cargo xtask bench capture`: attach an empty program to the buffered-write
    /// tracepoint (or, with --filesystem-only, the filesystem programs alone, with
    /// directory PATH marked; with --namespace-only, only the fanotify mark on PATH's
    /// filesystem), print "attached", and keep it until standard input closes.
    #[command(hide = true)]
    BenchFloor {
        #[arg(long)]
        filesystem_only: Option<PathBuf>,
        #[arg(long, conflicts_with = "filesystem_only")]
        namespace_only: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    #[command(
        after_help = "Example:\n  doppel-agent check-config --config /etc/doppel/agent.toml"
    )]
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// glibc gives every thread that allocates its own arena (up to 8 per core) and keeps
/// each at its high-water mark. The agent's large, short-lived buffers (ranges read
/// from files, batches, frames) are made on one thread and freed on another, so under a
/// write storm the arenas together held about twice what was live at the peak. Two
/// arenas keep the contention low and measured 20 MiB less at the storm's peak.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let verify = matches!(cli.cmd, Cmd::Verify { .. });
    match real_main(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("doppel-agent: {e:#}");
            std::process::ExitCode::from(if verify { 2 } else { 1 })
        }
    }
}

fn real_main(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Verify {
            config,
            set,
            json,
            repair,
        } => {
            let c = doppel_agent::config::Config::load(&config)?;
            let path = doppel_agent::control::socket_path(&c.state_dir);
            commands::verify(&path, set, json, repair)
        }
        Cmd::Status {
            config,
            json,
            watch,
        } => {
            let c = doppel_agent::config::Config::load(&config)?;
            let path = doppel_agent::control::socket_path(&c.state_dir);
            if watch {
                commands::watch(&path, json)?;
            } else {
                commands::status(&path, json)?;
            }
            Ok(0)
        }
        Cmd::Keygen { out, name } => {
            let fp = doppel_transport::keygen(&out, &name)?;
            println!(
                "wrote {} and {} (keep the key secret)",
                out.join("cert.pem").display(),
                out.join("key.pem").display()
            );
            println!("fingerprint: {fp}");
            eprintln!("pin it in the receiver's [[source]] `fingerprint`");
            Ok(0)
        }
        Cmd::Check { config, json } => {
            let rt = tokio::runtime::Runtime::new()?;
            let items = rt.block_on(doppel_agent::check::run(&config));
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                for i in &items {
                    let mark = if i.ok { "ok  " } else { "FAIL" };
                    println!("{mark} {:<16} {}", i.item, i.detail);
                    if let Some(fix) = &i.fix {
                        println!("     {:<16} fix: {fix}", "");
                    }
                }
            }
            Ok(if items.iter().all(|i| i.ok) { 0 } else { 1 })
        }
        Cmd::BenchFloor {
            filesystem_only,
            namespace_only,
        } => {
            let _hook = match (filesystem_only, namespace_only) {
                (Some(path), _) => {
                    Box::new(commands::filesystem_capture_only(&path)?) as Box<dyn Send>
                }
                (None, Some(path)) => Box::new(commands::namespace_capture_only(&path)?),
                (None, None) => Box::new(doppel_agent::capture::FloorHook::attach()?),
            };
            println!("attached");
            std::io::Write::flush(&mut std::io::stdout())?;
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
            Ok(0)
        }
        Cmd::CheckConfig { config } => {
            let c = doppel_agent::config::Config::load(&config)?;
            println!(
                "{}: ok ({} sets, {} targets)",
                config.display(),
                c.sets.len(),
                c.targets.len()
            );
            Ok(0)
        }
        Cmd::Run { config } => {
            let config = doppel_agent::config::Config::load(&config)?;
            doppel_control::log::init(&config.log)?;
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                sets = config.sets.len(),
                targets = config.targets.len(),
                "doppel-agent starting"
            );
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(doppel_agent::run::run(config))?;
            Ok(0)
        }
    }
}
