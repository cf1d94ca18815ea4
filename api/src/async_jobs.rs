//! The async jobs under `/api/v1/jobs`: submit (answered at once with the job), status, cancel
//! and list. The ids are the ones the OpenAI routes return in `pixmarket.job_id`; a job
//! submitted there is seen here with its progress.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::jobs::{ApiJobId, Asked, FailKind, Phase, Shot, View};
use crate::openai::{GenerationRequest, image_url, result_json};
use crate::params;

fn parse_id(text: &str) -> Result<ApiJobId, ApiError> {
    ApiJobId::parse(text).ok_or_else(|| ApiError::NotFound {
        what: "job",
        id: text.to_owned(),
    })
}

fn peer(p: Option<libp2p::PeerId>) -> Value {
    p.map_or(Value::Null, |p| Value::String(p.to_string()))
}

/// A job as JSON: its status, where it waits (this node's queue or a provider's, with the
/// position and the provider's ETA), its step of steps while it runs, and its images, cost and
/// receipt once it completed, or the reason it failed.
pub(crate) fn job_json(s: &AppState, v: &View) -> Value {
    let p = &v.asked.params;
    let mut j = json!({
        "id": v.id.to_string(),
        "object": "pixmarket.job",
        "created_at": v.created_ms / 1000,
        "status": v.phase.status(),
        "request": {
            "model": v.asked.model,
            "prompt": p.prompt,
            "size": format!("{}x{}", p.width, p.height),
            "n": p.images,
            "num_inference_steps": p.steps,
            "true_cfg_scale": p.true_cfg_scale,
            "seed": p.seed,
            "mode": p.mode.name(),
            "output_format": v.asked.output_format.name(),
        },
    });
    let extra = match &v.phase {
        Phase::Waiting => json!({
            "queue": "node",
            "queue_position": v.node_queue_position,
            "eta_ms": Value::Null,
        }),
        Phase::Quoted { provider, cost } => json!({
            "queue": "provider",
            "provider": provider.to_string(),
            "quoted_cost": crate::amount(*cost),
        }),
        Phase::Queued {
            provider,
            position,
            eta_ms,
        } => json!({
            "queue": "provider",
            "provider": provider.to_string(),
            "queue_position": position,
            "eta_ms": eta_ms,
        }),
        Phase::Running { provider, step, of } => json!({
            "provider": peer(*provider),
            "step": step,
            "steps": of,
            "preview": v.latest_preview.as_deref().map_or(Value::Null, preview_json),
        }),
        Phase::Completed(done) => {
            let urls: Vec<Value> = (0..done.images.len())
                .map(|i| json!({ "url": image_url(s, v.id, i, &v.asked) }))
                .collect();
            json!({
                "images": urls,
                "result": result_json(s, v.id, &v.asked, done),
            })
        }
        Phase::Failed { kind, reason, .. } => json!({
            "error": {
                "message": reason,
                "code": match kind {
                    FailKind::NoProviders => "no_providers",
                    FailKind::InsufficientCredit => "insufficient_credit",
                    FailKind::Busy { .. } => "market_busy",
                    FailKind::Invalid => "invalid_value",
                    FailKind::Other => "market_failed",
                },
            },
        }),
        Phase::Cancelled { .. } => json!({}),
    };
    if let (Value::Object(a), Value::Object(b)) = (&mut j, extra) {
        a.extend(b);
    }
    j
}

/// The latest preview of a running job: its step, its size and the PNG inline.
fn preview_json(shot: &Shot) -> Value {
    json!({
        "index": shot.index,
        "step": shot.step,
        "steps": shot.of,
        "size": format!("{}x{}", shot.preview.width, shot.preview.height),
        "b64_png": base64::engine::general_purpose::STANDARD.encode(&shot.preview.png),
    })
}

/// `POST /api/v1/jobs`: the generation body of `/v1/images/generations` (without
/// `response_format` and `stream`); answers 202 with the queued job.
pub(crate) async fn submit(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    if req.stream.is_some() {
        return Err(ApiError::invalid(
            "stream",
            "an async job does not stream; poll GET /api/v1/jobs/{id} (with partial_images, it shows the latest preview)",
        ));
    }
    let previews = crate::openai::partial_images(req.partial_images)?;
    if req.response_format.is_some() {
        return Err(ApiError::invalid(
            "response_format",
            "an async job's images are served at the URLs its status lists",
        ));
    }
    let output_format = crate::openai::OutputFormat::parse_opt(req.output_format.as_deref())?;
    let (model, params, mut options) = params::build(req.spec(), &s.requester)?;
    options.previews = previews;
    let id = s.jobs.submit(
        Asked {
            model,
            params,
            output_format,
        },
        options,
    )?;
    let view = s
        .jobs
        .get(id)?
        .ok_or_else(|| ApiError::internal("job vanished"))?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&s, &view))).into_response())
}

pub(crate) async fn status(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let view = s.jobs.get(id)?.ok_or_else(|| ApiError::NotFound {
        what: "job",
        id: id.to_string(),
    })?;
    Ok(Json(job_json(&s, &view)))
}

pub(crate) async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let view = s.jobs.cancel(parse_id(&id)?)?;
    Ok(Json(job_json(&s, &view)))
}

pub(crate) async fn list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = s.jobs.list()?.iter().map(|v| job_json(&s, v)).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}
