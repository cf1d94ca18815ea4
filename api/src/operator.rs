//! The operator's routes under `/api/v1`: the node's status, accounts with balances, deposits,
//! credit limits and the default credit (writes need the `admin` scope), receipts filtered by
//! peer and time, peers and providers. The ledger is the running node's own handle, so a
//! deposit recorded here shows in the balance at once and nothing opens the store a second
//! time. Ledger calls fsync: they run on the blocking pool.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pixmarket_ledger::{Ledger, Role};
use pixmarket_node::provider::QueueStatus;
use pixmarket_protocol::validate as v;
use pixmarket_protocol::{DepositNote, MicroTokens, PublicKey, Signed};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery};
use crate::jobs::Phase;
use crate::openai::Amount;

/// Receipts one listing returns at most; `limit` may ask for fewer. A busy provider's books
/// hold many thousands; a page of this many is a few hundred KiB of JSON.
pub const MAX_RECEIPTS_PER_PAGE: usize = 1000;

fn show(p: &PublicKey) -> String {
    p.to_peer_id().to_string()
}

fn parse_peer(param: &str, text: &str) -> Result<PublicKey, ApiError> {
    PublicKey::from_peer_id_str(text)
        .or_else(|_| text.parse::<PublicKey>())
        .map_err(|e| {
            ApiError::invalid(
                param,
                format!("invalid {param}: got {text:?}; allowed: a peer id (12D3KooW...): {e}"),
            )
        })
}

/// Tokens as the CLI takes them: a non-negative decimal with up to 6 places.
fn parse_tokens(amount: &Amount) -> Result<MicroTokens, ApiError> {
    let text = amount.text();
    if text.trim_start().starts_with('-') {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "invalid tokens: got {text:?}, which is negative; allowed: tokens of 0 or more"
            ),
        ));
    }
    text.parse::<MicroTokens>().map_err(|e| {
        ApiError::invalid(
            "tokens",
            format!("invalid tokens: got {text:?}; allowed: a non-negative decimal with up to 6 places ({e})"),
        )
    })
}

/// Runs a ledger call on the blocking pool.
async fn books<T: Send + 'static>(
    ledger: &Arc<Ledger>,
    f: impl FnOnce(&Ledger) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let l = ledger.clone();
    tokio::task::spawn_blocking(move || f(&l))
        .await
        .map_err(ApiError::internal)?
}

fn account_json(peer: &PublicKey, a: &pixmarket_ledger::Account) -> Value {
    json!({
        "peer": show(peer),
        "deposits": crate::amount(a.deposits),
        "credit_limit": crate::amount(a.credit_limit),
        "charged": crate::amount(a.charged),
        "held": crate::amount(a.held),
        // null when overdrawn (a requester's mirror of credit it did not record).
        "available": a.available().map(crate::amount),
        "chain_entries": a.entries,
    })
}

fn sum_charged(l: &Ledger, role: Role) -> Result<MicroTokens, ApiError> {
    let mut total = MicroTokens::ZERO;
    for (_, a) in l.accounts(role).map_err(ApiError::internal)? {
        total = total
            .checked_add(a.charged)
            .ok_or_else(|| ApiError::internal("charged total overflows"))?;
    }
    Ok(total)
}

