//! A running node: identity, ledger, network, the requester client, and (with `--provide`) the
//! provider service, wired together.
//!
//! Data flow: network events → the dispatcher task → provider requests run on the blocking pool
//! (they touch the ledger, which fsyncs) under a semaphore; job events → the requester's routes;
//! adverts → the requester's provider table. Shutdown is explicit: stop the provider, stop the
//! network loop, wait for the dispatcher.
//!
//! [`Node::crash`] is the other way out, for testnets: a process kill emulated inside one
//! process. The network task is aborted (no responses drained, connections cut), the dispatcher
//! and the advert task are aborted, the provider's workers abandon their batches at the next step
//! without touching the ledger, and the call returns once every task and thread of the node that
//! holds the ledger has let go, so the same ledger folder can be reopened for a restarted node.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use libp2p::Multiaddr;
use pixmarket_ledger::{Ledger, LedgerError, OpenError};
use pixmarket_protocol::SecretKey;
use pixmarket_protocol::messages::FailReason;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::generator::Generator;
use crate::metrics::{self, Metrics};
use crate::network::{self, Client, NetConfig, NetError, NetEvent, Request, Response};
use crate::provider::{Provider, ProviderSettings};
use crate::rate_limit::{Kind, RateLimits};
use crate::requester::Requester;

