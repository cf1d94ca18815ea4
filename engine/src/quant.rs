//! Quantized transformer weights: GGUF files through candle's `QTensor`/`QMatMul` (CPU and CUDA).
//!
//! Owns: the formats offered ([`QuantFormat`]: Q8_0, Q5_K, Q4_K), which tensors are quantized
//! ([`quantizable`]), writing a quantized copy of a model folder ([`quantize_model`]), the
//! weights backend over a GGUF file ([`GgufWeights`]), and [`Proj`], the linear layer that runs a
//! quantized matmul where its weight is quantized and a plain one otherwise.
//!
//! Layout: `transformer/diffusion_pytorch_model.gguf` holding every tensor under its diffusers
//! checkpoint name (`transformer_blocks.0.attn.to_q.weight`, …), as the community Qwen-Image GGUF
//! files (city96/Qwen-Image-gguf, QuantStack/Qwen-Image-GGUF, read by ComfyUI-GGUF and
//! stable-diffusion.cpp) name them; a `model.diffusion_model.` or `diffusion_model.` prefix is
//! stripped. Quantized: the 2-D weights of the blocks (attention projections, feed-forwards and
//! the modulation linears) whose input width is a multiple of the format's block. Kept in f32:
//! biases, norm weights, and the top-level embeddings and output layers (`img_in`, `txt_in`,
//! `time_text_embed`, `norm_out`, `proj_out`), where quality needs full precision and the bytes
//! are < 0.5 % of the model.
//!
//! How a quantized weight reaches [`Proj`]: the backend answers a name `W#q8_0` (or any other
//! block type of [`BLOCK_TYPES`]: `#q4_k`, `#q6_k`, …) with the raw GGML blocks of `W` as a `u8`
//! tensor, which `Proj` rebuilds into a `QTensor` on the model's device. Asked for `W` itself, it
//! dequantizes, so any layer that wants a plain tensor still gets the right values. LoRAs on a
//! quantized model ride the same way: [`crate::lora_quant`]'s backend answers `W#lora_down` and
//! `W#lora_up`, and `Proj` runs them beside the quantized matmul. The same
//! backend reads the text encoder's llama.cpp-layout file ([`crate::text_encoder_gguf`]) through
//! a name map.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, Linear, VarBuilder};

use crate::weights::{ComponentWeights, WeightsError};

/// File name of a quantized transformer inside `transformer/`.
pub const GGUF_FILE: &str = "diffusion_pytorch_model.gguf";
/// Name prefixes of the tensors that are quantized (the blocks).
const QUANTIZED_PREFIX: &str = "transformer_blocks.";
/// Prefixes stripped from names in community files.
const FOREIGN_PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

/// Why quantized weights could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// `--to` names no format offered.
    #[error("unknown quantization {0:?}; allowed: q8_0, q5_k, q4_k")]
    UnknownFormat(String),
    /// The source folder could not be read.
    #[error("source weights")]
    Source(#[from] WeightsError),
    /// A file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// candle failed to quantize, read or write a tensor.
    #[error("{what}")]
    Tensor {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: candle_core::Error,
    },
    /// A component's `config.json` is unusable.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The output folder exists and is not empty.
    #[error("{} exists and is not empty", .0.display())]
    OutputExists(PathBuf),
}

/// A quantization format offered by `model quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantFormat {
    /// 8.5 bits per weight: blocks of 32 with one f16 scale.
    Q8_0,
    /// 5.5 bits per weight: super-blocks of 256.
    Q5K,
    /// 4.5 bits per weight: super-blocks of 256.
    Q4K,
}

impl QuantFormat {
    /// Every format, in the order `--to` lists them.
    pub const ALL: [Self; 3] = [Self::Q8_0, Self::Q5K, Self::Q4K];

