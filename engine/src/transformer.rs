//! The Qwen-Image MMDiT (`QwenImageTransformer2DModel`, spec §1): 60 double-stream blocks over
//! joint [text, image] attention, predicting a flow-matching velocity in the packed latent space.
//!
//! Owns the module tree (names equal the diffusers checkpoint's), the forward pass, and the
//! numerics that make it match the reference in bf16 as well as f32 (spec §8):
//! - timestep sinusoid in f32 from the (model-dtype) timestep, cos first, scale 1000;
//! - RMSNorm: variance and scaling in f32, cast to the model dtype, then × weight;
//! - LayerNorm (no affine) statistics in f32, one rounding;
//! - SiLU and tanh-GELU evaluated in f32, one rounding (candle's bf16 kernels round per op);
//! - RoPE in f32 (see [`crate::rope`]);
//! - attention scores, softmax and the value product in f32 (PyTorch's CPU kernel accumulates in
//!   f32 too), with padded text keys masked to −∞; queries run in chunks whose scores and
//!   probabilities fit the attention budget ([`attention_query_chunk`]). Each query row's softmax
//!   sees every key whatever the chunk, so chunked and unchunked results are equal.
//!
//! Modulation, gates and residual adds run in the model dtype, op by op, as the reference does.

use std::path::Path;

use candle_core::{D, DType, Device, Module, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder};

use crate::config::{ConfigError, TIMESTEP_CHANNELS, TransformerConfig};
use crate::quant::Proj;
use crate::rope::{RopeTables, apply_rope};
use crate::step_cache::StepCache;
use crate::weights::{ComponentWeights, WeightsError};

/// Epsilon of every LayerNorm and RMSNorm in the model.
const NORM_EPS: f64 = 1e-6;
/// `Timesteps(scale=1000)`: sigma in [0, 1] is scaled back to the training timestep range.
const TIMESTEP_SCALE: f32 = 1000.0;
/// `max_period` of the sinusoid.
const MAX_PERIOD: f32 = 10_000.0;
/// Bytes of one f32 attention score.
const SCORE_BYTES: u64 = 4;
/// Score matrices alive at once in one chunk: the scores and their softmax.
const SCORE_MATRICES: u64 = 2;

/// Bytes the f32 scores and probabilities of one attention chunk may take by default: 1 GiB.
/// Unchunked, one block at 1024² holds 2 × 24 heads × 4608² × 4 B ≈ 4 GB of them per image row
/// (26 GB per row at 2048², 16 896 keys) — more than a 16 GB card has to spare. At 1 GiB a chunk
/// still has ≥ 600 query rows at 1024² with CFG, large enough that the matmuls stay efficient.
pub const DEFAULT_ATTENTION_BUDGET: u64 = 1 << 30;

/// Smallest budget a chunk sized from working memory gets ([`attention_budget_within`]):
/// 16 MiB still holds one query row of the full model at 2048² with CFG (48 heads × 16 896 keys
/// × 8 B = 6.5 MB), so every size keeps whole rows in a chunk.
pub const MIN_ATTENTION_BUDGET: u64 = 16 << 20;

/// The budget of one forward's chunks when `working` bytes of working memory are left for the
/// whole forward (`None`: no bound known): what the `[B, S, dim]` tensors beside the chunk
/// (`linear` bytes, [`crate::memory::forward_linear_bytes`]) leave of it, at most `cap`, at
/// least [`MIN_ATTENTION_BUDGET`] (or `cap` if smaller).
pub fn attention_budget_within(working: Option<u64>, linear: u64, cap: u64) -> u64 {
    match working {
        None => cap,
        Some(w) => w
            .saturating_sub(linear)
            .clamp(MIN_ATTENTION_BUDGET.min(cap), cap),
    }
}

