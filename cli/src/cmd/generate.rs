//! `pixmarket generate`: one image from a prompt.
//!
//! `--local` runs the engine on this machine with a model folder (a diffusers Qwen-Image folder,
//! or `tiny` for the built-in tiny model, trained on drawn scenes). Without `--local` the image is
//! bought on the market (`super::market`); the flags in [`JobArgs`] are the ones both forms
//! share. Arguments become a validated [`Job`] before any model is loaded, so bad input fails
//! fast with one line.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pixmarket_engine::drawn::DRAWN_MODEL_ID;
use pixmarket_engine::image_io::outpaint_canvas;
use pixmarket_engine::pipeline::{
    GenerateRequest, MAX_SIDE, Mode, QwenImage, SIZE_MULTIPLE, device_from_name, dtype_from_name,
    load_latents,
};
use pixmarket_engine::tiny::ensure_tiny_model;

use super::DataDirArg;

/// Defaults for real weights: the reference pipeline's (1024², 50 steps).
const DEFAULT_SIDE: u32 = 1024;
const DEFAULT_STEPS: u32 = 50;
/// Defaults for the tiny model: the size it was trained at and the steps measured to draw well.
const TINY_SIDE: u32 = pixmarket_engine::drawn::DRAWN_SIDE;
const TINY_STEPS: u32 = pixmarket_engine::drawn::DRAWN_STEPS;

/// What the picture is: the flags the local and the market forms share.
#[derive(Debug, Args)]
pub(crate) struct JobArgs {
    /// The prompt.
    pub(crate) prompt: String,
    /// What the picture should not show (used when --true-cfg-scale > 1).
    #[arg(long, default_value = " ")]
    pub(crate) negative_prompt: String,
    /// Width in pixels, a multiple of 16 [default: 1024, or 64 with --model tiny].
    #[arg(long)]
    pub(crate) width: Option<u32>,
    /// Height in pixels, a multiple of 16 [default: 1024, or 64 with --model tiny].
    #[arg(long)]
    pub(crate) height: Option<u32>,
    /// Denoising steps [default: 50, or 20 with --model tiny].
    #[arg(long)]
    pub(crate) steps: Option<u32>,
    /// True classifier-free guidance scale; 1 turns it off (half the work per step).
    #[arg(long, default_value_t = 4.0)]
    pub(crate) true_cfg_scale: f32,
    /// Seed of the starting noise [default: a fresh one, printed].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Start from this image (PNG or JPEG): image-to-image, or inpaint with --mask.
    #[arg(long, value_name = "FILE")]
    pub(crate) init_image: Option<PathBuf>,
    /// How much of --init-image to repaint, in (0, 1]; steps run = ⌈steps × strength⌉.
    #[arg(long, value_name = "X")]
    pub(crate) strength: Option<f64>,
    /// Inpaint: repaint where this mask (PNG or JPEG, same size as the image) is white.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    pub(crate) mask: Option<PathBuf>,
    /// Outpaint: grow --init-image by LEFT,TOP,RIGHT,BOTTOM pixels and paint only the new border
    /// (inpaint on a padded canvas; the size defaults to the canvas).
    #[arg(long, value_name = "L,T,R,B", requires = "init_image", conflicts_with = "mask",
          value_parser = parse_padding)]
    pub(crate) outpaint: Option<[u32; 4]>,
    /// Where to write the PNG (it carries the parameters as text chunks).
    #[arg(short, long, value_name = "FILE")]
    pub(crate) output: PathBuf,
}

/// How to run it on this machine.
#[derive(Debug, Args)]
pub(crate) struct LocalArgs {
    /// Generate on this machine; without it, the image is bought on the market (--peer or
    /// --bootstrap).
    #[arg(long, conflicts_with_all = ["peer", "bootstrap", "max_cost"])]
    local: bool,
    /// A Qwen-Image folder saved by diffusers (`QwenImagePipeline.save_pretrained`), or `tiny`
    /// for the built-in tiny model (trained on drawn scenes, see the engine README for what it
    /// can draw; installed on first use in <data-dir>/models/tiny). Use `./tiny` for a folder named tiny.
    #[arg(long, value_name = "DIR|tiny")]
    model: Option<String>,
    /// Initial noise: a safetensors file with a tensor `latents` of shape [1, 16, H/8, W/8].
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Compute precision: f32, bf16 or f16 (the VAE runs in f32 on the CPU).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    local: LocalArgs,
    #[command(flatten)]
    market: super::market::MarketArgs,
    #[command(flatten)]
    data_dir: DataDirArg,
}

