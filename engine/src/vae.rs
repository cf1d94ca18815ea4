//! The Qwen-Image VAE (`AutoencoderKLQwenImage`, the Wan-2.1 causal video VAE) for single images.
//!
//! Owns: the VAE config (`vae/config.json`), the decoder and encoder for one frame, the latent
//! (de)normalisation with `latents_mean` / `latents_std`, and the posterior distribution.
//!
//! Single-frame reduction (spec §2.2): a causal 3-D convolution pads the time axis with
//! `kernel_t - 1` zero frames in the past, so for one frame only its *last* temporal tap touches
//! data; it is run as a 2-D convolution with `weight[:, :, kt - 1]`. The resamplers' `time_conv`
//! is skipped by the reference on the first chunk, so it is never loaded. Tensors here are
//! `[B, C, H, W]`; a `[B, C, 1, H, W]` input is accepted and its frame axis dropped.
//!
//! Data flow: decode = denormalise → `post_quant_conv` → decoder → clamp to [-1, 1];
//! encode = encoder → `quant_conv` → [`LatentDistribution`] (raw VAE space; normalise with
//! [`AutoencoderKLQwenImage::normalize_latents`]).
//!
//! Dtypes: f32 anywhere; bf16 on CUDA only (candle 0.11's CPU conv2d has no bf16 matmul).

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::weights::{WeightsError, component_var_builder};

/// Query rows per chunk of the mid-block attention when no byte budget is set: at 1024² the
/// full score matrix is 16384² (1 GiB in f32); 2048 rows keep it at 128 MiB while the matmuls
/// stay large. A working-memory bound ([`AutoencoderKLQwenImage::set_working_memory`]) only
/// shrinks the chunk below this.
pub const DEFAULT_ATTENTION_QUERY_ROWS: usize = 2048;

/// Smallest chunk budget sized from working memory: 1 MiB still holds 21 query rows at 1024²
/// (a budget below one row's cost is exceeded by that row: a row is the least attention can
/// process).
pub const MIN_ATTENTION_BUDGET: u64 = 1 << 20;

/// Fewest query rows per mid-block attention chunk a memory plan counts on
/// ([`crate::memory::vae_head_bytes_within`]): a size whose chunk, sized from the working
/// memory, would be thinner is not admitted. Each chunk is a `[rows, C] × [C, tokens]` matmul
/// and a softmax over its rows; below about 128 rows the matmul is thinner than a GPU's tiles
/// (64–128 rows) and the chunk count (`tokens / rows`: 2048 at 4096², 128 at 1024²) makes
/// per-chunk overhead dominate, while one-row chunks ran 262 144 of them at 4096².
pub const MIN_PLANNED_ATTENTION_ROWS: usize = 128;

/// Score-sized f32 matrices a chunk holds at once: the scores, the scaled scores, the
/// probabilities.
pub const ATTENTION_SCORE_MATRICES: u64 = 3;

/// Frame-sized tensors `[B, C, h, w]` (compute dtype) alive beside the chunk, measured on the
/// CPU (`tests/vae_attention_memory.rs`): the input, the norm's output and temporaries, its
/// `[B, hw, C]` copy, `qkv` (three), q, kᵀ and v, the output chunks and their concatenation.
pub const ATTENTION_LIVE_TENSORS: u64 = 12;

/// Query rows whose [`ATTENTION_SCORE_MATRICES`] f32 matrices `[batch, rows, tokens]` fit in
/// `budget`; at least 1, at most `tokens`.
pub fn attention_query_chunk(budget: u64, batch: usize, tokens: usize) -> usize {
    let per_row = (batch as u64)
        .saturating_mul(tokens as u64)
        .saturating_mul(4 * ATTENTION_SCORE_MATRICES)
        .max(1);
    let rows = usize::try_from(budget / per_row).unwrap_or(usize::MAX);
    rows.clamp(1, tokens.max(1))
}

