//! Read-only figures the dashboard draws that the other routes do not give:
//!
//! - `GET /api/v1/earnings?bucket_s=&buckets=`: what this node earned as provider and spent as
//!   requester, per time bucket, from the receipts in its books (credited-back receipts do not
//!   count: they no longer charge);
//! - `GET /api/v1/activity`: jobs by outcome, the queue, and per device its busy time, busy
//!   fraction and step time, from the node's metrics since the API started.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use pixmarket_ledger::{Ledger, Role};
use pixmarket_protocol::MicroTokens;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::ApiQuery;

/// Buckets one earnings call returns at most: a day in 5-minute buckets is 288; a chart wider
/// than this has more bars than pixels to draw them in.
pub const MAX_BUCKETS: u32 = 288;
/// The longest bucket: a week, so a year fits in 53 buckets.
pub const MAX_BUCKET_S: u64 = 7 * 24 * 3600;
/// Without `bucket_s`: an hour.
const DEFAULT_BUCKET_S: u64 = 3600;
/// Without `buckets`: a day of hours.
const DEFAULT_BUCKETS: u32 = 24;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EarningsQuery {
    bucket_s: Option<u64>,
    buckets: Option<u32>,
}

/// Sums of receipt costs per bucket, oldest first; the last bucket ends at `until_ms`.
#[derive(Debug, PartialEq, Eq)]
struct Series {
    earned: Vec<MicroTokens>,
    spent: Vec<MicroTokens>,
}

fn bucketed(l: &Ledger, bucket_ms: u64, buckets: u32, until_ms: u64) -> Result<Series, ApiError> {
    let n = usize::try_from(buckets).map_err(ApiError::internal)?;
    let mut s = Series {
        earned: vec![MicroTokens::ZERO; n],
        spent: vec![MicroTokens::ZERO; n],
    };
    let span = bucket_ms.saturating_mul(u64::from(buckets));
    let from_ms = until_ms.saturating_sub(span);
    for stored in l.receipts(None).map_err(ApiError::internal)? {
        if stored.refunded.is_some() {
            continue;
        }
        let r = stored.receipt.verify().map_err(|e| {
            ApiError::internal(format!(
                "a stored receipt does not verify ({e}); run `pixmarket ledger verify`"
            ))
        })?;
        if r.issued_at_ms < from_ms || r.issued_at_ms >= until_ms {
            continue;
        }
        let i = usize::try_from((r.issued_at_ms - from_ms) / bucket_ms.max(1))
            .map_err(ApiError::internal)?
            .min(n.saturating_sub(1));
        let series = match stored.role {
            Role::Provider => &mut s.earned,
            Role::Requester => &mut s.spent,
        };
        if let Some(sum) = series.get_mut(i) {
            *sum = sum
                .checked_add(r.cost)
                .ok_or_else(|| ApiError::internal("a bucket's sum overflows"))?;
        }
    }
    Ok(s)
}

/// `GET /api/v1/earnings?bucket_s=3600&buckets=24`.
pub(crate) async fn earnings(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<EarningsQuery>,
) -> Result<Json<Value>, ApiError> {
    let bucket_s = q.bucket_s.unwrap_or(DEFAULT_BUCKET_S);
    if !(1..=MAX_BUCKET_S).contains(&bucket_s) {
        return Err(ApiError::invalid(
            "bucket_s",
            format!("invalid bucket_s: got {bucket_s}; allowed: 1..={MAX_BUCKET_S} seconds"),
        ));
    }
    let buckets = q.buckets.unwrap_or(DEFAULT_BUCKETS);
    if !(1..=MAX_BUCKETS).contains(&buckets) {
        return Err(ApiError::invalid(
            "buckets",
            format!("invalid buckets: got {buckets}; allowed: 1..={MAX_BUCKETS}"),
        ));
    }
    let bucket_ms = bucket_s * 1000;
    let until_ms = pixmarket_node::now_ms();
    let ledger: Arc<Ledger> = s.ledger.clone();
    let series =
        tokio::task::spawn_blocking(move || bucketed(&ledger, bucket_ms, buckets, until_ms))
            .await
            .map_err(ApiError::internal)??;
    let list = |v: &[MicroTokens]| -> Vec<Value> { v.iter().map(|m| crate::amount(*m)).collect() };
    let total = |v: &[MicroTokens]| {
        v.iter()
            .try_fold(MicroTokens::ZERO, |a, m| a.checked_add(*m))
            .ok_or_else(|| ApiError::internal("the total overflows"))
    };
    Ok(Json(json!({
        "bucket_s": bucket_s,
        "from_ms": until_ms.saturating_sub(bucket_ms * u64::from(buckets)),
        "until_ms": until_ms,
        "earned": list(&series.earned),
        "spent": list(&series.spent),
        "earned_total": crate::amount(total(&series.earned)?),
        "spent_total": crate::amount(total(&series.spent)?),
    })))
}

/// `GET /api/v1/activity`.
pub(crate) async fn activity(State(s): State<AppState>) -> Json<Value> {
    let t = s.metrics.totals();
    let uptime_ms = u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let devices: Vec<Value> = t
        .devices
        .iter()
        .map(|(label, d)| {
            // Busy time can run a little past the API's uptime (a batch started before it).
            let busy_fraction = if uptime_ms == 0 {
                0.0
            } else {
                (d.busy_ms as f64 / uptime_ms as f64).min(1.0)
            };
            json!({
                "device": label,
                "name": d.name,
                "memory_mib": d.memory_mib,
                "up": d.up,
                "busy_ms": d.busy_ms,
                "busy_fraction": busy_fraction,
                "steps": d.steps,
                "mean_step_ms": (d.steps > 0).then(|| d.step_us_total as f64 / d.steps as f64 / 1000.0),
                "last_step_ms": d.last_step_us.map(|us| us as f64 / 1000.0),
            })
        })
        .collect();
    Json(json!({
        "uptime_ms": uptime_ms,
        "providing": s.info.providing,
        "queue": t.queue,
        "jobs": t.jobs,
        "devices": devices,
    }))
}
