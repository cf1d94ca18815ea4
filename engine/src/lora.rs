//! LoRA adapters for the transformer, merged into its weights at load (full-precision weights;
//! quantized ones run them beside the matmul, [`crate::lora_quant`]).
//!
//! Owns: parsing `FILE[:SCALE]`, reading a LoRA safetensors file in either key layout, checking
//! every adapter against the model's linear layers, and the weights backend that returns
//! `W + Σ scale · (alpha / rank) · up · down` for each adapted weight (in f32, then converted to the
//! model dtype).
//!
//! Key layouts (a file may use one of each part):
//! - prefix: none, `transformer.` (diffusers), `diffusion_model.` (ComfyUI, the Qwen-Image-Lightning
//!   files), `lora_unet_` (kohya; the module path then has `_` for `.`), `base_model.model.` (PEFT);
//! - pair: `.lora_A.weight` / `.lora_B.weight` (diffusers/PEFT; `.lora_A.default.weight` too) or
//!   `.lora_down.weight` / `.lora_up.weight` (kohya/ComfyUI);
//! - `.alpha` beside a pair: scale `alpha / rank`. Without it, the safetensors metadata
//!   `lora_adapter_metadata` that diffusers writes (`lora_alpha`, `r`) gives it; without either the
//!   scale is 1 (alpha = rank), as diffusers assumes.
//!
//! Anything else — a key in no layout, an adapter for a module the model lacks (a text-encoder
//! LoRA, another model's), a half pair, a shape that does not fit — is an error naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::Init;
use candle_nn::var_builder::SimpleBackend;

use crate::config::TransformerConfig;
use crate::weights::{ComponentWeights, WeightsError};

/// Largest scale accepted on the command line: a LoRA is trained for 1; 8 already saturates.
pub const MAX_SCALE: f32 = 8.0;
/// Most LoRAs applied at once: each merge costs a rank-r matmul per adapted weight at load.
pub const MAX_LORAS: usize = 8;
/// Largest safetensors header read for the metadata (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Why a LoRA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A `FILE[:SCALE]` argument is malformed.
    #[error("bad LoRA argument {arg:?}: {reason}")]
    BadSpec {
        /// The argument.
        arg: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// More LoRAs than [`MAX_LORAS`].
    #[error("{count} LoRAs given, at most {MAX_LORAS} can be applied at once")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// The file could not be read as safetensors.
    #[error("cannot read LoRA file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A key in neither layout.
    #[error("{}: key {key:?} is not a LoRA weight (expected <module>.lora_A/lora_B/lora_down/lora_up.weight or <module>.alpha)", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// An adapter for a module the transformer does not have.
    #[error("{}: key {key:?} adapts {module:?}, which is not a linear layer of the Qwen-Image transformer", path.display())]
    UnknownModule {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The module it names.
        module: String,
    },
    /// One half of a pair, or an alpha without a pair.
    #[error("{}: module {module:?} has no {missing} weight", path.display())]
    Unpaired {
        /// The file.
        path: PathBuf,
        /// The module.
        module: String,
        /// The missing half.
        missing: &'static str,
    },
    /// The pair's shapes do not fit the module's weight.
    #[error("{}: module {module:?} has down {down:?} and up {up:?}, which do not make its [{out}, {inp}] weight", path.display())]
    Misshapen {
        /// The file.
        path: PathBuf,
        /// The module.
        module: String,
        /// The down (A) shape.
        down: Vec<usize>,
        /// The up (B) shape.
        up: Vec<usize>,
        /// The weight's output features.
        out: usize,
        /// The weight's input features.
        inp: usize,
    },
    /// The file holds no adapters.
    #[error("{}: no LoRA weights in the file", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The metadata asks for a variant this port does not merge (DoRA, rsLoRA, per-module ranks).
    #[error("{}: unsupported LoRA metadata: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What.
        what: String,
    },
}

/// One LoRA to apply: its file and the user's scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The safetensors file.
    pub path: PathBuf,
    /// Multiplies the adapter's own `alpha / rank` (1 = as trained).
    pub scale: f32,
}