/// Query rows per chunk: [`DEFAULT_ATTENTION_QUERY_ROWS`], or what a byte `budget` holds when
/// one is set; then, when `working` bytes bound the attention, no more than what is left beside
/// its `live` frame-sized bytes holds (at least [`MIN_ATTENTION_BUDGET`]'s worth). Between 1 and
/// `tokens`.
pub fn attention_rows(
    budget: Option<u64>,
    working: Option<u64>,
    live: u64,
    batch: usize,
    tokens: usize,
) -> usize {
    let cap = match budget {
        None => DEFAULT_ATTENTION_QUERY_ROWS,
        Some(b) => attention_query_chunk(b, batch, tokens),
    };
    let rows = match working {
        None => cap,
        Some(w) => {
            let left = w.saturating_sub(live).max(MIN_ATTENTION_BUDGET);
            cap.min(attention_query_chunk(left, batch, tokens))
        }
    };
    rows.clamp(1, tokens.max(1))
}

/// `F.normalize`'s default epsilon: the L2 norm is clamped from below by it.
const NORMALIZE_EPS: f64 = 1e-12;

/// `vae/config.json` of `AutoencoderKLQwenImage`. Missing keys take the diffusers defaults, which
/// are the shipped Qwen-Image values; unknown keys (`_class_name`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Channels of the first encoder level / last decoder level (96).
    pub base_dim: usize,
    /// Latent channels (16).
    pub z_dim: usize,
    /// Channel multipliers per level ([1, 2, 4, 4]).
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Scales with attention in the encoder's down blocks; empty in Qwen-Image, and only empty is
    /// supported.
    pub attn_scales: Vec<f64>,
    /// Per down level: whether it also downsamples time (only matters for video).
    pub temperal_downsample: Vec<bool>,
    /// Image channels (3).
    pub input_channels: usize,
    /// Per-channel latent mean.
    pub latents_mean: Vec<f32>,
    /// Per-channel latent standard deviation.
    pub latents_std: Vec<f32>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            input_channels: 3,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
        }
    }
}

impl VaeConfig {
    /// Pixels per latent cell along each side (8 for Qwen-Image).
    pub fn spatial_compression(&self) -> usize {
        1 << self.temperal_downsample.len()
    }

    fn validate(&self) -> Result<()> {
        if self.dim_mult.is_empty() || self.base_dim == 0 || self.z_dim == 0 {
            bail!("vae config: base_dim, z_dim and dim_mult must be non-empty / non-zero")
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            bail!(
                "vae config: temperal_downsample has {} entries, dim_mult needs {}",
                self.temperal_downsample.len(),
                self.dim_mult.len() - 1
            )
        }
        if !self.attn_scales.is_empty() {
            bail!(
                "vae config: attn_scales {:?} is not supported (Qwen-Image uses none)",
                self.attn_scales
            )
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!(
                "vae config: latents_mean/latents_std have {}/{} entries, z_dim is {}",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            )
        }
        if self.latents_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            bail!("vae config: latents_std must be finite and non-zero")
        }
        Ok(())
    }
}

/// Why a VAE folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum VaeLoadError {
    /// `config.json` could not be read.
    #[error("cannot read {}", path.display())]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a VAE config.
    #[error("bad VAE config {}", path.display())]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The weight files could not be opened.
    #[error("cannot open the VAE weights")]
    Weights(#[from] WeightsError),
    /// The config is unsupported or a tensor is missing or misshapen.
    #[error("cannot build the VAE from {}", dir.display())]
    Build {
        /// The component folder.
        dir: PathBuf,
        /// The error naming the tensor or the config field.
        #[source]
        source: candle_core::Error,
    },
}

/// A causal 3-D convolution reduced to the 2-D convolution it is for a single frame.
#[derive(Debug, Clone)]
struct CausalConv {
    /// `[out, in, kh, kw]`: the last temporal tap of the `[out, in, kt, kh, kw]` weight.
    weight: Tensor,
    /// `[1, out, 1, 1]`.
    bias: Tensor,
    padding: usize,
}

