//! OpenAI's images API under `/v1`: `POST /v1/images/generations`, `POST /v1/images/edits`
//! (multipart: `image`, optional `mask`), `GET /v1/models`, and the files the `url` response
//! format points at. A generation is a job in the shared table ([`crate::jobs`]): the route
//! submits it and waits for it to finish, so the same id shows its progress on `/api/v1/jobs`.
//! The response carries what the market charged in the `pixmarket` extension field. With
//! `stream`, the answer is server-sent events: with `partial_images` (0 to 3), one
//! `<prefix>.partial_image` event per preview the provider sends (a small PNG or JPEG of the
//! first image's predicted picture at evenly spaced steps, see `pixmarket_protocol::preview`),
//! then one `<prefix>.completed` event per image.

use std::io::Cursor;

use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt as _;
use pixmarket_protocol::Mode;
use pixmarket_protocol::preview;
use pixmarket_protocol::validate as v;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::jobs::{ApiJobId, Asked, Completed, Done, Phase, Shot, failure_error};
use crate::params::{self, MASKED_STRENGTH_PERMILLE, Spec};

/// The image encodings a response may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
}

impl OutputFormat {
    pub(crate) fn parse_opt(text: Option<&str>) -> Result<Self, ApiError> {
        match text {
            None | Some("png") => Ok(OutputFormat::Png),
            Some("jpeg" | "jpg") => Ok(OutputFormat::Jpeg),
            Some(other) => Err(ApiError::invalid(
                "output_format",
                format!("invalid output_format: got {other:?}; allowed: png, jpeg"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
        }
    }

    fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
        }
    }

    /// The provider's PNG in this format.
    pub fn encode(self, png: &[u8]) -> Result<Vec<u8>, ApiError> {
        match self {
            OutputFormat::Png => Ok(png.to_vec()),
            OutputFormat::Jpeg => {
                let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
                    .map_err(ApiError::internal)?;
                let mut out = Cursor::new(Vec::new());
                img.to_rgb8()
                    .write_to(&mut out, image::ImageFormat::Jpeg)
                    .map_err(ApiError::internal)?;
                Ok(out.into_inner())
            }
        }
    }
}

/// `b64_json` (the default) or `url`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseFormat {
    B64,
    Url,
}

impl ResponseFormat {
    fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        match text {
            None | Some("b64_json") => Ok(ResponseFormat::B64),
            Some("url") => Ok(ResponseFormat::Url),
            Some(other) => Err(ApiError::invalid(
                "response_format",
                format!("invalid response_format: got {other:?}; allowed: b64_json, url"),
            )),
        }
    }
}

/// A token amount given as a JSON string (`"0.5"`) or number (`0.5`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Amount {
    Text(String),
    Number(serde_json::Number),
}

impl Amount {
    pub(crate) fn text(&self) -> String {
        match self {
            Amount::Text(t) => t.clone(),
            Amount::Number(n) => n.to_string(),
        }
    }
}

/// An integer field that also takes an integral JSON float (`86.0`), as JSON Schema's
/// `integer` does; a fraction, a negative number or one out of range is refused.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    let Some(n) = n else { return Ok(None) };
    // Integral floats up to 2^53 are exact.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let v = match (n.as_u64(), n.as_f64()) {
        (Some(v), _) => v,
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=EXACT).contains(&f) => {
            // Integral and within 0..=2^53: exact as u64.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let v = f as u64;
            v
        }
        _ => {
            return Err(serde::de::Error::custom(format!(
                "{n} is not a whole number of 0 or more"
            )));
        }
    };
    T::try_from(v)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{v} is too large")))
}

/// `POST /v1/images/generations`' body. OpenAI's fields this market has no use for
/// (`quality`, `style`, `background`, `moderation`, `output_compression`, `user`) are accepted
/// and ignored, so clients that always send them work; any other unknown field is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenerationRequest {
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default, deserialize_with = "whole")]
    pub n: Option<u32>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "whole")]
    pub partial_images: Option<u32>,
    pub negative_prompt: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    pub num_inference_steps: Option<u32>,
    pub true_cfg_scale: Option<f32>,
    #[serde(default, deserialize_with = "whole")]
    pub seed: Option<u64>,
    pub max_cost: Option<Amount>,
    /// Require exact computation (no step caching); the market's `--exact`.
    pub exact: Option<bool>,
    #[serde(rename = "quality")]
    _quality: Option<Value>,
    #[serde(rename = "style")]
    _style: Option<Value>,
    #[serde(rename = "background")]
    _background: Option<Value>,
    #[serde(rename = "moderation")]
    _moderation: Option<Value>,
    #[serde(rename = "output_compression")]
    _output_compression: Option<Value>,
    #[serde(rename = "user")]
    _user: Option<Value>,
}

