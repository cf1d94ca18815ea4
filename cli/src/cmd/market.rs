//! The market form of `pixmarket generate` (without `--local`): start a short-lived requester on
//! the data folder's identity and ledger, reach a provider (`--peer`) or the network
//! (`--bootstrap`), buy the image, and write it with the provider, cost and receipt id printed.
//! The params come from the one job builder and the output is proven writable before anything
//! is bought; should the final write still fail, the paid image is kept in the data folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pixmarket_ledger::Role;
use pixmarket_node::DataDir;
use pixmarket_node::launch::{self, Overrides};
use pixmarket_node::requester::{GenerateError, GenerateOptions, JobProgress, Outcome};
use pixmarket_node::token_check;
use pixmarket_protocol::{Hash, JobParams, LoraChoice, MicroTokens, PublicKey};

use super::output::Output;
use crate::usage::{Interrupted, out, usage};

/// How long to wait for provider adverts (the first one heard, or `--peer`'s): providers
/// publish every 3 s, so two rounds and some gossip latency.
pub(crate) const ADVERT_WAIT: Duration = Duration::from_secs(8);
/// How often to look for adverts while waiting for the first one.
pub(crate) const ADVERT_POLL: Duration = Duration::from_millis(100);
/// How long to wait for the `--peer` provider's connection before saying why it failed: a
/// dial on loopback or a LAN connects in milliseconds, over the internet in about a second.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How often to look for that connection.
const CONNECT_POLL: Duration = Duration::from_millis(50);
/// How long the plain TCP probe of a failed `--peer` address may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Where a paid image goes, inside the data folder, when `-o` cannot be written after all.
const KEPT_IMAGES: &str = "images";

/// How to buy it.
#[derive(Debug, Args)]
pub(crate) struct MarketArgs {
    /// Buy from this provider: its address with /p2p/<peer id>, as `pixmarket node` prints it.
    #[arg(long, value_name = "MULTIADDR", conflicts_with = "bootstrap")]
    peer: Option<String>,
    /// Join the network through this peer and pick a provider from the adverts (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// The most to pay for the job, in tokens (e.g. 15 or 2.5).
    #[arg(long, value_name = "TOKENS", allow_hyphen_values = true)]
    max_cost: Option<String>,
    /// Check the provider's prompt-token count with this model's tokenizer (a Qwen-Image folder
    /// saved by diffusers; only model_index.json and tokenizer/ are read; repeatable). The
    /// built-in tiny model's tokenizer is always used for providers of the tiny model.
    #[arg(long, value_name = "MODEL_DIR")]
    tokenizer: Vec<PathBuf>,
    /// Require the exact computation: a provider that caches denoising steps runs this job
    /// without caching (its quote and receipt say "exact"), or refuses it.
    #[arg(long)]
    pub(crate) exact: bool,
}

/// Writes the paid image to `output`, or, if that fails now, into the data folder, and says
/// where it is.
pub(crate) fn keep(
    output: Output,
    png: &[u8],
    data_dir: &Path,
    job: &str,
) -> anyhow::Result<PathBuf> {
    let wanted = output.path().to_path_buf();
    match output.commit(png) {
        Ok(p) => Ok(p),
        Err(e) => {
            let dir = data_dir.join(KEPT_IMAGES);
            let kept = dir.join(format!("{job}.png"));
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&kept, png))
                .with_context(|| format!("{e:#}; and cannot keep it in {}", kept.display()))?;
            Err(e.context(format!(
                "the paid image is kept in {} instead of {}",
                kept.display(),
                wanted.display()
            )))
        }
    }
}

/// Writes a paid job's first image to `output` (or keeps it in the data folder, see [`keep`]).
pub(crate) fn write_paid(
    output: Output,
    outcome: &Outcome,
    data_dir: &Path,
    job: &str,
) -> anyhow::Result<PathBuf> {
    let png = outcome
        .images
        .first()
        .context("the provider delivered no image")?;
    keep(output, png, data_dir, job)
}

