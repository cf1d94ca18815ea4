//! `pixmarket fetch JOB`: ask the provider again for the images of a job this data folder
//! already paid for. A result that did not come within the fetch deadline (the provider's link
//! was down, its node saturated, ours stopped) is marked undelivered; while the provider still
//! keeps it (`RESULT_KEPT`, ten minutes from its completion) it can be fetched here, and then
//! counts as delivered in the books. Nothing is paid again: a repeated fetch carries the same
//! signed ack.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pixmarket_ledger::Role;
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};
use pixmarket_node::requester::{FETCH_DEADLINE, RESULT_KEPT, RefetchError};
use pixmarket_protocol::{JobId, PublicKey};

use super::DataDirArg;
use super::market::{ADVERT_POLL, ADVERT_WAIT, paid_json, print_paid, write_paid};
use super::output::Output;
use crate::usage::{out, usage};

#[derive(Debug, Args)]
pub(crate) struct FetchArgs {
    /// The job's id (32 hex digits), as `generate` or `ledger receipts` prints it.
    job: String,
    /// Where to write the PNG. Checked writable before the provider is asked.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// The provider's address with /p2p/<peer id>; its peer id must be the receipt's signer.
    #[arg(long, value_name = "MULTIADDR", conflicts_with = "bootstrap")]
    peer: Option<String>,
    /// Join the network through this peer and reach the provider by its advert (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data_dir: DataDirArg,
}

pub(crate) fn run(args: FetchArgs) -> anyhow::Result<()> {
    let job: JobId = args.job.parse().map_err(|e| {
        usage!(
            "JOB {:?}: {e}; a job id is 32 hex digits, as `generate` prints it",
            args.job
        )
    })?;
    let peer = match &args.peer {
        Some(addr) => Some(launch::peer_id_of("--peer", addr).map_err(|e| usage!("{e}"))?),
        None if args.bootstrap.is_empty() => {
            return Err(usage!(
                "say where the provider is: --peer MULTIADDR (its address) or --bootstrap \
                 MULTIADDR (the network)"
            ));
        }
        None => None,
    };
    let dir = DataDir::open(&args.data_dir.path()?)?;
    let output = Output::prepare(&args.output)?;
    let mut bootstrap = args.bootstrap.clone();
    bootstrap.extend(args.peer.clone());
    let overrides = Overrides {
        bootstrap,
        client_only: true,
        ..Overrides::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        let result = async {
            let stored = node
                .ledger()
                .receipt(Role::Requester, job)?
                .ok_or_else(|| {
                    usage!("job {job} is not a job this data folder bought (no receipt of it)")
                })?;
            let provider = stored.receipt.signer();
            if let Some(peer) = peer
                && peer != provider.to_peer_id()
            {
                return Err(usage!(
                    "--peer is {peer}, but job {job} was sold by {}; nothing was asked",
                    provider.to_peer_id()
                ));
            }
            if peer.is_none() {
                wait_for_advert(&node, &provider).await;
            }
            node.requester()
                .refetch(job, FETCH_DEADLINE)
                .await
                .map_err(|e| match e {
                    RefetchError::Undelivered { .. } => anyhow::Error::new(e).context(format!(
                        "a provider keeps a result for {} min after it completes",
                        RESULT_KEPT.as_secs() / 60
                    )),
                    other => other.into(),
                })
        }
        .await;
        node.shutdown().await;
        let refetched = result?;
        let outcome = refetched.outcome;
        let job = job.to_string();
        let written = write_paid(output, &outcome, dir.root(), &job)?;
        if args.json {
            let mut v = paid_json(&written, &outcome, &job);
            v["delivered_late"] = serde_json::json!(refetched.delivered_late);
            out!("{v}")?;
        } else {
            print_paid(&written, &outcome)?;
            out!(
                "cost: {} tokens, paid once, at the ack (nothing more now)",
                outcome.cost
            )?;
            if refetched.delivered_late {
                out!("delivered late: the job was marked undelivered and now counts as delivered")?;
            }
        }
        anyhow::Ok(())
    })
}

/// Waits a little for the provider's advert, which carries the addresses it can be dialed at.
async fn wait_for_advert(node: &pixmarket_node::Node, provider: &PublicKey) {
    let until = tokio::time::Instant::now() + ADVERT_WAIT;
    while tokio::time::Instant::now() < until {
        if node
            .requester()
            .providers()
            .iter()
            .any(|p| &p.key == provider)
        {
            return;
        }
        tokio::time::sleep(ADVERT_POLL).await;
    }
}
