//! `doppel-receiver`: the target-host daemon.

use std::io::IsTerminal;
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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match real_main(Cli::parse()) {
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
            raise_fd_limit();
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(serve(config, shutdown_signal()))
        }
    }
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
