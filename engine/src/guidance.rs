//! True classifier-free guidance with the per-token norm rescale (spec §3.2).
//!
//! Owns `comb = uncond + s·(cond − uncond)`, then `comb · ‖cond‖ / ‖comb‖` with L2 norms over the
//! last dim (the packed channels of each token) and no epsilon, as the reference pipeline does.
//! Arithmetic runs in the inputs' dtype op by op like the reference; the norms are accumulated in
//! f32 and rounded once.

use candle_core::{D, DType, Result, Tensor, bail};

/// L2 norm over the last dim, kept as a size-1 dim, accumulated in f32.
fn token_norm(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .to_dtype(x.dtype())
}

/// Guided velocity from the conditional and unconditional predictions (same shape and dtype).
pub fn true_cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    if cond.dims() != uncond.dims() || cond.dtype() != uncond.dtype() {
        bail!(
            "cond {:?} {:?} and uncond {:?} {:?} must agree",
            cond.dims(),
            cond.dtype(),
            uncond.dims(),
            uncond.dtype()
        );
    }
    let dtype = cond.dtype();
    let diff = (cond - uncond)?;
    // The scalar product is taken in f32 and rounded once, as PyTorch does for a Python float.
    let scaled = (diff.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)?;
    let comb = (uncond + scaled)?;
    let ratio = (token_norm(cond)? / token_norm(&comb)?)?;
    comb.broadcast_mul(&ratio)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rescaled_prediction_keeps_the_conditional_norm() {
        let dev = Device::Cpu;
        let cond = Tensor::new(&[[[3f32, 4.0]]], &dev).unwrap();
        let uncond = Tensor::new(&[[[1f32, 0.0]]], &dev).unwrap();
        let out = true_cfg(&cond, &uncond, 4.0).unwrap();
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // comb = (9, 16), norm 5 / sqrt(337)
        let k = 5.0 / 337f32.sqrt();
        assert!((v[0] - 9.0 * k).abs() < 1e-6 && (v[1] - 16.0 * k).abs() < 1e-6);
    }
}