impl LoraSpec {
    /// Parses `FILE` or `FILE:SCALE` (scale in [−[`MAX_SCALE`], [`MAX_SCALE`]], default 1). A
    /// path that itself contains `:` is taken whole unless its last part parses as a number.
    pub fn parse(arg: &str) -> Result<Self, LoraError> {
        let bad = |reason: String| LoraError::BadSpec {
            arg: arg.to_string(),
            reason,
        };
        let (path, scale) = match arg.rsplit_once(':').map(|(p, s)| (p, s.parse::<f32>())) {
            Some((p, Ok(scale))) => (p, scale),
            _ => (arg, 1.0),
        };
        if path.is_empty() {
            return Err(bad("the file is empty".into()));
        }
        if !scale.is_finite() || scale.abs() > MAX_SCALE {
            return Err(bad(format!(
                "the scale must be a number in [-{MAX_SCALE}, {MAX_SCALE}]"
            )));
        }
        Ok(Self {
            path: PathBuf::from(path),
            scale,
        })
    }
}

/// One adapter on one weight: `factor · up · down`, both f32 on the CPU.
#[derive(Debug, Clone)]
struct Delta {
    down: Tensor,
    up: Tensor,
    factor: f64,
}

/// Every adapter of a set of LoRAs, by the checkpoint name of the weight it changes.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    deltas: BTreeMap<String, Vec<Delta>>,
}

/// The transformer's linear layers: module name (without `.weight`) → `[out, in]`.
fn linear_modules(cfg: &TransformerConfig) -> BTreeMap<String, (usize, usize)> {
    cfg.tensor_shapes()
        .into_iter()
        .filter_map(|(name, shape)| {
            let module = name.strip_suffix(".weight")?;
            match shape[..] {
                [out, inp] => Some((module.to_string(), (out, inp))),
                _ => None,
            }
        })
        .collect()
}

/// Which half of a pair, or the alpha, a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a key into (module as written, part), or `None` for a key in no layout.
fn split_key(key: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_A.default.weight", Part::Down),
        (".lora_B.default.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    SUFFIXES
        .iter()
        .find_map(|(s, p)| key.strip_suffix(s).map(|m| (m, *p)))
}

/// The model's module for a module path as written, after removing the layout's prefix.
fn resolve_module<'m>(
    written: &str,
    modules: &'m BTreeMap<String, (usize, usize)>,
    underscored: &'m BTreeMap<String, String>,
) -> Option<&'m str> {
    for prefix in ["transformer.", "diffusion_model.", "base_model.model."] {
        if let Some(rest) = written.strip_prefix(prefix) {
            return modules.get_key_value(rest).map(|(k, _)| k.as_str());
        }
    }
    if let Some(rest) = written.strip_prefix("lora_unet_") {
        return underscored.get(rest).map(String::as_str);
    }
    modules.get_key_value(written).map(|(k, _)| k.as_str())
}

/// `lora_alpha / r` from diffusers' `lora_adapter_metadata`, if the file has it.
fn metadata_scale(path: &Path) -> Result<Option<f64>, LoraError> {
    use std::io::Read;
    let read_err = |e: Box<dyn std::error::Error + Send + Sync>| LoraError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let mut file = std::fs::File::open(path).map_err(|e| read_err(Box::new(e)))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| read_err(Box::new(e)))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(read_err(
            format!(
                "not a safetensors file: its header length field says {len} bytes \
                 (at most {MAX_HEADER_BYTES})"
            )
            .into(),
        ));
    }
    let mut header = Vec::new();
    file.take(len)
        .read_to_end(&mut header)
        .map_err(|e| read_err(Box::new(e)))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| read_err(Box::new(e)))?;
    let Some(raw) = header
        .get("__metadata__")
        .and_then(|m| m.get("lora_adapter_metadata"))
        .and_then(|m| m.as_str())
    else {
        return Ok(None);
    };
    let meta: serde_json::Value = serde_json::from_str(raw).map_err(|e| read_err(Box::new(e)))?;
    let field = |name: &str| {
        meta.get(name)
            .or_else(|| meta.get(format!("transformer.{name}")))
    };
    let unsupported = |what: &str| LoraError::Unsupported {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    for flag in ["use_dora", "use_rslora"] {
        if field(flag).and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(unsupported(flag));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if field(pattern)
            .and_then(serde_json::Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(unsupported(pattern));
        }
    }
    match (
        field("lora_alpha").and_then(serde_json::Value::as_f64),
        field("r").and_then(serde_json::Value::as_f64),
    ) {
        (Some(alpha), Some(r)) if r > 0.0 => Ok(Some(alpha / r)),
        _ => Ok(None),
    }
}