    /// Parses `q8_0`, `q5_k` or `q4_k`.
    pub fn parse(s: &str) -> Result<Self, QuantError> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| QuantError::UnknownFormat(s.to_string()))
    }

    /// The name `--to` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q5K => "q5_k",
            Self::Q4K => "q4_k",
        }
    }

    /// candle's GGML type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Stored bytes per weight, as a fraction `(bytes, weights)` of one block.
    pub fn bytes_per_block(self) -> (u64, u64) {
        let t = self.ggml();
        (t.type_size() as u64, t.block_size() as u64)
    }
}

/// The GGML block types a weight may be stored in and run by `QMatMul` without dequantizing
/// (what community files use, e.g. Q6_K beside Q4_K in a `Q4_K_M` file), with the names their
/// `#` markers use. F32, F16 and BF16 weights load as plain tensors.
pub const BLOCK_TYPES: [(GgmlDType, &str); 10] = [
    (GgmlDType::Q4_0, "q4_0"),
    (GgmlDType::Q4_1, "q4_1"),
    (GgmlDType::Q5_0, "q5_0"),
    (GgmlDType::Q5_1, "q5_1"),
    (GgmlDType::Q8_0, "q8_0"),
    (GgmlDType::Q2K, "q2_k"),
    (GgmlDType::Q3K, "q3_k"),
    (GgmlDType::Q4K, "q4_k"),
    (GgmlDType::Q5K, "q5_k"),
    (GgmlDType::Q6K, "q6_k"),
];

fn block_type_named(name: &str) -> Option<GgmlDType> {
    BLOCK_TYPES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(t, _)| *t)
}

fn is_block_type(t: GgmlDType) -> bool {
    BLOCK_TYPES.iter().any(|(b, _)| *b == t)
}

/// Whether the tensor `name` of `shape` is stored quantized in `format`.
pub fn quantizable(name: &str, shape: &[usize], format: QuantFormat) -> bool {
    match shape {
        [_, inp] => {
            name.starts_with(QUANTIZED_PREFIX)
                && name.ends_with(".weight")
                && inp % format.ggml().block_size() == 0
        }
        _ => false,
    }
}

/// What [`quantize_model`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantReport {
    /// Tensors stored quantized.
    pub quantized: usize,
    /// Tensors kept in f32.
    pub kept: usize,
    /// Bytes of the GGUF file.
    pub bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QuantError + '_ {
    move |source| QuantError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `dst/transformer/diffusion_pytorch_model.gguf` from the transformer of the diffusers
/// folder `src`, and links (or copies) every other file, so `dst` loads as a model folder. The
/// text encoder and the VAE are not quantized. `dst` must not exist or be empty.
pub fn quantize_model(
    src: &Path,
    dst: &Path,
    format: QuantFormat,
) -> Result<QuantReport, QuantError> {
    if dst.exists() && std::fs::read_dir(dst).map_err(io(dst))?.next().is_some() {
        return Err(QuantError::OutputExists(dst.to_path_buf()));
    }
    link_tree(src, dst, &|p: &Path| {
        p.parent().and_then(Path::file_name) == Some("transformer".as_ref())
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("diffusion_pytorch_model"))
    })?;
    quantize_transformer(
        &src.join("transformer"),
        &dst.join("transformer").join(GGUF_FILE),
        format,
    )
}

