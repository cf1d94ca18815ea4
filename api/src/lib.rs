//! pixmarket's HTTP API, served by a running node (`pixmarket node --api 127.0.0.1:7878`):
//!
//! - OpenAI's images API under `/v1` ([`openai`]): generations, edits, models, so the tools
//!   and SDKs people have buy on the market;
//! - async jobs under `/api/v1/jobs` ([`async_jobs`]), sharing one job table ([`jobs`]) and
//!   its ids with the OpenAI routes;
//! - the operator's routes under `/api/v1` ([`operator`]): status, accounts, deposits, credit,
//!   receipts, peers, providers, through the node's own ledger handle;
//! - the dashboard's read-only figures under `/api/v1` ([`dashboard_data`]): earnings over time
//!   and the node's activity (jobs by outcome, queue, per-device busy and step time);
//! - the OpenAPI document of `/api/v1` at `/api/v1/openapi.json`;
//! - the dashboard page at `/` ([`dashboard`]): static assets in the binary, served without the
//!   token (they hold no data); the page calls the routes above with the token.
//!
//! Every request passes [`guard`] (rate limit, `Origin`, bearer token) and the scope its route
//! needs; bodies are bounded ([`MAX_JSON_BODY`], [`MAX_EDIT_BODY`]); every error is one
//! [`ApiError`] in OpenAI's shape. [`client`] is the CLI's way in.
//!
//! Starting: [`Api::start`] binds (loopback unless told otherwise), writes a fresh token to
//! `<data-dir>/api.token` (0600) and the address to `<data-dir>/api.addr`, and serves until
//! [`Api::shutdown`], which removes both files.

pub mod async_jobs;
pub mod client;
pub mod dashboard;
pub mod dashboard_data;
pub mod error;
mod extract;
pub mod guard;
pub mod jobs;
pub mod openai;
pub mod operator;
mod params;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post, put};
use pixmarket_ledger::Ledger;
use pixmarket_node::Node;
use pixmarket_node::network::Client;
use pixmarket_node::requester::Requester;
use pixmarket_protocol::{MicroTokens, SecretKey};
use serde_json::{Value, json};

pub use error::ApiError;
pub use token::{ADDR_FILE, Scope, TOKEN_FILE};

/// JSON bodies are at most this large: a prompt of 2000 characters and the other fields are a
/// few KiB; 64 KiB leaves room without letting a client make the node buffer much.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// An edit's multipart body: the image and the mask, each at most the protocol's input limit,
/// and the text fields.
pub const MAX_EDIT_BODY: usize =
    2 * pixmarket_protocol::validate::MAX_INPUT_IMAGE_BYTES + 64 * 1024;
/// How long shutdown waits for requests in flight (a generation waiting on the market is cut).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How the API is served.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub bind: SocketAddr,
    /// Bind an address other than loopback (`--api-public`).
    pub allow_public: bool,
    /// Named tokens from config: (name, token, scope names).
    pub named_tokens: Vec<(String, String, Vec<String>)>,
    pub rate_per_second: u32,
    pub burst: u32,
    /// How long finished jobs' images (and their URLs) are kept.
    pub image_ttl: Duration,
    /// How long a paid job's images are asked for before the first fetch gives up
    /// ([`pixmarket_node::requester::FETCH_DEADLINE`] unless a test shortens it).
    pub fetch_deadline: Duration,
    /// The data folder: where the token and address files go.
    pub data_dir: PathBuf,
    /// The devices the provider computes on, as configured (`cpu`, `cuda:0`); empty when the
    /// node does not provide.
    pub devices: Vec<String>,
}

impl ApiSettings {
    pub fn new(bind: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            bind,
            allow_public: false,
            named_tokens: Vec::new(),
            rate_per_second: guard::DEFAULT_RATE_PER_SECOND,
            burst: guard::DEFAULT_BURST,
            image_ttl: jobs::DEFAULT_IMAGE_TTL,
            fetch_deadline: pixmarket_node::requester::FETCH_DEADLINE,
            data_dir,
            devices: Vec::new(),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "--api {0} is not a loopback address: anyone who can reach it with a token could spend this node's credit and, with an admin token, change its books, over plain HTTP; pass --api-public to bind it anyway (put TLS in front), or use 127.0.0.1:PORT"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen for the API on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] token::TokenError),
}

/// What the node's routes read besides its handles.
#[derive(Debug)]
pub(crate) struct NodeInfo {
    pub(crate) providing: bool,
    pub(crate) devices: Vec<String>,
    pub(crate) data_dir: Option<PathBuf>,
}

/// The handlers' state: the node's handles and the job table.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) jobs: jobs::Jobs,
    pub(crate) requester: Requester,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) net: Client,
    pub(crate) key: Arc<SecretKey>,
    pub(crate) base_url: Arc<str>,
    pub(crate) info: Arc<NodeInfo>,
    /// The provider service, for its queue in the node's status; `None` when not providing.
    pub(crate) provider: Option<pixmarket_node::provider::Provider>,
    pub(crate) metrics: Arc<pixmarket_node::metrics::Metrics>,
    /// When the API started: the span the node's totals are read over.
    pub(crate) started: tokio::time::Instant,
}

/// An amount for JSON: the token string people read and the exact micro-tokens scripts add.
pub(crate) fn amount(m: MicroTokens) -> Value {
    json!({ "tokens": m.to_string(), "micro": m.0 })
}