/// The fields `--json` prints for every paid image; callers add their own.
pub(crate) fn paid_json(written: &Path, outcome: &Outcome, job: &str) -> serde_json::Value {
    serde_json::json!({
        "output": written.display().to_string(),
        "provider": outcome.provider.to_string(),
        "cost": outcome.cost.to_string(),
        "cost_micro": outcome.cost.0,
        "job": job,
        "receipt": outcome.receipt.digest().to_string(),
        "path": outcome.path.as_str(),
    })
}

/// The lines every paid image's report starts with: where it went, from whom, by which path.
pub(crate) fn print_paid(written: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    out!("wrote {}", written.display())?;
    out!("provider: {}", outcome.provider)?;
    out!("path: {}", outcome.path.as_str())?;
    Ok(())
}

/// What a plain TCP connect to a `--peer` address found.
#[derive(Debug)]
enum Probe {
    /// Nothing listens there: a dead address (the reason is the OS's).
    Dead(String),
    /// Something listens: if libp2p then fails to reach the peer, the peer id is wrong.
    Listening,
    /// Not a TCP address (QUIC, DNS): nothing to tell apart.
    Unknown,
}

fn probe(addr: &str) -> Probe {
    use libp2p::multiaddr::Protocol;
    let Ok(ma) = addr.parse::<libp2p::Multiaddr>() else {
        return Probe::Unknown;
    };
    let mut ip = None;
    let mut tcp = None;
    for p in ma.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) => tcp = Some(port),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, tcp) else {
        return Probe::Unknown;
    };
    match std::net::TcpStream::connect_timeout(&(ip, port).into(), PROBE_TIMEOUT) {
        Ok(_) => Probe::Listening,
        Err(e) => Probe::Dead(format!(
            "nothing answers at {ip}:{port} ({e}): is the provider running, and is the address \
             right? Nothing was bought"
        )),
    }
}

/// A LoRA to buy with: a provider's offer by its name or its file's blake3 hash (64 hex
/// digits), and the scale.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WantedLora {
    pub name_or_hash: String,
    pub scale_permille: u16,
}

