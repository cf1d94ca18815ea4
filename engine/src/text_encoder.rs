//! The Qwen-Image text encoder: the language model of Qwen2.5-VL-7B run as an encoder.
//!
//! Owns: the text-encoder config (flat or nested `text_config`, old `rope_theta` or new
//! `rope_parameters`), the decoder-only transformer up to the final RMSNorm (spec §4), the
//! checkpoint key layouts, and turning [`PromptTokens`] into the prompt embeddings the
//! transformer consumes (template prefix dropped, re-padded, with a mask).
//!
//! Not candle-transformers' `qwen2`: that builds its RoPE table in the model dtype, which in
//! bf16 is off by up to ~0.25 rad at these positions; here cos/sin are formed in f32 from
//! `position · inv_freq` exactly as transformers does and cast afterwards. For text-only input
//! Qwen2.5-VL's M-RoPE has identical positions on its three axes, so it is plain 1-D RoPE in the
//! rotate-half convention (spec §4.3). The vision tower and `lm_head` are never loaded.
//!
//! Data flow: ids `[B, L]` → `embed_tokens` → N × (RMSNorm → GQA attention with RoPE, causal +
//! key-padding mask → residual → RMSNorm → SiLU-gated MLP → residual) → final `norm` →
//! `[B, L, hidden]`; then [`QwenTextEncoder::encode_prompts`] drops each sample's template prefix.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::quant::Proj;
use crate::tokenizer::PromptTokens;
use crate::weights::{ComponentWeights, WeightsError};

/// The language model's prefix in the transformers >= 4.52 layout (the Qwen-Image checkpoint).
pub const NESTED_PREFIX: &str = "model.language_model";
/// The language model's prefix in the older layout (and in what transformers 5 writes).
pub const FLAT_PREFIX: &str = "model";

/// Defaults of Qwen2.5-VL when a key is absent.
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
const DEFAULT_ROPE_THETA: f64 = 1e6;

/// The language-model part of a Qwen2.5-VL `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEncoderConfig {
    /// Width (3584).
    pub hidden_size: usize,
    /// MLP width (18944).
    pub intermediate_size: usize,
    /// Decoder layers (28).
    pub num_hidden_layers: usize,
    /// Query heads (28).
    pub num_attention_heads: usize,
    /// Key/value heads (4).
    pub num_key_value_heads: usize,
    /// Vocabulary rows of `embed_tokens` (152064).
    pub vocab_size: usize,
    /// RMSNorm epsilon (1e-6).
    pub rms_norm_eps: f64,
    /// RoPE base (1e6).
    pub rope_theta: f64,
}

impl TextEncoderConfig {
    /// The real Qwen2.5-VL-7B language model.
    pub fn qwen2_5_vl_7b() -> Self {
        Self {
            hidden_size: 3584,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            vocab_size: 152_064,
            rms_norm_eps: DEFAULT_RMS_NORM_EPS,
            rope_theta: DEFAULT_ROPE_THETA,
        }
    }

    /// Parses a `text_encoder/config.json`: keys inside `text_config` win over top-level ones
    /// (checkpoints written by different transformers versions put them in either place).
    pub fn from_json(text: &str) -> std::result::Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(ConfigError::Json)?;
        let inner = raw.text_config.as_deref();
        let pick = |f: fn(&RawConfig) -> Option<usize>, name: &'static str| {
            inner
                .and_then(f)
                .or_else(|| f(&raw))
                .ok_or(ConfigError::Missing(name))
        };
        let hidden_size = pick(|r| r.hidden_size, "hidden_size")?;
        let num_attention_heads = pick(|r| r.num_attention_heads, "num_attention_heads")?;
        let rope_theta = |r: &RawConfig| {
            r.rope_theta
                .or_else(|| r.rope_parameters.as_ref().and_then(|p| p.rope_theta))
        };
        let act = inner
            .and_then(|r| r.hidden_act.clone())
            .or_else(|| raw.hidden_act.clone());
        if let Some(act) = act
            && act != "silu"
        {
            return Err(ConfigError::Unsupported(format!("hidden_act {act}")));
        }
        let cfg = Self {
            hidden_size,
            intermediate_size: pick(|r| r.intermediate_size, "intermediate_size")?,
            num_hidden_layers: pick(|r| r.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: pick(|r| r.num_key_value_heads, "num_key_value_heads")
                .unwrap_or(num_attention_heads),
            vocab_size: pick(|r| r.vocab_size, "vocab_size")?,
            rms_norm_eps: inner
                .and_then(|r| r.rms_norm_eps)
                .or(raw.rms_norm_eps)
                .unwrap_or(DEFAULT_RMS_NORM_EPS),
            rope_theta: inner
                .and_then(rope_theta)
                .or_else(|| rope_theta(&raw))
                .unwrap_or(DEFAULT_ROPE_THETA),
        };
        cfg.validate().map_err(ConfigError::Unsupported)?;
        Ok(cfg)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let h = self.num_attention_heads;
        let kv = self.num_key_value_heads;
        if h == 0 || kv == 0 || !self.hidden_size.is_multiple_of(h) || !h.is_multiple_of(kv) {
            return Err(format!(
                "hidden_size {} / heads {h} / kv heads {kv} do not divide",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("odd head dim {}", self.head_dim()));
        }
        Ok(())
    }
}