impl CausalConv {
    /// A cubic kernel `k` (3 or 1) with "same" spatial padding, as the VAE uses everywhere.
    fn new(in_c: usize, out_c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_c, in_c, k, k, k), "weight")?;
        // [out, in, kt, kh, kw] -> [out, in, kh, kw] at tap kt-1: the only tap that sees the frame.
        let weight = w.narrow(2, k - 1, 1)?.squeeze(2)?.contiguous()?;
        let bias = vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?;
        Ok(Self {
            weight,
            bias,
            padding: k / 2,
        })
    }
}

impl Module for CausalConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, 1, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// A plain 2-D convolution (the resamplers' `nn.Conv2d`).
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    /// `[1, out, 1, 1]`.
    bias: Tensor,
}

impl Conv2d {
    fn new(in_c: usize, out_c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_c, in_c, k, k), "weight")?;
        let bias = vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?;
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
        x.conv2d(&self.weight, padding, stride, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// `QwenImageRMS_norm`: L2-normalise over channels (in f32), times √C and a per-channel gamma.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `[1, C, 1, 1]`.
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    /// `images` selects the gamma shape the checkpoint stores: `[C,1,1]` in the attention block,
    /// `[C,1,1,1]` elsewhere.
    fn new(c: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((c, 1, 1), "gamma")?
        } else {
            vb.get((c, 1, 1, 1), "gamma")?
        };
        let gamma = gamma.reshape((1, c, 1, 1))?;
        Ok(Self {
            gamma,
            scale: (c as f64).sqrt(),
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let norm = xf
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(NORMALIZE_EPS, f64::INFINITY)?;
        let normalized = xf.broadcast_div(&norm)?.to_dtype(dtype)?;
        (normalized * self.scale)?.broadcast_mul(&self.gamma)
    }
}

/// `QwenImageResidualBlock`.
#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv,
    norm2: RmsNorm,
    conv2: CausalConv,
    conv_shortcut: Option<CausalConv>,
}

