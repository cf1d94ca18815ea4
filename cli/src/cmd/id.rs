//! `pixmarket id`: print the node's peer id (which is also its signing key).

use clap::Args;
use pixmarket_node::DataDir;

use super::DataDirArg;
use crate::usage::out;

#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Also print the ed25519 public key in hex.
    #[arg(long)]
    public_key: bool,
}

pub(crate) fn run(args: IdArgs) -> anyhow::Result<()> {
    let dir = DataDir::open(&args.data_dir.path()?)?;
    let key = dir.identity()?.public();
    out!("{}", key.to_peer_id())?;
    if args.public_key {
        out!("{key}")?;
    }
    Ok(())
}