/// Why a text-encoder config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the expected shape.
    #[error("not a Qwen2.5-VL config")]
    Json(#[source] serde_json::Error),
    /// A required key is absent at both levels.
    #[error("missing key {0}")]
    Missing(&'static str),
    /// A value this port does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

#[derive(Debug, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
}

/// Every field optional: the same struct reads the top level and `text_config`.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    hidden_act: Option<String>,
    text_config: Option<Box<RawConfig>>,
}

/// Which weights of a `text_encoder/` folder to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextEncoderWeights {
    /// The folder's `.gguf` file if it has one, else its safetensors.
    #[default]
    AsFolder,
    /// The safetensors, even beside a `.gguf` file.
    FullPrecision,
    /// The `.gguf` file (an error if there is none).
    Quantized,
}

/// Whether the `text_encoder/` folder `dir` holds full-precision weights (`model*.safetensors`),
/// whether or not a `.gguf` file is beside them.
pub fn has_full_precision(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("model") && n.contains(".safetensors"))
        })
    })
}

/// Why a `text_encoder/` folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TextEncoderLoadError {
    /// `config.json` could not be read.
    #[error("cannot read {}", path.display())]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is unusable.
    #[error("bad text-encoder config {}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ConfigError,
    },
    /// The weight files could not be opened.
    #[error("cannot open the text-encoder weights")]
    Weights(#[from] WeightsError),
    /// A llama.cpp-layout `.gguf` file is unusable ([`crate::text_encoder_gguf`]).
    #[error("text encoder GGUF {}: {reason}", path.display())]
    Gguf {
        /// The file (or the folder, when it holds several).
        path: PathBuf,
        /// What is wrong, and what is allowed.
        reason: String,
    },
    /// A tensor is missing or misshapen.
    #[error("cannot build the text encoder from {}", dir.display())]
    Build {
        /// The component folder.
        dir: PathBuf,
        /// The error naming the tensor.
        #[source]
        source: candle_core::Error,
    },
}

/// transformers' Qwen2 RMSNorm: statistics in f32, cast back, then times the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let hidden = cfg.hidden_size;
        Ok(Self {
            q_proj: crate::quant::linear(hidden, h * d, vb.pp("q_proj"))?,
            k_proj: crate::quant::linear(hidden, kv * d, vb.pp("k_proj"))?,
            v_proj: crate::quant::linear(hidden, kv * d, vb.pp("v_proj"))?,
            o_proj: crate::quant::linear_no_bias(h * d, hidden, vb.pp("o_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x [B, L, hidden]`, `cos/sin [L, head_dim/2]`, `mask [B, 1, L, L]` additive f32.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        // [B, L, heads*D] -> [B, heads, L, D]
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, l, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, l, kv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, l, kv, d))?
            .transpose(1, 2)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        // GQA: query head i reads kv head i / (h / kv). [B, kv, L, D] -> [B, h, L, D]
        let rep = h / kv;
        let repeat = |t: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return t.contiguous();
            }
            t.unsqueeze(2)?
                .expand((b, kv, rep, l, d))?
                .reshape((b, h, l, d))
        };
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scale = 1.0 / (d as f64).sqrt();
        // Scores and softmax in f32, probabilities back in the model dtype for the value product:
        // what the reference's fused bf16 attention does. At <= ~550 tokens the f32 copies of q
        // and k cost nothing next to the projections.
        let q = q.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? * scale)?; // [B, h, L, L]
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v.contiguous()?)?; // [B, h, L, D]
        // [B, h, L, D] -> [B, L, h*D]
        let out = out.transpose(1, 2)?.reshape((b, l, h * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm::new(hidden, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                hidden,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp {
                gate_proj: crate::quant::linear_no_bias(hidden, inter, mlp.pp("gate_proj"))?,
                up_proj: crate::quant::linear_no_bias(hidden, inter, mlp.pp("up_proj"))?,
                down_proj: crate::quant::linear_no_bias(inter, hidden, mlp.pp("down_proj"))?,
            },
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + m
    }
}

/// Prompt embeddings for the transformer: template prefix dropped, right-padded with zeros.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, S, hidden]` in the encoder's dtype; rows past a sample's length are zero.
    pub embeds: Tensor,
    /// `[B, S]` u8: 1 for a real token, 0 for padding.
    pub mask: Tensor,
    /// Real tokens per sample (after the drop).
    pub lengths: Vec<usize>,
}

