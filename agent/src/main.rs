//! `doppel-agent`: command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Check a configuration file and exit.
    #[command(
        after_help = "Example:\n  doppel-agent check-config --config /etc/doppel/agent.toml"
    )]
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    match real_main(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("doppel-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Keygen { out, name } => {
            let fp = doppel_transport::keygen(&out, &name)?;
            println!(
                "wrote {} and {} (keep the key secret)",
                out.join("cert.pem").display(),
                out.join("key.pem").display()
            );
            println!("fingerprint: {fp}");
            eprintln!("pin it in the receiver's [[source]] `fingerprint`");
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let c = doppel_agent::config::Config::load(&config)?;
            println!(
                "{}: ok ({} sets, {} targets)",
                config.display(),
                c.sets.len(),
                c.targets.len()
            );
            Ok(())
        }
        Cmd::Run { config } => {
            init_logging();
            let config = doppel_agent::config::Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(doppel_agent::run::run(config))
        }
    }
}
