//! `pixmarket model`: model folders. `model tiny` writes the built-in tiny model (random
//! weights: it draws noise) in the diffusers layout.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use pixmarket_engine::tiny::{TINY_MODEL_ID, write_tiny_model};

use super::DataDirArg;
use crate::usage::out;

#[derive(Debug, Args)]
pub(crate) struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Write the built-in tiny model (deterministic random weights; its pictures are noise) in
    /// the diffusers Qwen-Image layout.
    Tiny(TinyArgs),
}

#[derive(Debug, Args)]
struct TinyArgs {
    /// The folder to write [default: <data-dir>/models/tiny, what `--model tiny` uses].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    data_dir: DataDirArg,
}

pub(crate) fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Tiny(a) => {
            let out = match a.out {
                Some(p) => p,
                None => a.data_dir.path()?.join("models").join("tiny"),
            };
            write_tiny_model(&out)
                .with_context(|| format!("cannot write the tiny model to {}", out.display()))?;
            out!(
                "wrote {TINY_MODEL_ID} to {} (random weights: it draws noise)",
                out.display()
            )?;
            Ok(())
        }
    }
}
