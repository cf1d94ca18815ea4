//! `pixmarket demo`: three providers (different prices) and one requester on loopback TCP, each
//! with its own data folder, identity and ledger; the requester prepays each provider, buys a
//! few images through the market, and every ledger is verified at the end.
//!
//! The providers run the built-in tiny model: the real Qwen-Image code with tiny weights trained
//! on drawn scenes. The market around it is exactly what runs with real weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::engine_generator::{EngineGenerator, tiny_model_dir};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::NetConfig;
use pixmarket_node::provider::ProviderSettings;
use pixmarket_node::requester::GenerateOptions;
use pixmarket_node::{DataDir, Node, NodeOptions, now_ms};
use pixmarket_protocol::{
    DepositNote, JobId, JobParams, MicroTokens, Mode, PriceSchedule, PublicKey, SecretKey, Signed,
};

/// Price factors of the three providers, in parts per million: the market should prefer the
/// cheapest at equal speed.
const PRICE_FACTORS_PPM: [u64; 3] = [1_000_000, 800_000, 1_500_000];
/// What the requester prepays each provider.
const DEPOSIT_TOKENS: u64 = 20;
/// How long to wait for every provider's advert to reach the requester.
const ADVERT_WAIT: Duration = Duration::from_secs(20);

/// The prompts the demo buys, Chinese included: sentences of the drawn tiny model's grammar
/// (engine/src/scenes.rs), so its pictures show what was asked.
pub const PROMPTS: [&str; 4] = [
    "a large red circle on the left on a yellow background",
    "蓝色背景上，一个白色大星星在中间",
    "a large green square at the top on a black background",
    "紫色背景上，一个橙色大三角形在右边",
];

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub out: PathBuf,
    pub jobs: usize,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
}

/// One job as the demo saw it.
#[derive(Clone, Debug)]
pub struct JobLine {
    pub prompt: String,
    pub provider: String,
    pub cost: MicroTokens,
    pub seconds: f64,
    pub image: PathBuf,
    pub receipt: JobId,
}

/// One ledger's view of one counterparty.
#[derive(Clone, Debug)]
pub struct BalanceLine {
    pub ledger: String,
    pub peer: String,
    pub deposits: MicroTokens,
    pub charged: MicroTokens,
    pub held: MicroTokens,
    pub available: MicroTokens,
}

/// Everything the demo did.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub jobs: Vec<JobLine>,
    pub balances: Vec<BalanceLine>,
    /// (node name, verify result: entries checked, or the first inconsistency).
    pub verified: Vec<(String, Result<String, String>)>,
    pub total_seconds: f64,
}

fn short(key: &PublicKey) -> String {
    let id = key.to_peer_id().to_string();
    format!("{}…{}", &id[..8], &id[id.len() - 6..])
}

struct DemoNode {
    name: String,
    node: Node,
    key: PublicKey,
}

async fn start_node(
    name: &str,
    root: &Path,
    provide: Option<(Vec<Arc<dyn Generator>>, ProviderSettings)>,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> anyhow::Result<(DemoNode, SecretKey)> {
    let folder = root.join("nodes").join(name);
    let dir = if folder
        .join(pixmarket_node::data_dir::IDENTITY_FILE)
        .exists()
    {
        DataDir::open(&folder)?
    } else {
        DataDir::init(&folder)?.0
    };
    // One copy of the key goes to the node; the demo keeps the other to sign deposit notes.
    let key = dir.identity()?;
    let signer = dir.identity()?;
    let public = key.public();
    let ledger = Arc::new(
        Ledger::open(&dir.ledger_path(), public).with_context(|| format!("ledger of {name}"))?,
    );
    let node = Node::start(NodeOptions {
        key,
        ledger,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            bootstrap,
            ..NetConfig::default()
        },
        provide,
        metrics: None,
    })
    .await?;
    Ok((
        DemoNode {
            name: name.to_owned(),
            node,
            key: public,
        },
        signer,
    ))
}