/// Query rows per attention chunk: the most rows `r ≤ queries` whose f32 scores and
/// probabilities, `2 · batch_heads · r · keys · 4` bytes, fit in `budget`; at least 1 (one row is
/// the least attention can process, so a budget below one row's cost is exceeded by that row).
pub fn attention_query_chunk(
    budget: u64,
    batch_heads: usize,
    queries: usize,
    keys: usize,
) -> usize {
    let per_row = (batch_heads as u64)
        .saturating_mul(keys as u64)
        .saturating_mul(SCORE_BYTES * SCORE_MATRICES)
        .max(1);
    let rows = usize::try_from(budget / per_row).unwrap_or(usize::MAX);
    rows.clamp(1, queries.max(1))
}

/// Why a transformer could not be loaded from a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `config.json` is missing, malformed or unsupported.
    #[error("transformer config")]
    Config(#[from] ConfigError),
    /// The weight files could not be opened.
    #[error("transformer weights")]
    Weights(#[from] WeightsError),
    /// A tensor is missing or misshapen (the message names it, both shapes and the file).
    #[error("building the transformer")]
    Build(#[source] candle_core::Error),
    /// A LoRA could not be read or does not fit this transformer.
    #[error("LoRA")]
    Lora(#[from] crate::lora::LoraError),
    /// The quantized weights file could not be read.
    #[error("quantized weights")]
    Quantized(#[from] crate::quant::QuantError),
}

/// Applies `f` to `x` in f32 and casts the result back (one rounding for bf16/f16).
fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dtype = x.dtype();
    f(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |t| t.silu())
}

/// LayerNorm over the last dim without affine parameters; statistics in f32.
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |t| {
        let mean = t.mean_keepdim(D::Minus1)?;
        let centred = t.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred.broadcast_div(&(var + NORM_EPS)?.sqrt()?)
    })
}

/// diffusers `RMSNorm` with a weight: normalise in f32, cast to the input dtype, × weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = in_f32(x, |t| {
            let var = t.sqr()?.mean_keepdim(D::Minus1)?;
            t.broadcast_div(&(var + NORM_EPS)?.sqrt()?)
        })?;
        normed.broadcast_mul(&self.weight)
    }
}