impl ResidualBlock {
    fn new(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_c == out_c {
            None
        } else {
            Some(CausalConv::new(in_c, out_c, 1, vb.pp("conv_shortcut"))?)
        };
        Ok(Self {
            norm1: RmsNorm::new(in_c, false, vb.pp("norm1"))?,
            conv1: CausalConv::new(in_c, out_c, 3, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_c, false, vb.pp("norm2"))?,
            conv2: CausalConv::new(out_c, out_c, 3, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResidualBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let x = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let x = self.conv2.forward(&self.norm2.forward(&x)?.silu()?)?;
        x + h
    }
}

/// `QwenImageAttentionBlock`: single-head self-attention over the H·W positions of a frame.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    /// `[C, 3C]`: the 1×1 `to_qkv` conv as a matmul on `[B, HW, C]`.
    qkv_t: Tensor,
    /// `[3C]`.
    qkv_bias: Tensor,
    /// `[C, C]`: the 1×1 `proj` conv, transposed.
    proj_t: Tensor,
    /// `[C]`.
    proj_bias: Tensor,
    channels: usize,
    /// Chunk budget in bytes (`None`: [`DEFAULT_ATTENTION_QUERY_ROWS`]).
    budget: Option<u64>,
    /// Working memory the chunks are sized within ([`attention_rows`]).
    working: Option<u64>,
}

impl AttentionBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let qkv = vb.pp("to_qkv");
        let proj = vb.pp("proj");
        // 1×1 conv weights [out, in, 1, 1] -> [in, out] for x[B, HW, in] @ w.
        let qkv_t = qkv
            .get((3 * c, c, 1, 1), "weight")?
            .reshape((3 * c, c))?
            .t()?
            .contiguous()?;
        let proj_t = proj
            .get((c, c, 1, 1), "weight")?
            .reshape((c, c))?
            .t()?
            .contiguous()?;
        Ok(Self {
            norm: RmsNorm::new(c, true, vb.pp("norm"))?,
            qkv_t,
            qkv_bias: qkv.get(3 * c, "bias")?,
            proj_t,
            proj_bias: proj.get(c, "bias")?,
            channels: c,
            budget: None,
            working: None,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            bail!("vae attention: {c} channels, expected {}", self.channels)
        }
        let n = self.norm.forward(x)?;
        // [B, C, H, W] -> [B, HW, C]
        let n = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        // [B, HW, 3C], channels ordered q | k | v
        let qkv = n
            .broadcast_matmul(&self.qkv_t)?
            .broadcast_add(&self.qkv_bias)?;
        let q = qkv.narrow(D::Minus1, 0, c)?.contiguous()?;
        let k_t = qkv.narrow(D::Minus1, c, c)?.transpose(1, 2)?.contiguous()?; // [B, C, HW]
        let v = qkv.narrow(D::Minus1, 2 * c, c)?.contiguous()?;
        let scale = 1.0 / (c as f64).sqrt();
        let tokens = h * w;
        let live = ATTENTION_LIVE_TENSORS * (b * c * tokens * x.dtype().size_in_bytes()) as u64;
        let chunk = attention_rows(self.budget, self.working, live, b, tokens);
        let mut outs = Vec::with_capacity(tokens.div_ceil(chunk));
        let mut start = 0;
        while start < tokens {
            let len = chunk.min(tokens - start);
            let scores = (q.narrow(1, start, len)?.matmul(&k_t)? * scale)?; // [B, len, HW]
            let probs = crate::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?); // [B, len, C]
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?; // [B, HW, C]
        let out = attn
            .broadcast_matmul(&self.proj_t)?
            .broadcast_add(&self.proj_bias)?;
        // [B, HW, C] -> [B, C, H, W]
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// `QwenImageMidBlock` with one attention: resnet → attention → resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResidualBlock,
    attention: AttentionBlock,
    resnet1: ResidualBlock,
}

impl MidBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet0: ResidualBlock::new(c, c, vb.pp("resnets.0"))?,
            attention: AttentionBlock::new(c, vb.pp("attentions.0"))?,
            resnet1: ResidualBlock::new(c, c, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward(x)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward(&x)
    }
}

/// `QwenImageResample` for one frame. `resample.0` is the parameterless upsample / zero pad,
/// `resample.1` the Conv2d (`nn.Sequential` indices); `time_conv` is unused for one frame.
#[derive(Debug, Clone)]
enum Resample {
    /// Nearest ×2 (nearest-exact equals nearest at ×2), then a 3×3 conv C → C/2.
    Up(Conv2d),
    /// Zero pad right and bottom by one, then a 3×3 conv with stride 2.
    Down(Conv2d),
}

impl Resample {
    fn up(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::Up(Conv2d::new(c, c / 2, 3, vb.pp("resample.1"))?))
    }

    fn down(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::Down(Conv2d::new(c, c, 3, vb.pp("resample.1"))?))
    }
}

impl Module for Resample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Up(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?, 1, 1)
            }
            Self::Down(conv) => {
                let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                conv.forward(&x, 0, 2)
            }
        }
    }
}

/// One entry of the encoder's flat `down_blocks` list.
#[derive(Debug, Clone)]
enum DownLayer {
    Residual(ResidualBlock),
    Resample(Resample),
}

/// `QwenImageEncoder3d` for one frame.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: CausalConv,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        // dims = base_dim * [1, dim_mult...]
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| m * cfg.base_dim)
            .collect();
        let conv_in = CausalConv::new(cfg.input_channels, dims[0], 3, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::new();
        let vb_down = vb.pp("down_blocks");
        for (level, pair) in dims.windows(2).enumerate() {
            let (mut in_c, out_c) = (pair[0], pair[1]);
            for _ in 0..cfg.num_res_blocks {
                let idx = down_blocks.len();
                down_blocks.push(DownLayer::Residual(ResidualBlock::new(
                    in_c,
                    out_c,
                    vb_down.pp(idx),
                )?));
                in_c = out_c;
            }
            if level + 1 != cfg.dim_mult.len() {
                let idx = down_blocks.len();
                down_blocks.push(DownLayer::Resample(Resample::down(out_c, vb_down.pp(idx))?));
            }
        }
        let top = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(top, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(top, false, vb.pp("norm_out"))?,
            // The encoder emits mean and log-variance: 2 × z_dim channels.
            conv_out: CausalConv::new(top, 2 * cfg.z_dim, 3, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Residual(r) => r.forward(&x)?,
                DownLayer::Resample(r) => r.forward(&x)?,
            };
        }
        let x = self.mid_block.forward(&x)?;
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward(&x)
    }
}

