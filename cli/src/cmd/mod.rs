//! The subcommands, one module each.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Subcommand};

mod completions;
mod demo;
mod doctor;
mod fetch;
mod generate;
mod id;
mod init;
mod job;
mod ledger;
mod market;
mod model;
mod node;
mod output;
mod price;
mod providers;
mod testnet;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a data folder: a new identity (mode 0600) and the default config.
    Init(init::InitArgs),
    /// Print this node's peer id.
    Id(id::IdArgs),
    /// How reachable the node running from this data folder is (per address: public, behind
    /// NAT, hole-punchable, relayed only), what it tried, and what to do about it.
    Doctor(doctor::DoctorArgs),
    /// Print what a job costs under the metering function.
    Price(price::PriceArgs),
    /// The books: balances, receipts, deposits, credit limits, verify, export and audit.
    Ledger(ledger::LedgerArgs),
    /// Generate an image (`--local`: on this machine, with a model folder or `--model tiny`).
    Generate(Box<generate::GenerateArgs>),
    /// Ask the provider again for the images of a job this data folder paid for (one marked
    /// undelivered, or whose image was lost here); nothing is paid again.
    Fetch(fetch::FetchArgs),
    /// Model folders: `model tiny` writes the built-in tiny model (trained on drawn scenes;
    /// `--random` for the random-weights one), `model train-tiny` trains it.
    Model(model::ModelArgs),
    /// Run a node until Ctrl-C; with --provide it sells image generation.
    Node(node::NodeArgs),
    /// List the providers whose adverts reach this node.
    Providers(providers::ProvidersArgs),
    /// A small local market: three providers and a requester on this machine (tiny model).
    Demo(demo::DemoArgs),
    /// Many nodes in one process: scenarios, faults, adversaries, and a report with the books
    /// check (`--experiment`: the utilization experiment).
    Testnet(Box<testnet::TestnetArgs>),
    /// Print a shell completion script: `pixmarket completions bash > /etc/bash_completion.d/pixmarket`.
    Completions(completions::CompletionsArgs),
}

pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(a) => init::run(a),
        Command::Id(a) => id::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Price(a) => price::run(a),
        Command::Ledger(a) => ledger::run(a),
        Command::Generate(a) => generate::run(*a),
        Command::Fetch(a) => fetch::run(a),
        Command::Model(a) => model::run(a),
        Command::Node(a) => node::run(a),
        Command::Providers(a) => providers::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Testnet(a) => testnet::run(*a),
        Command::Completions(a) => completions::run(&a),
    }
}

/// `--quiet`, set once by `main` before any command runs.
static QUIET: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` asked for results and errors only (no progress, notes or warnings).
pub(crate) fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The `--data-dir` flag every stateful command takes.
#[derive(Debug, Args)]
pub(crate) struct DataDirArg {
    /// The node's data folder [default: the platform's data folder, e.g. ~/.local/share/pixmarket]
    #[arg(long, value_name = "DIR", env = "PIXMARKET_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
}

impl DataDirArg {
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.data_dir {
            Some(p) => Ok(p.clone()),
            None => Ok(pixmarket_node::DataDir::default_path()?),
        }
    }
}