/// The hash `want` names among the offers in `table`: itself if it is 64 hex digits, else the
/// one file offered under that name (two different files under one name is an error listing
/// their hashes).
fn resolve_lora(
    table: &[pixmarket_node::requester::ProviderEntry],
    want: &str,
) -> anyhow::Result<Hash> {
    if want.len() == 64
        && let Ok(bytes) = <[u8; 32]>::try_from(hex::decode(want).unwrap_or_default())
    {
        return Hash::from_bytes(&bytes).map_err(|e| usage!("--lora {want}: {e}"));
    }
    let mut hashes: Vec<Hash> = table
        .iter()
        .flat_map(|p| p.advert.loras.iter())
        .filter(|l| l.name == want)
        .map(|l| l.hash)
        .collect();
    hashes.sort();
    hashes.dedup();
    match hashes.as_slice() {
        [one] => Ok(*one),
        [] => {
            let mut names: Vec<&str> = table
                .iter()
                .flat_map(|p| p.advert.loras.iter().map(|l| l.name.as_str()))
                .collect();
            names.sort_unstable();
            names.dedup();
            Err(usage!(
                "no provider heard offers a LoRA named {want:?} (offered: {}); nothing was bought",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        }
        many => Err(usage!(
            "providers offer different files named {want:?}; name one by its hash: {}",
            many.iter()
                .map(|h| hex::encode(h.as_bytes()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// After Ctrl-C dropped the job: waits for the provider's answer to the cancel (at most
/// `pixmarket_node::requester::CANCEL_TIMEOUT`) and says what is owed, from this node's books.
async fn interrupted(node: &pixmarket_node::Node) -> String {
    let sent = node.requester().abandoned().await;
    let Some(cancel) = sent.first() else {
        return "interrupted before a job was sent; nothing was bought".to_owned();
    };
    let paid = node
        .ledger()
        .receipt(Role::Requester, cancel.job)
        .ok()
        .flatten()
        .filter(|r| r.ack.is_some())
        .and_then(|r| r.receipt.verify().ok());
    if let Some(receipt) = paid {
        return format!(
            "interrupted after job {} was paid ({} tokens to {}); its images were not fetched",
            cancel.job, receipt.cost, cancel.provider
        );
    }
    if cancel.answered {
        format!(
            "interrupted: provider {} confirmed the cancel of job {}; nothing is owed",
            cancel.provider, cancel.job
        )
    } else {
        format!(
            "interrupted: provider {} did not answer the cancel of job {} within {} s; nothing \
             is owed (an unacknowledged job is never paid)",
            cancel.provider,
            cancel.job,
            pixmarket_node::requester::CANCEL_TIMEOUT.as_secs()
        )
    }
}

pub(crate) fn run(
    mut params: JobParams,
    lora: Option<WantedLora>,
    output: &Path,
    market: &MarketArgs,
    json: bool,
    data_dir: PathBuf,
) -> anyhow::Result<()> {
    let max_cost = match &market.max_cost {
        Some(t) => Some(
            t.parse::<MicroTokens>()
                .map_err(|e| usage!("invalid --max-cost: {e}"))?,
        ),
        None => None,
    };
    let provider = match &market.peer {
        Some(addr) => Some(launch::peer_id_of("--peer", addr).map_err(|e| usage!("{e}"))?),
        None if market.bootstrap.is_empty() => {
            return Err(usage!(
                "say where to buy: --peer MULTIADDR (a provider) or --bootstrap MULTIADDR (the \
                 network), or --local"
            ));
        }
        None => None,
    };
    let dir = DataDir::open(&data_dir)?;
    let output = Output::prepare(output)?;
    // A dead address fails here at once; a live one that is another node, after the dial.
    let probed = market.peer.as_deref().map(probe);
    if let Some(Probe::Dead(reason)) = &probed {
        anyhow::bail!("{reason}");
    }
    let mut bootstrap = market.bootstrap.clone();
    bootstrap.extend(market.peer.clone());
    let overrides = Overrides {
        bootstrap,
        client_only: true,
        ..Overrides::default()
    };
    let quiet = super::quiet() || json;
    // Printed with the result, so the same picture can be bought (or made locally) again.
    // None when the job carries its own starting noise (--latents): the seed plays no part.
    let seed = params.latents.is_none().then_some(params.seed);
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let node = launch::start(&dir, &overrides)
            .await
            .context("node failed to start")?;
        // A quote that meters more prompt tokens than our own count is refused.
        let counted = token_check::count_tokens_of_tiny(node.requester(), &dir)
            .context("cannot install the tiny model's tokenizer")
            .and_then(|_| {
                market.tokenizer.iter().try_for_each(|m| {
                    token_check::count_tokens_of_model(node.requester(), m)
                        .map(drop)
                        .with_context(|| format!("--tokenizer {}", m.display()))
                })
            });
        if let Err(e) = counted {
            node.shutdown().await;
            return Err(e);
        }
        if let (Some(peer), Some(addr)) = (provider, &market.peer) {
            let until = tokio::time::Instant::now() + CONNECT_WAIT;
            loop {
                let connected = node.client().connected_peers().await.unwrap_or_default();
                if connected.contains(&peer) {
                    break;
                }
                if tokio::time::Instant::now() >= until {
                    node.shutdown().await;
                    if matches!(probed, Some(Probe::Listening)) {
                        anyhow::bail!(
                            "a node answers at {addr} but it is not {peer}: check the peer id \
                             after /p2p/ (`pixmarket id --data-dir <provider's folder>` prints \
                             it). Nothing was bought"
                        );
                    }
                    anyhow::bail!(
                        "cannot reach provider {peer} at {addr}: is it running, and is the \
                         address right? Nothing was bought"
                    );
                }
                tokio::time::sleep(CONNECT_POLL).await;
            }
        }
        // The adverts say which model each provider runs (so which tokenizer checks its
        // quote) and how fast it is: wait for them a little, for `--peer` too.
        let wanted = provider.and_then(|p| PublicKey::from_peer_id(&p).ok());
        let until = tokio::time::Instant::now() + ADVERT_WAIT;
        while tokio::time::Instant::now() < until {
            let table = node.requester().providers();
            let heard = match &wanted {
                Some(key) => table.iter().any(|p| &p.key == key),
                None => !table.is_empty(),
            };
            if heard {
                break;
            }
            tokio::time::sleep(ADVERT_POLL).await;
        }
        if let Some(want) = &lora {
            match resolve_lora(&node.requester().providers(), &want.name_or_hash) {
                Ok(hash) => {
                    params.lora = Some(LoraChoice {
                        hash,
                        scale_permille: want.scale_permille,
                    });
                }
                Err(e) => {
                    node.shutdown().await;
                    return Err(e);
                }
            }
        }
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(u64::from(params.steps))
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("asking for a quote");
        let mut on_progress = |p: JobProgress| match p {
            JobProgress::Quoted { cost, .. } => bar.set_message(format!("quoted {cost} tokens")),
            JobProgress::Queued { position, .. } => {
                bar.set_message(format!("queued at position {position}"))
            }
            JobProgress::Step { step, of, .. } => {
                bar.set_length(u64::from(of));
                bar.set_position(u64::from(step));
                bar.set_message("generating");
            }
            JobProgress::FailingOver { reason, .. } => {
                if !quiet {
                    bar.println(format!("provider failed ({reason}); trying another"));
                }
            }
        };
        let options = GenerateOptions {
            max_cost,
            provider,
            ..GenerateOptions::default()
        };
        // Ctrl-C while the job is out drops it, which sends the provider a cancel (see
        // `pixmarket_node::requester::SentCancel`); its answer is awaited before exiting.
        let mut generating = Box::pin(node.requester().generate(params, options, &mut on_progress));
        let result = tokio::select! {
            r = &mut generating => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        };
        // Dropped here, before anything else: on Ctrl-C this sends the cancel.
        drop(generating);
        let Some(result) = result else {
            bar.finish_and_clear();
            let told = interrupted(&node).await;
            node.shutdown().await;
            return Err(anyhow::Error::new(Interrupted(told)));
        };
        bar.finish_and_clear();
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                if let GenerateError::Undelivered { job, .. } = &e {
                    let again = format!(
                        "ask for the images again, at no further cost, with `pixmarket fetch \
                         {job} {}` while the provider keeps them ({} min after the job \
                         completed)",
                        market.peer.as_ref().map_or_else(
                            || format!("--bootstrap {}", market.bootstrap.join(" --bootstrap ")),
                            |p| format!("--peer {p}")
                        ),
                        pixmarket_node::requester::RESULT_KEPT.as_secs() / 60
                    );
                    node.shutdown().await;
                    return Err(anyhow::Error::new(e).context(again));
                }
                let unreached = super::node::unreached_bootstrap(&node, &market.bootstrap).await;
                node.shutdown().await;
                if unreached.is_empty() {
                    return Err(e.into());
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "bootstrap peer {} is not reachable",
                    unreached.join(", ")
                )));
            }
        };
        let provider_key = PublicKey::from_peer_id(&outcome.provider).ok();
        let checked = provider_key.is_some_and(|k| node.requester().checks_tokens_of(&k));
        node.shutdown().await;
        let receipt = outcome.receipt.verify()?;
        let job = receipt.job_id.to_string();
        let written = write_paid(output, &outcome, dir.root(), &job)?;
        if json {
            let mut v = paid_json(&written, &outcome, &job);
            v["seed"] = serde_json::json!(seed);
            v["computation"] = serde_json::json!(receipt.step_caching.to_string());
            out!("{v}")?;
        } else {
            print_paid(&written, &outcome)?;
            out!("cost: {} tokens", outcome.cost)?;
            match seed {
                Some(seed) => out!("seed: {seed}")?,
                None => out!("seed: none (the given latents)")?,
            }
            out!("receipt: job {job} (receipt {})", outcome.receipt.digest())?;
            out!("computation: {}", receipt.step_caching)?;
            if !checked && !quiet {
                out!(
                    "prompt tokens: {}, as the provider counted them (--tokenizer MODEL_DIR \
                     checks them with that model's tokenizer)",
                    receipt.units.prompt_tokens
                )?;
            }
        }
        anyhow::Ok(())
    })
}