impl Module for Decoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.tail(&self.head(x)?)
    }
}

/// `QwenImageUpBlock`: `num_res_blocks + 1` residual blocks, then an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

/// `QwenImageDecoder3d` for one frame.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: CausalConv,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        // dims = base_dim * [dim_mult[-1], dim_mult reversed...]
        let last = cfg.dim_mult[cfg.dim_mult.len() - 1];
        let dims: Vec<usize> = std::iter::once(last)
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| m * cfg.base_dim)
            .collect();
        let conv_in = CausalConv::new(cfg.z_dim, dims[0], 3, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(dims[0], vb.pp("mid_block"))?;
        let mut up_blocks = Vec::new();
        for (i, pair) in dims.windows(2).enumerate() {
            // Every upsampler halves the channels, so levels after the first start at half width.
            let in_c = if i > 0 { pair[0] / 2 } else { pair[0] };
            let out_c = pair[1];
            let vb_i = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            let mut cur = in_c;
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(cur, out_c, vb_i.pp("resnets").pp(j))?);
                cur = out_c;
            }
            // Upsample on every level but the last; 2-D and 3-D modes are the same for one frame.
            let upsampler = if i + 1 != cfg.dim_mult.len() {
                Some(Resample::up(out_c, vb_i.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let out_c = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: RmsNorm::new(out_c, false, vb.pp("norm_out"))?,
            conv_out: CausalConv::new(out_c, cfg.input_channels, 3, vb.pp("conv_out"))?,
        })
    }
}

impl Decoder {
    /// `conv_in` and the mid block, at latent resolution: the only part whose output depends on
    /// the whole frame (the mid block's attention). A tiled decode runs it once, untiled.
    pub(crate) fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(x)?;
        self.mid_block.forward(&x)
    }

    /// Everything after [`Self::head`]: up blocks, output norm and conv. Every op here is local
    /// (3×3 convs, nearest upsampling, a per-pixel norm), so a tile of the head's output decodes
    /// to the same pixels as the whole frame away from the tile's edges
    /// ([`crate::vae_tiling::receptive_margin`]).
    pub(crate) fn tail(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x)?;
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward(&x)
    }
}

/// The encoder's posterior: a diagonal Gaussian in raw VAE latent space, `[B, z, h, w]` each.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// The mean (what img2img parity uses).
    pub mean: Tensor,
    /// The log-variance, clamped to [-30, 20] as the reference does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std · noise`, with `noise ~ N(0, 1)` of the mean's shape supplied by the caller
    /// (so the caller owns the random stream).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }
}

/// `AutoencoderKLQwenImage` for single images.
#[derive(Debug, Clone)]
pub struct AutoencoderKLQwenImage {
    cfg: VaeConfig,
    encoder: Encoder,
    quant_conv: CausalConv,
    decoder: Decoder,
    post_quant_conv: CausalConv,
    /// `[1, z, 1, 1]` in the model dtype.
    latents_mean: Tensor,
    /// `[1, z, 1, 1]`: `1 / std` computed in f32 then cast, as the pipelines hold it.
    latents_inv_std: Tensor,
}

