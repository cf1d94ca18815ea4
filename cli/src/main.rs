//! `pixmarket`: the command line. Each subcommand lives in its own module under `cmd/`, turns
//! its arguments into a validated value, and calls the library crates; no business logic here.

use std::process::ExitCode;

use clap::Parser;

mod cmd;

/// A peer-to-peer market for GPU image generation (Qwen-Image).
#[derive(Debug, Parser)]
#[command(name = "pixmarket", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings (refused jobs, bad receipts, failovers) by default; RUST_LOG=info or debug for more.
    // A testnet provokes refusals and failovers on purpose, by the hundred, and reports them
    // itself: only errors are logged there unless RUST_LOG asks for more.
    let default = if matches!(cli.command, cmd::Command::Testnet(_)) {
        "error"
    } else {
        "warn,libp2p_kad=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cmd::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line a person can act on.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
