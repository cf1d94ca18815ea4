//! Tiled VAE decode: the decoder's full-resolution levels run one tile at a time, so a decode's
//! peak memory is bounded by the tile instead of the image.
//!
//! Data flow: latents → [`AutoencoderKLQwenImage::decode_head`] once over the whole frame (latent
//! resolution; the mid block's attention sees every position, as untiled) → for each tile of
//! that output, with [`VaeTiling::overlap`] latents shared with each neighbour, the decoder's
//! tail → its pixels, weighted, summed into the image → divided by nothing (the weights of each
//! pixel sum to one) → clamped to [-1, 1].
//!
//! Why it equals the untiled decode: the tail is local, and a pixel depends only on the tail's
//! input within [`receptive_margin`] latents of it. A tile's pixels get a weight of zero within
//! that margin of an inner edge (where the tile's zero padding differs from the real
//! neighbours), then rise linearly to one across the rest of the overlap, so every pixel is a
//! weighted mean of values that are each the untiled value; they differ from it only by float
//! rounding of the sums. `tests/vae_tiling.rs` checks both the equality and the memory bound.

use candle_core::{DType, Result, Tensor, bail};

use crate::vae::{AutoencoderKLQwenImage, VaeConfig};

/// Latents of linear blending on top of the two margins in an overlap: the blend hides no
/// error (both sides are exact there), so a short ramp is enough; 4 latents is 32 pixels.
pub const BLEND_LATENTS: usize = 4;

/// How a decode is tiled, in latent cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    /// A tile's side (the last tile of a row or column is shifted back to end at the edge).
    pub tile: usize,
    /// Latents each tile shares with its neighbour; at least `2 · margin + 1`.
    pub overlap: usize,
}

impl VaeTiling {
    /// Tiles of `tile` latents with the least overlap that keeps the decode exact for `cfg`.
    pub fn exact(cfg: &VaeConfig, tile: usize) -> Self {
        Self {
            tile,
            overlap: min_overlap(cfg),
        }
    }
}

/// Pixels of the decoder's tail that a change of its input at one position can reach, in
/// latent cells, rounded up plus one cell for the floor of nearest upsampling: at level `i`
/// (scale `2^i` of the latents) each of the `num_res_blocks + 1` residual blocks has two 3×3
/// convs, every level but the last ends with an upsampler's 3×3 conv at twice its scale, and
/// `conv_out` is one more 3×3 conv at full scale. For Qwen-Image (4 levels, 2 res blocks) that is
/// 98 pixels, 12.25 latents: 14.
pub fn receptive_margin(cfg: &VaeConfig) -> usize {
    let levels = cfg.dim_mult.len();
    let full = 1usize << (levels - 1); // output pixels per latent
    let per_level = 2 * (cfg.num_res_blocks + 1);
    let mut pixels = 1; // conv_out
    for i in 0..levels {
        pixels += per_level * (full >> i);
        if i + 1 < levels {
            pixels += (full >> (i + 1)).max(1);
        }
    }
    pixels.div_ceil(full) + 1
}

/// The least overlap for which [`decode_tiled`] is exact: both margins and the blend.
pub fn min_overlap(cfg: &VaeConfig) -> usize {
    2 * receptive_margin(cfg) + BLEND_LATENTS
}

/// Start of each tile along an axis of `n` latents.
fn starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut out: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + tile < n)
        .collect();
    out.push(n - tile);
    out
}

/// Per tile along one axis: its start and length in latents, and its pixel weights, normalised
/// so each pixel's weights over the tiles sum to one.
fn axis_weights(n: usize, t: VaeTiling, margin: usize, f: usize) -> Vec<(usize, usize, Vec<f32>)> {
    let s = starts(n, t.tile, t.overlap);
    let ramp = ((t.overlap - 2 * margin) * f) as f32;
    let rise = |d: f32| ((d - (margin * f) as f32) / ramp).clamp(0.0, 1.0);
    let mut tiles: Vec<(usize, usize, Vec<f32>)> = s
        .iter()
        .enumerate()
        .map(|(i, &start)| {
            let len = t.tile.min(n);
            let px = len * f;
            let w = (0..px)
                .map(|u| {
                    let left = if i > 0 { rise(u as f32 + 0.5) } else { 1.0 };
                    let right = if i + 1 < s.len() {
                        rise(px as f32 - u as f32 - 0.5)
                    } else {
                        1.0
                    };
                    left * right
                })
                .collect();
            (start, len, w)
        })
        .collect();
    let mut sum = vec![0f32; n * f];
    for (start, _, w) in &tiles {
        for (u, x) in w.iter().enumerate() {
            sum[start * f + u] += x;
        }
    }
    for (start, _, w) in &mut tiles {
        for (u, x) in w.iter_mut().enumerate() {
            let total = sum[*start * f + u];
            *x = if total > 0.0 { *x / total } else { 0.0 };
        }
    }
    tiles
}