impl AutoencoderKLQwenImage {
    /// Builds the VAE from a config and weights named as in `vae/diffusion_pytorch_model.safetensors`.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        let inv_std: Vec<f32> = cfg.latents_std.iter().map(|s| 1.0 / s).collect();
        let latents_mean = Tensor::from_slice(&cfg.latents_mean, (1, z, 1, 1), vb.device())?
            .to_dtype(vb.dtype())?;
        let latents_inv_std =
            Tensor::from_slice(&inv_std, (1, z, 1, 1), vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv: CausalConv::new(2 * z, 2 * z, 1, vb.pp("quant_conv"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            post_quant_conv: CausalConv::new(z, z, 1, vb.pp("post_quant_conv"))?,
            latents_mean,
            latents_inv_std,
            cfg: cfg.clone(),
        })
    }

    /// Reads `config.json` of a diffusers `vae/` folder.
    pub fn load_config(dir: &Path) -> std::result::Result<VaeConfig, VaeLoadError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| VaeLoadError::ConfigRead {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| VaeLoadError::ConfigParse { path, source })
    }

    /// Loads a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
    /// its sharded form), memory-mapped, computing in `dtype` on `device`.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, VaeLoadError> {
        let cfg = Self::load_config(dir)?;
        let vb = component_var_builder(dir, "diffusion_pytorch_model", dtype, device)?;
        Self::new(&cfg, vb).map_err(|source| VaeLoadError::Build {
            dir: dir.to_path_buf(),
            source,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Sets the most bytes one query chunk of the mid-block attention may take, encoder and
    /// decoder (`None`: [`DEFAULT_ATTENTION_QUERY_ROWS`]); results do not depend on it.
    pub fn set_attention_budget(&mut self, bytes: Option<u64>) {
        self.encoder.mid_block.attention.budget = bytes;
        self.decoder.mid_block.attention.budget = bytes;
    }

    /// Shrinks the mid-block attention's chunks to fit `bytes` of working memory (`None`: no
    /// bound), see [`attention_rows`].
    pub fn set_working_memory(&mut self, bytes: Option<u64>) {
        self.encoder.mid_block.attention.working = bytes;
        self.decoder.mid_block.attention.working = bytes;
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.latents_mean.dtype()
    }

    /// Pipeline latents → raw VAE latents: `latents / (1 / std) + mean`, written as the pipelines
    /// write it so bf16 rounding matches. `[B, z, h, w]`.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        latents
            .to_dtype(self.dtype())?
            .broadcast_div(&self.latents_inv_std)?
            .broadcast_add(&self.latents_mean)
    }

    /// Raw VAE latents → pipeline latents: `(z - mean) · (1 / std)` (the img2img / inpaint
    /// pipelines' `_encode_vae_image`). `[B, z, h, w]`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        z.to_dtype(self.dtype())?
            .broadcast_sub(&self.latents_mean)?
            .broadcast_mul(&self.latents_inv_std)
    }

    /// Decodes normalised latents `[B, z, H/8, W/8]` (as the denoising loop holds them) to an
    /// image `[B, 3, H, W]` in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.single_frame(latents, self.cfg.z_dim, "latents")?;
        self.decode_raw(&self.denormalize_latents(&latents)?)
    }

    /// Decodes raw VAE latents (already denormalised) to `[B, 3, H, W]` in [-1, 1].
    pub fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_unclamped(z)?.clamp(-1.0, 1.0)
    }

    /// [`Self::decode_raw`] before the clamp to [-1, 1]: what training compares with the
    /// image, since the clamp passes no gradient to pixels outside the range.
    pub(crate) fn decode_unclamped(&self, z: &Tensor) -> Result<Tensor> {
        let z = self
            .single_frame(z, self.cfg.z_dim, "latents")?
            .to_dtype(self.dtype())?;
        let x = self.post_quant_conv.forward(&z)?;
        self.decoder.forward(&x)
    }

    /// Normalised latents → the decoder head's output `[B, C, h, w]` (post-quant conv, `conv_in`,
    /// mid block), for [`crate::vae_tiling`].
    pub fn decode_head(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.single_frame(latents, self.cfg.z_dim, "latents")?;
        let z = self.denormalize_latents(&latents)?;
        self.decoder.head(&self.post_quant_conv.forward(&z)?)
    }

    /// The decoder's tail on (a tile of) [`Self::decode_head`]'s output, unclamped.
    pub fn decode_tail(&self, x: &Tensor) -> Result<Tensor> {
        self.decoder.tail(x)
    }

    /// Encodes an image `[B, 3, H, W]` in [-1, 1] (H, W multiples of 8) to its posterior in raw
    /// VAE space; [`Self::normalize_latents`] of its mean gives the pipelines' image latents.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let image = self
            .single_frame(image, self.cfg.input_channels, "image")?
            .to_dtype(self.dtype())?;
        let (_, _, h, w) = image.dims4()?;
        let f = self.cfg.spatial_compression();
        if h % f != 0 || w % f != 0 {
            bail!("vae encode: image size {h}x{w} is not a multiple of {f}")
        }
        let enc = self.quant_conv.forward(&self.encoder.forward(&image)?)?; // [B, 2z, h, w]
        let z = self.cfg.z_dim;
        Ok(LatentDistribution {
            mean: enc.narrow(1, 0, z)?,
            logvar: enc.narrow(1, z, z)?.clamp(-30.0, 20.0)?,
        })
    }

    /// Accepts `[B, C, H, W]` or `[B, C, 1, H, W]` and returns the 4-D form.
    fn single_frame(&self, x: &Tensor, channels: usize, what: &str) -> Result<Tensor> {
        let x = match x.rank() {
            4 => x.clone(),
            5 if x.dim(2)? == 1 => x.squeeze(2)?,
            _ => bail!(
                "vae: {what} must be [B, {channels}, H, W] or [B, {channels}, 1, H, W], got {:?}",
                x.shape()
            ),
        };
        if x.dim(1)? != channels {
            bail!(
                "vae: {what} has {} channels, expected {channels}",
                x.dim(1)?
            )
        }
        Ok(x)
    }
}

