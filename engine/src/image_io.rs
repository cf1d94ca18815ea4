//! Image files in and out: init images and masks (PNG or JPEG bytes) as the reference pipelines
//! preprocess them, and PNG output carrying the generation parameters as text chunks.
//!
//! Init image (diffusers `VaeImageProcessor`): RGB, resized to the target size with Lanczos when
//! it differs (the reference uses PIL's Lanczos; `image`'s Lanczos3 is close but not bit-equal,
//! so parity holds for images already at the target size); `vae::rgb8_to_image` scales it.
//!
//! Mask (the inpaint pipeline's mask processor): grayscale with PIL's integer luma
//! `(19595 R + 38470 G + 7471 B + 2^15) >> 16`, resized like the image, binarised at
//! `v/255 ≥ 0.5` (white = repaint), then shrunk to the latent grid with PyTorch's `nearest`
//! rule `src = ⌊dst · in/out⌋` in f32.
//!
//! Output: 8-bit RGB PNG; each parameter is a `tEXt` chunk when its value is Latin-1-safe ASCII,
//! else an `iTXt` chunk (UTF-8), so non-English prompts survive.

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, RgbImage};

use crate::error::EngineError;

fn decode(bytes: &[u8], what: &'static str) -> Result<DynamicImage, EngineError> {
    image::load_from_memory(bytes).map_err(|source| EngineError::BadImage { what, source })
}

/// Decodes an init image to row-major RGB bytes at `width × height` (resized when it differs);
/// [`crate::vae::rgb8_to_image`] turns them into the encoder's input.
pub fn init_image_rgb8(bytes: &[u8], width: usize, height: usize) -> Result<Vec<u8>, EngineError> {
    let img = decode(bytes, "init image")?.to_rgb8();
    Ok(resize_rgb(img, width, height).into_raw())
}

fn resize_rgb(img: RgbImage, width: usize, height: usize) -> RgbImage {
    if img.dimensions() == (width as u32, height as u32) {
        img
    } else {
        image::imageops::resize(&img, width as u32, height as u32, FilterType::Lanczos3)
    }
}

/// Re-encodes an image (PNG or JPEG) as a PNG of `width × height`, stretched as the pipelines
/// would stretch it: Lanczos for an init image, nearest-neighbour for a mask (`sharp`), so its
/// edges stay black and white. Lets a caller send exactly the size it asks for.
pub fn resize_png(
    bytes: &[u8],
    width: u32,
    height: u32,
    what: &'static str,
    sharp: bool,
) -> Result<Vec<u8>, EngineError> {
    let img = decode(bytes, what)?.to_rgb8();
    let filter = if sharp {
        FilterType::Nearest
    } else {
        FilterType::Lanczos3
    };
    let img = if img.dimensions() == (width, height) {
        img
    } else {
        image::imageops::resize(&img, width, height, filter)
    };
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|source| EngineError::BadImage { what, source })?;
    Ok(out)
}

/// PIL's `convert("L")` for one RGB pixel.
fn pil_luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Decodes a mask (white = repaint) to the latent grid `[lat_h, lat_w]` of 0.0 / 1.0 values,
/// for an image of `width × height` pixels.
pub fn mask_latent_data(
    bytes: &[u8],
    width: usize,
    height: usize,
    lat_w: usize,
    lat_h: usize,
) -> Result<Vec<f32>, EngineError> {
    let img = decode(bytes, "mask")?;
    let gray = match img {
        DynamicImage::ImageLuma8(g) => g,
        other => {
            let rgb = other.to_rgb8();
            image::GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let p = rgb.get_pixel(x, y);
                image::Luma([pil_luma(p[0], p[1], p[2])])
            })
        }
    };
    let gray = if gray.dimensions() == (width as u32, height as u32) {
        gray
    } else {
        image::imageops::resize(&gray, width as u32, height as u32, FilterType::Lanczos3)
    };
    let (sy, sx) = (height as f32 / lat_h as f32, width as f32 / lat_w as f32);
    let mut out = Vec::with_capacity(lat_h * lat_w);
    for i in 0..lat_h {
        let y = ((i as f32 * sy).floor() as usize).min(height - 1);
        for j in 0..lat_w {
            let x = ((j as f32 * sx).floor() as usize).min(width - 1);
            let v = f32::from(gray.get_pixel(x as u32, y as u32)[0]) / 255.0;
            out.push(if v >= 0.5 { 1.0 } else { 0.0 });
        }
    }
    Ok(out)
}

/// Width and height of an encoded image, without decoding the pixels fully.
pub fn image_size(bytes: &[u8], what: &'static str) -> Result<(u32, u32), EngineError> {
    Ok(decode(bytes, what)?.dimensions())
}