/// Hard-links (copying where links fail) every file of `src` into `dst`, except `skip`ped ones.
fn link_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<(), QuantError> {
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for entry in std::fs::read_dir(src).map_err(io(src))? {
        let path = entry.map_err(io(src))?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let target = dst.join(name);
        if path.is_dir() {
            link_tree(&path, &target, skip)?;
        } else if !skip(&path) && std::fs::hard_link(&path, &target).is_err() {
            std::fs::copy(&path, &target).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Quantizes the transformer folder `src` (safetensors) into the GGUF file `out`.
pub fn quantize_transformer(
    src: &Path,
    out: &Path,
    format: QuantFormat,
) -> Result<QuantReport, QuantError> {
    let weights = ComponentWeights::open(src, "diffusion_pytorch_model")?;
    let tensor_err = |what: String| move |source| QuantError::Tensor { what, source };
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(weights.len());
    let mut quantized = 0;
    for name in weights.names() {
        let t = weights.load(name, None, DType::F32, &Device::Cpu)?;
        let q = if quantizable(name, t.dims(), format) {
            quantized += 1;
            QTensor::quantize(&t, format.ggml())
        } else {
            QTensor::quantize(&t, GgmlDType::F32)
        }
        .map_err(tensor_err(format!("quantizing {name}")))?;
        tensors.push((name.to_string(), q));
    }
    let kept = tensors.len() - quantized;
    let file = File::create(out).map_err(io(out))?;
    let mut w = BufWriter::new(file);
    let arch = gguf_file::Value::String("qwen_image".into());
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut w, &[("general.architecture", &arch)], &refs)
        .map_err(tensor_err(format!("writing {}", out.display())))?;
    drop(w);
    let bytes = std::fs::metadata(out).map_err(io(out))?.len();
    Ok(QuantReport {
        quantized,
        kept,
        bytes,
    })
}

/// A weights backend over one GGUF file (see the module docs for the `#format` names).
#[derive(Debug)]
pub struct GgufWeights {
    path: PathBuf,
    content: gguf_file::Content,
    /// Our name → the file's name (community files may carry a prefix).
    names: BTreeMap<String, String>,
    reader: Mutex<BufReader<File>>,
}

impl GgufWeights {
    /// Opens `path` and reads its header; tensors keep their names, less a community prefix.
    pub fn open(path: &Path) -> Result<Self, QuantError> {
        Self::open_mapped(path, &|n: &str| {
            let ours = FOREIGN_PREFIXES
                .iter()
                .find_map(|p| n.strip_prefix(p))
                .unwrap_or(n);
            Some(ours.to_string())
        })
    }

    /// Opens `path`; `rename` gives our name for each of the file's tensor names (`None`: the
    /// tensor is not read).
    pub fn open_mapped(
        path: &Path,
        rename: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, QuantError> {
        let file = File::open(path).map_err(io(path))?;
        let mut reader = BufReader::new(file);
        let content =
            gguf_file::Content::read(&mut reader).map_err(|source| QuantError::Tensor {
                what: format!("reading the GGUF header of {}", path.display()),
                source,
            })?;
        let names = content
            .tensor_infos
            .keys()
            .filter_map(|n| Some((rename(n)?, n.clone())))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            content,
            names,
            reader: Mutex::new(reader),
        })
    }

    /// A `VarBuilder` over this file.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn qtensor(&self, name: &str) -> candle_core::Result<QTensor> {
        let Some(file_name) = self.names.get(name) else {
            candle_core::bail!("tensor {name} is not in {}", self.path.display())
        };
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| candle_core::Error::Msg("GGUF reader poisoned".into()))?;
        self.content.tensor(&mut *reader, file_name, &Device::Cpu)
    }

    /// `(name, block type)` for a `W#type` name.
    fn split_marker(name: &str) -> Option<(&str, GgmlDType)> {
        let (base, fmt) = name.rsplit_once('#')?;
        Some((base, block_type_named(fmt)?))
    }

    /// The block type `name` is stored in, if it is one of [`BLOCK_TYPES`].
    pub(crate) fn stored_block_type(&self, name: &str) -> Option<GgmlDType> {
        let info = self.content.tensor_infos.get(self.names.get(name)?)?;
        is_block_type(info.ggml_dtype).then_some(info.ggml_dtype)
    }

    /// The file's metadata (architecture, sizes).
    pub fn metadata(&self) -> &std::collections::HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// Our names of the tensors the file holds, with their shapes (outer dimension first) and
    /// stored types.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize], GgmlDType)> {
        self.names.iter().filter_map(|(ours, theirs)| {
            let info = self.content.tensor_infos.get(theirs)?;
            Some((ours.as_str(), info.shape.dims(), info.ggml_dtype))
        })
    }

    /// Bytes the tensors take once loaded: block-type weights as stored, every other tensor at
    /// `dtype_bytes` per element (they are dequantized to the model dtype).
    pub fn loaded_bytes(&self, dtype_bytes: u64) -> u64 {
        self.shapes()
            .map(|(_, dims, t)| {
                let n = dims.iter().product::<usize>() as u64;
                if is_block_type(t) {
                    n / t.block_size() as u64 * t.type_size() as u64
                } else {
                    n * dtype_bytes
                }
            })
            .sum()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `t`, a tensor `name` read from the GGUF file at `path`, if it has the shape the model asks
/// for; otherwise the error names both shapes and the file.
pub(crate) fn expect_shape(
    t: Tensor,
    s: &Shape,
    name: &str,
    path: &Path,
) -> candle_core::Result<Tensor> {
    if t.dims() != s.dims() {
        candle_core::bail!(
            "{name} is {:?} in {}, expected {:?}",
            t.dims(),
            path.display(),
            s.dims()
        )
    }
    Ok(t)
}

impl SimpleBackend for GgufWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name, &self.path)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some((base, _)) = Self::split_marker(name) {
            let q = self.qtensor(base)?;
            let bytes = q.data()?.into_owned();
            let n = bytes.len();
            return Tensor::from_vec(bytes, n, &Device::Cpu);
        }
        self.qtensor(name)?
            .dequantize(&Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match Self::split_marker(name) {
            Some((base, t)) => self.stored_block_type(base) == Some(t),
            None => self.names.contains_key(name),
        }
    }
}

