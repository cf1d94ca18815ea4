//! The computed memory model of one transformer forward: weight bytes per storage format and the
//! peak working memory of one forward, from the config and the shapes alone.
//!
//! Used by the pipeline's memory check and by `docs/memory.md`'s table; the activation formula is
//! an upper count of the tensors the code keeps alive at its peak (listed at
//! [`LINEAR_F32_PER_WIDTH`]), checked against an allocator's measured peak on a scaled config in
//! `tests/attention_memory.rs`.

use crate::config::TransformerConfig;
use crate::transformer::attention_query_chunk;

/// Bytes of one f32.
const F32: u64 = 4;
/// `[B, S, dim]` f32 tensors alive at the attention's peak: the joint q, v and transposed k, the
/// finished output chunks and their concatenation, and the transposed output (six), with a
/// seventh for the layer-norm statistics of the next stage.
pub const LINEAR_F32_PER_WIDTH: u64 = 7;
/// `[B, S, dim]` tensors in the model dtype alive at the attention's peak: the block's inputs
/// (img, txt), their modulated copies, and the per-stream q, k, v (roped) — seven — plus the
/// ffn's 4·dim hidden state in the model dtype and in f32 at its own peak, which is no larger
/// than nine of them: counted as nine so one figure covers both stages.
pub const LINEAR_MODEL_PER_WIDTH: u64 = 9;

/// The shapes of one transformer call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardShape {
    /// Rows in the batch (one per image, two with CFG).
    pub rows: usize,
    /// Image tokens, `(H/16)·(W/16)`.
    pub image_tokens: usize,
    /// Text tokens (the longest prompt in the batch, at most 512).
    pub text_tokens: usize,
}

impl ForwardShape {
    /// The call for `rows` rows of a `width`×`height` image with `text_tokens` text tokens.
    pub fn for_size(rows: usize, width: u32, height: u32, text_tokens: usize) -> Self {
        let tokens = |side: u32| (side / crate::pipeline::SIZE_MULTIPLE) as usize;
        Self {
            rows,
            image_tokens: tokens(width) * tokens(height),
            text_tokens,
        }
    }

    /// The joint sequence length.
    pub fn sequence(&self) -> usize {
        self.image_tokens + self.text_tokens
    }
}

/// Bytes of the f32 scores and probabilities of the largest attention chunk for `shape` under
/// `budget` (the unchunked matrices when `budget` is `u64::MAX`).
pub fn attention_scores_bytes(cfg: &TransformerConfig, shape: ForwardShape, budget: u64) -> u64 {
    let s = shape.sequence();
    let bh = shape.rows * cfg.num_attention_heads;
    let rows = attention_query_chunk(budget, bh, s, s) as u64;
    2 * bh as u64 * rows * s as u64 * F32
}

/// Peak working memory, in bytes, of one transformer forward beyond its weights: the chunk's
/// scores and probabilities plus the `[B, S, dim]`-sized tensors alive beside them, for a model
/// computing in a dtype of `dtype_bytes` bytes.
pub fn forward_peak_bytes(
    cfg: &TransformerConfig,
    shape: ForwardShape,
    dtype_bytes: u64,
    budget: u64,
) -> u64 {
    let linear = forward_linear_bytes(shape.rows, shape.sequence(), cfg.inner_dim(), dtype_bytes);
    linear.saturating_add(attention_scores_bytes(cfg, shape, budget))
}

/// The `[B, S, dim]` tensors alive beside the attention chunk at a forward's peak:
/// [`LINEAR_F32_PER_WIDTH`] in f32 and [`LINEAR_MODEL_PER_WIDTH`] in the model dtype.
pub fn forward_linear_bytes(rows: usize, sequence: usize, dim: usize, dtype_bytes: u64) -> u64 {
    let width = (rows * sequence * dim) as u64;
    width * (LINEAR_F32_PER_WIDTH * F32 + LINEAR_MODEL_PER_WIDTH * dtype_bytes)
}

/// [`forward_peak_bytes`] when chunks are sized from `working` bytes of working memory, at
/// most `cap` ([`crate::transformer::attention_budget_within`]), as the transformer sizes them.
pub fn forward_peak_bytes_within(
    cfg: &TransformerConfig,
    shape: ForwardShape,
    dtype_bytes: u64,
    cap: u64,
    working: Option<u64>,
) -> u64 {
    let linear = forward_linear_bytes(shape.rows, shape.sequence(), cfg.inner_dim(), dtype_bytes);
    let budget = crate::transformer::attention_budget_within(working, linear, cap);
    linear.saturating_add(attention_scores_bytes(cfg, shape, budget))
}

