//! 2×2 packing of latents into transformer tokens and back (spec §1.6).
//!
//! Owns the token layout: token `(r, c)` of the `h × w` patch grid (row-major) holds latent
//! pixels `(2r + dy, 2c + dx)` of every channel, at channel index `ch·4 + dy·2 + dx`. Latents
//! here are 4-D `[B, C, H, W]`; the VAE's single-frame axis is the VAE's business.

use candle_core::{Result, Tensor, bail};

/// Side of a packed patch in latent pixels.
pub const PATCH: usize = 2;
/// Pixels per latent pixel along each side (the VAE's spatial factor).
pub const VAE_SCALE: usize = 8;

/// The patch grid `(h, w)` for an image of `height × width` pixels: `(H/16, W/16)`, rounding
/// down as the reference pipeline does (it warns and truncates sizes not a multiple of 16).
pub fn patch_grid(height: usize, width: usize) -> (usize, usize) {
    (height / (VAE_SCALE * PATCH), width / (VAE_SCALE * PATCH))
}

/// `[B, C, H, W]` → `[B, (H/2)·(W/2), C·4]`.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % PATCH != 0 || w % PATCH != 0 {
        bail!("latent size {h}×{w} must be even to pack 2×2 patches");
    }
    let (gh, gw) = (h / PATCH, w / PATCH);
    latents
        // [B, C, H, W] -> [B, C, gh, 2, gw, 2]
        .reshape((b, c, gh, PATCH, gw, PATCH))?
        // -> [B, gh, gw, C, 2, 2]
        .permute((0, 2, 4, 1, 3, 5))?
        // -> [B, gh·gw, C·4]
        .reshape((b, gh * gw, c * PATCH * PATCH))
}

/// `[B, h·w, C·4]` → `[B, C, 2h, 2w]` for the patch grid `grid = (h, w)`.
pub fn unpack(tokens: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (b, s, cp) = tokens.dims3()?;
    let (gh, gw) = grid;
    if gh * gw != s || cp % (PATCH * PATCH) != 0 {
        bail!(
            "cannot unpack {:?} onto a {gh}×{gw} grid of 2×2 patches",
            tokens.dims()
        );
    }
    let c = cp / (PATCH * PATCH);
    tokens
        // [B, gh·gw, C·4] -> [B, gh, gw, C, 2, 2]
        .reshape((b, gh, gw, c, PATCH, PATCH))?
        // -> [B, C, gh, 2, gw, 2]
        .permute((0, 3, 1, 4, 2, 5))?
        // -> [B, C, 2gh, 2gw]
        .reshape((b, c, gh * PATCH, gw * PATCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn pack_unpack_round_trip_and_channel_order() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), [2, 6, 12]);
        // Token 0, channel 1·4 + 1·2 + 0 = latent (ch 1, y 1, x 0).
        let v = p
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(6)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(v, (24 + 6) as f32);
        let back = unpack(&p, (2, 3)).unwrap();
        let diff = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>();
        assert_eq!(diff.unwrap(), 0.0);
        assert!(pack(&Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap()).is_err());
        assert_eq!(patch_grid(1328, 1328), (83, 83));
    }
}