/// `x · (1 + scale) + shift` with `shift`, `scale`: `[B, dim]` broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    // [B, dim] -> [B, 1, dim]
    let scale = (scale.unsqueeze(1)? + 1.0)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// `x + gate · y` with `gate`: `[B, dim]`.
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// The sinusoidal timestep features `[B, 256]` in f32 (diffusers `Timesteps(256,
/// flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)`): `[cos(arg), sin(arg)]` with
/// `arg = (t · freq_i) · 1000`, `freq_i = exp(−ln(10000)·i/128)`, all in f32 whatever `t`'s dtype
/// (diffusers' `Timesteps` uses `embeddings.get_timestep_embedding`, which keeps the frequencies in
/// f32; the copy in `transformer_qwenimage.py` that rounds them to `t`'s dtype is not called).
pub fn timestep_sinusoid(t: &Tensor) -> Result<Tensor> {
    let half = TIMESTEP_CHANNELS / 2;
    // Exponent in f32 as the reference forms it; exp evaluated in f64 and rounded to f32, which
    // lands on PyTorch's f32 values for all but two frequencies (an ulp off moves `arg` by ~1e-4).
    let neg_ln = -(f64::from(MAX_PERIOD).ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| f64::from(neg_ln * i as f32 / half as f32).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    // [B] -> [B, 1] x [1, half] -> [B, half]
    let args = (t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?
        * TIMESTEP_SCALE as f64)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// `time_text_embed`: sinusoid → `timestep_embedder.linear_1` → SiLU → `linear_2`.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("timestep_embedder");
        Ok(Self {
            linear_1: candle_nn::linear(TIMESTEP_CHANNELS, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// `t: [B]` already in the model dtype → `[B, dim]`.
    fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let emb = timestep_sinusoid(t)?.to_dtype(dtype)?;
        self.linear_2.forward(&silu(&self.linear_1.forward(&emb)?)?)
    }
}

/// diffusers `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj` → tanh-GELU → `net.2`
/// (`net.1` is Dropout).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Proj,
    proj_out: Proj,
}

impl FeedForward {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: crate::quant::linear(dim, hidden, vb.pp("net.0.proj"))?,
            proj_out: crate::quant::linear(hidden, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = in_f32(&self.proj_in.forward(x)?, |t| t.gelu())?;
        self.proj_out.forward(&h)
    }
}

/// Joint attention (`attn` with `QwenDoubleStreamAttnProcessor2_0`): image projections `to_*`,
/// text projections `add_*_proj`, per-head RMSNorm, RoPE, one attention over [text, image].
#[derive(Debug, Clone)]
struct JointAttention {
    to_q: Proj,
    to_k: Proj,
    to_v: Proj,
    add_q_proj: Proj,
    add_k_proj: Proj,
    add_v_proj: Proj,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_out: Proj,
    to_add_out: Proj,
    heads: usize,
    head_dim: usize,
    /// Bytes one chunk's f32 scores and probabilities may take ([`attention_query_chunk`]).
    budget: u64,
    /// Working memory a forward may use: each call's chunks take what its other tensors leave
    /// of it, up to `budget` ([`attention_budget_within`]).
    working: Option<u64>,
}

impl JointAttention {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let lin = |name: &str| crate::quant::linear(d, d, vb.pp(name));
        Ok(Self {
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            add_q_proj: lin("add_q_proj")?,
            add_k_proj: lin("add_k_proj")?,
            add_v_proj: lin("add_v_proj")?,
            norm_q: RmsNorm::new(hd, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(hd, vb.pp("norm_k"))?,
            norm_added_q: RmsNorm::new(hd, vb.pp("norm_added_q"))?,
            norm_added_k: RmsNorm::new(hd, vb.pp("norm_added_k"))?,
            // `to_out` is a ModuleList [Linear, Dropout]: index 0 holds the weights.
            to_out: lin("to_out.0")?,
            to_add_out: lin("to_add_out")?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
            budget: DEFAULT_ATTENTION_BUDGET,
            working: None,
        })
    }

    /// Projects one stream to `[B, H, S, Dh]`, normalising (q, k) per head and applying RoPE.
    fn qkv(
        &self,
        x: &Tensor,
        proj: [&Proj; 3],
        norms: [&RmsNorm; 2],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let (b, s, _) = x.dims3()?;
        // [B, S, H·Dh] -> [B, S, H, Dh]
        let split = |t: Tensor| t.reshape((b, s, self.heads, self.head_dim));
        let q = norms[0].forward(&split(proj[0].forward(x)?)?)?;
        let k = norms[1].forward(&split(proj[1].forward(x)?)?)?;
        let v = split(proj[2].forward(x)?)?;
        // [B, S, H, Dh] -> [B, H, S, Dh]
        let q = apply_rope(&q.transpose(1, 2)?, cos, sin)?;
        let k = apply_rope(&k.transpose(1, 2)?, cos, sin)?;
        Ok([q, k, v.transpose(1, 2)?])
    }

    /// Returns `(img_out, txt_out)`. `bias`: `[B, 1, 1, S_t + S_i]` f32, 0 or −∞.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        rope: &RopeTables,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = img.dtype();
        let (b, s_img, _) = img.dims3()?;
        let s_txt = txt.dim(1)?;
        let [iq, ik, iv] = self.qkv(
            img,
            [&self.to_q, &self.to_k, &self.to_v],
            [&self.norm_q, &self.norm_k],
            &rope.img_cos,
            &rope.img_sin,
        )?;
        let [tq, tk, tv] = self.qkv(
            txt,
            [&self.add_q_proj, &self.add_k_proj, &self.add_v_proj],
            [&self.norm_added_q, &self.norm_added_k],
            &rope.txt_cos,
            &rope.txt_sin,
        )?;
        // Joint sequence in the order [text, image]: [B, H, S_t + S_i, Dh], in f32.
        let f32_cat = |a: &Tensor, b: &Tensor| {
            Tensor::cat(&[a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?], 2)
        };
        let q = f32_cat(&tq, &iq)?;
        let k = f32_cat(&tk, &ik)?;
        let v = f32_cat(&tv, &iv)?.contiguous()?;
        let q = q.contiguous()?;
        let kt = k.t()?.contiguous()?;
        drop(k);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let s = s_txt + s_img;
        let linear = crate::memory::forward_linear_bytes(
            b,
            s,
            self.heads * self.head_dim,
            img.dtype().size_in_bytes() as u64,
        );
        let budget = attention_budget_within(self.working, linear, self.budget);
        let chunk = attention_query_chunk(budget, b * self.heads, s, s);
        let mut chunks = Vec::with_capacity(s.div_ceil(chunk));
        for start in (0..s).step_by(chunk) {
            let rows = chunk.min(s - start);
            let qc = if rows == s {
                q.clone()
            } else {
                q.narrow(2, start, rows)?.contiguous()?
            };
            // [B, H, r, Dh] x [B, H, Dh, S] -> [B, H, r, S]
            let mut scores = (qc.matmul(&kt)? * scale)?;
            if let Some(bias) = bias {
                scores = scores.broadcast_add(bias)?;
            }
            let probs = crate::ops::softmax_last_dim(&scores)?;
            drop(scores);
            // [B, H, r, S] x [B, H, S, Dh] -> [B, H, r, Dh]
            chunks.push(probs.matmul(&v)?);
        }
        let out = match <[Tensor; 1]>::try_from(chunks) {
            Ok([one]) => one,
            Err(chunks) => Tensor::cat(&chunks, 2)?,
        };
        // [B, H, S, Dh] -> [B, S, H, Dh] -> [B, S, H·Dh]
        let out = out.transpose(1, 2)?.reshape((b, s, ()))?;
        let out = out.to_dtype(dtype)?;
        let txt_out = self
            .to_add_out
            .forward(&out.narrow(1, 0, s_txt)?.contiguous()?)?;
        let img_out = self
            .to_out
            .forward(&out.narrow(1, s_txt, s_img)?.contiguous()?)?;
        Ok((img_out, txt_out))
    }
}

/// One double-stream block, `transformer_blocks.{i}`.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    img_mod: Proj,
    txt_mod: Proj,
    attn: JointAttention,
    img_mlp: FeedForward,
    txt_mlp: FeedForward,
}