impl GenerationRequest {
    pub(crate) fn spec(&self) -> Spec {
        Spec {
            model: self.model.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            size: self.size.clone(),
            num_inference_steps: self.num_inference_steps,
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            max_cost: self.max_cost.as_ref().map(Amount::text),
            exact: self.exact.unwrap_or(false),
            mode: None,
            image_size: None,
        }
    }
}

/// How a generation answers: streamed or not, and with how many partial images (previews,
/// asked of the provider only for a stream, as OpenAI sends partial images only in one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Streaming {
    stream: bool,
    previews: u8,
}

/// `partial_images` as OpenAI allows it: 0 to 3.
pub(crate) fn partial_images(n: Option<u32>) -> Result<u8, ApiError> {
    match n.map(u8::try_from) {
        None => Ok(0),
        Some(Ok(n)) if n <= preview::MAX_PREVIEWS => Ok(n),
        Some(_) => Err(ApiError::invalid(
            "partial_images",
            format!(
                "invalid partial_images: got {}; allowed: 0..={}",
                n.unwrap_or_default(),
                preview::MAX_PREVIEWS
            ),
        )),
    }
}

fn stream_wanted(stream: Option<bool>, partial: Option<u32>) -> Result<Streaming, ApiError> {
    let previews = partial_images(partial)?;
    let stream = stream == Some(true);
    Ok(Streaming {
        stream,
        previews: if stream { previews } else { 0 },
    })
}

pub(crate) async fn generations(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    let stream = stream_wanted(req.stream, req.partial_images)?;
    let response_format = ResponseFormat::parse(req.response_format.as_deref())?;
    let output_format = OutputFormat::parse_opt(req.output_format.as_deref())?;
    let spec = req.spec();
    submit_and_answer(
        s,
        spec,
        output_format,
        response_format,
        stream,
        "image_generation",
    )
    .await
}

/// Submits the job `spec` asks for, then answers with its images when it ends, or, with
/// `stream`, with the event stream whose events are named `<prefix>.…`.
async fn submit_and_answer(
    s: AppState,
    spec: Spec,
    output_format: OutputFormat,
    response_format: ResponseFormat,
    streaming: Streaming,
    prefix: &'static str,
) -> Result<Response, ApiError> {
    let (model, params, mut options) = params::build(spec, &s.requester)?;
    options.previews = streaming.previews;
    let id = s.jobs.submit(
        Asked {
            model,
            params,
            output_format,
        },
        options,
    )?;
    if streaming.stream {
        Ok(sse(s, id, prefix).into_response())
    } else {
        finish(&s, id, response_format).await
    }
}

/// Where a job's stream stands: the previews sent so far, and whether it has ended.
struct Follow {
    s: AppState,
    id: ApiJobId,
    prefix: &'static str,
    rx: Option<watch::Receiver<Phase>>,
    sent: usize,
    ended: bool,
}