/// How the transformer's weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Every tensor in a float dtype of this many bytes (2 for bf16).
    Float(u64),
    /// Block weights quantized ([`crate::quant::quantizable`]), the rest in f32.
    Quantized(crate::quant::QuantFormat),
}

/// Bytes of the transformer's weights of `cfg` stored as `format`.
pub fn transformer_weight_bytes(cfg: &TransformerConfig, format: WeightFormat) -> u64 {
    cfg.tensor_shapes()
        .iter()
        .map(|(name, shape)| {
            let n: u64 = shape.iter().map(|&x| x as u64).product();
            match format {
                WeightFormat::Float(b) => n * b,
                WeightFormat::Quantized(q) if crate::quant::quantizable(name, shape, q) => {
                    let (bytes, block) = q.bytes_per_block();
                    n / block * bytes
                }
                WeightFormat::Quantized(_) => n * F32,
            }
        })
        .sum()
}

/// Parameters of a model tree built by `build` over a [`crate::weights::ShapeOnly`] backend
/// (nothing is allocated; every tensor asked for is counted).
fn count_params(
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<()>,
) -> u64 {
    let shapes = crate::weights::ShapeOnly::default();
    if build(shapes.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu)).is_err() {
        return 0;
    }
    shapes
        .seen()
        .values()
        .map(|s| s.iter().map(|&x| x as u64).product::<u64>())
        .sum()
}

/// Bytes of the text encoder's language model in a dtype of `dtype_bytes` bytes.
pub fn text_encoder_weight_bytes(
    cfg: &crate::text_encoder::TextEncoderConfig,
    dtype_bytes: u64,
) -> u64 {
    count_params(|vb| crate::text_encoder::QwenTextEncoder::new(cfg, vb).map(|_| ())) * dtype_bytes
}

/// Bytes of the text encoder's language model loaded from a llama.cpp-layout GGUF file in
/// `format` ([`crate::text_encoder_gguf::write_text_encoder`]): the linears
/// [`crate::text_encoder_gguf::quantizable`] picks at the format's bytes, every other tensor (the
/// embedding, norms, biases) at `dtype_bytes` (dequantized to the model dtype at load), as
/// [`crate::quant::GgufWeights::loaded_bytes`] counts a file.
pub fn text_encoder_quantized_bytes(
    cfg: &crate::text_encoder::TextEncoderConfig,
    format: crate::quant::QuantFormat,
    dtype_bytes: u64,
) -> u64 {
    let shapes = crate::weights::ShapeOnly::default();
    let vb = shapes.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
    if crate::text_encoder::QwenTextEncoder::new(cfg, vb).is_err() {
        return 0;
    }
    shapes
        .seen()
        .iter()
        .filter(|(name, _)| !name.contains('#'))
        .map(|(name, shape)| {
            let n: u64 = shape.iter().map(|&x| x as u64).product();
            if crate::text_encoder_gguf::quantizable(name, shape, format) {
                let (bytes, block) = format.bytes_per_block();
                n / block * bytes
            } else {
                n * dtype_bytes
            }
        })
        .sum()
}

/// Working memory of one text-encoder pass over `tokens` tokens beyond its weights: per token
/// the MLP's gate, up and product (`3 · intermediate_size`) and eight hidden-width tensors
/// (residual, norm, q, k, v, attention output, projections) in f32, plus one layer's f32
/// scores and probabilities (`2 · heads · tokens²`). Counted in f32 whatever the model dtype,
/// as an upper figure; the encoder runs layer by layer, so one layer's worth is live.
pub fn text_encoder_encode_bytes(
    cfg: &crate::text_encoder::TextEncoderConfig,
    tokens: usize,
) -> u64 {
    let t = tokens as u64;
    let per_token = (3 * cfg.intermediate_size + 8 * cfg.hidden_size) as u64;
    let scores = 2 * cfg.num_attention_heads as u64 * t * t;
    (t * per_token + scores) * F32
}

