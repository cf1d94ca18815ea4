//! `pixmarket generate`: one image from a prompt.
//!
//! `--local` runs the engine on this machine with a model folder (a diffusers Qwen-Image folder,
//! or `tiny` for the built-in tiny model, trained on drawn scenes). Without `--local` the image is
//! bought on the market (`super::market`). Both forms build their [`JobParams`] from the flags in
//! [`JobArgs`] through one function (`super::job::build`), and check the output path, before
//! any model is loaded or any token is spent, so bad input fails fast with one line.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pixmarket_engine::EngineError;
use pixmarket_engine::drawn::DRAWN_MODEL_ID;
use pixmarket_engine::lora::LoraSpec;
use pixmarket_engine::pipeline::{
    GenerateRequest, QwenImage, device_from_name, dtype_from_name, load_latents,
};
use pixmarket_engine::placement::{self, LoadOptions, TextEncoderPlace};
use pixmarket_engine::scheduler::FlowMatchEulerConfig;
use pixmarket_engine::tiny::ensure_tiny_model;
use pixmarket_protocol::JobParams;
use pixmarket_protocol::validate as v;

use super::DataDirArg;
use super::job::{self, Form};
use super::output::Output;
use crate::usage::{out, usage};

/// Local runs default to full precision on the CPU: they work on every machine.
const DEFAULT_DTYPE: &str = "f32";
const DEFAULT_DEVICE: &str = "cpu";

/// What the picture is: the flags the local and the market forms share. Ranges are the local
/// ones; the market's narrower ones are checked before anything is bought.
#[derive(Debug, Args)]
pub(crate) struct JobArgs {
    /// The prompt (1..=2000 characters).
    pub(crate) prompt: String,
    /// What the picture should not show (used when --true-cfg-scale > 1).
    #[arg(long, default_value = " ")]
    pub(crate) negative_prompt: String,
    /// Width in pixels, a multiple of 16: 64..=2048 on the market, 16..=4096 with --local
    /// (memory permitting) [default: the init image's or the outpaint canvas's; else 1024, or
    /// 64 with --model tiny].
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32)
              .range(i64::from(v::LOCAL_MIN_DIMENSION)..=i64::from(v::LOCAL_MAX_DIMENSION)))]
    pub(crate) width: Option<u32>,
    /// Height in pixels, as --width.
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32)
              .range(i64::from(v::LOCAL_MIN_DIMENSION)..=i64::from(v::LOCAL_MAX_DIMENSION)))]
    pub(crate) height: Option<u32>,
    /// Denoising steps: 1..=100 on the market, 1..=1000 with --local [default: 50, or 8 with
    /// --model tiny].
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(v::LOCAL_MAX_STEPS)))]
    pub(crate) steps: Option<u32>,
    /// True classifier-free guidance scale, 1..=20; 1 turns it off (half the work per step)
    /// [default: 4, or 1 with --model tiny].
    #[arg(long, allow_negative_numbers = true, value_parser = parse_true_cfg)]
    pub(crate) true_cfg_scale: Option<f32>,
    /// Seed of the starting noise [default: a fresh one, printed].
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed)]
    pub(crate) seed: Option<u64>,
    /// Start from this image (PNG or JPEG): image-to-image, or inpaint with --mask. The picture
    /// takes its size unless --width/--height say otherwise (then --resize is needed).
    #[arg(long, value_name = "FILE")]
    pub(crate) init_image: Option<PathBuf>,
    /// How much of --init-image to repaint, in (0, 1] [default: 0.6; 1 when outpainting].
    /// Steps run (and billed) = ⌈steps × strength⌉.
    #[arg(long, value_name = "X", allow_negative_numbers = true, value_parser = parse_strength)]
    pub(crate) strength: Option<u16>,
    /// Inpaint: repaint where this mask (PNG or JPEG, the init image's size) is white.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    pub(crate) mask: Option<PathBuf>,
    /// Outpaint: grow --init-image by LEFT,TOP,RIGHT,BOTTOM pixels and paint only the new border
    /// (inpaint on a padded canvas; the size defaults to the canvas).
    #[arg(long, value_name = "L,T,R,B", requires = "init_image", conflicts_with = "mask",
          value_parser = parse_padding)]
    pub(crate) outpaint: Option<[u32; 4]>,
    /// Stretch --init-image and --mask to --width × --height when their size differs (without
    /// it, a different size is refused).
    #[arg(long)]
    pub(crate) resize: bool,
    /// Where to write the PNG (it carries the parameters as text chunks). Checked writable
    /// before anything is bought or run.
    #[arg(short, long, value_name = "FILE")]
    pub(crate) output: PathBuf,
}