/// The stream of one job: comments keep the connection alive while it waits, one
/// `<prefix>.partial_image` event per preview as it comes, then one `<prefix>.completed`
/// event per image (OpenAI's fields, and the `pixmarket` extension), or one `error` event in
/// OpenAI's error shape.
fn sse(s: AppState, id: ApiJobId, prefix: &'static str) -> impl IntoResponse {
    let rx = s.jobs.watch(id).ok().flatten();
    let follow = Follow {
        s,
        id,
        prefix,
        rx,
        sent: 0,
        ended: false,
    };
    let events = futures::stream::unfold(follow, |mut f| async move {
        if f.ended {
            return None;
        }
        let batch = next_events(&mut f).await;
        Some((futures::stream::iter(batch), f))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The next events of a followed job: its new previews, or, once it has ended and every
/// preview is out, its images (or its error). Waits for a change when there is nothing new.
async fn next_events(f: &mut Follow) -> Vec<Result<Event, std::convert::Infallible>> {
    loop {
        let Some(rx) = f.rx.as_mut() else {
            f.ended = true;
            let e = ApiError::internal("the job vanished from the table");
            return vec![Ok(Event::default()
                .event("error")
                .data(error_event(&e).to_string()))];
        };
        let phase = rx.borrow_and_update().clone();
        let shots = f.s.jobs.previews(f.id).ok().flatten().unwrap_or_default();
        if shots.len() > f.sent {
            let asked = f.s.jobs.get(f.id).ok().flatten().map(|v| v.asked);
            let new = &shots[f.sent..];
            f.sent = shots.len();
            if let Some(asked) = asked {
                return new
                    .iter()
                    .map(|shot| Ok(partial_event(f.id, f.prefix, &asked, shot)))
                    .collect();
            }
        }
        if phase.is_finished() {
            f.ended = true;
            return completed_events(&f.s, f.id, f.prefix, outcome(&f.s, f.id, phase));
        }
        if rx.changed().await.is_err() {
            let last = rx.borrow().clone();
            f.ended = true;
            return completed_events(&f.s, f.id, f.prefix, outcome(&f.s, f.id, last));
        }
    }
}

/// One preview as OpenAI's partial image event; `size` is the preview's own.
fn partial_event(id: ApiJobId, prefix: &'static str, asked: &Asked, shot: &Shot) -> Event {
    let name = format!("{prefix}.partial_image");
    let data = match asked.output_format.encode(&shot.preview.png) {
        Ok(bytes) => json!({
            "type": name,
            "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
            "created_at": shot.received_ms / 1000,
            "size": format!("{}x{}", shot.preview.width, shot.preview.height),
            "output_format": asked.output_format.name(),
            "partial_image_index": shot.index,
            // OpenAI's fields for the settings this market does not have.
            "background": "opaque",
            "quality": "auto",
            "pixmarket": {
                "job_id": id.to_string(),
                "step": shot.step,
                "steps": shot.of,
            },
        }),
        Err(e) => error_event(&e),
    };
    Event::default().event(name).data(data.to_string())
}

fn completed_events(
    s: &AppState,
    id: ApiJobId,
    prefix: &'static str,
    outcome: Result<Completed, ApiError>,
) -> Vec<Result<Event, std::convert::Infallible>> {
    match outcome {
        Ok((asked, done)) => done
            .images
            .iter()
            .map(|png| {
                let data = match asked.output_format.encode(png) {
                    Ok(bytes) => json!({
                        "type": format!("{prefix}.completed"),
                        "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                        "created_at": done.finished_ms / 1000,
                        "size": format!("{}x{}", asked.params.width, asked.params.height),
                        "output_format": asked.output_format.name(),
                        "pixmarket": result_json(s, id, &asked, &done),
                    }),
                    Err(e) => error_event(&e),
                };
                Ok(Event::default()
                    .event(format!("{prefix}.completed"))
                    .data(data.to_string()))
            })
            .collect(),
        Err(e) => vec![Ok(Event::default()
            .event("error")
            .data(error_event(&e).to_string()))],
    }
}

fn error_event(e: &ApiError) -> Value {
    json!({ "type": "error", "error": { "message": e.to_string(), "code": e.status().as_u16() } })
}

/// Waits for job `id` to finish: its images, or the error its end answers.
async fn completed(s: &AppState, id: ApiJobId) -> Result<Completed, ApiError> {
    let Some(mut rx) = s.jobs.watch(id)? else {
        return Err(ApiError::internal("the job vanished from the table"));
    };
    let phase = loop {
        let p = rx.borrow_and_update().clone();
        if p.is_finished() {
            break p;
        }
        if rx.changed().await.is_err() {
            break rx.borrow().clone();
        }
    };
    outcome(s, id, phase)
}

/// A finished job's images, or the error its end answers.
fn outcome(s: &AppState, id: ApiJobId, phase: Phase) -> Result<Completed, ApiError> {
    match phase {
        Phase::Completed(_) => s
            .jobs
            .images(id)?
            .ok_or_else(|| ApiError::internal("the job's images are gone")),
        Phase::Failed { kind, reason, .. } => Err(failure_error(kind, &reason)),
        Phase::Cancelled { .. } => Err(ApiError::Conflict(format!(
            "job {id} was cancelled before it finished; nothing was paid"
        ))),
        _ => Err(ApiError::internal("the job stopped without an outcome")),
    }
}

/// Waits for job `id` and answers in OpenAI's shape.
async fn finish(s: &AppState, id: ApiJobId, format: ResponseFormat) -> Result<Response, ApiError> {
    let (asked, done) = completed(s, id).await?;
    Ok(Json(body(s, id, &asked, &done, format)?).into_response())
}

fn body(
    s: &AppState,
    id: ApiJobId,
    asked: &Asked,
    done: &Done,
    format: ResponseFormat,
) -> Result<Value, ApiError> {
    let mut data = Vec::new();
    for (i, png) in done.images.iter().enumerate() {
        data.push(match format {
            ResponseFormat::B64 => json!({
                "b64_json": base64::engine::general_purpose::STANDARD
                    .encode(asked.output_format.encode(png)?),
                "revised_prompt": Value::Null,
            }),
            ResponseFormat::Url => json!({ "url": image_url(s, id, i, asked) }),
        });
    }
    Ok(json!({
        "created": done.finished_ms / 1000,
        "data": data,
        "output_format": asked.output_format.name(),
        "size": format!("{}x{}", asked.params.width, asked.params.height),
        "pixmarket": result_json(s, id, asked, done),
    }))
}

pub(crate) fn image_url(s: &AppState, id: ApiJobId, index: usize, asked: &Asked) -> String {
    format!(
        "{}/v1/images/files/{id}/{index}.{}",
        s.base_url,
        asked.output_format.name()
    )
}

/// The extension field: what the market charged, who, and the receipt.
pub(crate) fn result_json(s: &AppState, id: ApiJobId, asked: &Asked, done: &Done) -> Value {
    let expires = s
        .jobs
        .get(id)
        .ok()
        .flatten()
        .and_then(|v| v.images_expire_ms);
    json!({
        "job_id": id.to_string(),
        "model": asked.model,
        "provider": done.provider.to_string(),
        "cost": crate::amount(done.cost),
        "receipt": done.receipt,
        "provider_job_id": done.provider_job_id,
        "attempts": done.attempts,
        "seed": asked.params.seed,
        "images_expire_at": expires.map(|ms| ms / 1000),
    })
}

/// `GET /v1/images/files/{job}/{index}.{png|jpeg}`: an image while its job's images are kept.
pub(crate) async fn file(
    State(s): State<AppState>,
    Path((job, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let gone = || ApiError::NotFound {
        what: "image",
        id: format!("{job}/{name}"),
    };
    let id = ApiJobId::parse(&job).ok_or_else(gone)?;
    let (index, ext) = name.split_once('.').ok_or_else(gone)?;
    let index: usize = index.parse().map_err(|_| gone())?;
    let (asked, done) = s.jobs.images(id)?.ok_or_else(gone)?;
    if ext != asked.output_format.name() {
        return Err(gone());
    }
    let png = done.images.get(index).ok_or_else(gone)?;
    let bytes = asked.output_format.encode(png)?;
    Ok(([(header::CONTENT_TYPE, asked.output_format.mime())], bytes).into_response())
}

/// `GET /v1/models`: the models fresh adverts offer now.
pub(crate) async fn models(State(s): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = params::offered(&s.requester)
        .into_iter()
        .map(|(id, providers)| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": format!("pixmarket market ({} providers)", providers.len()),
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// OpenAI's mask: transparent (alpha 0) where the image is to be edited. The engine's: white
/// where it is repainted. A mask without an alpha channel is taken as the engine's already.
fn engine_mask(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    let bad = |e: image::ImageError| {
        ApiError::invalid(
            "mask",
            format!("the mask is not a readable PNG or JPEG: {e}"),
        )
    };
    let img = image::load_from_memory(bytes).map_err(bad)?;
    if !img.color().has_alpha() {
        return Ok(bytes.to_vec());
    }
    let rgba = img.to_rgba8();
    let gray = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y)[3] == 0 { 255 } else { 0 }])
    });
    let mut out = Cursor::new(Vec::new());
    gray.write_to(&mut out, image::ImageFormat::Png)
        .map_err(ApiError::internal)?;
    Ok(out.into_inner())
}

fn image_size(param: &str, bytes: &[u8]) -> Result<(u32, u32), ApiError> {
    v::bytes("init_image", bytes.len(), 1, v::MAX_INPUT_IMAGE_BYTES)
        .map_err(|e| ApiError::invalid(param, e.to_string()))?;
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(ApiError::internal)?;
    if !matches!(
        img.format(),
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg)
    ) {
        return Err(ApiError::invalid(
            param,
            format!("the {param} is not a PNG or JPEG"),
        ));
    }
    img.into_dimensions()
        .map_err(|e| ApiError::invalid(param, format!("the {param} is not readable: {e}")))
}

/// `POST /v1/images/edits`: multipart with `image` (PNG or JPEG), optional `mask` (OpenAI's:
/// transparent where to paint), `prompt`, and the generation's other fields as text parts;
/// `strength` (0, 1] says how much of an unmasked image to repaint.
pub(crate) async fn edits(
    State(s): State<AppState>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let mut image_bytes = None;
    let mut mask = None;
    let mut fields: Vec<(String, String)> = Vec::new();
    let malformed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: crate::MAX_EDIT_BODY,
            }
        } else {
            ApiError::Invalid {
                param: None,
                message: format!("the body is not the multipart form this route takes: {e}"),
            }
        }
    };
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            // Clients send `image` or `image[]`; one image is used.
            "image" | "image[]" => {
                if image_bytes.is_some() {
                    return Err(ApiError::invalid(
                        "image",
                        "more than one image; an edit takes one",
                    ));
                }
                image_bytes = Some(field.bytes().await.map_err(malformed)?.to_vec());
            }
            "mask" => mask = Some(field.bytes().await.map_err(malformed)?.to_vec()),
            _ => {
                if fields.len() >= MAX_FORM_FIELDS {
                    return Err(ApiError::invalid(
                        name,
                        format!("more than {MAX_FORM_FIELDS} form fields"),
                    ));
                }
                let text = field.text().await.map_err(malformed)?;
                fields.push((name, text));
            }
        }
    }
    let image_bytes =
        image_bytes.ok_or_else(|| ApiError::invalid("image", "the `image` part is missing"))?;
    let size = image_size("image", &image_bytes)?;
    let mut spec = Spec {
        image_size: Some(size),
        ..Spec::default()
    };
    let mut response_format = None;
    let mut output_format = None;
    let mut strength = None;
    let (mut stream, mut partial) = (None, None);
    for (name, text) in fields {
        let number = |what: &str| {
            ApiError::invalid(
                name.clone(),
                format!("invalid {name}: got {text:?}; allowed: {what}"),
            )
        };
        match name.as_str() {
            "prompt" => spec.prompt = text.clone(),
            "model" => spec.model = Some(text.clone()),
            "size" => spec.size = Some(text.clone()),
            "negative_prompt" => spec.negative_prompt = Some(text.clone()),
            "max_cost" => spec.max_cost = Some(text.clone()),
            "n" => spec.n = Some(text.parse().map_err(|_| number("an integer"))?),
            "num_inference_steps" => {
                spec.num_inference_steps = Some(text.parse().map_err(|_| number("an integer"))?);
            }
            "true_cfg_scale" => {
                spec.true_cfg_scale = Some(text.parse().map_err(|_| number("a number"))?);
            }
            "seed" => spec.seed = Some(text.parse().map_err(|_| number("an integer"))?),
            "strength" => {
                let x: f64 = text.parse().map_err(|_| number("a number in (0, 1]"))?;
                if !(x.is_finite() && x > 0.0 && x <= 1.0) {
                    return Err(number("a number in (0, 1]"));
                }
                // In (0, 1] × 1000, rounded: fits u16 without loss of sign or range.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let permille = (x * f64::from(v::MAX_STRENGTH_PERMILLE)).round() as u16;
                strength = Some(permille.max(1));
            }
            "response_format" => response_format = Some(text.clone()),
            "output_format" => output_format = Some(text.clone()),
            "stream" => stream = Some(text == "true"),
            "partial_images" => partial = Some(text.parse().map_err(|_| number("an integer"))?),
            // OpenAI's fields this market has no use for.
            "quality" | "background" | "input_fidelity" | "output_compression" | "user" => {}
            _ => {
                return Err(ApiError::invalid(
                    name.clone(),
                    format!("unknown field {name:?} for an edit"),
                ));
            }
        }
    }
    let stream = stream_wanted(stream, partial)?;
    let response_format = ResponseFormat::parse(response_format.as_deref())?;
    let output_format = OutputFormat::parse_opt(output_format.as_deref())?;
    spec.mode = Some(match mask {
        None => Mode::ImageToImage {
            init_image: image_bytes,
            strength_permille: strength.unwrap_or(params::DEFAULT_STRENGTH_PERMILLE),
        },
        Some(m) => {
            let mask_size = image_size("mask", &m)?;
            if mask_size != size {
                return Err(ApiError::invalid(
                    "mask",
                    format!(
                        "the mask is {}x{} but the image is {}x{}; they must be the same size",
                        mask_size.0, mask_size.1, size.0, size.1
                    ),
                ));
            }
            Mode::Inpaint {
                init_image: image_bytes,
                mask: engine_mask(&m)?,
                strength_permille: strength.unwrap_or(MASKED_STRENGTH_PERMILLE),
            }
        }
    });
    submit_and_answer(
        s,
        spec,
        output_format,
        response_format,
        stream,
        "image_edit",
    )
    .await
}

/// Text fields an edit's form may have; OpenAI's and the market's together are about twenty.
const MAX_FORM_FIELDS: usize = 32;