impl LoraSet {
    /// Reads every LoRA in `specs` and checks it against the transformer of `cfg`.
    pub fn load(specs: &[LoraSpec], cfg: &TransformerConfig) -> Result<Self, LoraError> {
        if specs.len() > MAX_LORAS {
            return Err(LoraError::TooMany { count: specs.len() });
        }
        let modules = linear_modules(cfg);
        let underscored: BTreeMap<String, String> = modules
            .keys()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        let mut set = Self::default();
        for spec in specs {
            set.add_file(spec, &modules, &underscored)?;
        }
        Ok(set)
    }

    fn add_file(
        &mut self,
        spec: &LoraSpec,
        modules: &BTreeMap<String, (usize, usize)>,
        underscored: &BTreeMap<String, String>,
    ) -> Result<(), LoraError> {
        let path = spec.path.as_path();
        let default_scale = metadata_scale(path)?.unwrap_or(1.0);
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| LoraError::Read {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?;
        // module -> (down, up, alpha)
        let mut parts: BTreeMap<&str, [Option<Tensor>; 3]> = BTreeMap::new();
        for (key, tensor) in &tensors {
            let Some((written, part)) = split_key(key) else {
                return Err(LoraError::UnknownKey {
                    path: path.to_path_buf(),
                    key: key.clone(),
                });
            };
            let Some(module) = resolve_module(written, modules, underscored) else {
                return Err(LoraError::UnknownModule {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    module: written.to_string(),
                });
            };
            let slot = match part {
                Part::Down => 0,
                Part::Up => 1,
                Part::Alpha => 2,
            };
            parts.entry(module).or_default()[slot] = Some(tensor.clone());
        }
        if parts.is_empty() {
            return Err(LoraError::Empty {
                path: path.to_path_buf(),
            });
        }
        let read = |e: candle_core::Error| LoraError::Read {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        for (module, [down, up, alpha]) in parts {
            let unpaired = |missing| LoraError::Unpaired {
                path: path.to_path_buf(),
                module: module.to_string(),
                missing,
            };
            let down = down.ok_or_else(|| unpaired("down (lora_A)"))?;
            let up = up.ok_or_else(|| unpaired("up (lora_B)"))?;
            let (out, inp) = modules.get(module).copied().unwrap_or_default();
            let fits = match (down.dims(), up.dims()) {
                (&[r, i], &[o, r2]) => r == r2 && i == inp && o == out && r > 0,
                _ => false,
            };
            if !fits {
                return Err(LoraError::Misshapen {
                    path: path.to_path_buf(),
                    module: module.to_string(),
                    down: down.dims().to_vec(),
                    up: up.dims().to_vec(),
                    out,
                    inp,
                });
            }
            let rank = down.dims()[0] as f64;
            let own = match alpha {
                Some(a) => {
                    a.to_dtype(DType::F64)
                        .and_then(|a| a.flatten_all())
                        .and_then(|a| a.to_vec1::<f64>())
                        .map_err(read)?
                        .first()
                        .copied()
                        .unwrap_or(rank)
                        / rank
                }
                None => default_scale,
            };
            self.deltas
                .entry(format!("{module}.weight"))
                .or_default()
                .push(Delta {
                    down: down.to_dtype(DType::F32).map_err(read)?,
                    up: up.to_dtype(DType::F32).map_err(read)?,
                    factor: own * f64::from(spec.scale),
                });
        }
        Ok(())
    }

    /// Whether no adapter is held.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Number of weights changed.
    pub fn weights_adapted(&self) -> usize {
        self.deltas.len()
    }

    /// The adapters of weight `name` stacked for a side path, f32 on the CPU, if any adapter has
    /// it: `down` `[Σ rank, in]` (each LoRA's down matrix, one under the other) and `up`
    /// `[out, Σ rank]` (each up matrix times its `scale · alpha / rank`, side by side), so that
    /// `up · down` is [`Self::delta`].
    pub fn stacked(&self, name: &str) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Some(list) = self.deltas.get(name) else {
            return Ok(None);
        };
        let downs: Vec<&Tensor> = list.iter().map(|d| &d.down).collect();
        let ups = list
            .iter()
            .map(|d| d.up.affine(d.factor, 0.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some((Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?)))
    }

    /// Whether an adapter changes weight `name`.
    pub fn adapts(&self, name: &str) -> bool {
        self.deltas.contains_key(name)
    }

    /// `Σ factor · up · down` for weight `name`, f32 `[out, in]` on the CPU, if any adapter has it.
    pub fn delta(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(list) = self.deltas.get(name) else {
            return Ok(None);
        };
        let mut sum: Option<Tensor> = None;
        for d in list {
            let term = (d.up.matmul(&d.down)? * d.factor)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum)
    }
}

/// A checkpoint with LoRAs merged in: adapted weights are loaded in f32, the deltas added, and
/// the sum converted to the requested dtype; other weights load as they are.
#[derive(Debug)]
pub struct MergedWeights {
    base: ComponentWeights,
    loras: LoraSet,
}

impl MergedWeights {
    /// The checkpoint `base` with `loras` merged in.
    pub fn new(base: ComponentWeights, loras: LoraSet) -> Self {
        Self { base, loras }
    }

    fn load(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let wrap = |e: WeightsError| candle_core::Error::Wrapped(Box::new(e));
        match self.loras.delta(name)? {
            None => self.base.load(name, expected, dtype, dev).map_err(wrap),
            Some(delta) => {
                let w = self
                    .base
                    .load(name, expected, DType::F32, &Device::Cpu)
                    .map_err(wrap)?;
                (w + delta)?.to_dtype(dtype)?.to_device(dev)
            }
        }
    }
}

impl SimpleBackend for MergedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(s.dims()), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_scale() {
        assert_eq!(
            LoraSpec::parse("a/b.safetensors").unwrap(),
            LoraSpec {
                path: "a/b.safetensors".into(),
                scale: 1.0
            }
        );
        assert_eq!(LoraSpec::parse("x.safetensors:0.5").unwrap().scale, 0.5);
        assert_eq!(LoraSpec::parse("x.safetensors:-1").unwrap().scale, -1.0);
        // A colon that is not followed by a number is part of the path.
        assert_eq!(
            LoraSpec::parse("c:dir/x.safetensors").unwrap().path,
            PathBuf::from("c:dir/x.safetensors")
        );
        for bad in ["", ":1", "x:9", "x:NaN", "x:inf"] {
            assert!(
                matches!(LoraSpec::parse(bad), Err(LoraError::BadSpec { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_of_both_layouts_resolve_to_the_model_modules() {
        let cfg = crate::tiny::transformer_config();
        let modules = linear_modules(&cfg);
        let underscored: BTreeMap<String, String> = modules
            .keys()
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        let resolve = |key: &str| {
            let (m, p) = split_key(key)?;
            Some((resolve_module(m, &modules, &underscored)?.to_string(), p))
        };
        let q = "transformer_blocks.1.attn.to_q".to_string();
        let out = "transformer_blocks.0.attn.to_out.0".to_string();
        assert_eq!(
            resolve("transformer.transformer_blocks.1.attn.to_q.lora_A.weight"),
            Some((q.clone(), Part::Down))
        );
        assert_eq!(
            resolve("diffusion_model.transformer_blocks.1.attn.to_q.lora_up.weight"),
            Some((q.clone(), Part::Up))
        );
        assert_eq!(
            resolve("lora_unet_transformer_blocks_1_attn_to_q.alpha"),
            Some((q, Part::Alpha))
        );
        assert_eq!(
            resolve("lora_unet_transformer_blocks_0_attn_to_out_0.lora_down.weight"),
            Some((out, Part::Down))
        );
        assert_eq!(
            resolve("lora_unet_norm_out_linear.lora_down.weight"),
            Some(("norm_out.linear".to_string(), Part::Down))
        );
        assert_eq!(resolve("lora_te_text_model_q.lora_down.weight"), None);
        assert_eq!(resolve("transformer_blocks.0.attn.to_q.weight"), None);
        assert_eq!(
            resolve("transformer.transformer_blocks.9.attn.to_q.lora_A.weight"),
            None
        );
    }
}