/// Bytes of the VAE in a dtype of `dtype_bytes` bytes.
pub fn vae_weight_bytes(cfg: &crate::vae::VaeConfig, dtype_bytes: u64) -> u64 {
    count_params(|vb| crate::vae::AutoencoderKLQwenImage::new(cfg, vb).map(|_| ())) * dtype_bytes
}

/// Full-resolution tensors the VAE decoder holds at once (input, conv output, norm, residual).
const VAE_LIVE_TENSORS: u64 = 4;

/// Working memory of one VAE decode of a `width`×`height` image: its last levels run at full
/// resolution with up to twice the base width, [`VAE_LIVE_TENSORS`] of them alive at once.
pub fn vae_decode_bytes(width: u32, height: u32, base_dim: usize, dtype_bytes: u64) -> u64 {
    u64::from(width) * u64::from(height) * 2 * base_dim as u64 * VAE_LIVE_TENSORS * dtype_bytes
}

/// Working memory of the head of a VAE decode of a `width`×`height` image (post-quant conv,
/// `conv_in`, mid block, at latent resolution; [`crate::vae::AutoencoderKLQwenImage::decode_head`])
/// with the default chunk: [`vae_head_bytes_within`] with no working-memory bound.
pub fn vae_head_bytes(
    width: u32,
    height: u32,
    cfg: &crate::vae::VaeConfig,
    dtype_bytes: u64,
) -> u64 {
    vae_head_bytes_within(width, height, cfg, dtype_bytes, None)
}

/// The head's working memory when the mid-block attention's chunks are sized within `working`
/// bytes ([`crate::vae::attention_rows`]; `None`: the default chunk): [`VAE_LIVE_TENSORS`]
/// tensors of the head's width `base_dim · dim_mult[-1]` plus one query chunk in f32 as three
/// score-sized matrices (the scores, their scaled copy, the probabilities), or, with a bound,
/// the attention's [`crate::vae::ATTENTION_LIVE_TENSORS`] beside its smaller chunk, counted at
/// no fewer than [`crate::vae::MIN_PLANNED_ATTENTION_ROWS`] rows (so a size whose chunk would be
/// thinner comes out above `working` and a plan does not admit it). Not bounded by a tile: the
/// attention sees the whole frame, but its chunk shrinks with the memory left.
pub fn vae_head_bytes_within(
    width: u32,
    height: u32,
    cfg: &crate::vae::VaeConfig,
    dtype_bytes: u64,
    working: Option<u64>,
) -> u64 {
    let (tokens, head_out) = head_shape(width, height, cfg, dtype_bytes);
    let t = usize::try_from(tokens).unwrap_or(usize::MAX);
    let score_bytes =
        |rows: usize| crate::vae::ATTENTION_SCORE_MATRICES * rows as u64 * tokens * F32;
    match working {
        None => {
            let rows = crate::vae::attention_rows(None, None, 0, 1, t);
            head_out * VAE_LIVE_TENSORS + score_bytes(rows)
        }
        Some(_) => {
            let live = head_out * crate::vae::ATTENTION_LIVE_TENSORS;
            let rows = crate::vae::attention_rows(None, working, live, 1, t)
                .max(crate::vae::MIN_PLANNED_ATTENTION_ROWS.min(t));
            live + score_bytes(rows)
        }
    }
}

/// Latent tokens of a `width`×`height` image and the bytes of the head's output.
fn head_shape(
    width: u32,
    height: u32,
    cfg: &crate::vae::VaeConfig,
    dtype_bytes: u64,
) -> (u64, u64) {
    let f = cfg.spatial_compression() as u64;
    let tokens = (u64::from(width) / f) * (u64::from(height) / f);
    let head_width = (cfg.base_dim * cfg.dim_mult.last().copied().unwrap_or(1)) as u64;
    (tokens, tokens * head_width * dtype_bytes)
}