/// A linear layer whose weight is quantized (run by `QMatMul` in f32, plus the LoRA side path
/// if any, result cast back to the input dtype, bias added in that dtype) or plain.
#[derive(Debug, Clone)]
pub enum Proj {
    /// Full-precision weight.
    Plain(Linear),
    /// Quantized weight.
    Quantized {
        /// The matmul.
        weight: QMatMul,
        /// The bias, in the model dtype.
        bias: Option<Tensor>,
        /// LoRAs applied beside the matmul ([`crate::lora_quant`]).
        lora: Option<LoraSide>,
    },
}

/// The LoRAs of one quantized linear, kept in full precision beside its `QMatMul`:
/// `x · downᵀ · upᵀ`, where `down` stacks every LoRA's `[rank, in]` down matrix and `up` every
/// `[out, rank]` up matrix times its `scale · alpha / rank`, so the product is
/// `Σ scale · (alpha / rank) · x · downᵢᵀ · upᵢᵀ` — the delta the merged path adds to the weight.
#[derive(Debug, Clone)]
pub struct LoraSide {
    /// `downᵀ`: `[in, Σ rank]`, contiguous.
    down_t: Tensor,
    /// `upᵀ`: `[Σ rank, out]`, contiguous.
    up_t: Tensor,
}

impl LoraSide {
    /// `x · downᵀ · upᵀ` in the side path's dtype, returned in f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(self.down_t.dtype())?
            .broadcast_matmul(&self.down_t)?
            .broadcast_matmul(&self.up_t)?
            .to_dtype(DType::F32)
    }
}

/// `candle_nn::linear` that takes the quantized weight when the backend has one. Backends that
/// answer `contains` for every name (the shape-recording and the inventing test backends) fail,
/// or answer with something other than raw blocks, when the marker is fetched; then the plain
/// weight is loaded, as from any backend without quantized tensors.
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Proj> {
    match quantized_weight(inp, out, &vb)? {
        Some(weight) => Ok(Proj::Quantized {
            weight,
            bias: Some(vb.get(out, "bias")?),
            lora: lora_side(inp, out, &vb)?,
        }),
        None => Ok(Proj::Plain(candle_nn::linear(inp, out, vb)?)),
    }
}