/// Decodes normalised latents `[B, z, h, w]` to `[B, 3, 8h, 8w]` in [-1, 1] as
/// [`AutoencoderKLQwenImage::decode`] does, one tile of the full-resolution levels at a time.
pub fn decode_tiled(
    vae: &AutoencoderKLQwenImage,
    latents: &Tensor,
    t: VaeTiling,
) -> Result<Tensor> {
    let cfg = vae.config();
    if t.overlap < min_overlap(cfg) || t.tile <= t.overlap {
        bail!(
            "vae tiling: tile {} with overlap {} latents; the overlap must be at least {} and \
             below the tile",
            t.tile,
            t.overlap,
            min_overlap(cfg)
        )
    }
    decode_tiles(vae, &vae.decode_head(latents)?, t)
}

/// The tiled part of [`decode_tiled`]: the decoder's tail over the head's output `x`
/// (`[B, C, h, w]`, from [`AutoencoderKLQwenImage::decode_head`]) one tile at a time, blended,
/// clamped to [-1, 1].
pub fn decode_tiles(vae: &AutoencoderKLQwenImage, x: &Tensor, t: VaeTiling) -> Result<Tensor> {
    let cfg = vae.config();
    let margin = receptive_margin(cfg);
    if t.overlap < min_overlap(cfg) || t.tile <= t.overlap {
        bail!(
            "vae tiling: tile {} with overlap {} latents; the overlap must be at least {} and \
             below the tile",
            t.tile,
            t.overlap,
            min_overlap(cfg)
        )
    }
    let (b, _, h, w) = x.dims4()?;
    let f = cfg.spatial_compression();
    let rows = axis_weights(h, t, margin, f);
    let cols = axis_weights(w, t, margin, f);
    let device = x.device();
    let mut image = Tensor::zeros((b, cfg.input_channels, h * f, w * f), DType::F32, device)?;
    for (y0, th, wy) in &rows {
        let wy = Tensor::from_slice(wy, (wy.len(), 1), device)?;
        for (x0, tw, wx) in &cols {
            let wx = Tensor::from_slice(wx, (1, wx.len()), device)?;
            let weight = wy.broadcast_mul(&wx)?.unsqueeze(0)?.unsqueeze(0)?; // [1, 1, th·f, tw·f]
            let tile = x.narrow(2, *y0, *th)?.narrow(3, *x0, *tw)?.contiguous()?;
            let pixels = vae.decode_tail(&tile)?.to_dtype(DType::F32)?;
            let (ys, xs) = (y0 * f..(y0 + th) * f, x0 * f..(x0 + tw) * f);
            let region = image
                .narrow(2, ys.start, ys.len())?
                .narrow(3, xs.start, xs.len())?;
            let sum = (region + pixels.broadcast_mul(&weight)?)?;
            image = image.slice_assign(&[0..b, 0..cfg.input_channels, ys, xs], &sum)?;
        }
    }
    image.to_dtype(vae.dtype())?.clamp(-1.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_of_the_qwen_image_vae() {
        // 6·(8 + 4 + 2 + 1) + (4 + 2 + 1) + 1 = 98 pixels → 12.25 latents → 13, plus one.
        assert_eq!(receptive_margin(&VaeConfig::default()), 14);
        assert_eq!(min_overlap(&VaeConfig::default()), 32);
    }

    #[test]
    fn tiles_cover_the_axis_and_weights_sum_to_one() {
        for (n, tile, overlap) in [(128, 64, 32), (166, 64, 32), (64, 64, 32), (40, 64, 32)] {
            let t = VaeTiling { tile, overlap };
            let tiles = axis_weights(n, t, 14, 8);
            assert_eq!(tiles.last().map(|(s, l, _)| s + l), Some(n));
            let mut sum = vec![0f32; n * 8];
            for (s, _, w) in &tiles {
                for (u, x) in w.iter().enumerate() {
                    sum[s * 8 + u] += x;
                }
            }
            assert!(sum.iter().all(|x| (x - 1.0).abs() < 1e-6), "{n} {tile}");
            // No weight within the margin of an inner edge.
            for (i, (_, _, w)) in tiles.iter().enumerate() {
                if i > 0 {
                    assert!(w[..14 * 8].iter().all(|&x| x == 0.0));
                }
            }
        }
    }
}