/// The six `[B, dim]` modulation vectors of one stream, in checkpoint order.
struct Modulation {
    shift1: Tensor,
    scale1: Tensor,
    gate1: Tensor,
    shift2: Tensor,
    scale2: Tensor,
    gate2: Tensor,
}

impl Modulation {
    /// `[B, 6·dim]` laid out `[shift1, scale1, gate1, shift2, scale2, gate2]`.
    fn split(m: &Tensor) -> Result<Self> {
        let c = m.chunk(6, D::Minus1)?;
        let [shift1, scale1, gate1, shift2, scale2, gate2] = <[Tensor; 6]>::try_from(c)
            .map_err(|c| candle_core::Error::msg(format!("modulation split into {}", c.len())))?;
        Ok(Self {
            shift1,
            scale1,
            gate1,
            shift2,
            scale2,
            gate2,
        })
    }
}

impl TransformerBlock {
    /// Builds block weights under `vb` (a `transformer_blocks.{i}` prefix).
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            // `img_mod`/`txt_mod` are Sequential [SiLU, Linear]: index 1 holds the weights.
            img_mod: crate::quant::linear(d, 6 * d, vb.pp("img_mod.1"))?,
            txt_mod: crate::quant::linear(d, 6 * d, vb.pp("txt_mod.1"))?,
            attn: JointAttention::new(cfg, vb.pp("attn"))?,
            img_mlp: FeedForward::new(d, cfg.ffn_dim(), vb.pp("img_mlp"))?,
            txt_mlp: FeedForward::new(d, cfg.ffn_dim(), vb.pp("txt_mlp"))?,
        })
    }

    /// Sets the bytes one attention chunk's f32 scores and probabilities may take.
    pub fn set_attention_budget(&mut self, bytes: u64) {
        self.attn.budget = bytes;
    }

    /// Sizes each call's attention chunks from `bytes` of working memory (`None`: the budget
    /// alone), see [`attention_budget_within`].
    pub fn set_working_memory(&mut self, bytes: Option<u64>) {
        self.attn.working = bytes;
    }

    /// One block: `img: [B, S_i, dim]`, `txt: [B, S_t, dim]`, `temb: [B, dim]`, `bias` from
    /// [`attention_bias`]. Returns the new `(img, txt)` (note: diffusers returns `(txt, img)`).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &RopeTables,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let act = silu(temb)?;
        let im = Modulation::split(&self.img_mod.forward(&act)?)?;
        let tm = Modulation::split(&self.txt_mod.forward(&act)?)?;

        let img_in = modulate(&layer_norm(img)?, &im.shift1, &im.scale1)?;
        let txt_in = modulate(&layer_norm(txt)?, &tm.shift1, &tm.scale1)?;
        let (img_attn, txt_attn) = self.attn.forward(&img_in, &txt_in, rope, bias)?;
        let img = gated_add(img, &im.gate1, &img_attn)?;
        let txt = gated_add(txt, &tm.gate1, &txt_attn)?;

        let img_mlp =
            self.img_mlp
                .forward(&modulate(&layer_norm(&img)?, &im.shift2, &im.scale2)?)?;
        let img = gated_add(&img, &im.gate2, &img_mlp)?;
        let txt_mlp =
            self.txt_mlp
                .forward(&modulate(&layer_norm(&txt)?, &tm.shift2, &tm.scale2)?)?;
        let txt = gated_add(&txt, &tm.gate2, &txt_mlp)?;

        // The reference clips to ±65504 in fp16 only (no-op for f32/bf16).
        if img.dtype() == DType::F16 {
            return Ok((
                img.clamp(-65504f32, 65504f32)?,
                txt.clamp(-65504f32, 65504f32)?,
            ));
        }
        Ok((img, txt))
    }
}