/// [`linear`] without a bias (`candle_nn::linear_no_bias`).
pub fn linear_no_bias(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Proj> {
    match quantized_weight(inp, out, &vb)? {
        Some(weight) => Ok(Proj::Quantized {
            weight,
            bias: None,
            lora: lora_side(inp, out, &vb)?,
        }),
        None => Ok(Proj::Plain(candle_nn::linear_no_bias(inp, out, vb)?)),
    }
}

/// The `[out, inp]` weight as a `QMatMul` when the backend holds it in a block type.
fn quantized_weight(
    inp: usize,
    out: usize,
    vb: &VarBuilder,
) -> candle_core::Result<Option<QMatMul>> {
    for (ggml, name) in BLOCK_TYPES {
        let marker = format!("weight#{name}");
        if !vb.contains_tensor(&marker) {
            continue;
        }
        let raw = match vb.get_unchecked_dtype(&marker, DType::U8) {
            Ok(t) if t.dtype() == DType::U8 && t.rank() == 1 => t.to_vec1::<u8>()?,
            _ => continue,
        };
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            ggml,
            &raw,
            vec![out, inp],
            vb.device(),
        )?;
        return Ok(Some(QMatMul::from_qtensor(q)?));
    }
    Ok(None)
}

/// The LoRA side path of the quantized `[out, inp]` weight, when the backend has one (it answers
/// [`crate::lora_quant::DOWN_MARKER`] and [`crate::lora_quant::UP_MARKER`]): in f32 on the CPU, in
/// the model dtype elsewhere (on CUDA, the compute dtype the rest of the model runs in).
fn lora_side(inp: usize, out: usize, vb: &VarBuilder) -> candle_core::Result<Option<LoraSide>> {
    use crate::lora_quant::{DOWN_MARKER, UP_MARKER};
    if !vb.contains_tensor(DOWN_MARKER) || !vb.contains_tensor(UP_MARKER) {
        return Ok(None);
    }
    let dtype = if vb.device().is_cpu() {
        DType::F32
    } else {
        vb.dtype()
    };
    let down = vb.get_unchecked_dtype(DOWN_MARKER, dtype)?;
    let up = vb.get_unchecked_dtype(UP_MARKER, dtype)?;
    match (down.dims(), up.dims()) {
        (&[r, i], &[o, r2]) if r == r2 && i == inp && o == out => Ok(Some(LoraSide {
            down_t: down.t()?.contiguous()?,
            up_t: up.t()?.contiguous()?,
        })),
        _ => candle_core::bail!(
            "LoRA side path of a [{out}, {inp}] weight has down {:?} and up {:?}",
            down.dims(),
            up.dims()
        ),
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Plain(l) => l.forward(x),
            Self::Quantized { weight, bias, lora } => {
                let x32 = x.to_dtype(DType::F32)?;
                let y = weight.forward(&x32)?;
                let y = match lora {
                    Some(side) => (y + side.forward(x)?)?,
                    None => y,
                };
                let y = y.to_dtype(x.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_only_block_weights_are_quantized() {
        assert_eq!(QuantFormat::parse("q4_k").unwrap(), QuantFormat::Q4K);
        assert!(matches!(
            QuantFormat::parse("q2_k"),
            Err(QuantError::UnknownFormat(_))
        ));
        let q4 = QuantFormat::Q4K;
        assert!(quantizable(
            "transformer_blocks.3.attn.to_q.weight",
            &[3072, 3072],
            q4
        ));
        assert!(quantizable(
            "transformer_blocks.3.img_mod.1.weight",
            &[18432, 3072],
            q4
        ));
        assert!(!quantizable(
            "transformer_blocks.3.attn.to_q.bias",
            &[3072],
            q4
        ));
        assert!(!quantizable(
            "transformer_blocks.3.attn.norm_q.weight",
            &[128],
            q4
        ));
        assert!(!quantizable("img_in.weight", &[3072, 64], q4));
        assert!(!quantizable(
            "transformer_blocks.0.attn.to_q.weight",
            &[32, 32],
            q4
        ));
        assert!(quantizable(
            "transformer_blocks.0.attn.to_q.weight",
            &[32, 32],
            QuantFormat::Q8_0
        ));
        assert_eq!(QuantFormat::Q4K.bytes_per_block(), (144, 256));
        assert_eq!(QuantFormat::Q8_0.bytes_per_block(), (34, 32));
    }
}