/// `VaeImageProcessor.postprocess(image, "pil")` without the PIL step: `(x·0.5 + 0.5)` clamped
/// to [0, 1] *in the image's dtype* (in bf16 this rounding moves about one pixel in five by one
/// level, so it is mirrored), then f32 ×255, rounded half to even as numpy does, to u8.
/// `image [B, 3, H, W]` → one row-major RGB buffer (`H·W·3` bytes) per batch entry.
pub fn image_to_rgb8(image: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, c, _, _) = image.dims4()?;
    if c != 3 {
        bail!("image_to_rgb8: {c} channels, expected 3")
    }
    let unit = image.affine(0.5, 0.0)?.affine(1.0, 0.5)?.clamp(0.0, 1.0)?;
    // [B, 3, H, W] -> [B, H, W, 3]
    let hwc = unit
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    (0..b)
        .map(|i| {
            let v = hwc.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter()
                .map(|x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect())
        })
        .collect()
}

/// `VaeImageProcessor.preprocess` after resizing: row-major RGB bytes (`H·W·3`) → `[1, 3, H, W]`
/// f32 in [-1, 1] (`2·(v / 255) − 1`), ready for [`AutoencoderKLQwenImage::encode`].
pub fn rgb8_to_image(rgb: &[u8], width: usize, height: usize, device: &Device) -> Result<Tensor> {
    if rgb.len() != width * height * 3 {
        bail!(
            "rgb8_to_image: {} bytes for {width}x{height} RGB",
            rgb.len()
        )
    }
    let v: Vec<f32> = rgb
        .iter()
        .map(|b| 2.0 * (f32::from(*b) / 255.0) - 1.0)
        .collect();
    // [H, W, 3] -> [1, 3, H, W]
    Tensor::from_vec(v, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VaeConfig {
        VaeConfig {
            base_dim: 4,
            z_dim: 4,
            latents_mean: vec![0.0; 4],
            latents_std: vec![1.0; 4],
            ..VaeConfig::default()
        }
    }

    #[test]
    fn shapes_with_zero_weights() -> Result<()> {
        let cfg = tiny();
        let vae = AutoencoderKLQwenImage::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
        let latents = Tensor::zeros((2, 4, 3, 5), DType::F32, &Device::Cpu)?;
        assert_eq!(vae.decode(&latents)?.dims(), &[2, 3, 24, 40]);
        let image = Tensor::zeros((1, 3, 1, 16, 24), DType::F32, &Device::Cpu)?;
        let dist = vae.encode(&image)?;
        assert_eq!(dist.mean.dims(), &[1, 4, 2, 3]);
        assert_eq!(dist.logvar.dims(), &[1, 4, 2, 3]);
        Ok(())
    }

    #[test]
    fn rejects_bad_inputs_and_configs() -> Result<()> {
        let vae =
            AutoencoderKLQwenImage::new(&tiny(), VarBuilder::zeros(DType::F32, &Device::Cpu))?;
        let wrong_channels = Tensor::zeros((1, 5, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(vae.decode(&wrong_channels).is_err());
        let odd = Tensor::zeros((1, 3, 12, 16), DType::F32, &Device::Cpu)?;
        assert!(vae.encode(&odd).is_err());
        let bad = VaeConfig {
            attn_scales: vec![1.0],
            ..tiny()
        };
        assert!(
            AutoencoderKLQwenImage::new(&bad, VarBuilder::zeros(DType::F32, &Device::Cpu)).is_err()
        );
        let bad = VaeConfig {
            latents_std: vec![1.0; 3],
            ..tiny()
        };
        assert!(
            AutoencoderKLQwenImage::new(&bad, VarBuilder::zeros(DType::F32, &Device::Cpu)).is_err()
        );
        Ok(())
    }

    #[test]
    fn default_config_is_qwen_image() {
        let cfg: VaeConfig = serde_json::from_str(r#"{"_class_name": "AutoencoderKLQwenImage"}"#)
            .unwrap_or_default();
        assert_eq!(cfg, VaeConfig::default());
        assert_eq!(cfg.spatial_compression(), 8);
    }

    #[test]
    // The inputs are exact bf16 values, written in full so they stay exact.
    #[allow(clippy::excessive_precision)]
    fn rgb8_rounds_like_the_reference() -> Result<()> {
        // Values and expected bytes from torch/numpy: bf16 `x*0.5+0.5` rounds before ×255.
        let x = [
            -0.00823974609375f32,
            0.58984375,
            -0.90625,
            -0.80859375,
            -0.423828125,
            0.294921875,
            -0.0218505859375,
            0.87109375,
            -0.09765625,
            0.291015625,
            -0.33203125,
            -0.2158203125,
            -1.0546875,
            -0.7265625,
            -0.453125,
            0.040771484375,
        ];
        let bf16_bytes = [
            127u8, 203, 12, 24, 74, 165, 125, 239, 115, 164, 85, 100, 0, 35, 70, 132,
        ];
        let f32_bytes = [
            126u8, 203, 12, 24, 73, 165, 125, 239, 115, 165, 85, 100, 0, 35, 70, 133,
        ];
        // One 4x4 channel, replicated to RGB: [1, 3, 4, 4]
        let t = Tensor::from_slice(&x, (1, 1, 4, 4), &Device::Cpu)?.repeat((1, 3, 1, 1))?;
        let from_bf16 = image_to_rgb8(&t.to_dtype(DType::BF16)?)?;
        let from_f32 = image_to_rgb8(&t)?;
        let red = |v: &[u8]| v.iter().step_by(3).copied().collect::<Vec<u8>>();
        assert_eq!(red(&from_bf16[0]), bf16_bytes);
        assert_eq!(red(&from_f32[0]), f32_bytes);
        let back = rgb8_to_image(&from_f32[0], 4, 4, &Device::Cpu)?;
        assert_eq!(back.dims(), &[1, 3, 4, 4]);
        assert_eq!(image_to_rgb8(&back)?, from_f32);
        Ok(())
    }
}
