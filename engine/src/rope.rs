//! Qwen-Image's 3-axis rotary position embedding ("MSRoPE", spec §1.4).
//!
//! Owns the cos/sin tables for the image and text tokens, computed in f32 on the host exactly as
//! the reference forms its angles (`pos · 1/θ^(2k/d)` in f32), and their application to q/k in
//! the interleaved-pair convention, also in f32.
//!
//! Positions: the head dim is split into three axes (frame, height, width) of `axes[a]` dims,
//! i.e. `axes[a]/2` frequencies each. Image token (r, c) of an h×w grid has frame 0, height
//! `r − ⌈h/2⌉`, width `c − ⌈w/2⌉` (centred). Text token j sits at `max(⌊h/2⌋, ⌊w/2⌋) + j` on all
//! three axes. The reference precomputes tables for positions −4096..4095 only; positions outside
//! that range are an error here rather than a silently different table.

use candle_core::{DType, Device, Result, Tensor, bail};

/// RoPE base frequency, fixed in the reference (`QwenEmbedRope(theta=10000)`).
pub const ROPE_THETA: f32 = 10_000.0;

/// Largest |position| + 1 the reference's precomputed table holds (`torch.arange(4096)`).
pub const MAX_POSITION: i64 = 4096;

/// cos/sin tables, each `[tokens, head_dim/2]` in f32 on the model's device.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Image tokens, row-major over the patch grid.
    pub img_cos: Tensor,
    /// Image tokens.
    pub img_sin: Tensor,
    /// Text tokens.
    pub txt_cos: Tensor,
    /// Text tokens.
    pub txt_sin: Tensor,
}

/// Inverse frequencies of one axis of `dim` dims, in f32 as the reference computes them.
fn axis_inv_freqs(dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|k| 1.0f32 / ROPE_THETA.powf((2 * k) as f32 / dim as f32))
        .collect()
}

fn check_position(p: i64) -> Result<()> {
    if !(-MAX_POSITION..MAX_POSITION).contains(&p) {
        bail!("RoPE position {p} is outside the reference's table (−4096..4095)");
    }
    Ok(())
}

/// Fills one row of cos/sin for per-axis positions `pos` (frame, height, width).
fn push_row(
    axes_inv: &[Vec<f32>; 3],
    pos: [i64; 3],
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) -> Result<()> {
    for (inv, &p) in axes_inv.iter().zip(pos.iter()) {
        check_position(p)?;
        for &f in inv {
            // f32 product, as `torch.outer(index, inv_freq)` with a float32 result.
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok(())
}

impl RopeTables {
    /// Tables for an `img_hw = (h, w)` patch grid and `txt_len` text tokens.
    pub fn new(
        axes: [usize; 3],
        img_hw: (usize, usize),
        txt_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if axes.iter().any(|d| d % 2 != 0) {
            bail!("RoPE axis dims {axes:?} must be even");
        }
        let (h, w) = img_hw;
        if h == 0 || w == 0 {
            bail!("empty image grid {h}×{w}");
        }
        let half: usize = axes.iter().sum::<usize>() / 2;
        let inv = [
            axis_inv_freqs(axes[0]),
            axis_inv_freqs(axes[1]),
            axis_inv_freqs(axes[2]),
        ];
        let to_i64 = |n: usize| {
            i64::try_from(n)
                .map_err(|_| candle_core::Error::msg(format!("RoPE size {n} too large")))
        };
        let (h_i, w_i) = (to_i64(h)?, to_i64(w)?);
        // ceil(n/2) tokens get negative positions, floor(n/2) non-negative ones.
        let (h0, w0) = ((h_i + 1) / 2, (w_i + 1) / 2);
        let (mut ic, mut is) = (
            Vec::with_capacity(h * w * half),
            Vec::with_capacity(h * w * half),
        );
        for r in 0..h_i {
            for c in 0..w_i {
                push_row(&inv, [0, r - h0, c - w0], &mut ic, &mut is)?;
            }
        }
        let start = (h_i / 2).max(w_i / 2);
        let (mut tc, mut ts) = (
            Vec::with_capacity(txt_len * half),
            Vec::with_capacity(txt_len * half),
        );
        for j in 0..to_i64(txt_len)? {
            let p = start + j;
            push_row(&inv, [p, p, p], &mut tc, &mut ts)?;
        }
        Ok(Self {
            img_cos: Tensor::from_vec(ic, (h * w, half), device)?,
            img_sin: Tensor::from_vec(is, (h * w, half), device)?,
            txt_cos: Tensor::from_vec(tc, (txt_len, half), device)?,
            txt_sin: Tensor::from_vec(ts, (txt_len, half), device)?,
        })
    }
}

/// Rotates adjacent pairs `(x[2k], x[2k+1])` of `x: [B, H, S, D]` by the angles in `cos`/`sin`
/// (`[S, D/2]`, f32). Computed in f32 and cast back to `x`'s dtype, as the reference does.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    // rope_i needs a contiguous [B, H, S, D] input.
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    crate::ops::rope_i(&x32, cos, sin)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_starts_after_the_half_extent_and_frame_axis_is_identity() {
        let t = RopeTables::new([2, 2, 2], (3, 4), 2, &Device::Cpu).unwrap();
        // Frequencies per axis: 1 (k = 0 → inv 1). Columns: frame, height, width.
        let txt = t.txt_sin.to_vec2::<f32>().unwrap();
        assert!(
            (txt[0][0] - 2f32.sin()).abs() < 1e-7,
            "text starts at max(1, 2) = 2"
        );
        let img = t.img_cos.to_vec2::<f32>().unwrap();
        assert!(img.iter().all(|row| row[0] == 1.0));
        // First image token: height −2, width −2.
        assert!((img[0][1] - (-2f32).cos()).abs() < 1e-7);
    }

    #[test]
    fn positions_beyond_the_reference_table_are_rejected() {
        assert!(RopeTables::new([2, 2, 2], (2, 2), 4096, &Device::Cpu).is_err());
    }
}