/// Working memory of the tiled part of a decode ([`crate::vae_tiling::decode_tiles`]): one
/// tile's tail ([`vae_decode_bytes`] at the tile's size) beside the head's output and the f32
/// image being summed (three copies of it at an update).
pub fn vae_tiles_bytes(
    width: u32,
    height: u32,
    cfg: &crate::vae::VaeConfig,
    tiling: crate::vae_tiling::VaeTiling,
    dtype_bytes: u64,
) -> u64 {
    let f = cfg.spatial_compression() as u64;
    let (_, head_out) = head_shape(width, height, cfg, dtype_bytes);
    let side = |s: u32| (tiling.tile as u64 * f).min(u64::from(s));
    let tile_px = side(width) * side(height);
    let tile = tile_px * 2 * cfg.base_dim as u64 * VAE_LIVE_TENSORS * dtype_bytes;
    let image = 3 * cfg.input_channels as u64 * u64::from(width) * u64::from(height) * F32;
    head_out + tile + image
}

/// Working memory of one VAE decode tiled by `tiling` ([`crate::vae_tiling::decode_tiled`]):
/// the larger of its head ([`vae_head_bytes_within`] `working`: the mid-block attention's chunk
/// shrinks to the memory left, as the VAE sizes it at run time) and its tiles
/// ([`vae_tiles_bytes`]).
pub fn vae_tiled_decode_bytes(
    width: u32,
    height: u32,
    cfg: &crate::vae::VaeConfig,
    tiling: crate::vae_tiling::VaeTiling,
    dtype_bytes: u64,
    working: Option<u64>,
) -> u64 {
    vae_head_bytes_within(width, height, cfg, dtype_bytes, working).max(vae_tiles_bytes(
        width,
        height,
        cfg,
        tiling,
        dtype_bytes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::DEFAULT_ATTENTION_BUDGET;

    /// MiB of one forward of the 20B config in bf16 with 512 text tokens: unchunked and with the
    /// default budget. `docs/memory.md` quotes these figures.
    fn mib(side: u32, rows: usize, budget: u64) -> u64 {
        let cfg = TransformerConfig::qwen_image_20b();
        let shape = ForwardShape::for_size(rows, side, side, 512);
        forward_peak_bytes(&cfg, shape, 2, budget) >> 20
    }

    #[test]
    fn weight_bytes_of_the_full_model() {
        let cfg = TransformerConfig::qwen_image_20b();
        let gb = |f| transformer_weight_bytes(&cfg, f) / 10_000_000;
        // Hundredths of a GB (10^9 B): bf16 40.86, q8_0 21.84, q5_k 14.19, q4_k 11.65.
        assert_eq!(gb(WeightFormat::Float(2)), 4086);
        assert_eq!(
            gb(WeightFormat::Quantized(crate::quant::QuantFormat::Q8_0)),
            2184
        );
        assert_eq!(
            gb(WeightFormat::Quantized(crate::quant::QuantFormat::Q5K)),
            1419
        );
        assert_eq!(
            gb(WeightFormat::Quantized(crate::quant::QuantFormat::Q4K)),
            1165
        );
        // The text encoder's language model in bf16 14.14 GB, the VAE 0.24 GB.
        let te = crate::text_encoder::TextEncoderConfig::qwen2_5_vl_7b();
        assert_eq!(text_encoder_weight_bytes(&te, 2) / 10_000_000, 1414);
        let vae = crate::vae::VaeConfig::default();
        assert_eq!(vae_weight_bytes(&vae, 2) / 10_000_000, 24);
        // Its llama.cpp-layout GGUF as loaded in bf16 (rounded): Q8_0 8.02, Q5_K 5.58, Q4_K
        // 4.76 GB.
        let q = |f| (text_encoder_quantized_bytes(&te, f, 2) + 5_000_000) / 10_000_000;
        assert_eq!(q(crate::quant::QuantFormat::Q8_0), 802);
        assert_eq!(q(crate::quant::QuantFormat::Q5K), 558);
        assert_eq!(q(crate::quant::QuantFormat::Q4K), 476);
    }

    #[test]
    fn full_config_figures() {
        let got: Vec<[u64; 2]> = [
            (1024, 1),
            (1024, 2),
            (1328, 1),
            (1328, 2),
            (2048, 1),
            (2048, 2),
        ]
        .iter()
        .map(|&(side, rows)| {
            [
                mib(side, rows, u64::MAX),
                mib(side, rows, DEFAULT_ATTENTION_BUDGET),
            ]
        })
        .collect();
        assert_eq!(
            got,
            [
                [4509, 1644],
                [9018, 2264],
                [11026, 2020],
                [22053, 3016],
                [54549, 3297],
                [109098, 5574]
            ]
        );
    }
}
