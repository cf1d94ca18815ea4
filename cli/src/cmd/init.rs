//! `pixmarket init`: create a data folder with a new identity and the default config.

use anyhow::Context;
use clap::Args;
use pixmarket_node::DataDir;

use super::DataDirArg;
use crate::usage::out;

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
}

pub(crate) fn run(args: InitArgs) -> anyhow::Result<()> {
    let path = args.data_dir.path()?;
    let (dir, key) = DataDir::init(&path).context("init failed")?;
    out!("initialised {}", dir.root().display())?;
    out!("peer id: {}", key.public().to_peer_id())?;
    Ok(())
}
