//! How well a drawn model's VAE alone reproduces held-out scenes (encode → posterior mean →
//! decode), by the adherence measure and the mean absolute pixel error:
//! `cargo run -p pixmarket-engine --example vae_check -- DIR/vae [PNG_DIR]`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::drawn::DRAWN_SIDE;
use pixmarket_engine::scenes::{check_adherence, held_out_set};
use pixmarket_engine::vae::{AutoencoderKLQwenImage, image_to_rgb8, rgb8_to_image};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .map_or("engine/assets/tiny-drawn/vae", String::as_str),
    );
    let vae = AutoencoderKLQwenImage::load(&dir, DType::F32, &Device::Cpu)?;
    let side: u32 = std::env::var("SIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DRAWN_SIDE);
    let s = side as usize;
    let scenes = held_out_set(7, 50);
    let imgs = scenes
        .iter()
        .map(|sc| rgb8_to_image(&sc.render(side), s, s, &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::cat(&imgs, 0)?;
    // NOISE=k adds k·(latent std) of Gaussian noise to every latent before decoding: how
    // forgiving the decoder is of a transformer's small errors.
    let k: f64 = std::env::var("NOISE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let mean = vae.encode(&x)?.mean;
    let z = if k > 0.0 {
        let n = Tensor::from_vec(
            pixmarket_engine::noise::gaussian(5, mean.elem_count()),
            mean.shape(),
            &Device::Cpu,
        )?;
        let z = vae.normalize_latents(&mean)?;
        let noisy = (z + (n * k)?)?;
        vae.denormalize_latents(&noisy)?
    } else {
        mean
    };
    let rec = image_to_rgb8(&vae.decode_raw(&z)?)?;
    let (mut ok, mut err) = (0, 0f64);
    for (k, (sc, r)) in scenes.iter().zip(&rec).enumerate() {
        ok += usize::from(check_adherence(sc, r, side).ok());
        let orig = sc.render(side);
        err += orig
            .iter()
            .zip(r)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / orig.len() as f64;
        if let Some(d) = args.get(1) {
            std::fs::create_dir_all(d)?;
            let both: Vec<u8> = (0..s)
                .flat_map(|y| {
                    let o = &orig[3 * s * y..3 * s * (y + 1)];
                    let rr = &r[3 * s * y..3 * s * (y + 1)];
                    o.iter().chain(rr).copied().collect::<Vec<_>>()
                })
                .collect();
            let png = pixmarket_engine::image_io::encode_png(&both, 2 * side, side, &[])?;
            std::fs::write(PathBuf::from(d).join(format!("{k}.png")), png)?;
        }
    }
    println!(
        "vae: {ok}/50 reconstructions pass the measure, mean |Δ| {:.1} levels",
        err / 50.0
    );
    Ok(())
}
