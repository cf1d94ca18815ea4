//! Previews of an image while it is denoised: at a step the request names, the loop predicts
//! the clean latents from the current ones (flow matching: `x₀ = x_t − σ_t·v`), decodes that
//! prediction with the model's own VAE, and shrinks the picture to the protocol's preview size
//! ([`pixmarket_protocol::preview::preview_size`]) by averaging each block of pixels, then writes
//! it as a PNG. It is the model's real estimate of the finished picture at that step, not a
//! colour projection of the latents; it costs one VAE decode, at most
//! [`pixmarket_protocol::preview::MAX_PREVIEWS`] per job.

use pixmarket_protocol::Preview;
use pixmarket_protocol::preview::{MAX_PREVIEW_BYTES, preview_factor, preview_size};

use crate::error::EngineError;
use crate::image_io;

/// A preview made during a `generate` call, for the request at index `request` of the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPreview {
    pub request: usize,
    /// The request's own step (1-based, over the steps it runs) the preview shows.
    pub step: u32,
    pub preview: Preview,
}

/// Shrinks a `width × height` RGB picture (row-major, 3 bytes a pixel) to its preview size by
/// averaging each `f × f` block (`f` from [`preview_factor`]; rows and columns past the last
/// whole block are left out) and writes it as a PNG without text chunks. `None` when the PNG
/// would exceed [`MAX_PREVIEW_BYTES`], which a 128² RGB picture cannot.
pub fn preview_of(rgb: &[u8], width: u32, height: u32) -> Result<Option<Preview>, EngineError> {
    let (w, h) = (width as usize, height as usize);
    if rgb.len() != 3 * w * h {
        return Err(EngineError::InvalidRequest(format!(
            "a {width}x{height} picture has {} bytes of RGB, not {}",
            rgb.len(),
            3 * w * h
        )));
    }
    let f = preview_factor(width, height) as usize;
    let (pw, ph) = preview_size(width, height);
    let (pwu, phu) = (pw as usize, ph as usize);
    // Each output pixel averages the rows and columns of its block that exist (a side
    // shorter than the factor gives a one-pixel side averaging all of it).
    let (bw, bh) = (f.min(w), f.min(h));
    let mut out = Vec::with_capacity(3 * pwu * phu);
    for py in 0..phu {
        for px in 0..pwu {
            let mut sum = [0u32; 3];
            for y in py * bh..(py + 1) * bh {
                let row = &rgb[3 * (y * w + px * bw)..3 * (y * w + (px + 1) * bw)];
                for p in row.chunks_exact(3) {
                    for c in 0..3 {
                        sum[c] += u32::from(p[c]);
                    }
                }
            }
            let n = u32::try_from(bw * bh).unwrap_or(u32::MAX).max(1);
            for s in sum {
                // The rounded mean of bytes is a byte.
                out.push(u8::try_from((s + n / 2) / n).unwrap_or(u8::MAX));
            }
        }
    }
    let png = image_io::encode_png(&out, pw, ph, &[])?;
    if png.len() > MAX_PREVIEW_BYTES {
        return Ok(None);
    }
    Ok(Some(Preview {
        width: pw,
        height: ph,
        png,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_averages_blocks_and_has_the_protocol_size() {
        // 64×64: left half red, right half blue.
        let (w, h) = (64u32, 64u32);
        let mut rgb = Vec::new();
        for _y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(if x < 32 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let p = preview_of(&rgb, w, h).unwrap().unwrap();
        assert_eq!((p.width, p.height), (16, 16));
        p.validate(w, h).unwrap();
        let img = image::load_from_memory(&p.png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (16, 16));
        assert_eq!(img.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(15, 15).0, [0, 0, 255]);
    }

    #[test]
    fn incompressible_pictures_stay_under_the_byte_bound() {
        // Noise constant over each 4×4 block of a 512² picture: its preview is 128² of
        // noise, the worst case for PNG.
        let hash = |v: u32| {
            let mut s = v.wrapping_mul(2_654_435_761) ^ 0x9e37_79b9;
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s.to_le_bytes()[0]
        };
        let mut rgb = Vec::new();
        for y in 0..512u32 {
            for x in 0..512u32 {
                for c in 0..3u32 {
                    rgb.push(hash(((y / 4) * 128 + x / 4) * 3 + c));
                }
            }
        }
        let p = preview_of(&rgb, 512, 512).unwrap().unwrap();
        assert_eq!((p.width, p.height), (128, 128));
        assert!(
            p.png.len() > 40_000,
            "the test picture compressed: {}",
            p.png.len()
        );
        assert!(p.png.len() <= MAX_PREVIEW_BYTES, "{}", p.png.len());
    }
}