/// `GET /api/v1/node`.
pub(crate) async fn node(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let peer_id = s.net.local_peer_id();
    let addrs: Vec<String> = s
        .net
        .listen_addrs()
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|a| {
            a.with(libp2p::multiaddr::Protocol::P2p(peer_id))
                .to_string()
        })
        .collect();
    let peers = s.net.connected_peers().await.map_err(ApiError::internal)?;
    let reach = s.net.reachability().await.map_err(ApiError::internal)?;
    let (earned, spent) = books(&s.ledger, |l| {
        Ok((
            sum_charged(l, Role::Provider)?,
            sum_charged(l, Role::Requester)?,
        ))
    })
    .await?;
    let jobs = s.jobs.list()?;
    let count = |f: fn(&Phase) -> bool| jobs.iter().filter(|j| f(&j.phase)).count();
    Ok(Json(json!({
        "peer_id": peer_id.to_string(),
        "addresses": addrs,
        "connected_peers": peers.len(),
        // What `pixmarket doctor` says: the verdict, one sentence of advice, and per address
        // what AutoNAT found.
        "reachability": {
            "verdict": reach.verdict().as_str(),
            "advice": reach.advice(),
            "addresses": reach.addresses,
            "relays": reach.relays,
        },
        "providing": s.info.providing,
        "devices": s.info.devices,
        "api_jobs": {
            "queued": count(|p| p.status() == "queued"),
            "running": count(|p| p.status() == "running"),
            "kept": jobs.len(),
        },
        "provider_queue": s.provider.as_ref().map_or(Value::Null, |p| provider_queue(&p.queue_status())),
        "earnings": crate::amount(earned),
        "spent": crate::amount(spent),
    })))
}