/// A validated request plus where its model and output live.
#[derive(Debug)]
struct Job {
    model_dir: PathBuf,
    tiny: bool,
    request: GenerateRequest,
    output: PathBuf,
}

fn parse_padding(s: &str) -> Result<[u32; 4], String> {
    let parts: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("expected LEFT,TOP,RIGHT,BOTTOM in pixels: {e}"))?;
    <[u32; 4]>::try_from(parts)
        .map_err(|p| format!("expected 4 numbers LEFT,TOP,RIGHT,BOTTOM, got {}", p.len()))
}

fn check_side(flag: &str, v: u32) -> anyhow::Result<u32> {
    if v == 0 || !v.is_multiple_of(SIZE_MULTIPLE) || v > MAX_SIDE {
        bail!("{flag} {v} must be a positive multiple of {SIZE_MULTIPLE}, at most {MAX_SIDE}");
    }
    Ok(v)
}

fn read_input(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    pixmarket_engine::image_io::image_size(&bytes, "image")
        .with_context(|| format!("{flag} {} is not a readable PNG or JPEG", path.display()))?;
    Ok(bytes)
}

/// A seed from the clock when none is given; printed so the picture can be made again.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // The low 64 bits of the nanoseconds: the part that changes between runs.
    let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or_default();
    low ^ (u64::from(std::process::id()) << 32)
}

impl GenerateArgs {
    fn into_job(self) -> anyhow::Result<Job> {
        let GenerateArgs {
            job,
            local,
            data_dir,
            market: _,
        } = self;
        let Some(model) = local.model else {
            bail!("--local needs --model DIR (a diffusers Qwen-Image folder) or --model tiny");
        };
        let tiny = model == "tiny";
        let model_dir = if tiny {
            data_dir.path()?.join("models").join("tiny")
        } else {
            PathBuf::from(&model)
        };
        if !tiny && !model_dir.is_dir() {
            bail!("model folder {} does not exist", model_dir.display());
        }
        if job.strength.is_some() && job.init_image.is_none() {
            bail!("--strength needs --init-image");
        }
        let strength_permille = match job.strength {
            // Outpainting repaints a blank border: all of it. Otherwise diffusers' default, 0.6.
            None if job.outpaint.is_some() => 1000,
            None => 600,
            // In (0, 1], so the per-mille value is in 0..=1000 and fits.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(s) if s > 0.0 && s <= 1.0 => ((s * 1000.0).round() as u16).max(1),
            Some(s) => bail!("--strength {s} must be in (0, 1]"),
        };
        let mut canvas = None;
        let mode = match (&job.init_image, &job.mask) {
            (None, _) => Mode::TextToImage,
            (Some(img), None) if job.outpaint.is_some() => {
                let pad = job.outpaint.unwrap_or_default();
                let bytes = read_input("--init-image", img)?;
                let (init_image, mask, w, h) = outpaint_canvas(&bytes, pad)?;
                canvas = Some((w, h));
                Mode::Inpaint {
                    init_image,
                    mask,
                    strength_permille,
                }
            }
            (Some(img), None) => Mode::ImageToImage {
                init_image: read_input("--init-image", img)?,
                strength_permille,
            },
            (Some(img), Some(mask)) => Mode::Inpaint {
                init_image: read_input("--init-image", img)?,
                mask: read_input("--mask", mask)?,
                strength_permille,
            },
        };
        let (side, steps) = if tiny {
            (TINY_SIDE, TINY_STEPS)
        } else {
            (DEFAULT_SIDE, DEFAULT_STEPS)
        };
        if let Some((w, h)) = canvas
            && (job.width.is_none() || job.height.is_none())
            && (!w.is_multiple_of(SIZE_MULTIPLE) || !h.is_multiple_of(SIZE_MULTIPLE))
        {
            bail!(
                "the outpaint canvas is {w}×{h}; choose padding that makes both sides multiples \
                 of {SIZE_MULTIPLE}, or give --width and --height"
            );
        }
        let width = check_side("--width", job.width.or(canvas.map(|c| c.0)).unwrap_or(side))?;
        let height = check_side(
            "--height",
            job.height.or(canvas.map(|c| c.1)).unwrap_or(side),
        )?;
        let steps = job.steps.unwrap_or(steps);
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        if !job.true_cfg_scale.is_finite() || job.true_cfg_scale < 0.0 {
            bail!(
                "--true-cfg-scale {} must be a number ≥ 0",
                job.true_cfg_scale
            );
        }
        let latents = match &local.latents {
            None => None,
            Some(p) => {
                let l = load_latents(p)?;
                let want = [1, 16, height as usize / 8, width as usize / 8];
                if l.dims() != want {
                    bail!(
                        "--latents {} has shape {:?}; a {width}×{height} image needs {want:?}",
                        p.display(),
                        l.dims()
                    );
                }
                Some(l)
            }
        };
        let request = GenerateRequest {
            prompt: job.prompt,
            negative_prompt: job.negative_prompt,
            width,
            height,
            steps,
            true_cfg_scale: job.true_cfg_scale,
            seed: job.seed.unwrap_or_else(fresh_seed),
            latents,
            mode,
        };
        Ok(Job {
            model_dir,
            tiny,
            request,
            output: job.output,
        })
    }
}

pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.local.local {
        return super::market::run(&args.job, &args.market, args.data_dir.path()?);
    }
    let dtype = dtype_from_name(&args.local.dtype)
        .with_context(|| format!("unknown --dtype {}", args.local.dtype))?;
    let device = device_from_name(&args.local.device)?;
    let job = args.into_job()?;
    if job.tiny {
        ensure_tiny_model(&job.model_dir).context("cannot create the tiny model")?;
        eprintln!(
            "note: {DRAWN_MODEL_ID} draws one or two shapes on a background (the grammar is in \
             the engine README). Point --model at a Qwen-Image folder for real images."
        );
    }
    let t_load = Instant::now();
    let model = QwenImage::load(&job.model_dir, dtype, &device)?;
    eprintln!("loaded {} in {:.1?}", model.description(), t_load.elapsed());
    let r = &job.request;
    eprintln!(
        "{} {}×{}, {} of {} steps, true CFG {}, seed {}",
        r.mode.name(),
        r.width,
        r.height,
        r.effective_steps(),
        r.steps,
        r.true_cfg_scale,
        if r.latents.is_some() {
            "(given latents)".to_string()
        } else {
            r.seed.to_string()
        }
    );

    let bar = ProgressBar::new(u64::from(r.effective_steps()));
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut step_times: Vec<Duration> = Vec::new();
    let t_gen = Instant::now();
    let images = model.generate(std::slice::from_ref(&job.request), &mut |p| {
        step_times.push(p.step_time);
        bar.set_position(u64::from(p.step));
        bar.set_message(format!("{:.2?}/step", p.step_time));
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    let image = images?.pop().context("the engine returned no image")?;
    let png = image.png()?;
    std::fs::write(&job.output, png)
        .with_context(|| format!("cannot write {}", job.output.display()))?;
    let steps_total: Duration = step_times.iter().sum();
    let per_step = steps_total
        .checked_div(u32::try_from(step_times.len()).unwrap_or(1).max(1))
        .unwrap_or_default();
    println!(
        "wrote {} ({}×{}) in {:.2?}: {} steps at {:.2?}/step, then decode",
        job.output.display(),
        image.width,
        image.height,
        t_gen.elapsed(),
        step_times.len(),
        per_step
    );
    Ok(())
}