/// Outpainting input: `init` (PNG or JPEG) on a larger canvas with `pad = [left, top, right,
/// bottom]` pixels of mid-grey around it, and the mask that repaints exactly the padding.
/// Returns `(canvas_png, mask_png, width, height)`; run it as an inpaint request.
pub fn outpaint_canvas(
    init: &[u8],
    pad: [u32; 4],
) -> Result<(Vec<u8>, Vec<u8>, u32, u32), EngineError> {
    let img = decode(init, "init image")?.to_rgb8();
    let [left, top, right, bottom] = pad;
    let (w, h) = img.dimensions();
    let side = |a: u32, b: u32, c: u32| a.checked_add(b)?.checked_add(c);
    let (cw, ch) = match (side(w, left, right), side(h, top, bottom)) {
        (Some(cw), Some(ch))
            if cw <= crate::pipeline::MAX_SIDE && ch <= crate::pipeline::MAX_SIDE =>
        {
            (cw, ch)
        }
        _ => {
            return Err(EngineError::InvalidRequest(format!(
                "outpainting a {w}×{h} image by {left},{top},{right},{bottom} makes a canvas \
                 larger than {0}×{0}",
                crate::pipeline::MAX_SIDE
            )));
        }
    };
    let mut canvas = RgbImage::from_pixel(cw, ch, image::Rgb([128, 128, 128]));
    image::imageops::replace(&mut canvas, &img, i64::from(left), i64::from(top));
    let mask = image::GrayImage::from_fn(cw, ch, |x, y| {
        let inside = x >= left && x < left + w && y >= top && y < top + h;
        image::Luma([if inside { 0 } else { 255 }])
    });
    let png = |img: DynamicImage| -> Result<Vec<u8>, EngineError> {
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|source| EngineError::BadImage {
            what: "outpaint canvas",
            source,
        })?;
        Ok(bytes)
    };
    Ok((
        png(DynamicImage::ImageRgb8(canvas))?,
        png(DynamicImage::ImageLuma8(mask))?,
        cw,
        ch,
    ))
}

/// Encodes 8-bit RGB pixels (row-major, `3·width·height` bytes) as a PNG with one text chunk per
/// `(key, value)`. Keys must be 1–79 Latin-1 characters (PNG's rule).
pub fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(&str, String)],
) -> Result<Vec<u8>, EngineError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            let plain = value
                .chars()
                .all(|c| c.is_ascii() && (c == '\n' || !c.is_ascii_control()));
            if plain {
                enc.add_text_chunk((*key).to_string(), value.clone())?;
            } else {
                enc.add_itxt_chunk((*key).to_string(), value.clone())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

/// The text chunks (`tEXt` and `iTXt`) of a PNG, in file order; for tests and tools.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>, png::DecodingError> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(img: DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        bytes
    }

    #[test]
    fn text_chunks_round_trip_including_unicode() {
        let rgb = vec![7u8; 2 * 3 * 3];
        let text = [
            ("prompt", "a fox, 東京".to_string()),
            ("seed", "42".to_string()),
        ];
        let png = encode_png(&rgb, 2, 3, &text).unwrap();
        let chunks = png_text_chunks(&png).unwrap();
        assert!(chunks.contains(&("seed".into(), "42".into())));
        assert!(chunks.contains(&("prompt".into(), "a fox, 東京".into())));
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.into_raw(), rgb);
    }

    #[test]
    fn mask_binarises_at_half_and_samples_nearest() {
        // 16×8 mask: left half 128 (repaint), right half 127 (keep).
        let mask =
            image::GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 128 } else { 127 }]));
        let bytes = png_of(DynamicImage::ImageLuma8(mask));
        let m = mask_latent_data(&bytes, 16, 8, 2, 1).unwrap();
        assert_eq!(m, vec![1.0, 0.0]);
        assert!(mask_latent_data(b"not an image", 16, 8, 2, 1).is_err());
    }

    #[test]
    fn outpaint_canvas_masks_exactly_the_padding() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30]));
        let (canvas, mask, w, h) =
            outpaint_canvas(&png_of(DynamicImage::ImageRgb8(img)), [2, 1, 0, 3]).unwrap();
        assert_eq!((w, h), (6, 6));
        let canvas = image::load_from_memory(&canvas).unwrap().to_rgb8();
        assert_eq!(canvas.get_pixel(2, 1).0, [10, 20, 30]);
        assert_eq!(canvas.get_pixel(0, 0).0, [128, 128, 128]);
        let m = mask_latent_data(&mask, 6, 6, 6, 6).unwrap();
        let repaint: usize = m.iter().filter(|&&v| v == 1.0).count();
        assert_eq!(repaint, 36 - 8);
        assert_eq!(m[6 + 2], 0.0);
    }

    #[test]
    fn init_image_is_resized_to_the_request() {
        let img = RgbImage::from_fn(4, 2, |x, _| image::Rgb([x as u8 * 60, 0, 0]));
        let bytes = png_of(DynamicImage::ImageRgb8(img.clone()));
        assert_eq!(init_image_rgb8(&bytes, 4, 2).unwrap(), img.into_raw());
        assert_eq!(init_image_rgb8(&bytes, 8, 4).unwrap().len(), 8 * 4 * 3);
    }
}
