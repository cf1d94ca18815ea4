//! LoRAs on a quantized transformer, applied beside the quantized matmul.
//!
//! Owns [`LoraGgufWeights`], the weights backend over a GGUF file and a [`LoraSet`]. A quantized
//! weight cannot take a merged delta without dequantizing it (and then it is no longer quantized),
//! so each adapted quantized linear keeps its `QMatMul` and adds, in full precision,
//! `Σ scale · (alpha / rank) · x · downᵀ · upᵀ` (see [`crate::quant::LoraSide`]): the same delta
//! the merged path adds to `W`, applied to `x` instead. Weights the file holds in full precision
//! (the top-level embeddings and output layers, biases) get the delta merged as
//! [`crate::lora::MergedWeights`] does.
//!
//! The side path's cost: `Σ rank · (in + out)` parameters per adapted linear, kept in f32 on the
//! CPU and in the model dtype on other devices, and two thin matmuls per forward of that linear.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::Init;
use candle_nn::var_builder::SimpleBackend;

use crate::lora::LoraSet;
use crate::quant::GgufWeights;

/// Name suffix (after the module path) a layer asks for the stacked down matrices.
pub const DOWN_MARKER: &str = "weight#lora_down";
/// Name suffix a layer asks for the stacked, scaled up matrices.
pub const UP_MARKER: &str = "weight#lora_up";

/// A GGUF checkpoint with LoRAs: beside the matmul for quantized weights, merged for the rest.
#[derive(Debug)]
pub struct LoraGgufWeights {
    base: GgufWeights,
    loras: LoraSet,
}

/// Which half of the stacked adapters a marker asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Down,
    Up,
}

impl LoraGgufWeights {
    /// The file `base` with `loras`.
    pub fn new(base: GgufWeights, loras: LoraSet) -> Self {
        Self { base, loras }
    }

    /// `(weight name, half)` for a `<module>.weight#lora_down|up` name.
    fn split_marker(name: &str) -> Option<(String, Half)> {
        for (marker, half) in [(DOWN_MARKER, Half::Down), (UP_MARKER, Half::Up)] {
            if let Some(module) = name.strip_suffix(marker) {
                return Some((format!("{module}weight"), half));
            }
        }
        None
    }

    /// Whether the side path serves weight `weight`: a LoRA adapts it and the file holds it in
    /// a block type (so the layer runs it through `QMatMul` and never asks for it merged).
    fn side_serves(&self, weight: &str) -> bool {
        self.loras.adapts(weight) && self.base.stored_block_type(weight).is_some()
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some((weight, half)) = Self::split_marker(name) {
            let Some((down, up)) = self.loras.stacked(&weight)? else {
                candle_core::bail!("no LoRA adapts {weight}")
            };
            let t = match half {
                Half::Down => down,
                Half::Up => up,
            };
            return t.to_dtype(dtype)?.to_device(dev);
        }
        if name.contains('#') {
            return self.base.get_unchecked(name, dtype, dev);
        }
        match self.loras.delta(name)? {
            None => self.base.get_unchecked(name, dtype, dev),
            Some(delta) => {
                let w = self.base.get_unchecked(name, DType::F32, &Device::Cpu)?;
                (w + delta)?.to_dtype(dtype)?.to_device(dev)
            }
        }
    }
}

impl SimpleBackend for LoraGgufWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        crate::quant::expect_shape(self.load(name, dtype, dev)?, &s, name, self.base.path())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match Self::split_marker(name) {
            Some((weight, _)) => self.side_serves(&weight),
            None => self.base.contains_tensor(name),
        }
    }
}
