//! Fused kernels with a differentiable twin. candle's fused softmax and rotary kernels have no
//! backward pass; when an input tracks gradients (training the drawn tiny model, [`crate::train`])
//! the same math runs as plain tensor ops, which candle can differentiate. Inference (no
//! gradients tracked) keeps the fused kernels, so its numbers are unchanged.

use candle_core::{D, Result, Tensor};

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Interleaved rotary embedding of a contiguous `[B, H, S, D]` input with `cos`/`sin` `[S, D/2]`.
pub(crate) fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::rotary_emb::rope_i_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope_i(x, cos, sin)
    }
}
