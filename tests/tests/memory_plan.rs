//! A provider whose memory plan bounds its size and batch (`Generator::max_side`,
//! `Generator::max_images`): over real libp2p its quote for a larger job, or for more images
//! than fit at that size, is a typed refusal naming the limits, a job request for one is
//! refused before anything is held, a job within the limits is quoted, and the advert states
//! the limits. The second test plans the tiny model itself for a small device.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use pixmarket_node::engine_generator::{EngineGenerator, Placement};
use pixmarket_node::generator::{GenError, Generator, GeneratorInfo};
use pixmarket_node::network::{Request, Response};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{JobParams, MicroTokens, QuoteId, QuoteRequest, Signed};
use pixmarket_tests::evil::RawPeer;
use pixmarket_tests::evil::wait_until;
use pixmarket_tests::{TestNode, small_job, tiny_generator};

/// The tiny model behind a memory plan that allows sides up to `max_side`, with `max_images`
/// images per batch at any of them.
struct Capped {
    inner: Arc<dyn Generator>,
    max_side: u32,
    max_images: u32,
}

impl Generator for Capped {
    fn info(&self) -> GeneratorInfo {
        self.inner.info()
    }
    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        self.inner.count_prompt_tokens(prompt)
    }
    fn max_side(&self) -> u32 {
        self.max_side
    }
    fn max_images(&self, width: u32, height: u32) -> u32 {
        if width.max(height) > self.max_side {
            0
        } else {
            self.max_images
        }
    }
    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        self.inner.generate(jobs, progress)
    }
}

fn quote_request(
    peer: &RawPeer,
    provider: pixmarket_protocol::PublicKey,
    side: u32,
    images: u32,
) -> Request {
    let q = QuoteRequest {
        quote_id: QuoteId::random(),
        provider,
        prompt: "a lighthouse".into(),
        width: side,
        height: side,
        steps: 2,
        images,
        strength_permille: None,
        exact: false,
        lora: None,
    };
    Request::Quote(Signed::sign(&peer.secret(), &q).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_beyond_the_memory_plan_are_refused_at_the_quote_and_the_job() {
    let generator: Arc<dyn Generator> = Arc::new(Capped {
        inner: tiny_generator(),
        max_side: 128,
        max_images: 2,
    });
    let provider = TestNode::start(61, vec![], Some(generator)).await;
    let peer = RawPeer::start(62, vec![provider.addr.clone()]).await;
    provider.deposit_from(61, peer.public(), 5);
    let to = provider.key.to_peer_id();

    let too_large = |images, max_images| FailReason::TooLarge {
        width: 256,
        height: 256,
        images,
        max_side: 128,
        max_images,
    };
    let refusal = peer
        .request(to, quote_request(&peer, provider.key, 256, 1))
        .await
        .unwrap();
    assert_eq!(refusal, Response::Refused(too_large(1, 0)));
    if let Response::Refused(r) = &refusal {
        assert!(r.to_string().contains("at most 128×128"), "{r}");
    }
    // Three images at 128² are more than the plan batches.
    match peer
        .request(to, quote_request(&peer, provider.key, 128, 3))
        .await
        .unwrap()
    {
        Response::Refused(FailReason::TooLarge {
            images: 3,
            max_images: 2,
            ..
        }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    for images in [1, 2] {
        match peer
            .request(to, quote_request(&peer, provider.key, 128, images))
            .await
            .unwrap()
        {
            Response::Quote(q) => assert_eq!(q.signer(), provider.key),
            other => panic!("expected a quote, got {other:?}"),
        }
    }

    // A job request that skipped the quote is refused the same way, and nothing is held.
    let params = JobParams {
        width: 256,
        height: 256,
        ..small_job("a lighthouse")
    };
    let req = RawPeer::job_request(provider.key, params, MicroTokens::from_tokens(5).unwrap());
    let signed = Signed::sign(&peer.secret(), &req).unwrap();
    assert_eq!(
        peer.request(to, Request::Job(signed)).await.unwrap(),
        Response::Refused(too_large(1, 0))
    );
    assert!(provider.node.ledger().holds().unwrap().is_empty());

    // The advert states both limits (images at the standard size, here the largest side).
    let requester = TestNode::start(63, vec![provider.addr.clone()], None).await;
    let client = requester.node.requester().clone();
    wait_until(Duration::from_secs(30), "the provider's advert", || {
        !client.providers().is_empty()
    })
    .await;
    let advert = client.providers()[0].advert.clone();
    assert_eq!((advert.max_width, advert.max_height), (128, 128));
    assert_eq!(advert.max_images, 2);
}

/// The engine's own plan of the tiny model for a 1 GiB device (which once found no size at all)
/// gives the provider the market's largest side (since the VAE's attention is planned at the
/// chunk it sizes from the memory left; at its default chunk the plan stopped at 1904) and a
/// batch there below the protocol's 4: a quote at that size is signed, one for an image more is
/// refused with the plan's limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiny_model_planned_for_one_gib_serves() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    pixmarket_engine::tiny::ensure_tiny_model(&model).unwrap();
    let placement = Placement {
        text_encoder_on_cpu: false,
        device_memory_gib: 1,
    };
    let g = EngineGenerator::load_with(&model, "f32", "cpu", placement).unwrap();
    let side = g.max_side();
    assert_eq!(side, pixmarket_protocol::validate::MAX_DIMENSION);
    let at_largest = g.max_images(side, side);
    assert!(
        (1..pixmarket_protocol::validate::MAX_IMAGES).contains(&at_largest),
        "{at_largest}"
    );
    assert!(g.max_images(256, 256) >= at_largest);
    let provider = TestNode::start(64, vec![], Some(Arc::new(g))).await;
    let peer = RawPeer::start(65, vec![provider.addr.clone()]).await;
    let to = provider.key.to_peer_id();
    match peer
        .request(to, quote_request(&peer, provider.key, side, 1))
        .await
        .unwrap()
    {
        Response::Quote(q) => assert_eq!(q.signer(), provider.key),
        other => panic!("expected a quote, got {other:?}"),
    }
    assert_eq!(
        peer.request(to, quote_request(&peer, provider.key, side, at_largest + 1))
            .await
            .unwrap(),
        Response::Refused(FailReason::TooLarge {
            width: side,
            height: side,
            images: at_largest + 1,
            max_side: side,
            max_images: at_largest,
        })
    );
}