/// The additive attention bias `[B, 1, 1, S_t + S_i]` (f32) for a text key-padding mask
/// `[B, S_t]` (non-zero = keep). Image keys are always kept, so no row is fully masked.
pub fn attention_bias(mask: &Tensor, s_img: usize) -> Result<Tensor> {
    let (b, s_txt) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ne(0f32)?;
    let zeros = Tensor::zeros((b, s_txt), DType::F32, mask.device())?;
    let neg = Tensor::full(f32::NEG_INFINITY, (b, s_txt), mask.device())?;
    let txt_bias = keep.where_cond(&zeros, &neg)?;
    let img_bias = Tensor::zeros((b, s_img), DType::F32, mask.device())?;
    // [B, S_t + S_i] -> [B, 1, 1, S_t + S_i]
    Tensor::cat(&[txt_bias, img_bias], 1)?
        .unsqueeze(1)?
        .unsqueeze(1)
}

/// `QwenImageTransformer2DModel`.
#[derive(Debug, Clone)]
pub struct QwenImageTransformer {
    cfg: TransformerConfig,
    img_in: Linear,
    txt_norm: RmsNorm,
    txt_in: Linear,
    time_text_embed: TimestepEmbedding,
    blocks: Vec<TransformerBlock>,
    norm_out: Linear,
    proj_out: Linear,
    dtype: DType,
    device: Device,
    attention_budget: u64,
    /// See [`Self::set_working_memory`].
    working_memory: Option<u64>,
}

