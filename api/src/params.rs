//! From an API request to the [`JobParams`] a provider runs: the OpenAI fields (`size` as
//! `WxH`, `n`) and the market's extras (`negative_prompt`, `num_inference_steps`,
//! `true_cfg_scale`, `seed`, `max_cost`, `exact`) checked against the protocol's market limits
//! ([`Limits::MARKET`], `JobParams::validate`), so the API refuses what the CLI and providers
//! refuse, with the same words, naming the request's own field as `param`.
//!
//! Defaults follow the model the market offers: the drawn tiny model's trained size, steps and
//! CFG for it; the reference pipeline's (1024², 50 steps, true CFG 4) for real weights.

use std::collections::BTreeMap;

use libp2p::PeerId;
use pixmarket_engine::drawn::{DRAWN_CFG, DRAWN_MODEL_ID, DRAWN_SIDE, DRAWN_STEPS};
use pixmarket_node::requester::{GenerateOptions, Requester};
use pixmarket_protocol::validate::{self as v, Limits, ValidationError};
use pixmarket_protocol::{JobParams, MicroTokens, Mode};

use crate::error::ApiError;

/// Defaults for real weights: the reference pipeline's.
const DEFAULT_SIDE: u32 = 1024;
const DEFAULT_STEPS: u32 = 50;
const DEFAULT_TRUE_CFG: f32 = 4.0;
/// Image-to-image repaints this much of the image unless told: diffusers' default, 0.6.
pub(crate) const DEFAULT_STRENGTH_PERMILLE: u16 = 600;
/// An edit with a mask repaints the masked part entirely, as OpenAI's edits do.
pub(crate) const MASKED_STRENGTH_PERMILLE: u16 = 1000;

/// The request's fields that shape the job, whichever route they came on.
#[derive(Debug, Default)]
pub(crate) struct Spec {
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub num_inference_steps: Option<u32>,
    pub true_cfg_scale: Option<f32>,
    pub seed: Option<u64>,
    pub max_cost: Option<String>,
    /// Require exact computation: no step caching.
    pub exact: bool,
    /// Text to image unless an edit gave an image (and mask).
    pub mode: Option<Mode>,
    /// The edit image's size, the picture's unless `size` says otherwise.
    pub image_size: Option<(u32, u32)>,
}

/// The models fresh adverts offer now, each with its providers best first.
pub(crate) fn offered(requester: &Requester) -> BTreeMap<String, Vec<PeerId>> {
    let mut models: BTreeMap<String, Vec<PeerId>> = BTreeMap::new();
    for p in requester.providers() {
        models
            .entry(p.advert.model_id.clone())
            .or_default()
            .push(p.key.to_peer_id());
    }
    models
}

/// A protocol field's name as this API calls it.
fn param_of(field: &str) -> &str {
    match field {
        "width" | "height" => "size",
        "steps" => "num_inference_steps",
        "images" => "n",
        "init_image" => "image",
        other => other,
    }
}

fn invalid(e: &ValidationError) -> ApiError {
    ApiError::invalid(param_of(e.field), e.to_string())
}

/// `WxH` (e.g. `1024x1024`), each side checked against the market's limits.
pub(crate) fn parse_size(text: &str) -> Result<(u32, u32), ApiError> {
    let bad = || {
        ApiError::invalid(
            "size",
            format!(
                "invalid size: got {text:?}; allowed: WIDTHxHEIGHT (e.g. 1024x1024), each a multiple of {} in {}..={} on the market, or \"auto\"",
                v::DIMENSION_MULTIPLE,
                v::MIN_DIMENSION,
                v::MAX_DIMENSION
            ),
        )
    };
    let (w, h) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    Limits::MARKET
        .dimension("width", w)
        .and_then(|()| Limits::MARKET.dimension("height", h))
        .map_err(|_| bad())?;
    Ok((w, h))
}