async fn first_address(node: &Node) -> anyhow::Result<libp2p::Multiaddr> {
    for _ in 0..200 {
        if let Some(a) = node.addresses().await?.into_iter().next() {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("node did not start listening")
}

/// Runs the demo market; `log` receives one line per event as it happens.
pub async fn run(config: &DemoConfig, log: &mut dyn FnMut(String)) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    let model = tiny_model_dir(&config.out);
    pixmarket_engine::tiny::ensure_tiny_model(&model).context("cannot write the tiny model")?;
    log(format!(
        "tiny model ready in {} (trained on drawn scenes)",
        model.display()
    ));

    let mut providers = Vec::new();
    let mut provider_secrets = Vec::new();
    let mut bootstrap = Vec::new();
    for (i, ppm) in PRICE_FACTORS_PPM.iter().enumerate() {
        let generator: Arc<dyn Generator> = Arc::new(
            EngineGenerator::load(&model, "f32", "cpu").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let settings = ProviderSettings {
            advert_interval: pixmarket_node::provider::ADVERT_INTERVAL,
            ack_deadline: pixmarket_node::provider::ACK_DEADLINE,
            schedule: PriceSchedule {
                price_factor_ppm: *ppm,
                min_prompt_tokens: 0,
            },
            max_queue: 8,
            max_batch: 2,
            ms_per_standard_image: 60_000,
        };
        let (p, secret) = start_node(
            &format!("provider-{}", i + 1),
            &config.out,
            Some((vec![generator], settings)),
            bootstrap.clone(),
        )
        .await?;
        if bootstrap.is_empty() {
            bootstrap.push(first_address(&p.node).await?);
        }
        log(format!(
            "{} up: {} (price factor {})",
            p.name,
            short(&p.key),
            MicroTokens(*ppm)
        ));
        providers.push(p);
        provider_secrets.push(secret);
    }
    let (requester, _) = start_node("requester", &config.out, None, bootstrap).await?;
    log(format!("requester up: {}", short(&requester.key)));

    // Each provider's operator records the requester's prepayment in their own books.
    for (p, secret) in providers.iter().zip(&provider_secrets) {
        let note = DepositNote {
            deposit_id: JobId::random().0,
            account: requester.key,
            amount: MicroTokens::from_tokens(DEPOSIT_TOKENS).context("deposit")?,
            memo: "demo prepayment".into(),
            recorded_at_ms: now_ms(),
        };
        let signed = Signed::sign(secret, &note)?;
        p.node.ledger().deposit(&signed)?;
        // The requester keeps the provider-signed note too: its mirror of what it prepaid.
        requester.node.ledger().deposit(&signed)?;
    }
    log(format!(
        "requester prepaid {DEPOSIT_TOKENS} tokens to each provider"
    ));

    let deadline = Instant::now() + ADVERT_WAIT;
    while requester.node.requester().providers().len() < providers.len() {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} provider adverts arrived within {} s",
                requester.node.requester().providers().len(),
                providers.len(),
                ADVERT_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log(format!(
        "{} provider adverts received over gossip",
        providers.len()
    ));

    let images_dir = config.out.join("images");
    std::fs::create_dir_all(&images_dir)?;
    let mut jobs = Vec::new();
    for i in 0..config.jobs {
        let prompt = PROMPTS[i % PROMPTS.len()];
        let params = JobParams {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: config.width,
            height: config.height,
            steps: config.steps,
            true_cfg_scale: pixmarket_engine::drawn::DRAWN_CFG,
            seed: i as u64,
            images: 1,
            mode: Mode::TextToImage,
            exact: false,
            lora: None,
            latents: None,
        };
        let t = Instant::now();
        let outcome = requester
            .node
            .requester()
            .generate(params, GenerateOptions::default(), &mut |_| {})
            .await
            .with_context(|| format!("job {}", i + 1))?;
        let seconds = t.elapsed().as_secs_f64();
        let image = images_dir.join(format!("job-{}.png", i + 1));
        std::fs::write(&image, &outcome.images[0])?;
        let provider = providers
            .iter()
            .find(|p| p.key.to_peer_id() == outcome.provider)
            .map_or_else(|| outcome.provider.to_string(), |p| p.name.clone());
        let receipt = outcome.receipt.verify()?;
        log(format!(
            "job {}: {provider} drew “{prompt}”, charged {} tokens in {seconds:.1} s → {}",
            i + 1,
            outcome.cost,
            image.display()
        ));
        jobs.push(JobLine {
            prompt: prompt.into(),
            provider,
            cost: outcome.cost,
            seconds,
            image,
            receipt: receipt.job_id,
        });
    }

    // Let the last acknowledgements land in the providers' books before reading them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut balances = Vec::new();
    let mut verified = Vec::new();
    for p in &providers {
        if let Some(a) = p.node.ledger().account(Role::Provider, &requester.key)? {
            balances.push(BalanceLine {
                ledger: p.name.clone(),
                peer: "requester".into(),
                deposits: a.deposits,
                charged: a.charged,
                held: a.held,
                available: a.available().unwrap_or(MicroTokens::ZERO),
            });
        }
        let mirror = requester
            .node
            .ledger()
            .account(Role::Requester, &p.key)?
            .unwrap_or_default();
        balances.push(BalanceLine {
            ledger: "requester".into(),
            peer: p.name.clone(),
            deposits: mirror.deposits,
            charged: mirror.charged,
            held: mirror.held,
            available: mirror.available().unwrap_or(MicroTokens::ZERO),
        });
    }
    for n in providers.iter().chain(std::iter::once(&requester)) {
        let r = n
            .node
            .ledger()
            .verify()
            .map(|rep| format!("ok: {} log entries, {} receipts", rep.entries, rep.receipts))
            .map_err(|e| e.to_string());
        verified.push((n.name.clone(), r));
    }
    requester.node.shutdown().await;
    for p in providers {
        p.node.shutdown().await;
    }
    Ok(DemoReport {
        jobs,
        balances,
        verified,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}
