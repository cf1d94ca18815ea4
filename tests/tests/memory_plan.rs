//! A provider whose memory plan allows at most 128×128 (`Generator::max_side`): over real libp2p
//! its quote for a larger job is a typed refusal naming the limit, a job request for one is
//! refused before anything is held, and a job within the limit is quoted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::sync::Arc;

use pixmarket_node::generator::{GenError, Generator, GeneratorInfo};
use pixmarket_node::network::{Request, Response};
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{JobParams, MicroTokens, QuoteId, QuoteRequest, Signed};
use pixmarket_tests::evil::RawPeer;
use pixmarket_tests::{TestNode, small_job, tiny_generator};

/// The tiny model behind a memory plan that allows `max_side`.
struct Capped {
    inner: Arc<dyn Generator>,
    max_side: u32,
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
    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        self.inner.generate(jobs, progress)
    }
}

fn quote_request(peer: &RawPeer, provider: pixmarket_protocol::PublicKey, side: u32) -> Request {
    let q = QuoteRequest {
        quote_id: QuoteId::random(),
        provider,
        prompt: "a lighthouse".into(),
        width: side,
        height: side,
        steps: 2,
        images: 1,
        strength_permille: None,
        exact: false,
    };
    Request::Quote(Signed::sign(&peer.secret(), &q).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_beyond_the_memory_plan_are_refused_at_the_quote_and_the_job() {
    let generator: Arc<dyn Generator> = Arc::new(Capped {
        inner: tiny_generator(),
        max_side: 128,
    });
    let provider = TestNode::start(61, vec![], Some(generator)).await;
    let peer = RawPeer::start(62, vec![provider.addr.clone()]).await;
    provider.deposit_from(61, peer.public(), 5);
    let to = provider.key.to_peer_id();

    match peer
        .request(to, quote_request(&peer, provider.key, 256))
        .await
        .unwrap()
    {
        Response::Refused(FailReason::Unsupported(msg)) => {
            assert!(msg.contains("at most 128×128"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match peer
        .request(to, quote_request(&peer, provider.key, 128))
        .await
        .unwrap()
    {
        Response::Quote(q) => assert_eq!(q.signer(), provider.key),
        other => panic!("expected a quote, got {other:?}"),
    }

    // A job request that skipped the quote is refused the same way, and nothing is held.
    let params = JobParams {
        width: 256,
        height: 256,
        ..small_job("a lighthouse")
    };
    let req = RawPeer::job_request(provider.key, params, MicroTokens::from_tokens(5).unwrap());
    let signed = Signed::sign(&peer.secret(), &req).unwrap();
    match peer.request(to, Request::Job(signed)).await.unwrap() {
        Response::Refused(FailReason::Unsupported(msg)) => {
            assert!(msg.contains("at most 128×128"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(provider.node.ledger().holds().unwrap().is_empty());
}
