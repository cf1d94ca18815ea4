//! Previews: small pictures of a job's current latents that a provider sends with its progress
//! events when the signed request asks for them ([`crate::JobRequest::previews`]). They are free
//! and unpaid, so they are bounded to be a thumbnail and never the image: at most
//! [`MAX_PREVIEWS`] per job, each a PNG of at most [`PREVIEW_MAX_SIDE`] pixels a side and at
//! most `1/PREVIEW_REDUCTION` of the image's side ([`preview_size`]), taken only before the
//! last step ([`preview_steps`]). Both sides compute the same steps and size, so a requester
//! refuses a preview that is larger or comes at another step.

use serde::{Deserialize, Serialize};

use crate::validate::ValidationError;

/// OpenAI's `partial_images` allows 0 to 3; each preview costs the provider one VAE decode it
/// is not paid for, so the bound also bounds that unpaid work.
pub const MAX_PREVIEWS: u8 = 3;
/// The longest side of a preview: 128 px shows the composition and colours, and 128² RGB
/// (48 KiB even incompressible) keeps a PNG inside [`MAX_PREVIEW_BYTES`].
pub const PREVIEW_MAX_SIDE: u32 = 128;
/// A preview's side is at most the image's side divided by this: 1/16 of the pixels at most
/// (a 64² image gives a 16² preview, 1024² gives 128²), so a preview never stands in for
/// the image the requester pays for.
pub const PREVIEW_REDUCTION: u32 = 4;
/// The PNG bytes of one preview: 128² RGB stored without compression is 49,152 bytes of pixels
/// plus the row filters, zlib and chunk overhead (under 50 KB); 56 KiB leaves room and keeps
/// the progress event carrying it under the event frame limit (64 KiB).
pub const MAX_PREVIEW_BYTES: usize = 56 * 1024;

/// One preview: a PNG of `width × height` 8-bit RGB pixels.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    pub width: u32,
    pub height: u32,
    pub png: Vec<u8>,
}

impl std::fmt::Debug for Preview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Preview({}x{}, {} bytes)",
            self.width,
            self.height,
            self.png.len()
        )
    }
}

const PNG_MAGIC: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

impl Preview {
    /// Checks the preview against the bounds for an image of `width × height`: the size
    /// [`preview_size`] gives, at most [`MAX_PREVIEW_BYTES`], and a PNG whose header states
    /// that size (the pixels themselves are not decoded here).
    pub fn validate(&self, width: u32, height: u32) -> Result<(), ValidationError> {
        let (w, h) = preview_size(width, height);
        if (self.width, self.height) != (w, h) {
            return Err(ValidationError::new(
                "preview",
                format!("{}x{}", self.width, self.height),
                format!("{w}x{h} for a {width}x{height} image"),
            ));
        }
        if self.png.is_empty() || self.png.len() > MAX_PREVIEW_BYTES {
            return Err(ValidationError::new(
                "preview",
                format!("{} bytes", self.png.len()),
                format!("1..={MAX_PREVIEW_BYTES} bytes"),
            ));
        }
        // The IHDR chunk follows the magic: length (4), "IHDR", width (4), height (4).
        let header = self
            .png
            .get(..24)
            .filter(|b| b.starts_with(PNG_MAGIC) && b.get(12..16) == Some(b"IHDR".as_slice()));
        let stated = header.and_then(|b| {
            let w = u32::from_be_bytes(b.get(16..20)?.try_into().ok()?);
            let h = u32::from_be_bytes(b.get(20..24)?.try_into().ok()?);
            Some((w, h))
        });
        if stated != Some((w, h)) {
            return Err(ValidationError::new(
                "preview",
                stated.map_or("not a PNG".to_owned(), |(a, b)| format!("a {a}x{b} PNG")),
                format!("a {w}x{h} PNG"),
            ));
        }
        Ok(())
    }
}