impl PromptEmbeds {
    /// Whether no sample is padded; the reference then passes no mask to the transformer.
    pub fn is_unpadded(&self) -> bool {
        self.lengths
            .iter()
            .all(|l| Some(l) == self.lengths.iter().max())
    }
}

/// The Qwen2.5-VL language model as a text encoder.
#[derive(Debug, Clone)]
pub struct QwenTextEncoder {
    cfg: TextEncoderConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[head_dim/2]` f32: `1 / theta^(2i / head_dim)`.
    inv_freq: Tensor,
    dtype: DType,
    device: Device,
}

impl QwenTextEncoder {
    /// Builds the model from weights rooted at the language model (`vb` already at
    /// [`NESTED_PREFIX`] or [`FLAT_PREFIX`]): `embed_tokens`, `layers.N.*`, `norm`.
    pub fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("text encoder config: {e}")
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let half = cfg.head_dim() / 2;
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), all in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim() as f32))
            .collect();
        Ok(Self {
            embed_tokens: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                vb.pp("embed_tokens"),
            )?,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            inv_freq: Tensor::from_vec(inv_freq, (1, half), vb.device())?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
        })
    }

    /// Loads a transformers `text_encoder/` folder (`config.json` + `model.safetensors` or
    /// `model.safetensors.index.json` with shards), accepting both key layouts
    /// (`model.language_model.*` and `model.*`); only the language model is read. A folder with
    /// one `.gguf` file loads that instead, in llama.cpp's layout
    /// ([`crate::text_encoder_gguf`]; its `config.json`, if any, is not read).
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, TextEncoderLoadError> {
        Self::load_weights(dir, dtype, device, TextEncoderWeights::AsFolder)
    }

    /// As [`Self::load`], with the weights `which` names: a folder holding both a `.gguf` file
    /// and safetensors loads either (the plan's choice, [`crate::placement`]).
    pub fn load_weights(
        dir: &Path,
        dtype: DType,
        device: &Device,
        which: TextEncoderWeights,
    ) -> std::result::Result<Self, TextEncoderLoadError> {
        match (which, crate::text_encoder_gguf::find_gguf(dir)?) {
            (TextEncoderWeights::FullPrecision, _) => {}
            (TextEncoderWeights::AsFolder | TextEncoderWeights::Quantized, Some(gguf)) => {
                return crate::text_encoder_gguf::load(&gguf, dtype, device);
            }
            (TextEncoderWeights::Quantized, None) => {
                return Err(TextEncoderLoadError::Gguf {
                    path: dir.to_path_buf(),
                    reason: "no .gguf file, and the quantized text encoder was asked for".into(),
                });
            }
            (TextEncoderWeights::AsFolder, None) => {}
        }
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| TextEncoderLoadError::ConfigRead {
                path: path.clone(),
                source,
            })?;
        let cfg = TextEncoderConfig::from_json(&text)
            .map_err(|source| TextEncoderLoadError::Config { path, source })?;
        let weights = ComponentWeights::open(dir, "model")?;
        let nested = format!("{NESTED_PREFIX}.");
        let prefix = if weights.names().any(|n| n.starts_with(&nested)) {
            NESTED_PREFIX
        } else {
            FLAT_PREFIX
        };
        let vb = weights.into_var_builder(dtype, device).pp(prefix);
        Self::new(&cfg, vb).map_err(|source| TextEncoderLoadError::Build {
            dir: dir.to_path_buf(),
            source,
        })
    }

    /// The config of a `text_encoder/` folder without loading its weights: from the metadata of
    /// its `.gguf` file if it has one, else from `config.json`.
    pub fn read_config(dir: &Path) -> std::result::Result<TextEncoderConfig, TextEncoderLoadError> {
        if let Some(gguf) = crate::text_encoder_gguf::find_gguf(dir)? {
            return crate::text_encoder_gguf::open(&gguf).map(|(_, cfg)| cfg);
        }
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| TextEncoderLoadError::ConfigRead {
                path: path.clone(),
                source,
            })?;
        TextEncoderConfig::from_json(&text)
            .map_err(|source| TextEncoderLoadError::Config { path, source })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &TextEncoderConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the language model: `ids [B, L]` (u32), `mask [B, L]` (1 = token, 0 = padding; any
    /// integer or float dtype, right-padded: real tokens first) → the last hidden state after the
    /// final norm, `[B, L, hidden]`, the reference's `hidden_states[-1]`. The template prefix is
    /// still there: see [`Self::encode_prompts`] or [`drop_template_prefix`].
    pub fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if mask.dims() != [b, l] {
            bail!(
                "text encoder: mask {:?} does not match ids {:?}",
                mask.dims(),
                ids.dims()
            )
        }
        let lengths = right_padded_lengths(mask)?;
        let (cos, sin) = self.rope_tables(l)?;
        let mask = attention_mask(&lengths, l, &self.device)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &mask)?;
        }
        self.norm.forward(&x)
    }

    /// RoPE `(cos, sin)`, each `[L, head_dim/2]` in the model dtype, for positions `0..L`:
    /// transformers 5 uses these for text-only input, and for right padding they equal the older
    /// `cumsum(mask) - 1` on every real token. Angles are `position · inv_freq` in f32 (positions
    /// made on the host, exact below 2^24, so no integer cast kernel runs on the device) and only
    /// cos/sin are cast.
    pub fn rope_tables(&self, l: usize) -> Result<(Tensor, Tensor)> {
        let positions: Vec<f32> = (0..l).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (l, 1), &self.device)?;
        let angles = positions.broadcast_mul(&self.inv_freq)?; // [L, D/2], f32
        Ok((
            angles.cos()?.to_dtype(self.dtype)?,
            angles.sin()?.to_dtype(self.dtype)?,
        ))
    }

    /// Encodes tokenized prompts as `QwenImagePipeline.encode_prompt` does: right-pads the batch,
    /// runs [`Self::encode`], drops each sample's first `drop_index` tokens, and re-pads to the
    /// longest remaining length. The tokens were already cut so that at most
    /// `max_sequence_length` remain after the drop.
    pub fn encode_prompts(&self, prompts: &[PromptTokens]) -> Result<PromptEmbeds> {
        if prompts.is_empty() {
            bail!("text encoder: no prompts")
        }
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(prompts.len() * longest);
        let mut mask = Vec::with_capacity(prompts.len() * longest);
        for p in prompts {
            if p.ids.len() <= p.drop_index {
                bail!(
                    "text encoder: {} tokens do not extend past the template prefix {}",
                    p.ids.len(),
                    p.drop_index
                )
            }
            ids.extend_from_slice(&p.ids);
            ids.extend(std::iter::repeat_n(0u32, longest - p.ids.len()));
            mask.extend(std::iter::repeat_n(1u8, p.ids.len()));
            mask.extend(std::iter::repeat_n(0u8, longest - p.ids.len()));
        }
        let b = prompts.len();
        let ids = Tensor::from_vec(ids, (b, longest), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, longest), &self.device)?;
        let hidden = self.encode(&ids, &mask)?;
        let spans: Vec<(usize, usize)> = prompts
            .iter()
            .map(|p| (p.drop_index, p.ids.len()))
            .collect();
        drop_template_prefix(&hidden, &spans)
    }
}

/// Keeps rows `start..end` of each sample of `hidden [B, L, D]` (`spans[b] = (start, end)`:
/// the template prefix length and the sample's real length) and re-pads them with zeros to the
/// longest kept length, as `QwenImagePipeline._get_qwen_prompt_embeds` does.
pub fn drop_template_prefix(hidden: &Tensor, spans: &[(usize, usize)]) -> Result<PromptEmbeds> {
    let (b, l, d) = hidden.dims3()?;
    if spans.len() != b {
        bail!(
            "drop_template_prefix: {} spans for a batch of {b}",
            spans.len()
        )
    }
    if let Some((s, e)) = spans.iter().find(|(s, e)| s >= e || *e > l) {
        bail!("drop_template_prefix: span {s}..{e} is empty or past the length {l}")
    }
    let lengths: Vec<usize> = spans.iter().map(|(s, e)| e - s).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut rows = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * longest);
    for (i, (s, e)) in spans.iter().enumerate() {
        let kept = hidden.i((i, *s..*e))?; // [e-s, D]
        let pad = longest - (e - s);
        rows.push(if pad == 0 {
            kept
        } else {
            kept.pad_with_zeros(0, 0, pad)?
        });
        mask.extend(std::iter::repeat_n(1u8, e - s));
        mask.extend(std::iter::repeat_n(0u8, pad));
    }
    let embeds = Tensor::stack(&rows, 0)?; // [B, longest, D]
    if embeds.dims() != [b, longest, d] {
        bail!(
            "drop_template_prefix: built {:?}, expected [{b}, {longest}, {d}]",
            embeds.dims()
        )
    }
    let mask = Tensor::from_vec(mask, (b, longest), hidden.device())?;
    Ok(PromptEmbeds {
        embeds,
        mask,
        lengths,
    })
}

/// Per-row count of leading ones in a `[B, L]` 0/1 mask; fails if a row has a one after a zero.
fn right_padded_lengths(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .map(|row| {
            let len = row.iter().take_while(|v| **v != 0.0).count();
            if row[len..].iter().any(|v| *v != 0.0) {
                bail!("text encoder: the mask must be right-padded (real tokens first)")
            }
            if len == 0 {
                bail!("text encoder: a row of the mask has no tokens")
            }
            Ok(len)
        })
        .collect()
}

/// Additive f32 mask `[B, 1, L, L]`: 0 where query i may see key j (j <= i and j is a real
/// token), the most negative f32 elsewhere (finite, so a fully masked padding row stays NaN-free).
fn attention_mask(lengths: &[usize], l: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(lengths.len() * l * l);
    for &len in lengths {
        for i in 0..l {
            data.extend((0..l).map(|j| if j <= i && j < len { 0.0 } else { f32::MIN }));
        }
    }
    Tensor::from_vec(data, (lengths.len(), 1, l, l), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TextEncoderConfig {
        TextEncoderConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 50,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
        }
    }

    #[test]
    fn config_reads_flat_and_nested_layouts() -> std::result::Result<(), ConfigError> {
        let flat = r#"{"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"hidden_size": 1280}}"#;
        assert_eq!(
            TextEncoderConfig::from_json(flat)?,
            TextEncoderConfig::qwen2_5_vl_7b()
        );
        let nested = r#"{"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}}"#;
        assert_eq!(
            TextEncoderConfig::from_json(nested)?,
            TextEncoderConfig::qwen2_5_vl_7b()
        );
        assert!(matches!(
            TextEncoderConfig::from_json(r#"{"hidden_size": 8}"#),
            Err(ConfigError::Missing(_))
        ));
        Ok(())
    }

    #[test]
    fn shapes_and_mask_checks_with_zero_weights() -> Result<()> {
        let dev = Device::Cpu;
        let te = QwenTextEncoder::new(&tiny(), VarBuilder::zeros(DType::F32, &dev))?;
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 0, 0]], &dev)?;
        let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 0, 0]], &dev)?;
        assert_eq!(te.encode(&ids, &mask)?.dims(), &[2, 4, 16]);
        let left_padded = Tensor::new(&[[1u8, 1, 1, 1], [0, 0, 1, 1]], &dev)?;
        assert!(te.encode(&ids, &left_padded).is_err());
        let p = |n: usize, drop_index: usize| PromptTokens {
            ids: vec![1; n],
            user_prompt_tokens: 1,
            drop_index,
        };
        let out = te.encode_prompts(&[p(7, 3), p(5, 3)])?;
        assert_eq!(out.embeds.dims(), &[2, 4, 16]);
        assert_eq!(out.lengths, vec![4, 2]);
        assert_eq!(
            out.mask.to_vec2::<u8>()?,
            vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
        );
        assert!(!out.is_unpadded());
        assert!(te.encode_prompts(&[p(3, 3)]).is_err());
        Ok(())
    }

    #[test]
    fn bf16_rope_table_is_formed_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = TextEncoderConfig {
            hidden_size: 32,
            num_attention_heads: 2,
            ..tiny()
        };
        let te = QwenTextEncoder::new(&cfg, VarBuilder::zeros(DType::BF16, &dev))?;
        let (cos, _) = te.rope_tables(600)?;
        let got = cos.to_dtype(DType::F32)?.i((599, 0))?.to_scalar::<f32>()?;
        // Frequency 0 is 1 rad per position: cos(599) rounded once to bf16.
        let to_bf16 = |v: f32| -> Result<f32> {
            Tensor::new(v, &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()
        };
        let want = to_bf16(599f32.cos())?;
        assert_eq!(got, want);
        // What a table built in bf16 gives instead (599 is not a bf16 number: it rounds to 600).
        let bf16_angle = to_bf16(599.0)?;
        assert!((bf16_angle.cos() - want).abs() > 0.1);
        Ok(())
    }
}
