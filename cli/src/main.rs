//! `pixmarket`: the command line. Each subcommand lives in its own module under `cmd/`, turns
//! its arguments into a validated value, and calls the library crates; no business logic here.
//! Exit codes and closed pipes are `usage`'s.

use std::process::ExitCode;

use clap::Parser;

mod cmd;
mod usage;

/// A peer-to-peer market for GPU image generation (Qwen-Image).
///
/// Exit status: 0 on success, 2 when the command line is wrong (nothing was spent), 130 when
/// Ctrl-C stopped a bought job (it is cancelled at the provider), 1 for any other failure.
#[derive(Debug, Parser)]
#[command(
    name = "pixmarket",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Print only results and errors: no progress bars, notes or warnings.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print and exit 0; a wrong command line prints clap's message with
        // the allowed values and exits 2.
        Err(e) => e.exit(),
    };
    cmd::set_quiet(cli.quiet);
    // Warnings (refused jobs, bad receipts, failovers) by default; RUST_LOG=info or debug for more.
    // A testnet provokes refusals and failovers on purpose, by the hundred, and reports them
    // itself: only errors are logged there unless RUST_LOG asks for more.
    // A running node logs the node crate's info lines too (one per job sold, issue 22), which
    // is what an operator watching it wants to see.
    let default = match &cli.command {
        _ if cli.quiet => "error",
        cmd::Command::Testnet(_) => "error",
        cmd::Command::Node(_) => "warn,pixmarket_node=info,libp2p_kad=error",
        _ => "warn,libp2p_kad=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cmd::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our stdout went away (`| head -1`): it has what it wanted.
        Err(e) if usage::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line a person can act on.
            eprintln!("error: {e:#}");
            ExitCode::from(usage::exit_code(&e))
        }
    }
}