/// The size of a preview of a `width × height` image: each side divided by the same factor,
/// at least [`PREVIEW_REDUCTION`] and enough to bring the longer side to
/// [`PREVIEW_MAX_SIDE`], rounded down, at least 1.
pub fn preview_size(width: u32, height: u32) -> (u32, u32) {
    let factor = preview_factor(width, height);
    ((width / factor).max(1), (height / factor).max(1))
}

/// The factor [`preview_size`] divides each side by.
pub fn preview_factor(width: u32, height: u32) -> u32 {
    width
        .max(height)
        .div_ceil(PREVIEW_MAX_SIDE)
        .max(PREVIEW_REDUCTION)
}

/// The steps (1-based, over the `run` steps a job's image runs) after which a job asking for
/// `n` previews gets one: `⌈k·run/(n+1)⌉` for `k = 1..=n`, evenly spaced, never the last step
/// (whose prediction is the image itself), without repeats; fewer than `n` when the job runs
/// too few steps. `n` is capped at [`MAX_PREVIEWS`].
pub fn preview_steps(run: u32, n: u8) -> Vec<u32> {
    let n = u32::from(n.min(MAX_PREVIEWS));
    let mut steps: Vec<u32> = Vec::with_capacity(n as usize);
    for k in 1..=n {
        let s = (u64::from(k) * u64::from(run)).div_ceil(u64::from(n) + 1);
        let s = u32::try_from(s).unwrap_or(u32::MAX).max(1);
        if s < run && steps.last() != Some(&s) {
            steps.push(s);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_spread_and_never_the_last() {
        assert_eq!(preview_steps(50, 3), vec![13, 25, 38]);
        assert_eq!(preview_steps(4, 3), vec![1, 2, 3]);
        assert_eq!(preview_steps(2, 3), vec![1]);
        assert_eq!(preview_steps(1, 3), Vec::<u32>::new());
        assert_eq!(preview_steps(30, 0), Vec::<u32>::new());
        // More than the bound is the bound.
        assert_eq!(preview_steps(50, 200), preview_steps(50, 3));
    }

    #[test]
    fn sizes_are_a_sixteenth_of_the_pixels_at_most() {
        assert_eq!(preview_size(64, 64), (16, 16));
        assert_eq!(preview_size(1024, 1024), (128, 128));
        assert_eq!(preview_size(2048, 1024), (128, 64));
        assert_eq!(preview_size(4096, 16), (128, 1));
        for w in (16..=4096).step_by(16) {
            for h in [16, 64, 512, 1040, 4096] {
                let (pw, ph) = preview_size(w, h);
                assert!(pw <= PREVIEW_MAX_SIDE && ph <= PREVIEW_MAX_SIDE);
                assert!(pw * PREVIEW_REDUCTION <= w.max(PREVIEW_REDUCTION));
                assert!(ph * PREVIEW_REDUCTION <= h.max(PREVIEW_REDUCTION));
            }
        }
    }

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut b = PNG_MAGIC.to_vec();
        b.extend_from_slice(&13u32.to_be_bytes());
        b.extend_from_slice(b"IHDR");
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b
    }

    #[test]
    fn a_preview_larger_than_its_bound_is_refused() {
        let ok = Preview {
            width: 16,
            height: 16,
            png: png_header(16, 16),
        };
        assert!(ok.validate(64, 64).is_ok());
        // The full image passed off as a preview.
        let full = Preview {
            width: 64,
            height: 64,
            png: png_header(64, 64),
        };
        assert_eq!(full.validate(64, 64).unwrap_err().field, "preview");
        // A header that lies about the size it states.
        let lying = Preview {
            png: png_header(64, 64),
            ..ok.clone()
        };
        assert!(lying.validate(64, 64).is_err());
        let not_png = Preview {
            png: vec![0; 30],
            ..ok.clone()
        };
        assert!(not_png.validate(64, 64).is_err());
        let huge = Preview {
            png: [png_header(16, 16), vec![0; MAX_PREVIEW_BYTES]].concat(),
            ..ok
        };
        assert!(huge.validate(64, 64).is_err());
    }
}
