//! A running node: identity, ledger, network, the requester client, and (with `--provide`) the
//! provider service, wired together.
//!
//! Data flow: network events → the dispatcher task → provider requests run on the blocking pool
//! (they touch the ledger, which fsyncs) under a semaphore; job events → the requester's routes;
//! adverts → the requester's provider table. Shutdown is explicit: stop the provider, stop the
//! network loop, wait for the dispatcher.

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
use crate::requester::Requester;

/// Provider requests being handled at once; beyond this the network queue fills and the loop
/// answers `Busy`. Each may wait on one fsync.
const MAX_CONCURRENT_HANDLERS: usize = 64;
/// How long shutdown waits for the network loop to deliver its last responses.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the ledger")]
    Ledger(#[from] OpenError),
    #[error("ledger")]
    Books(#[from] LedgerError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a node needs to start.
pub struct NodeOptions {
    pub key: SecretKey,
    pub ledger: Arc<Ledger>,
    pub net: NetConfig,
    /// Sell generation with this generator and these settings.
    pub provide: Option<(Arc<dyn Generator>, ProviderSettings)>,
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
    metrics_addr: Option<SocketAddr>,
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
            Some((generator, settings)) => Some(Provider::start(
                key.clone(),
                ledger.clone(),
                client.clone(),
                generator,
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
        tasks.spawn(dispatch(
            events,
            client.clone(),
            requester.clone(),
            provider.clone(),
            metrics,
        ));
        Ok(Self {
            client,
            requester,
            provider,
            ledger,
            network,
            tasks,
            metrics_addr,
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

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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

    /// Stops the provider, then the network (which first delivers the responses in flight, such
    /// as the ack of a receipt just paid), then the dispatcher and the metrics endpoint.
    pub async fn shutdown(mut self) {
        if let Some(p) = &self.provider {
            p.stop();
        }
        self.client.shutdown().await;
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
}

async fn dispatch(
    mut events: mpsc::Receiver<NetEvent>,
    client: Client,
    requester: Requester,
    provider: Option<Provider>,
    metrics: Arc<Metrics>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDLERS));
    let mut peers = BTreeSet::new();
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::Request {
                peer,
                request,
                channel,
            } => match *request {
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
                        let answer =
                            tokio::task::spawn_blocking(move || provider.handle(peer, request))
                                .await
                                .unwrap_or(Response::Refused(FailReason::ShuttingDown));
                        let _ = client.respond(channel, answer).await;
                        drop(permit);
                    });
                }
            },
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
