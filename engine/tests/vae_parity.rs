//! VAE parity against diffusers' `AutoencoderKLQwenImage` on the small random model in
//! `fixtures/vae/` (made by `tools/make_encoder_vae_fixtures.py`), all in f32.
//!
//! Metric: relative error `max|ours - ref| / max|ref|` over the whole tensor; bound 1e-4 (the
//! final image must land within 1/255 of the reference, so the VAE has to be tight).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use pixmarket_engine::vae::AutoencoderKLQwenImage;

const TOLERANCE: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae")
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    anyhow::ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} vs reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let diff = (ours - reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

fn setup() -> Result<(
    AutoencoderKLQwenImage,
    std::collections::HashMap<String, Tensor>,
)> {
    let dir = fixture_dir();
    let vae = AutoencoderKLQwenImage::load(&dir, DType::F32, &Device::Cpu)
        .context("load the fixture VAE")?;
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    Ok((vae, expected))
}

fn get<'a>(m: &'a std::collections::HashMap<String, Tensor>, k: &str) -> Result<&'a Tensor> {
    m.get(k).with_context(|| format!("fixture tensor {k}"))
}

#[test]
fn decode_matches_reference() -> Result<()> {
    let (vae, expected) = setup()?;
    let latents = get(&expected, "latents")?;
    let image = vae.decode(latents)?;
    let err = rel_err(&image, get(&expected, "decoded")?)?;
    println!("vae decode rel err {err:.3e}");
    assert!(err <= TOLERANCE, "decode rel err {err:e}");

    let raw = vae.denormalize_latents(latents)?;
    let err = rel_err(&vae.decode_raw(&raw)?, get(&expected, "decoded_unclamped")?)?;
    println!("vae decode_raw rel err {err:.3e}");
    assert!(err <= TOLERANCE, "decode_raw rel err {err:e}");
    // The 5-D form the reference uses gives the same result.
    let err = rel_err(&vae.decode(&latents.unsqueeze(2)?)?, &image)?;
    assert!(err == 0.0);
    Ok(())
}

#[test]
fn encode_matches_reference() -> Result<()> {
    let (vae, expected) = setup()?;
    let dist = vae.encode(get(&expected, "image")?)?;
    let err_mean = rel_err(&dist.mean, get(&expected, "posterior_mean")?)?;
    let err_std = rel_err(&dist.std()?, get(&expected, "posterior_std")?)?;
    let err_norm = rel_err(
        &vae.normalize_latents(&dist.mean)?,
        get(&expected, "posterior_mean_normalised")?,
    )?;
    println!(
        "vae encode rel err: mean {err_mean:.3e}, std {err_std:.3e}, normalised mean {err_norm:.3e}"
    );
    assert!(err_mean <= TOLERANCE && err_std <= TOLERANCE && err_norm <= TOLERANCE);
    Ok(())
}

#[test]
fn normalisation_round_trips() -> Result<()> {
    let (vae, expected) = setup()?;
    let latents = get(&expected, "latents")?;
    let back = vae.normalize_latents(&vae.denormalize_latents(latents)?)?;
    let err = rel_err(&back, latents)?;
    assert!(err <= 1e-6, "round trip rel err {err:e}");
    Ok(())
}

#[test]
fn missing_folder_is_a_typed_error() {
    let err = AutoencoderKLQwenImage::load(Path::new("/nonexistent/vae"), DType::F32, &Device::Cpu);
    assert!(matches!(
        err,
        Err(pixmarket_engine::vae::VaeLoadError::ConfigRead { .. })
    ));
}

// No bf16 check here: candle 0.11's CPU conv2d (im2col + gemm) has no bf16 matmul ("unsupported
// dtype BF16 for op matmul"), so a bf16 VAE runs only on CUDA; on the CPU use f32.
