//! `cargo xtask`: setup, build, demo, test, bench for doppel.

mod bench;
mod compile;
mod demo;
mod fuzz;
mod install;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "doppel's project tasks (run as root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent; seconds when done before).
    Setup,
    /// Build doppel-agent (with its embedded eBPF program) and doppel-receiver, release.
    Build,
    /// Replicate a demo directory live to a receiver on 127.0.0.1 and show it.
    Demo {
        /// How long the demo writer runs.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Run every test: unit tests, then end-to-end tests with real processes.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Install the release binaries, the systemd units and example configurations.
    /// Nothing is enabled: configure, `doppel-agent check`, then `systemctl enable --now`.
    Install {
        /// Binaries go to PREFIX/bin.
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Stage everything under this directory instead of / (for packaging).
        #[arg(long)]
        destdir: Option<std::path::PathBuf>,
    },
    /// Fuzz every decoder (wire frames, capture records, journal records, paths).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run benchmarks, print a table and write the figures as a flat JSON object.
    Bench {
        /// Benchmarks to run (default: all). Names: lag, slowdown.
        names: Vec<String>,
        #[arg(long, default_value = "bench.json")]
        json: std::path::PathBuf,
    },
    /// (internal) the receiving end of the plain-quinn baseline, in its own process
    /// like doppel-receiver.
    #[command(hide = true)]
    BenchSink {
        keys: std::path::PathBuf,
        client_fp: String,
        /// Use quinn's default transport settings instead of doppel's.
        #[arg(long)]
        quinn_defaults: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => setup::ensure().and_then(|_| compile::release()),
        Cmd::Demo { seconds } => demo::run(seconds),
        Cmd::Test { filter } => test::run(filter.as_deref()),
        Cmd::Bench { names, json } => bench::run(&names, &json),
        Cmd::Fuzz { seconds } => fuzz::run(seconds),
        Cmd::Install { prefix, destdir } => install::run(&prefix, destdir.as_deref()),
        Cmd::BenchSink {
            keys,
            client_fp,
            quinn_defaults,
        } => bench::sink(&keys, &client_fp, quinn_defaults),
    };
    if let Err(e) = r {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
