//! LoRAs over the market, with two real nodes over libp2p and the real engine on the small
//! random pipeline of `engine/tests/fixtures/pipeline/model` and its LoRA fixture
//! (`engine/tests/fixtures/lora/peft.safetensors`, made by `engine/tools/make_lora_fixtures.py`):
//! - the provider's advert lists the LoRA by name and the blake3 hash of its file;
//! - a job naming it by hash is generated with it merged: the bought picture equals the engine
//!   loading the same LoRA locally, and differs from the base model's; the next job without a
//!   LoRA is the base model's picture again (the merge is undone by reloading, bit for bit);
//! - a quote or a job naming a LoRA the provider lacks is refused with `LoraUnavailable`
//!   before anything is held.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pixmarket_node::engine_generator::EngineGenerator;
use pixmarket_node::engine_loras::{OfferedLora, hash_file};
use pixmarket_node::generator::Generator;
use pixmarket_node::network::{Request, Response};
use pixmarket_node::requester::{GenerateError, GenerateOptions};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{Hash, JobParams, LoraChoice, MicroTokens, QuoteId, QuoteRequest, Signed};
use pixmarket_tests::evil::{RawPeer, wait_until};
use pixmarket_tests::{TestNode, small_job};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("pipeline/model")
}

fn lora_file() -> PathBuf {
    fixtures().join("lora/peft.safetensors")
}

/// A two-step job at the fixture pipeline's size.
fn job(lora: Option<LoraChoice>) -> JobParams {
    JobParams {
        width: 64,
        height: 64,
        steps: 2,
        lora,
        ..small_job("a lighthouse on a cliff")
    }
}

fn local(generator: &EngineGenerator, params: &JobParams) -> Vec<u8> {
    generator
        .generate(std::slice::from_ref(params), &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .remove(0)
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_names_an_offered_lora_by_hash_and_gets_it_merged() {
    let hash = hash_file(&lora_file()).unwrap();
    let offer = OfferedLora::open("fixture-style", &lora_file(), false).unwrap();
    assert_eq!(offer.offer.hash, hash);
    let provider_gen = Arc::new(
        EngineGenerator::load(&model(), "f32", "cpu")
            .unwrap()
            .with_loras(vec![offer])
            .unwrap(),
    );
    // References computed by a separate engine: the base model and the LoRA at scale 0.8.
    let reference = EngineGenerator::load(&model(), "f32", "cpu")
        .unwrap()
        .with_loras(vec![OfferedLora::open("x", &lora_file(), false).unwrap()])
        .unwrap();
    let choice = LoraChoice {
        hash,
        scale_permille: 800,
    };
    let base_png = local(&reference, &job(None));
    let lora_png = local(&reference, &job(Some(choice)));
    assert_ne!(base_png, lora_png, "the LoRA changed nothing");

    let provider =
        TestNode::start(71, vec![], Some(provider_gen.clone() as Arc<dyn Generator>)).await;
    let requester = TestNode::start(72, vec![provider.addr.clone()], None).await;
    provider.deposit_from(71, requester.key, 100);
    let client = requester.node.requester().clone();
    wait_until(Duration::from_secs(30), "the provider's advert", || {
        !client.providers().is_empty()
    })
    .await;
    let advert = client.providers()[0].advert.clone();
    assert_eq!(advert.loras.len(), 1);
    assert_eq!(advert.loras[0].name, "fixture-style");
    assert_eq!(advert.lora(&hash).map(|l| l.hash), Some(hash));

    let options = || GenerateOptions {
        provider: Some(provider.key.to_peer_id()),
        ..GenerateOptions::default()
    };
    let bought = client
        .generate(job(Some(choice)), options(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(
        bought.images[0], lora_png,
        "the bought picture is not the LoRA's"
    );
    // Metered by the steps run, as any job.
    assert_eq!(bought.receipt.verify().unwrap().units.steps, 2);
    let plain = client
        .generate(job(None), options(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(plain.images[0], base_png, "the LoRA was not undone");

    // A LoRA the provider lacks: the requester finds no provider offering it; sent directly
    // it is refused at the quote and at the job, and nothing is held.
    let missing = LoraChoice {
        hash: Hash::of(b"not a LoRA file"),
        scale_permille: 1000,
    };
    let err = client
        .generate(job(Some(missing)), GenerateOptions::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, GenerateError::NoProviders), "{err:?}");
    let peer = RawPeer::start(73, vec![provider.addr.clone()]).await;
    provider.deposit_from(71, peer.public(), 5);
    let to = provider.key.to_peer_id();
    let q = QuoteRequest {
        quote_id: QuoteId::random(),
        provider: provider.key,
        prompt: "a lighthouse".into(),
        width: 64,
        height: 64,
        steps: 2,
        images: 1,
        strength_permille: None,
        exact: false,
        lora: Some(missing.hash),
    };
    let refused = Response::Refused(FailReason::LoraUnavailable { hash: missing.hash });
    let answer = peer
        .request(
            to,
            Request::Quote(Signed::sign(&peer.secret(), &q).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(answer, refused);
    let req = RawPeer::job_request(
        provider.key,
        job(Some(missing)),
        MicroTokens::from_tokens(5).unwrap(),
    );
    let signed = Signed::sign(&peer.secret(), &req).unwrap();
    assert_eq!(
        peer.request(to, Request::Job(signed)).await.unwrap(),
        refused
    );
    assert!(provider.node.ledger().holds().unwrap().is_empty());
    requester.node.shutdown().await;
    provider.node.shutdown().await;
}