/// A running API.
#[derive(Debug)]
pub struct Api {
    addr: SocketAddr,
    token: String,
    jobs: jobs::Jobs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    files: Vec<PathBuf>,
}

fn scoped(scope: Scope, route: MethodRouter<AppState>) -> MethodRouter<AppState> {
    route.route_layer(axum::middleware::from_fn(move |req, next| {
        guard::require(scope, req, next)
    }))
}

fn router(state: AppState, guard: Arc<guard::Guard>) -> Router {
    use Scope::{Admin, Buy, Read};
    let api = Router::new()
        .route(
            "/v1/images/generations",
            scoped(Buy, post(openai::generations)),
        )
        .route(
            "/v1/images/edits",
            scoped(Buy, post(openai::edits)).layer(DefaultBodyLimit::max(MAX_EDIT_BODY)),
        )
        .route("/v1/models", scoped(Read, get(openai::models)))
        .route(
            "/v1/images/files/{job}/{name}",
            scoped(Read, get(openai::file)),
        )
        .route(
            "/api/v1/jobs",
            scoped(Read, get(async_jobs::list)).merge(scoped(Buy, post(async_jobs::submit))),
        )
        .route("/api/v1/jobs/{id}", scoped(Read, get(async_jobs::status)))
        .route(
            "/api/v1/jobs/{id}/cancel",
            scoped(Buy, post(async_jobs::cancel)),
        )
        .route("/api/v1/node", scoped(Read, get(operator::node)))
        .route("/api/v1/accounts", scoped(Read, get(operator::accounts)))
        .route(
            "/api/v1/accounts/{peer}",
            scoped(Read, get(operator::account)),
        )
        .route(
            "/api/v1/accounts/{peer}/deposits",
            scoped(Admin, post(operator::deposit)),
        )
        .route(
            "/api/v1/accounts/{peer}/prepaid",
            scoped(Admin, post(operator::prepaid)),
        )
        .route(
            "/api/v1/accounts/{peer}/credit-limit",
            scoped(Admin, put(operator::credit_limit)),
        )
        .route(
            "/api/v1/default-credit",
            scoped(Admin, put(operator::default_credit)),
        )
        .route("/api/v1/receipts", scoped(Read, get(operator::receipts)))
        .route("/api/v1/peers", scoped(Read, get(operator::peers)))
        .route("/api/v1/providers", scoped(Read, get(operator::providers)))
        .route(
            "/api/v1/earnings",
            scoped(Read, get(dashboard_data::earnings)),
        )
        .route(
            "/api/v1/activity",
            scoped(Read, get(dashboard_data::activity)),
        )
        .route("/api/v1/openapi.json", scoped(Read, get(openapi)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            guard::guard,
        ))
        .with_state(state);
    // The page's assets hold no data: they pass the rate limit but not the token check.
    dashboard::routes()
        .layer(axum::middleware::from_fn_with_state(
            guard,
            guard::rate_only,
        ))
        .merge(api)
}

/// The OpenAPI document of `/api/v1` (and `/v1`), shipped with the crate.
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound {
        what: "route",
        id: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

impl Api {
    /// Binds, writes the token and address files, and serves `node`'s API. `key` is the node's
    /// identity: deposit notes are signed with it.
    pub async fn start(
        node: &Node,
        key: SecretKey,
        settings: ApiSettings,
    ) -> Result<Self, StartError> {
        if !settings.bind.ip().is_loopback() && !settings.allow_public {
            return Err(StartError::NotLoopback(settings.bind));
        }
        let cookie = token::fresh_token();
        let tokens = token::Tokens::new(&cookie, &settings.named_tokens)?;
        let listener = tokio::net::TcpListener::bind(settings.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.bind,
            source,
        })?;
        let mut own_origins = vec![format!("http://{addr}")];
        if addr.ip().is_loopback() {
            own_origins.push(format!("http://localhost:{}", addr.port()));
        }
        let jobs = jobs::Jobs::new(
            node.requester().clone(),
            settings.image_ttl,
            settings.fetch_deadline,
        );
        let state = AppState {
            jobs: jobs.clone(),
            requester: node.requester().clone(),
            ledger: node.ledger().clone(),
            net: node.client().clone(),
            key: Arc::new(key),
            base_url: format!("http://{addr}").into(),
            info: Arc::new(NodeInfo {
                providing: node.is_provider(),
                devices: settings.devices.clone(),
                data_dir: Some(settings.data_dir.clone()),
            }),
            provider: node.provider().cloned(),
            metrics: node.metrics().clone(),
            started: tokio::time::Instant::now(),
        };
        let guard = Arc::new(guard::Guard {
            tokens,
            limiter: guard::RateLimiter::new(settings.rate_per_second, settings.burst),
            own_origins,
        });
        let token_path = settings.data_dir.join(TOKEN_FILE);
        let addr_path = settings.data_dir.join(ADDR_FILE);
        token::write_private(&token_path, &cookie)?;
        token::write_private(&addr_path, &addr.to_string())?;
        let app = router(state, guard);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the API server stopped");
            }
        });
        tracing::info!(%addr, "API listening");
        Ok(Self {
            addr,
            token: cookie,
            jobs,
            stop: Some(stop),
            task,
            files: vec![token_path, addr_path],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cookie token (also in `<data-dir>/api.token`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Stops serving: requests in flight get a short grace, jobs still open are cancelled
    /// (nothing is acknowledged for them, so nothing is paid), and the token and address files
    /// are removed. Call it before the node's shutdown.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.jobs.abort_all();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