impl QwenImageTransformer {
    /// Builds the model from `vb` (names as in the diffusers checkpoint). The dtype and device of
    /// the model are `vb`'s.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}");
        }
        let d = cfg.inner_dim();
        let blocks = (0..cfg.num_layers)
            .map(|i| TransformerBlock::new(cfg, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            img_in: candle_nn::linear(cfg.in_channels, d, vb.pp("img_in"))?,
            txt_norm: RmsNorm::new(cfg.joint_attention_dim, vb.pp("txt_norm"))?,
            txt_in: candle_nn::linear(cfg.joint_attention_dim, d, vb.pp("txt_in"))?,
            time_text_embed: TimestepEmbedding::new(d, vb.pp("time_text_embed"))?,
            blocks,
            // AdaLayerNormContinuous: its LayerNorm has no weights; `linear` gives [scale, shift].
            norm_out: candle_nn::linear(d, 2 * d, vb.pp("norm_out.linear"))?,
            proj_out: candle_nn::linear(d, cfg.out_dim(), vb.pp("proj_out"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            attention_budget: DEFAULT_ATTENTION_BUDGET,
            working_memory: None,
        })
    }

    /// Loads `<dir>/config.json` and the weights in `<dir>` (`diffusion_pytorch_model*.safetensors`),
    /// converting them to `dtype` on `device`.
    ///
    /// A folder with `diffusion_pytorch_model.gguf` (written by `pixmarket model quantize`, or a
    /// community Qwen-Image GGUF renamed so) loads its quantized block weights into quantized
    /// matmuls ([`crate::quant`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
        let gguf = dir.join(crate::quant::GGUF_FILE);
        let vb = if gguf.is_file() {
            crate::quant::GgufWeights::open(&gguf)?.into_var_builder(dtype, device)
        } else {
            ComponentWeights::open(dir, "diffusion_pytorch_model")?.into_var_builder(dtype, device)
        };
        Self::new(&cfg, vb).map_err(LoadError::Build)
    }

    /// As [`Self::load`], with the LoRAs of `loras` merged into the weights (see [`crate::lora`]),
    /// or, for a quantized transformer, applied beside each quantized matmul and merged into its
    /// full-precision weights ([`crate::lora_quant`]).
    pub fn load_with_loras(
        dir: &Path,
        dtype: DType,
        device: &Device,
        loras: &[crate::lora::LoraSpec],
    ) -> std::result::Result<Self, LoadError> {
        if loras.is_empty() {
            return Self::load(dir, dtype, device);
        }
        let cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
        let set = crate::lora::LoraSet::load(loras, &cfg)?;
        let gguf = dir.join(crate::quant::GGUF_FILE);
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = if gguf.is_file() {
            let base = crate::quant::GgufWeights::open(&gguf)?;
            Box::new(crate::lora_quant::LoraGgufWeights::new(base, set))
        } else {
            let base = ComponentWeights::open(dir, "diffusion_pytorch_model")?;
            Box::new(crate::lora::MergedWeights::new(base, set))
        };
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        Self::new(&cfg, vb).map_err(LoadError::Build)
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets the bytes one attention chunk's f32 scores and probabilities may take in every block
    /// ([`DEFAULT_ATTENTION_BUDGET`] until set). Results do not depend on it.
    pub fn set_attention_budget(&mut self, bytes: u64) {
        self.attention_budget = bytes;
        self.blocks
            .iter_mut()
            .for_each(|b| b.set_attention_budget(bytes));
    }

    /// The bytes one attention chunk's f32 scores and probabilities may take.
    pub fn attention_budget(&self) -> u64 {
        self.attention_budget
    }

    /// Sizes each call's attention chunks from `bytes` of working memory in every block
    /// (`None`, the default: the attention budget alone). Results do not depend on it.
    pub fn set_working_memory(&mut self, bytes: Option<u64>) {
        self.working_memory = bytes;
        self.blocks
            .iter_mut()
            .for_each(|b| b.set_working_memory(bytes));
    }

    /// The working memory chunks are sized from (`None`: none given).
    pub fn working_memory(&self) -> Option<u64> {
        self.working_memory
    }

    /// The blocks, for block-level tests and callers that step through them.
    pub fn blocks(&self) -> &[TransformerBlock] {
        &self.blocks
    }

    /// The timestep embedding `temb: [B, dim]` for `timestep: [B]` (cast to the model dtype
    /// first, as the reference does).
    pub fn timestep_embedding(&self, timestep: &Tensor) -> Result<Tensor> {
        let t = timestep.to_dtype(self.dtype)?;
        self.time_text_embed.forward(&t, self.dtype)
    }

    /// Predicts the velocity `[B, S_i, in_channels]`.
    ///
    /// - `img`: packed latents `[B, S_i, in_channels]` with `S_i = h·w`;
    /// - `txt`: text encoder states `[B, S_t, joint_attention_dim]`;
    /// - `txt_mask`: `[B, S_t]`, non-zero = real token; `None` = all real;
    /// - `timestep`: sigma in [0, 1], `[B]` (the pipeline's `t / 1000`);
    /// - `img_hw`: the patch grid `(h, w)` = latent size / 2.
    ///
    /// Inputs are converted to the model's dtype.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        txt_mask: Option<&Tensor>,
        timestep: &Tensor,
        img_hw: (usize, usize),
    ) -> Result<Tensor> {
        let prep = self.prepare(img, txt, txt_mask, timestep, img_hw)?;
        let (mut x, mut c) = (prep.img, prep.txt);
        for block in &self.blocks {
            (x, c) = block.forward(&x, &c, &prep.temb, &prep.rope, prep.bias.as_ref())?;
        }
        self.head(&x, &prep.temb)
    }

    /// [`Self::forward`] with step caching (see [`crate::step_cache`]): the first block always
    /// runs; each row whose first-block residual changed less than the cache's threshold since
    /// its last full step reuses that step's residual of the remaining blocks, the others run
    /// them. `may_reuse: false` runs every row fully (the warm-up steps and the last step).
    /// Every row computed fully gives exactly [`Self::forward`]'s output.
    pub fn forward_step_cached(
        &self,
        inputs: ForwardInputs<'_>,
        cache: &mut StepCache,
        may_reuse: bool,
    ) -> Result<Tensor> {
        let ForwardInputs {
            img,
            txt,
            txt_mask,
            timestep,
            img_hw,
        } = inputs;
        let rows = img.dim(0)?;
        cache.ensure_rows(rows)?;
        let prep = self.prepare(img, txt, txt_mask, timestep, img_hw)?;
        let Some((first, rest)) = self.blocks.split_first() else {
            return self.head(&prep.img, &prep.temb);
        };
        let (x1, c1) = first.forward(
            &prep.img,
            &prep.txt,
            &prep.temb,
            &prep.rope,
            prep.bias.as_ref(),
        )?;
        // [B, S_i, dim]: what the first block added, the cheap signal.
        let first_residual = (&x1 - &prep.img)?;
        let reuse = cache.decide(&first_residual, may_reuse)?;
        let compute: Vec<usize> = (0..rows).filter(|&r| !reuse[r]).collect();
        let run_rest = |x: Tensor, c: Tensor, temb: &Tensor, bias: Option<&Tensor>| {
            let (mut x, mut c) = (x, c);
            for block in rest {
                (x, c) = block.forward(&x, &c, temb, &prep.rope, bias)?;
            }
            Ok::<_, candle_core::Error>(x)
        };
        let x = if compute.len() == rows {
            // Every row runs: the same ops in the same order as `forward`.
            let x = run_rest(x1.clone(), c1, &prep.temb, prep.bias.as_ref())?;
            cache.store(&compute, &first_residual, &(&x - &x1)?)?;
            x
        } else {
            let mut out: Vec<Option<Tensor>> = vec![None; rows];
            if !compute.is_empty() {
                let idx = Tensor::from_vec(
                    compute.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    compute.len(),
                    &self.device,
                )?;
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let xs = pick(&x1)?;
                let bias = prep.bias.as_ref().map(pick).transpose()?;
                let done = run_rest(xs.clone(), pick(&c1)?, &pick(&prep.temb)?, bias.as_ref())?;
                cache.store(&compute, &pick(&first_residual)?, &(&done - &xs)?)?;
                for (k, &r) in compute.iter().enumerate() {
                    out[r] = Some(done.narrow(0, k, 1)?);
                }
            }
            for r in (0..rows).filter(|&r| reuse[r]) {
                let residual = cache.residual(r)?;
                out[r] = Some((x1.narrow(0, r, 1)? + residual)?);
            }
            let out = out
                .into_iter()
                .map(|t| {
                    t.ok_or_else(|| candle_core::Error::msg("a row was neither run nor reused"))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&out, 0)?
        };
        self.head(&x, &prep.temb)
    }

    /// Checks the inputs and runs everything before the blocks: the input projections, the
    /// timestep embedding, the RoPE tables and the attention bias.
    fn prepare(
        &self,
        img: &Tensor,
        txt: &Tensor,
        txt_mask: Option<&Tensor>,
        timestep: &Tensor,
        img_hw: (usize, usize),
    ) -> Result<Prepared> {
        let (b, s_img, c_in) = img.dims3()?;
        let (bt, s_txt, c_txt) = txt.dims3()?;
        if c_in != self.cfg.in_channels || c_txt != self.cfg.joint_attention_dim || bt != b {
            bail!(
                "expected img [B, S_i, {}] and txt [B, S_t, {}] with one B, got {:?} and {:?}",
                self.cfg.in_channels,
                self.cfg.joint_attention_dim,
                img.dims(),
                txt.dims()
            );
        }
        if img_hw.0 * img_hw.1 != s_img {
            bail!(
                "image grid {}×{} does not hold {s_img} tokens",
                img_hw.0,
                img_hw.1
            );
        }
        if timestep.dims() != [b] {
            bail!("timestep must be [B] = [{b}], got {:?}", timestep.dims());
        }
        let bias = match txt_mask {
            Some(m) if m.dims() != [b, s_txt] => {
                bail!(
                    "txt_mask must be [B, S_t] = [{b}, {s_txt}], got {:?}",
                    m.dims()
                )
            }
            Some(m) => Some(attention_bias(&m.to_device(&self.device)?, s_img)?),
            None => None,
        };
        let img = img.to_dtype(self.dtype)?;
        let txt = txt.to_dtype(self.dtype)?;

        let x = self.img_in.forward(&img)?;
        let temb = self.timestep_embedding(timestep)?;
        let c = self.txt_in.forward(&self.txt_norm.forward(&txt)?)?;
        let rope = RopeTables::new(self.cfg.axes_dims_rope, img_hw, s_txt, &self.device)?;
        Ok(Prepared {
            img: x,
            txt: c,
            temb,
            rope,
            bias,
        })
    }

    /// Everything after the blocks: the output norm and projection.
    fn head(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // AdaLayerNormContinuous: [scale, shift] (scale first, unlike the blocks).
        let emb = self.norm_out.forward(&silu(temb)?)?;
        let [scale, shift] = <[Tensor; 2]>::try_from(emb.chunk(2, D::Minus1)?)
            .map_err(|c| candle_core::Error::msg(format!("norm_out split into {}", c.len())))?;
        let x = modulate(&layer_norm(x)?, &shift, &scale)?;
        self.proj_out.forward(&x)
    }
}

/// The inputs of one transformer call, as [`QwenImageTransformer::forward`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInputs<'a> {
    /// Packed latents `[B, S_i, in_channels]`.
    pub img: &'a Tensor,
    /// Text encoder states `[B, S_t, joint_attention_dim]`.
    pub txt: &'a Tensor,
    /// `[B, S_t]`, non-zero = real token; `None` = all real.
    pub txt_mask: Option<&'a Tensor>,
    /// Sigma in [0, 1], `[B]`.
    pub timestep: &'a Tensor,
    /// The patch grid `(h, w)`.
    pub img_hw: (usize, usize),
}

/// The streams and tables every block of one call shares.
struct Prepared {
    img: Tensor,
    txt: Tensor,
    temb: Tensor,
    rope: RopeTables,
    bias: Option<Tensor>,
}