/// How to run it on this machine.
#[derive(Debug, Args)]
pub(crate) struct LocalArgs {
    /// Generate on this machine; without it, the image is bought on the market (--peer or
    /// --bootstrap).
    #[arg(long, conflicts_with_all = ["peer", "bootstrap", "max_cost", "exact"])]
    local: bool,
    /// A Qwen-Image folder saved by diffusers (`QwenImagePipeline.save_pretrained`), or `tiny`
    /// for the built-in tiny model (trained on drawn scenes, see the engine README for what it
    /// can draw; installed on first use in <data-dir>/models/tiny). Use `./tiny` for a folder
    /// named tiny.
    #[arg(long, value_name = "DIR|tiny")]
    model: Option<String>,
    /// Initial noise instead of the seed's: a safetensors file with a tensor `latents` of
    /// shape [1, 16, H/8, W/8]. On the market the job carries it (one image, finite values),
    /// so the provider starts from the same noise as --local would.
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Compute precision: f32, bf16 or f16; on --device cpu the VAE still runs in f32
    /// [default: f32].
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`) [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// With --local: merge a LoRA into the transformer at load (a quantized transformer runs it
    /// beside its quantized matmuls instead), a safetensors file in the
    /// diffusers/PEFT key layout (`lora_A`/`lora_B`) or the kohya/ComfyUI one
    /// (`lora_down`/`lora_up` + `alpha`), at SCALE (-8..=8, default 1); repeatable, up to 8,
    /// their changes add. Over the market: one LoRA a provider offers, by the name or the
    /// blake3 hash (64 hex digits) its advert lists, at SCALE in (0, 8]; only providers that
    /// offer it are asked.
    #[arg(long, value_name = "FILE|NAME|HASH[:SCALE]", value_parser = parse_lora)]
    lora: Vec<LoraSpec>,
    /// A few-step preset for the Qwen-Image-Lightning LoRAs: `lightning-8` or `lightning-4`
    /// sets 8 or 4 steps and true CFG off (metered as 8 or 4 steps). With --local give the
    /// file with --lora (the preset also sets the scheduler config the LoRAs are published
    /// with: shift 3, no terminal stretch); over the market the LoRA is the providers' offer
    /// named `lightning-8` / `lightning-4` unless --lora names another, and the provider
    /// runs it on that scheduler config.
    #[arg(long, value_parser = ["lightning-8", "lightning-4"],
          conflicts_with_all = ["steps", "true_cfg_scale"])]
    preset: Option<String>,
    /// Run the text encoder on the CPU (in --dtype; ~14 GB of RAM in bf16 for Qwen-Image)
    /// and move the prompt embeddings to --device: frees its weights from a 24 or 16 GB card.
    /// Local only.
    #[arg(long)]
    text_encoder_on_cpu: bool,
    /// Memory of --device in GiB: print the placement plan for it (where the text encoder
    /// goes, the largest size and batch that fit) and refuse a size larger than it allows.
    /// Local only.
    #[arg(long, value_name = "GIB", value_parser = clap::value_parser!(u32).range(1..=4096))]
    device_memory: Option<u32>,
}

fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    LoraSpec::parse(s).map_err(|e| e.to_string())
}

/// The market's LoRA from `--lora NAME|HASH[:SCALE]` (at most one) or the preset's name.
fn market_lora(
    loras: &[LoraSpec],
    preset: Option<&str>,
) -> anyhow::Result<Option<super::market::WantedLora>> {
    let (name, scale) = match loras {
        [] => match preset {
            Some(p) => (p.to_string(), 1.0),
            None => return Ok(None),
        },
        [one] => (one.path.display().to_string(), one.scale),
        _ => {
            return Err(usage!(
                "a market job takes one --lora (a provider merges one offer per job); got {}",
                loras.len()
            ));
        }
    };
    let most = f32::from(v::MAX_LORA_SCALE_PERMILLE) / 1000.0;
    if !(scale > 0.0 && scale <= most) {
        return Err(usage!(
            "--lora {name}:{scale}: over the market the scale must be in (0, {most}]"
        ));
    }
    // In (0, 8] × 1000, rounded: fits u16 without loss of sign or range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let scale_permille = ((scale * 1000.0).round() as u16).max(1);
    Ok(Some(super::market::WantedLora {
        name_or_hash: name,
        scale_permille,
    }))
}

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    local: LocalArgs,
    #[command(flatten)]
    market: super::market::MarketArgs,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data_dir: DataDirArg,
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

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "{s} is not a seed; allowed: a whole number in 0..={}",
            u64::MAX
        )
    })
}

/// Strength in (0, 1] as per-mille, rounded, at least 1‰.
pub(crate) fn parse_strength(s: &str) -> Result<u16, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s} is not a number; allowed: (0, 1], e.g. 0.6"))?;
    if !(x.is_finite() && x > 0.0 && x <= 1.0) {
        return Err(format!("{s} is not in (0, 1]"));
    }
    // In (0, 1] × 1000, rounded: 0..=1000 fits u16 without loss of sign or range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let permille = (x * f64::from(v::MAX_STRENGTH_PERMILLE)).round() as u16;
    Ok(permille.max(1))
}

fn parse_true_cfg(s: &str) -> Result<f32, String> {
    let x: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s} is not a number"))?;
    v::true_cfg_scale(x).map_err(|e| e.to_string())?;
    Ok(x)
}

/// The engine's request for the job's params: the same fields (the latents, a tensor here and
/// bytes in the params, are set by the caller).
fn engine_request(p: &JobParams) -> GenerateRequest {
    GenerateRequest {
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        width: p.width,
        height: p.height,
        steps: p.steps,
        true_cfg_scale: p.true_cfg_scale,
        seed: p.seed,
        latents: None,
        mode: p.mode.clone(),
    }
}

/// Checks `--latents`' shape against the picture's size.
fn check_latents_shape(
    path: &std::path::Path,
    dims: &[usize],
    params: &JobParams,
) -> anyhow::Result<()> {
    let want = [
        1,
        pixmarket_engine::pipeline::LATENT_CHANNELS,
        params.height as usize / 8,
        params.width as usize / 8,
    ];
    if dims != want {
        return Err(usage!(
            "--latents {} has shape {dims:?}; a {}×{} image needs {want:?}",
            path.display(),
            params.width,
            params.height
        ));
    }
    Ok(())
}

pub(crate) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.local.local {
        // How to run it here means nothing to a bought image: say so rather than ignore it.
        for (flag, given) in [
            ("--model", args.local.model.is_some()),
            ("--dtype", args.local.dtype.is_some()),
            ("--device", args.local.device.is_some()),
            ("--text-encoder-on-cpu", args.local.text_encoder_on_cpu),
            ("--device-memory", args.local.device_memory.is_some()),
        ] {
            if given {
                return Err(usage!(
                    "{flag} needs --local: add --local to run it on this machine, or drop {flag} \
                     and buy it with --peer or --bootstrap"
                ));
            }
        }
    }
    if args.local.local && args.local.preset.is_some() && args.local.lora.is_empty() {
        return Err(usage!(
            "--preset with --local needs the Lightning LoRA file: add --lora FILE"
        ));
    }
    if !args.local.local {
        let mut job_args = args.job;
        let preset_steps = match args.local.preset.as_deref() {
            Some("lightning-8") => Some(8),
            Some("lightning-4") => Some(4),
            _ => None,
        };
        if let Some(steps) = preset_steps {
            job_args.steps = Some(steps);
            job_args.true_cfg_scale = Some(1.0);
        }
        let lora = market_lora(&args.local.lora, args.local.preset.as_deref())?;
        let mut params = job::build(&job_args, Form::Market)?;
        params.exact = args.market.exact;
        if let Some(path) = &args.local.latents {
            // The job carries the noise itself, so the provider starts where --local would.
            let l = load_latents(path).map_err(|e| usage!("{e}"))?;
            check_latents_shape(path, l.dims(), &params)?;
            let values = pixmarket_engine::pipeline::latents_to_f32(&l)
                .with_context(|| format!("--latents {}", path.display()))?;
            params.latents = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
            params
                .validate()
                .map_err(|e| usage!("--latents {}: {e}", path.display()))?;
        }
        return super::market::run(
            params,
            lora,
            &job_args.output,
            &args.market,
            args.json,
            args.data_dir.path()?,
        );
    }
    let GenerateArgs {
        mut job,
        local,
        data_dir,
        json,
        market: _,
    } = args;
    let dtype_name = local.dtype.as_deref().unwrap_or(DEFAULT_DTYPE);
    let dtype = dtype_from_name(dtype_name)
        .ok_or_else(|| usage!("unknown --dtype {dtype_name}; allowed: f32, bf16, f16"))?;
    let device = device_from_name(local.device.as_deref().unwrap_or(DEFAULT_DEVICE))
        .map_err(|e| usage!("{e}"))?;
    let Some(model) = local.model else {
        return Err(usage!(
            "--local needs --model DIR (a diffusers Qwen-Image folder) or --model tiny"
        ));
    };
    let tiny = model == "tiny";
    let model_dir = if tiny {
        data_dir.path()?.join("models").join("tiny")
    } else {
        PathBuf::from(&model)
    };
    if !tiny && !model_dir.is_dir() {
        return Err(usage!(
            "model folder {} does not exist",
            model_dir.display()
        ));
    }
    let lightning_steps = match local.preset.as_deref() {
        Some("lightning-8") => Some(8),
        Some("lightning-4") => Some(4),
        _ => None,
    };
    if let Some(steps) = lightning_steps {
        job.steps = Some(steps);
        job.true_cfg_scale = Some(1.0);
    }
    let params = job::build(&job, Form::Local { tiny })?;
    let latents = match &local.latents {
        None => None,
        Some(p) => {
            let l = load_latents(p).map_err(|e| usage!("{e}"))?;
            check_latents_shape(p, l.dims(), &params)?;
            Some(l)
        }
    };
    let output = Output::prepare(&job.output)?;
    let request = GenerateRequest {
        latents,
        ..engine_request(&params)
    };
    let quiet = super::quiet();
    if tiny {
        ensure_tiny_model(&model_dir).context("cannot create the tiny model")?;
        if !quiet {
            eprintln!(
                "note: {DRAWN_MODEL_ID} draws one or two shapes on a background (the grammar is \
                 in the engine README). Point --model at a Qwen-Image folder for real images."
            );
        }
    }
    let t_load = Instant::now();
    let mut opts = LoadOptions::default();
    if let Some(gib) = local.device_memory {
        let plan = placement::plan_folder(&model_dir, dtype, u64::from(gib) << 30)
            .ok_or_else(|| usage!("--device-memory needs a diffusers Qwen-Image folder"))?;
        if plan.max_images(params.width, params.height) == 0 {
            return Err(usage!(
                "{}×{} does not fit {gib} GiB with this model ({plan})",
                params.width,
                params.height
            ));
        }
        if !quiet {
            eprintln!("plan for {gib} GiB: {plan}");
        }
        opts = plan.load_options();
    }
    if local.text_encoder_on_cpu {
        opts.text_encoder = TextEncoderPlace::Cpu;
    }
    opts.loras = local.lora.clone();
    let mut model = QwenImage::load_with(&model_dir, dtype, &device, &opts)?;
    if lightning_steps.is_some() {
        model
            .set_scheduler(FlowMatchEulerConfig::lightning())
            .context("the Lightning scheduler config")?;
    }
    let r = &request;
    if !quiet {
        eprintln!("loaded {} in {:.1?}", model.description(), t_load.elapsed());
        for l in &local.lora {
            eprintln!("applied LoRA {} at scale {}", l.path.display(), l.scale);
        }
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
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::from(r.effective_steps()))
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut step_times: Vec<Duration> = Vec::new();
    let t_gen = Instant::now();
    let images = model.generate(std::slice::from_ref(&request), &mut |p| {
        step_times.push(p.step_time);
        bar.set_position(u64::from(p.step));
        bar.set_message(format!("{:.2?}/step", p.step_time));
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    let image = images
        .map_err(|e| match e {
            // A size the device cannot hold is the command line's to change.
            e @ EngineError::TooLarge { .. } => usage!("{e}"),
            e => anyhow::Error::new(e),
        })?
        .pop()
        .context("the engine returned no image")?;
    let png = image.png()?;
    let written = output.commit(&png)?;
    let steps_total: Duration = step_times.iter().sum();
    let per_step = steps_total
        .checked_div(u32::try_from(step_times.len()).unwrap_or(1).max(1))
        .unwrap_or_default();
    if json {
        let seed = if r.latents.is_some() {
            serde_json::Value::Null
        } else {
            r.seed.into()
        };
        out!(
            "{}",
            serde_json::json!({
                "output": written.display().to_string(),
                "width": image.width,
                "height": image.height,
                "mode": r.mode.name(),
                "steps": r.steps,
                "steps_run": step_times.len(),
                "seed": seed,
                "seconds": t_gen.elapsed().as_secs_f64(),
            })
        )?;
    } else {
        out!(
            "wrote {} ({}×{}) in {:.2?}: {} steps at {:.2?}/step, then decode",
            written.display(),
            image.width,
            image.height,
            t_gen.elapsed(),
            step_times.len(),
            per_step
        )?;
    }
    Ok(())
}