/// Provider requests being handled at once; beyond this the network queue fills and the loop
/// answers `Busy`. Each may wait on one fsync.
const MAX_CONCURRENT_HANDLERS: u32 = 64;
/// How long [`Node::crash`] waits for the node's threads to let go of the ledger: a model step
/// (the worker stops at the next one) or a ledger write on the blocking pool, with margin.
const CRASH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for the network loop to deliver its last responses.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the ledger")]
    Ledger(#[from] OpenError),
    #[error("ledger")]
    Books(#[from] LedgerError),
    #[error("cannot start the provider")]
    Provider(#[from] crate::provider::ProviderError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the node's {what} still ran {} s after the crash; the ledger may still be open", CRASH_WAIT.as_secs())]
    StillRunning { what: &'static str },
}

/// What a node needs to start.
pub struct NodeOptions {
    pub key: SecretKey,
    pub ledger: Arc<Ledger>,
    pub net: NetConfig,
    /// Sell generation with these generators (one per device, each with its own copy of the
    /// weights; 1..=[`crate::provider::MAX_DEVICES`]) and these settings.
    pub provide: Option<(Vec<Arc<dyn Generator>>, ProviderSettings)>,
    pub metrics: Option<SocketAddr>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("net", &self.net)
            .field("provide", &self.provide.is_some())
            .finish()
    }
}

/// A started node.
#[derive(Debug)]
pub struct Node {
    client: Client,
    requester: Requester,
    provider: Option<Provider>,
    ledger: Arc<Ledger>,
    /// The swarm's task, awaited on shutdown so responses in flight are delivered.
    network: tokio::task::JoinHandle<()>,
    tasks: JoinSet<()>,
    /// One permit per provider request being handled (each holds the ledger until it returns).
    handlers: Arc<Semaphore>,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
}

impl Node {
    /// Starts the network, the dispatcher and, if asked, the provider. Must run in a tokio runtime.
    pub async fn start(options: NodeOptions) -> Result<Self, NodeError> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (client, events, event_loop) =
            network::new(&options.key, &options.net, Some(&mut registry))?;
        let network = tokio::spawn(event_loop.run());
        let mut tasks = JoinSet::new();
        let key = Arc::new(options.key);
        let ledger = options.ledger;
        let requester =
            Requester::new(key.clone(), ledger.clone(), client.clone(), metrics.clone());
        let provider = match options.provide {
            Some((generators, settings)) => Some(Provider::start(
                key.clone(),
                ledger.clone(),
                client.clone(),
                generators,
                settings,
                metrics.clone(),
            )?),
            None => None,
        };
        let mut metrics_addr = None;
        if let Some(addr) = options.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Metrics { addr, source })?;
            metrics_addr = listener.local_addr().ok();
            tasks.spawn(metrics::serve(
                listener,
                Arc::new(std::sync::Mutex::new(registry)),
            ));
        }
        let handlers = Arc::new(Semaphore::new(
            usize::try_from(MAX_CONCURRENT_HANDLERS).unwrap_or(usize::MAX),
        ));
        tasks.spawn(dispatch(
            events,
            client.clone(),
            requester.clone(),
            provider.clone(),
            metrics.clone(),
            handlers.clone(),
        ));
        Ok(Self {
            client,
            requester,
            provider,
            ledger,
            network,
            tasks,
            handlers,
            metrics_addr,
            metrics,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn requester(&self) -> &Requester {
        &self.requester
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub fn is_provider(&self) -> bool {
        self.provider.is_some()
    }

    /// The provider's queue now; `None` when this node does not provide.
    pub fn provider_queue(&self) -> Option<crate::provider::QueueStatus> {
        self.provider.as_ref().map(Provider::queue_status)
    }

    /// The provider service, when this node provides (cheap to clone).
    pub fn provider(&self) -> Option<&Provider> {
        self.provider.as_ref()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The node's figures (jobs by outcome, queue, per-device busy and step time), which the
    /// API's dashboard routes read.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Addresses the swarm listens on, with `/p2p/<peer id>` appended: what others dial.
    pub async fn addresses(&self) -> Result<Vec<Multiaddr>, NetError> {
        let peer = self.client.local_peer_id();
        Ok(self
            .client
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| a.with(libp2p::multiaddr::Protocol::P2p(peer)))
            .collect())
    }

    /// Stops selling while the network stays up: running and queued jobs are voided (their
    /// requesters told), deliveries in flight get until `deadline`, and receipts still
    /// unacknowledged then are credited back, so requesters can still learn those credit
    /// notes (`Requester::sync_chain`) before [`Node::shutdown`]. Nothing for a node that does
    /// not provide.
    pub async fn stop_providing(&self, deadline: tokio::time::Instant) {
        if let Some(p) = &self.provider {
            p.stop();
            if let Err(e) = p.wait_stopped(deadline).await {
                tracing::warn!(still = e.0, "provider did not stop in time");
            }
        }
    }

    /// Stops the provider (its deliveries in flight get a grace), then the network (which first
    /// delivers the responses in flight, such as the ack of a receipt just paid), then the
    /// dispatcher and the metrics endpoint. `generate` calls still waiting on a provider end
    /// with an error.
    pub async fn shutdown(mut self) {
        // First the provider, with the network still up: the workers void what they will not
        // finish (telling those requesters), and deliveries in flight get a grace to be
        // acknowledged and fetched; receipts still unacknowledged then are credited.
        if let Some(p) = &self.provider {
            p.stop();
            if let Err(e) = p
                .wait_stopped(tokio::time::Instant::now() + SHUTDOWN_GRACE)
                .await
            {
                tracing::warn!(still = e.0, "provider did not stop in time");
            }
        }
        self.client.shutdown().await;
        self.requester.stop();
        // The loop drains for at most its own DRAIN_TIMEOUT; the margin covers a slow wake-up.
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.network)
            .await
            .is_err()
        {
            self.network.abort();
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops the node as a process kill would, as closely as one process allows: the network
    /// task is aborted without delivering the responses in flight, the dispatcher and the
    /// metrics endpoint are aborted, and the provider (if any) abandons its running batch at the
    /// next step without settling, voiding or reporting it, leaving its queue as it is.
    ///
    /// Returns once the node's own holders of the ledger (the worker threads, the advert task,
    /// the dispatcher, provider requests on the blocking pool) have let go, or `StillRunning`
    /// after about 10 s. The caller may then drop its `Arc<Ledger>` and reopen the folder for a
    /// node with the same key, whose provider voids the holds left open. `generate` calls still
    /// running on this node end at once with an error, having paid nothing more; clones of
    /// [`Node::requester`] the caller kept hold the ledger until the caller drops them.
    pub async fn crash(mut self) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + CRASH_WAIT;
        // First the network: nothing more comes in and nothing more goes out.
        self.network.abort();
        let _ = (&mut self.network).await;
        self.requester.stop();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Some(p) = &self.provider {
            p.crash(deadline)
                .await
                .map_err(|e| NodeError::StillRunning { what: e.0 })?;
        }
        // Every handler returns its permit when its ledger work is done.
        match tokio::time::timeout_at(
            deadline,
            self.handlers.acquire_many(MAX_CONCURRENT_HANDLERS),
        )
        .await
        {
            Ok(Ok(permits)) => drop(permits),
            Ok(Err(_)) => {}
            Err(_) => {
                return Err(NodeError::StillRunning {
                    what: "provider request handlers",
                });
            }
        }
        tracing::debug!(peer = %self.client.local_peer_id(), "node crashed (emulated kill)");
        Ok(())
    }
}

async fn dispatch(
    mut events: mpsc::Receiver<NetEvent>,
    client: Client,
    requester: Requester,
    provider: Option<Provider>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
) {
    let mut peers = BTreeSet::new();
    let mut limits = RateLimits::default();
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::Request {
                peer,
                request,
                channel,
                via,
            } => {
                // Before any work: a result the relayed circuit could not carry is refused now.
                if provider.is_some()
                    && let Some(reason) = network::path::relay_refusal(&request, via)
                {
                    tracing::info!(%peer, %reason, "refusing a job the relay cannot carry");
                    let _ = client.respond(channel, Response::Refused(reason)).await;
                    continue;
                }
                if let Err(wait) = limits.admit(peer, Kind::of(&request)) {
                    tracing::debug!(%peer, kind = request.kind(), "rate limited");
                    let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                    let busy = Response::Refused(FailReason::Busy { retry_after_ms });
                    let _ = client.respond(channel, busy).await;
                    continue;
                }
                match *request {
                    Request::Event(event) => requester.on_event(peer, event, channel).await,
                    request => {
                        let Some(provider) = provider.clone() else {
                            let r = Response::Refused(FailReason::Unsupported(
                                "requests to a node that does not provide".into(),
                            ));
                            let _ = client.respond(channel, r).await;
                            continue;
                        };
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            return;
                        };
                        let client = client.clone();
                        tokio::spawn(async move {
                            // The permit lives as long as the ledger work, even if this task is
                            // cancelled: `Node::crash` waits for every permit.
                            let answer = tokio::task::spawn_blocking(move || {
                                let answer = provider.handle(peer, request);
                                drop(provider);
                                drop(permit);
                                answer
                            })
                            .await
                            .unwrap_or(Response::Refused(FailReason::ShuttingDown));
                            let _ = client.respond(channel, answer).await;
                        });
                    }
                }
            }
            NetEvent::Advert { advert, signed } => requester.on_advert(signed.signer(), *advert),
            NetEvent::PeerConnected(p) => {
                peers.insert(p);
                metrics.set_peers(peers.len());
            }
            NetEvent::PeerDisconnected(p) => {
                peers.remove(&p);
                metrics.set_peers(peers.len());
            }
            NetEvent::Listening(_) => {}
        }
    }
}