/// Builds the job and its spending options, or names the field that is wrong.
pub(crate) fn build(
    spec: Spec,
    requester: &Requester,
) -> Result<(String, JobParams, GenerateOptions), ApiError> {
    let models = offered(requester);
    let model = match &spec.model {
        Some(m) => {
            if !models.contains_key(m) {
                let list: Vec<&str> = models.keys().map(String::as_str).collect();
                return Err(ApiError::invalid(
                    "model",
                    if list.is_empty() {
                        format!(
                            "invalid model: got {m:?}; no provider offers a model now (GET /v1/models lists what the market offers)"
                        )
                    } else {
                        format!(
                            "invalid model: got {m:?}; allowed: {} (what the market offers now)",
                            list.join(", ")
                        )
                    },
                ));
            }
            m.clone()
        }
        // The best provider's model; with no provider the market call says so.
        None => requester
            .providers()
            .first()
            .map(|p| p.advert.model_id.clone())
            .unwrap_or_default(),
    };
    let (side, default_steps, default_cfg) = if model == DRAWN_MODEL_ID {
        (DRAWN_SIDE, DRAWN_STEPS, DRAWN_CFG)
    } else {
        (DEFAULT_SIDE, DEFAULT_STEPS, DEFAULT_TRUE_CFG)
    };
    v::text("prompt", &spec.prompt, 1, v::MAX_PROMPT_CHARS).map_err(|e| invalid(&e))?;
    if spec.prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt is only whitespace; describe the picture in 1..={} characters",
                v::MAX_PROMPT_CHARS
            ),
        ));
    }
    // The CLI's default: a blank negative prompt.
    let negative_prompt = spec.negative_prompt.unwrap_or_else(|| " ".into());
    v::text("negative_prompt", &negative_prompt, 0, v::MAX_PROMPT_CHARS)
        .map_err(|e| invalid(&e))?;
    let true_cfg_scale = spec.true_cfg_scale.unwrap_or(default_cfg);
    v::true_cfg_scale(true_cfg_scale).map_err(|e| invalid(&e))?;
    let (width, height) = match spec.size.as_deref() {
        None | Some("auto") => spec.image_size.unwrap_or((side, side)),
        Some(s) => parse_size(s)?,
    };
    Limits::MARKET
        .dimension("width", width)
        .and_then(|()| Limits::MARKET.dimension("height", height))
        .map_err(|e| invalid(&e))?;
    if let Some((w, h)) = spec.image_size
        && (w, h) != (width, height)
    {
        return Err(ApiError::invalid(
            "size",
            format!(
                "the image is {w}x{h} but size asks for {width}x{height}; leave size out (or \"auto\") to paint at the image's size"
            ),
        ));
    }
    let steps = spec.num_inference_steps.unwrap_or(default_steps);
    Limits::MARKET.steps(steps).map_err(|e| invalid(&e))?;
    let n = spec.n.unwrap_or(1);
    if !(1..=v::MAX_IMAGES).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("invalid n: got {n}; allowed: 1..={}", v::MAX_IMAGES),
        ));
    }
    let max_cost = match &spec.max_cost {
        None => None,
        Some(text) => Some(text.parse::<MicroTokens>().map_err(|e| {
            ApiError::invalid(
                "max_cost",
                format!("invalid max_cost: got {text:?}; allowed: tokens, a non-negative decimal with up to 6 places ({e})"),
            )
        })?),
    };
    let params = JobParams {
        prompt: spec.prompt,
        negative_prompt,
        width,
        height,
        steps,
        true_cfg_scale,
        seed: spec.seed.unwrap_or_else(rand::random),
        images: n,
        mode: spec.mode.unwrap_or(Mode::TextToImage),
        exact: spec.exact,
        lora: None,
        latents: None,
    };
    // The provider's own check, so nothing it would refuse is sent.
    params.validate().map_err(|e| invalid(&e))?;
    // In a market of several models, only providers of the asked one will do: the best of
    // them is asked (a single provider, so no fail-over).
    let pin = (spec.model.is_some() && models.len() > 1)
        .then(|| models.get(&model).and_then(|p| p.first().copied()))
        .flatten();
    let options = GenerateOptions {
        max_cost,
        provider: pin,
        ..GenerateOptions::default()
    };
    Ok((model, params, options))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sizes_are_wxh_within_the_market_limits() {
        assert_eq!(parse_size("64x64").unwrap(), (64, 64));
        assert_eq!(parse_size("1024X512").unwrap(), (1024, 512));
        for bad in [
            "64", "64x", "x64", "65x64", "32x32", "4096x64", "-64x64", "axb",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(
                matches!(&e, ApiError::Invalid { param: Some(p), .. } if p == "size"),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("multiple of 16"), "{e}");
        }
    }

    #[test]
    fn protocol_fields_are_named_as_the_api_names_them() {
        assert_eq!(param_of("width"), "size");
        assert_eq!(param_of("steps"), "num_inference_steps");
        assert_eq!(param_of("images"), "n");
        assert_eq!(param_of("prompt"), "prompt");
    }
}