/// The provider's queue as JSON: the jobs on its devices with their step, and the waiting
/// ones in order with their wait so far and estimated finish.
fn provider_queue(q: &QueueStatus) -> Value {
    let running: Vec<Value> = q
        .running
        .iter()
        .map(|r| {
            json!({
                "job_id": r.job_id.to_string(),
                "requester": r.requester.to_string(),
                "step": r.step,
                "steps": r.of,
            })
        })
        .collect();
    let waiting: Vec<Value> = q
        .waiting
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({
                "position": i,
                "job_id": w.job_id.to_string(),
                "requester": w.requester.to_string(),
                "size": format!("{}x{}", w.width, w.height),
                "num_inference_steps": w.steps,
                "n": w.images,
                "waited_ms": w.waited_ms,
                "eta_ms": w.eta_ms,
            })
        })
        .collect();
    json!({
        "running": running,
        "waiting": waiting,
        "depth": q.waiting.len(),
        "max_queue": q.max_queue,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleQuery {
    role: Option<String>,
}

/// `GET /api/v1/accounts?role=provider|requester`: both roles unless one is asked.
pub(crate) async fn accounts(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<RoleQuery>,
) -> Result<Json<Value>, ApiError> {
    let roles = match q.role.as_deref() {
        None => vec![Role::Provider, Role::Requester],
        Some("provider") => vec![Role::Provider],
        Some("requester") => vec![Role::Requester],
        Some(other) => {
            return Err(ApiError::invalid(
                "role",
                format!("invalid role: got {other:?}; allowed: provider, requester"),
            ));
        }
    };
    books(&s.ledger, move |l| {
        let mut by_role = serde_json::Map::new();
        for role in roles {
            let list: Vec<Value> = l
                .accounts(role)
                .map_err(ApiError::internal)?
                .iter()
                .map(|(p, a)| account_json(p, a))
                .collect();
            by_role.insert(role.to_string(), Value::Array(list));
        }
        Ok(Json(json!({
            "default_credit": crate::amount(l.default_credit().map_err(ApiError::internal)?),
            "accounts": by_role,
        })))
    })
    .await
}

/// `GET /api/v1/accounts/{peer}`: the peer's account as provider (what it deposited with this
/// node) and as requester (this node's mirror of what it owes the peer).
pub(crate) async fn account(
    State(s): State<AppState>,
    Path(peer): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let peer = parse_peer("peer", &peer)?;
    books(&s.ledger, move |l| {
        let get = |role| -> Result<Value, ApiError> {
            Ok(l.account(role, &peer)
                .map_err(ApiError::internal)?
                .map_or(Value::Null, |a| account_json(&peer, &a)))
        };
        Ok(Json(json!({
            "peer": show(&peer),
            "provider": get(Role::Provider)?,
            "requester": get(Role::Requester)?,
        })))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DepositBody {
    tokens: Amount,
    #[serde(default)]
    memo: String,
}

/// `POST /api/v1/accounts/{peer}/deposits`: records that the peer prepaid `tokens` (a deposit
/// note signed by this node), as `pixmarket ledger deposit` does.
pub(crate) async fn deposit(
    State(s): State<AppState>,
    Path(peer): Path<String>,
    ApiJson(body): ApiJson<DepositBody>,
) -> Result<Response, ApiError> {
    record_note(s, &peer, body, NoteSide::Deposit).await
}

/// `POST /api/v1/accounts/{peer}/prepaid`: records that this node prepaid the provider `peer`
/// `tokens` (a note signed by this node, on the requester side), as `pixmarket ledger prepaid`
/// does, so this node's mirror of that account shows what it may still spend there.
pub(crate) async fn prepaid(
    State(s): State<AppState>,
    Path(peer): Path<String>,
    ApiJson(body): ApiJson<DepositBody>,
) -> Result<Response, ApiError> {
    record_note(s, &peer, body, NoteSide::Prepaid).await
}

/// Which side of the books a signed note of money paid goes to.
#[derive(Debug, Clone, Copy)]
enum NoteSide {
    /// The peer paid us: our provider account with it.
    Deposit,
    /// We paid the peer: our requester mirror of its account.
    Prepaid,
}

/// Signs a note of `body.tokens` for `peer`, records it on `side`, and answers 201 with the
/// account as it now stands.
async fn record_note(
    s: AppState,
    peer: &str,
    body: DepositBody,
    side: NoteSide,
) -> Result<Response, ApiError> {
    let peer = parse_peer("peer", peer)?;
    let amount = parse_tokens(&body.tokens)?;
    v::text("memo", &body.memo, 0, v::MAX_MEMO_CHARS)
        .map_err(|e| ApiError::invalid("memo", e.to_string()))?;
    let note = DepositNote {
        deposit_id: rand::random(),
        account: peer,
        amount,
        memo: body.memo,
        recorded_at_ms: pixmarket_node::now_ms(),
    };
    note.validate()
        .map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    let signed = Signed::sign(&s.key, &note).map_err(ApiError::internal)?;
    let deposit_id = hex::encode(note.deposit_id);
    let account = books(&s.ledger, move |l| {
        let role = match side {
            NoteSide::Deposit => {
                l.deposit(&signed)
                    .map_err(|e| ApiError::Conflict(format!("deposit refused: {e}")))?;
                Role::Provider
            }
            NoteSide::Prepaid => {
                l.prepaid(&signed)
                    .map_err(|e| ApiError::Conflict(format!("prepayment refused: {e}")))?;
                Role::Requester
            }
        };
        Ok(l.account(role, &peer)
            .map_err(ApiError::internal)?
            .unwrap_or_default())
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "deposit_id": deposit_id,
            "amount": crate::amount(amount),
            "account": account_json(&peer, &account),
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokensBody {
    tokens: Amount,
}

/// `PUT /api/v1/accounts/{peer}/credit-limit`.
pub(crate) async fn credit_limit(
    State(s): State<AppState>,
    Path(peer): Path<String>,
    ApiJson(body): ApiJson<TokensBody>,
) -> Result<Json<Value>, ApiError> {
    let peer = parse_peer("peer", &peer)?;
    let amount = parse_tokens(&body.tokens)?;
    books(&s.ledger, move |l| {
        l.set_credit_limit(peer, amount)
            .map_err(|e| ApiError::Conflict(format!("credit limit refused: {e}")))?;
        let a = l
            .account(Role::Provider, &peer)
            .map_err(ApiError::internal)?
            .unwrap_or_default();
        Ok(Json(json!({ "account": account_json(&peer, &a) })))
    })
    .await
}

/// `PUT /api/v1/default-credit`: the credit a peer gets when first seen. The config's
/// `provider.new_peer_credit` is recorded as dealt with, as `ledger default-credit` does, so
/// the next start does not undo this.
pub(crate) async fn default_credit(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<TokensBody>,
) -> Result<Json<Value>, ApiError> {
    let amount = parse_tokens(&body.tokens)?;
    let dir = s.info.data_dir.clone();
    books(&s.ledger, move |l| {
        l.set_default_credit(amount).map_err(ApiError::internal)?;
        if let Some(root) = dir
            && let Ok(dir) = pixmarket_node::DataDir::open(&root)
            && let Ok(config) = dir.config()
        {
            dir.set_applied_peer_credit(&config.provider.new_peer_credit)
                .map_err(ApiError::internal)?;
        }
        Ok(Json(json!({ "default_credit": crate::amount(amount) })))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReceiptQuery {
    peer: Option<String>,
    /// Receipts issued at or after this time (Unix milliseconds).
    since_ms: Option<u64>,
    /// Receipts issued before this time (Unix milliseconds).
    until_ms: Option<u64>,
    limit: Option<usize>,
    /// Matching receipts to skip: the count already read, to page on.
    offset: Option<usize>,
}

/// `GET /api/v1/receipts?peer=&since_ms=&until_ms=&limit=&offset=`: in the books' order.
pub(crate) async fn receipts(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ReceiptQuery>,
) -> Result<Json<Value>, ApiError> {
    let peer = q
        .peer
        .as_deref()
        .map(|p| parse_peer("peer", p))
        .transpose()?;
    let limit = q.limit.unwrap_or(MAX_RECEIPTS_PER_PAGE);
    if !(1..=MAX_RECEIPTS_PER_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("invalid limit: got {limit}; allowed: 1..={MAX_RECEIPTS_PER_PAGE}"),
        ));
    }
    let mut skip = q.offset.unwrap_or(0);
    books(&s.ledger, move |l| {
        let mut data = Vec::new();
        let mut more = false;
        for stored in l.receipts(peer.as_ref()).map_err(ApiError::internal)? {
            let r = stored.receipt.verify().map_err(|e| {
                ApiError::internal(format!(
                    "a stored receipt does not verify ({e}); run `pixmarket ledger verify`"
                ))
            })?;
            if q.since_ms.is_some_and(|t| r.issued_at_ms < t)
                || q.until_ms.is_some_and(|t| r.issued_at_ms >= t)
            {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if data.len() == limit {
                more = true;
                break;
            }
            let other = match stored.role {
                Role::Provider => r.requester,
                Role::Requester => r.provider,
            };
            data.push(json!({
                "role": stored.role.to_string(),
                "job": r.job_id.to_string(),
                "peer": show(&other),
                "cost": crate::amount(r.cost),
                "cumulative": crate::amount(r.cumulative_charged),
                "issued_at_ms": r.issued_at_ms,
                "acked": stored.ack.is_some(),
                "refunded": stored.refunded,
                "undelivered": stored.undelivered,
                "receipt": stored.receipt.digest().to_string(),
            }));
        }
        Ok(Json(
            json!({ "object": "list", "data": data, "has_more": more }),
        ))
    })
    .await
}

/// `GET /api/v1/peers`: the peers this node is connected to.
pub(crate) async fn peers(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let peers: Vec<String> = s
        .net
        .connected_peers()
        .await
        .map_err(ApiError::internal)?
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(Json(json!({ "object": "list", "data": peers })))
}

/// `GET /api/v1/providers`: fresh adverts, best first.
pub(crate) async fn providers(State(s): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = s
        .requester
        .providers()
        .iter()
        .map(|p| {
            let a = &p.advert;
            json!({
                "peer": show(&p.key),
                "model": a.model_id,
                "gpu": a.gpu_name,
                "max_size": format!("{}x{}", a.max_width, a.max_height),
                "max_steps": a.max_steps,
                "queue_depth": a.queue_depth,
                "max_queue": a.max_queue,
                "ms_per_standard_image": a.ms_per_standard_image,
                "price_factor_ppm": a.schedule.price_factor_ppm,
                "image_to_image": a.supports_image_to_image,
                "inpaint": a.supports_inpaint,
                "failures": p.failures,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
