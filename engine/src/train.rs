//! Training the drawn tiny model ([`crate::drawn`]) with candle's autograd and AdamW, on the
//! scenes of [`crate::scenes`]; what `pixmarket model train-tiny` runs.
//!
//! Data flow of [`train`]:
//! 1. the folder gets everything but trained weights ([`crate::drawn::write_untrained_model`])
//!    and the transformer's initial weights, so it loads as a model from the start;
//! 2. **VAE**: an autoencoder on random 32×32 windows of freshly drawn scenes — loss
//!    `MSE(decode(mean), image)` plus `1e-3 · mean²` to keep the latents small — from the random
//!    tiny model's initialisation with residual branches at zero; per-channel `latents_mean` /
//!    `latents_std` measured on encoded scenes go into `vae/config.json`; then, when
//!    `decoder_steps` > 0, the **decoder** alone on whole 64×64 scenes (the encoder, and so
//!    every latent, stays as it is), which removes what the windows left (blur from borders and
//!    a smaller attention field) and, with `decoder_noise`, learns to decode latents a little
//!    off the encoder's, as a transformer draws them;
//! 3. **transformer**: a pool of training scenes is encoded once (VAE posterior mean,
//!    normalised; the English and Chinese caption through the frozen text encoder), then flow
//!    matching as the scheduler samples it: `x_σ = σ·noise + (1 − σ)·x₀`, σ uniform in (0, 1),
//!    target velocity `noise − x₀`, MSE; one caption in ten is replaced by the empty prompt so
//!    true CFG with an empty negative prompt has an unconditional model to push against;
//! 4. every `checkpoint_every` steps and at the end of each phase the weights go into the
//!    folder and `train_state.json` records the steps done; `resume` continues from there
//!    (weights and step; AdamW's moments restart, which costs a few noisy steps) with the options
//!    given to it, so a run can be lengthened.
//!
//! Learning rates: AdamW, linear warm-up over the first 5 % of a phase (of the transformer's
//! steps from [`TrainOptions::schedule_start`]), then cosine decay to a tenth; no weight decay
//! (the model is far smaller than its endless data). With [`TrainOptions::ema_decay`] the
//! transformer the folder holds is the moving average of the optimiser's weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::drawn::{self, DRAWN_SIDE};
use crate::error::EngineError;
use crate::latents::pack;
use crate::noise::{SplitMix64, gaussian};
use crate::pipeline::{QwenImage, pad_text};
use crate::scenes::{Lang, Scene};
use crate::tiny::{initial_tensors, save, write_json, write_transformer_config};
use crate::transformer::QwenImageTransformer;
use crate::vae::{AutoencoderKLQwenImage, rgb8_to_image};
use crate::weight_average::WeightAverage;

/// How long and how hard to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// VAE optimiser steps.
    pub vae_steps: usize,
    /// Scenes per VAE step.
    pub vae_batch: usize,
    /// Side of the random square window of each scene the VAE trains on (a multiple of 8, at
    /// most the scene's side): convolutions do not care where the window is, and the
    /// back-propagation cost grows with the pixels.
    pub vae_crop: usize,
    /// Peak VAE learning rate.
    pub vae_lr: f64,
    /// Decoder optimiser steps after the VAE phase: whole scenes (no windows), encoder frozen,
    /// so the latents — and so the transformer's training data — do not change, and a trained
    /// model's decoder can be trained again without touching its transformer.
    #[serde(default)]
    pub decoder_steps: usize,
    /// Scenes per decoder step.
    #[serde(default = "default_decoder_batch")]
    pub decoder_batch: usize,
    /// Noise added to the latents the decoder phase decodes, in latent standard deviations:
    /// each scene's latents get `u · decoder_noise · std` of Gaussian noise per channel (`u`
    /// uniform in [0, 1) per scene), so the decoder learns to forgive a transformer's small
    /// errors as well as to reproduce clean latents. 0 decodes the encoder's latents as they are.
    #[serde(default)]
    pub decoder_noise: f64,
    /// Transformer optimiser steps.
    pub transformer_steps: usize,
    /// Transformer blocks. A resumed run may ask for more blocks than its checkpoint has: the
    /// trained blocks keep their weights and the new ones are appended with adaLN-Zero
    /// modulations (each starts as the identity, so the grown model draws what the checkpoint
    /// drew and training goes on from there). Fewer blocks than the checkpoint's are refused.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers: usize,
    /// Latents per transformer step.
    pub transformer_batch: usize,
    /// Peak transformer learning rate.
    pub transformer_lr: f64,
    /// Training scenes encoded once for the transformer phase.
    pub pool: usize,
    /// Shift of the σ drawn per example: σ = s·u / (1 + (s − 1)·u) for u uniform, as the
    /// scheduler shifts its steps (1 = σ uniform). Above 1 more of the training lands at high
    /// noise, where the sampler's first steps decide the layout.
    #[serde(default = "default_sigma_shift")]
    pub sigma_shift: f64,
    /// Decay of an exponential moving average of the transformer's weights, updated after
    /// every step (`d · average + (1 − d) · weights`, `d` ramped in as `(1 + n)/(10 + n)`);
    /// 0 for none. With an average the folder's
    /// `transformer/` holds the average (what the model draws with) and
    /// `transformer_online.safetensors` the optimiser's own weights, which `resume` goes on
    /// from; without, `transformer/` holds the optimiser's weights.
    #[serde(default)]
    pub ema_decay: f64,
    /// The transformer step the learning-rate schedule (warm-up, then cosine decay) starts
    /// from: 0 spreads it over the whole run; a resumed run that sets it to the steps already
    /// done gets a whole warm-up and decay of its own instead of the tail of the first run's.
    #[serde(default)]
    pub schedule_start: usize,
    /// Seed of every scene, noise and σ drawn.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
}

impl TrainOptions {
    /// Refuses options no run can use ([`TrainError::Decay`], [`TrainError::DecoderNoise`]);
    /// [`train`] calls it before it reads or writes anything.
    pub fn check(&self) -> Result<(), TrainError> {
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(TrainError::Decay(self.ema_decay));
        }
        if !(self.decoder_noise.is_finite() && self.decoder_noise >= 0.0) {
            return Err(TrainError::DecoderNoise(self.decoder_noise));
        }
        Ok(())
    }
}

impl Default for TrainOptions {
    /// The longest 2-block phase of the run that made the shipped model (engine README, "The
    /// drawn tiny model"), at the shipped depth of [`drawn::DRAWN_LAYERS`] blocks, with its
    /// last phase, 600 decoder steps of 8 scenes at latent noise 0.3. That run resumed several
    /// times: with fewer transformer steps, a batch of 16, a pool of 4000 and σ uniform before
    /// this phase; twice after it (to 11000 and 13500 steps, peak rates 5·10⁻⁴ and 6·10⁻⁴);
    /// then grown from 2 blocks to 4 and trained to 22500 steps on a pool of 16000; then to
    /// 29000 with a schedule of its own (peak 3·10⁻⁴) and a weight average (decay 0.999); the
    /// decoder last. One uninterrupted run with these options trains all four blocks from the
    /// start, so it does not give the same weights.
    fn default() -> Self {
        Self {
            vae_steps: 700,
            vae_batch: 8,
            vae_crop: 32,
            decoder_steps: 600,
            decoder_batch: 8,
            decoder_noise: 0.3,
            vae_lr: 3e-3,
            transformer_steps: 8000,
            transformer_layers: drawn::DRAWN_LAYERS,
            transformer_batch: 32,
            transformer_lr: 1e-3,
            pool: 8000,
            sigma_shift: 2.0,
            ema_decay: 0.0,
            schedule_start: 0,
            seed: 19,
            checkpoint_every: 100,
        }
    }
}

fn default_decoder_batch() -> usize {
    4
}

/// Blocks of runs recorded before the option existed.
fn default_transformer_layers() -> usize {
    2
}

fn default_sigma_shift() -> f64 {
    1.0
}

/// σ for a uniform draw `u` in (0, 1), shifted by `shift` (see [`TrainOptions::sigma_shift`]).
fn shifted_sigma(u: f64, shift: f64) -> f64 {
    shift * u / (1.0 + (shift - 1.0) * u)
}

/// Which phase a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The VAE as an autoencoder.
    Vae,
    /// The VAE's decoder on whole scenes, encoder frozen.
    Decoder,
    /// Encoding the transformer's training pool (step = scenes encoded).
    Pool,
    /// The transformer with flow matching.
    Transformer,
}

/// One progress report, after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    /// The phase.
    pub phase: Phase,
    /// Steps of the phase done.
    pub step: usize,
    /// Steps the phase runs.
    pub of: usize,
    /// The step's loss (0 for [`Phase::Pool`]).
    pub loss: f32,
    /// Wall time of the phase so far.
    pub elapsed: Duration,
}

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Writing or loading the model folder failed.
    #[error("model folder")]
    Engine(#[from] EngineError),
    /// A tensor computation failed.
    #[error("training computation failed")]
    Compute(#[from] candle_core::Error),
    /// A resumed run asked for fewer transformer blocks than its checkpoint has.
    #[error(
        "the checkpoint has {have} transformer blocks and {asked} were asked for: a run can \
         grow the transformer, not shrink it"
    )]
    Shrink {
        /// Blocks in the checkpoint.
        have: usize,
        /// Blocks asked for.
        asked: usize,
    },
    /// [`TrainOptions::decoder_noise`] was negative or not a number.
    #[error(
        "decoder_noise {0} is not a noise level: give 0 (clean latents) or a positive number of \
         latent standard deviations"
    )]
    DecoderNoise(f64),
    /// [`TrainOptions::ema_decay`] was outside [0, 1).
    #[error("ema_decay {0} is not a decay: give 0 (no average) or a number above 0 and below 1")]
    Decay(f64),
    /// `train_state.json` could not be read.
    #[error("cannot resume from {}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// `train_state.json`: the options and the steps done per phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainState {
    options: TrainOptions,
    vae_steps_done: usize,
    #[serde(default)]
    decoder_steps_done: usize,
    latent_stats: Option<(Vec<f32>, Vec<f32>)>,
    transformer_steps_done: usize,
}

const STATE_FILE: &str = "train_state.json";
const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
const TRANSFORMER_WEIGHTS: &str = "transformer/diffusion_pytorch_model.safetensors";
/// The optimiser's transformer weights when the folder's `transformer/` holds their average
/// ([`TrainOptions::ema_decay`]); the loader never reads it.
const ONLINE_TRANSFORMER_WEIGHTS: &str = "transformer_online.safetensors";
/// Scenes encoded to measure the latent statistics: enough that each channel's mean and std
/// are stable to about 1 % (512 images × 64 latent cells).
const STATS_SCENES: usize = 512;
/// Share of captions replaced by the empty prompt (the unconditional model for true CFG).
const CAPTION_DROPOUT: f64 = 0.1;

fn lr_at(peak: f64, step: usize, total: usize) -> f64 {
    let warm = (total / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (total - warm).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// The transformer's learning rate at `step`: [`lr_at`] over the steps from
/// [`TrainOptions::schedule_start`] (at most `step`) to the end of the run.
fn transformer_lr_at(opts: &TrainOptions, step: usize) -> f64 {
    let start = opts.schedule_start.min(step);
    lr_at(
        opts.transformer_lr,
        step - start,
        opts.transformer_steps.saturating_sub(start),
    )
}

fn varmap_from(tensors: BTreeMap<String, Tensor>) -> Result<VarMap, TrainError> {
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// `tensors` with those whose name satisfies `zero` replaced by zeros.
fn zero_where(
    tensors: BTreeMap<String, Tensor>,
    zero: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>, TrainError> {
    tensors
        .into_iter()
        .map(|(n, t)| {
            let t = if zero(&n) { t.zeros_like()? } else { t };
            Ok((n, t))
        })
        .collect()
}

/// Sets every variable of `varmap` from the file at `path`, converted to the variable's dtype:
/// a shipped folder stores f16 (`drawn::export_for_shipping`), training runs in f32, so
/// training can go on from the shipped weights.
fn load_vars(varmap: &VarMap, path: &Path) -> Result<(), TrainError> {
    let file = candle_core::safetensors::load(path, &Device::Cpu)?;
    set_vars(varmap, &file, path, |_| false)
}

/// Sets every variable of `varmap` not `skip`ped from `file` (read from `path`), which must
/// hold each of them.
fn set_vars(
    varmap: &VarMap,
    file: &HashMap<String, Tensor>,
    path: &Path,
    skip: impl Fn(&str) -> bool,
) -> Result<(), TrainError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
    for (name, var) in data.iter().filter(|(name, _)| !skip(name)) {
        let t = file
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("{} has no {name}", path.display())))?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The block index of a transformer tensor name (`transformer_blocks.{i}.…`).
fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("transformer_blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// [`load_vars`] for a transformer of `layers` blocks from a checkpoint with `layers` or fewer:
/// the blocks the checkpoint lacks keep their initial (identity) weights.
fn grow_from(varmap: &VarMap, path: &Path, layers: usize) -> Result<(), TrainError> {
    let file = candle_core::safetensors::load(path, &Device::Cpu)?;
    let have = file
        .keys()
        .filter_map(|n| block_of(n))
        .max()
        .map_or(0, |i| i + 1);
    if have > layers {
        return Err(TrainError::Shrink {
            have,
            asked: layers,
        });
    }
    set_vars(varmap, &file, path, |name| {
        block_of(name).is_some_and(|i| i >= have)
    })
}

fn save_vars(varmap: &VarMap, path: &Path) -> Result<(), TrainError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
    let tensors: BTreeMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    drop(data);
    // Write then rename, so an interrupted checkpoint never leaves a torn file.
    let tmp = path.with_extension("partial");
    save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::io(path, e))?;
    Ok(())
}

fn write_state(dir: &Path, state: &TrainState) -> Result<(), TrainError> {
    let value = serde_json::to_value(state).map_err(|e| TrainError::State {
        path: dir.join(STATE_FILE),
        source: Box::new(e),
    })?;
    write_json(&dir.join(STATE_FILE), &value)?;
    Ok(())
}

fn read_state(dir: &Path) -> Result<Option<TrainState>, TrainError> {
    let path = dir.join(STATE_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| TrainError::State {
        path: path.clone(),
        source: e,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(Box::new(e)))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(Box::new(e)))
}

/// A batch of scenes as an image tensor `[B, 3, side, side]` in [-1, 1].
fn scene_images(scenes: &[Scene], side: u32) -> Result<Tensor, TrainError> {
    let s = side as usize;
    let imgs = scenes
        .iter()
        .map(|sc| rgb8_to_image(&sc.render(side), s, s, &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&imgs, 0)?)
}

/// The same random window of side `side` (rounded down to a multiple of 8) from every image of
/// `x: [B, 3, H, W]`.
fn crop(x: &Tensor, side: usize, rng: &mut SplitMix64) -> Result<Tensor, TrainError> {
    let (_, _, h, w) = x.dims4()?;
    let side = (side / 8 * 8).clamp(8, h.min(w));
    let y0 = (rng.next_u64() % (h - side + 1) as u64) as usize;
    let x0 = (rng.next_u64() % (w - side + 1) as u64) as usize;
    Ok(x.narrow(2, y0, side)?.narrow(3, x0, side)?.contiguous()?)
}

/// Trains the drawn tiny model into `out` (a diffusers folder that loads at every checkpoint).
/// `resume` continues the run recorded in `out/train_state.json`; otherwise training starts
/// afresh and overwrites `out`. `progress` is called after every step.
pub fn train(
    out: &Path,
    opts: &TrainOptions,
    resume: bool,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(), TrainError> {
    opts.check()?;
    let mut state = match (resume, read_state(out)?) {
        (true, Some(mut st)) => {
            // The run goes on with the options given now (e.g. more transformer steps); the
            // steps done and the measured latent statistics are kept.
            st.options = opts.clone();
            st
        }
        _ => {
            drawn::write_untrained_model(out, &[0.0; 16], &[1.0; 16], opts.transformer_layers)?;
            let tc = drawn::transformer_config_with(opts.transformer_layers);
            let init = initial_tensors(|vb| QwenImageTransformer::new(&tc, vb).map(drop))?;
            save(&init, &out.join(TRANSFORMER_WEIGHTS))?;
            let st = TrainState {
                options: opts.clone(),
                vae_steps_done: 0,
                decoder_steps_done: 0,
                latent_stats: None,
                transformer_steps_done: 0,
            };
            write_state(out, &st)?;
            st
        }
    };
    if state.vae_steps_done < opts.vae_steps || state.latent_stats.is_none() {
        train_vae(out, opts, &mut state, progress)?;
    }
    if state.decoder_steps_done < opts.decoder_steps {
        train_decoder(out, opts, &mut state, progress)?;
    }
    if state.transformer_steps_done < opts.transformer_steps {
        train_transformer(out, opts, &mut state, progress)?;
    }
    Ok(())
}

fn train_vae(
    out: &Path,
    opts: &TrainOptions,
    state: &mut TrainState,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(), TrainError> {
    let vc = drawn::vae_config();
    let init = initial_tensors(|vb| AutoencoderKLQwenImage::new(&vc, vb).map(drop))?;
    // Residual branches start at zero (their last conv, and the attention's output projection),
    // so the untrained VAE is a shallow network and every block starts as the identity: a deep
    // random stack learned measurably slower.
    let varmap = varmap_from(zero_where(init, |n| {
        n.contains(".conv2.") || (n.contains("attentions.") && n.contains(".proj."))
    })?)?;
    if state.vae_steps_done > 0 {
        load_vars(&varmap, &out.join(VAE_WEIGHTS))?;
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: opts.vae_lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
    let t0 = Instant::now();
    for step in state.vae_steps_done..opts.vae_steps {
        opt.set_learning_rate(lr_at(opts.vae_lr, step, opts.vae_steps));
        let mut rng = SplitMix64::new(opts.seed ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let scenes: Vec<Scene> = (0..opts.vae_batch)
            .map(|_| Scene::random_train(&mut rng))
            .collect();
        let x = crop(&scene_images(&scenes, DRAWN_SIDE)?, opts.vae_crop, &mut rng)?;
        // Built anew every step: constructors derive some weights from the variables (the
        // conv's temporal tap, transposed projections) as copies, which would otherwise keep
        // the values they had when the model was built.
        let vae = AutoencoderKLQwenImage::new(&vc, vb.clone())?;
        let post = vae.encode(&x)?;
        let rec = vae.decode_unclamped(&post.mean)?;
        let loss = ((&rec - &x)?.sqr()?.mean_all()? + (post.mean.sqr()?.mean_all()? * 1e-3)?)?;
        opt.backward_step(&loss)?;
        let done = step + 1;
        progress(&TrainProgress {
            phase: Phase::Vae,
            step: done,
            of: opts.vae_steps,
            loss: loss.to_scalar::<f32>()?,
            elapsed: t0.elapsed(),
        });
        if done % opts.checkpoint_every == 0 || done == opts.vae_steps {
            save_vars(&varmap, &out.join(VAE_WEIGHTS))?;
            state.vae_steps_done = done;
            write_state(out, state)?;
        }
    }
    // Latent statistics of the trained encoder, per channel over scenes and cells.
    let vae = AutoencoderKLQwenImage::new(&vc, vb)?;
    let mut rng = SplitMix64::new(opts.seed ^ 0x5747_4154);
    let mut sums = [0f64; 16];
    let mut sq = [0f64; 16];
    let mut count = 0f64;
    for chunk in 0..STATS_SCENES.div_ceil(64) {
        let n = 64.min(STATS_SCENES - chunk * 64);
        let scenes: Vec<Scene> = (0..n).map(|_| Scene::random_train(&mut rng)).collect();
        let mean = vae
            .encode(&scene_images(&scenes, DRAWN_SIDE)?)?
            .mean
            .detach();
        // [B, 16, h, w] -> [16, B·h·w]
        let per_channel = mean.transpose(0, 1)?.flatten_from(1)?.to_vec2::<f32>()?;
        for (c, vals) in per_channel.iter().enumerate() {
            for &v in vals {
                sums[c] += f64::from(v);
                sq[c] += f64::from(v) * f64::from(v);
            }
        }
        count += per_channel.first().map_or(0, Vec::len) as f64;
    }
    let means: Vec<f32> = sums.iter().map(|s| (s / count) as f32).collect();
    let stds: Vec<f32> = sq
        .iter()
        .zip(&sums)
        .map(|(q, s)| ((q / count - (s / count).powi(2)).max(1e-8).sqrt()) as f32)
        .collect();
    drawn::write_untrained_model(out, &means, &stds, opts.transformer_layers)?;
    state.latent_stats = Some((means, stds));
    write_state(out, state)?;
    Ok(())
}

fn train_decoder(
    out: &Path,
    opts: &TrainOptions,
    state: &mut TrainState,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(), TrainError> {
    let vc = drawn::vae_config();
    let init = initial_tensors(|vb| AutoencoderKLQwenImage::new(&vc, vb).map(drop))?;
    let varmap = varmap_from(init)?;
    load_vars(&varmap, &out.join(VAE_WEIGHTS))?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let vars = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
        data.iter()
            .filter(|(n, _)| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: opts.vae_lr / 3.0,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
    // Per-channel latent std, [1, 16, 1, 1], for the noise; `train` runs the VAE phase, which
    // measures the statistics, before this one, so the unit fallback is for a state file
    // without them.
    let latent_std = match &state.latent_stats {
        Some((_, std)) => Tensor::from_vec(std.clone(), (1, std.len(), 1, 1), &Device::Cpu)?,
        None => Tensor::ones((1, 16, 1, 1), DType::F32, &Device::Cpu)?,
    };
    let t0 = Instant::now();
    for step in state.decoder_steps_done..opts.decoder_steps {
        opt.set_learning_rate(lr_at(opts.vae_lr / 3.0, step, opts.decoder_steps));
        let mut rng = SplitMix64::new(opts.seed ^ 0xDEC0 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let scenes: Vec<Scene> = (0..opts.decoder_batch)
            .map(|_| Scene::random_train(&mut rng))
            .collect();
        let x = scene_images(&scenes, DRAWN_SIDE)?;
        let vae = AutoencoderKLQwenImage::new(&vc, vb.clone())?;
        let z = vae.encode(&x)?.mean.detach();
        let z = if opts.decoder_noise > 0.0 {
            noisy_latents(&z, &latent_std, opts.decoder_noise, &mut rng)?
        } else {
            z
        };
        let rec = vae.decode_unclamped(&z)?;
        let loss = (&rec - &x)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        let done = step + 1;
        progress(&TrainProgress {
            phase: Phase::Decoder,
            step: done,
            of: opts.decoder_steps,
            loss: loss.to_scalar::<f32>()?,
            elapsed: t0.elapsed(),
        });
        if done % opts.checkpoint_every == 0 || done == opts.decoder_steps {
            save_vars(&varmap, &out.join(VAE_WEIGHTS))?;
            state.decoder_steps_done = done;
            write_state(out, state)?;
        }
    }
    Ok(())
}

/// `z` ([B, C, h, w]) plus, for each scene, `u · level · std` of Gaussian noise per channel
/// (`std`: [1, C, 1, 1]), `u` uniform in [0, 1) per scene ([`TrainOptions::decoder_noise`]).
fn noisy_latents(
    z: &Tensor,
    std: &Tensor,
    level: f64,
    rng: &mut SplitMix64,
) -> Result<Tensor, TrainError> {
    let b = z.dim(0)?;
    let scale: Vec<f32> = (0..b).map(|_| (rng.next_f64() * level) as f32).collect();
    let scale = Tensor::from_vec(scale, (b, 1, 1, 1), z.device())?;
    let noise = Tensor::from_vec(
        gaussian(rng.next_u64(), z.elem_count()),
        z.shape(),
        z.device(),
    )?;
    Ok((z + noise.broadcast_mul(std)?.broadcast_mul(&scale)?)?)
}

/// One training example of the transformer: packed latents and both captions' embeddings.
struct Example {
    latents: Tensor,
    en: Tensor,
    zh: Tensor,
}

fn train_transformer(
    out: &Path,
    opts: &TrainOptions,
    state: &mut TrainState,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(), TrainError> {
    let tc = drawn::transformer_config_with(opts.transformer_layers);
    let init = initial_tensors(|vb| QwenImageTransformer::new(&tc, vb).map(drop))?;
    // adaLN-Zero (DiT): the modulations start at zero, so every block's gates are closed and
    // each block starts as the identity.
    let init = zero_where(init, |n| n.contains("_mod."))?;
    let varmap = varmap_from(init.clone())?;
    let folder_weights = out.join(TRANSFORMER_WEIGHTS);
    let online_weights = out.join(ONLINE_TRANSFORMER_WEIGHTS);
    if state.transformer_steps_done > 0 {
        // The optimiser's weights where an average was kept, else the folder's.
        let from = if online_weights.is_file() {
            &online_weights
        } else {
            &folder_weights
        };
        grow_from(&varmap, from, opts.transformer_layers)?;
    }
    let mut average = if opts.ema_decay > 0.0 {
        // Starts at the folder's weights: the average so far when there was one, else the
        // optimiser's weights (a first run, or a run that kept no average).
        let start = varmap_from(init)?;
        if state.transformer_steps_done > 0 {
            grow_from(&start, &folder_weights, opts.transformer_layers)?;
        }
        Some(WeightAverage::new(opts.ema_decay, start))
    } else {
        None
    };
    // The folder holds this many blocks from now on: weights first, then the config that
    // names them. Interrupted between the two, the folder still loads as the old depth: the
    // loader reads only the tensors its config names.
    save_transformer(out, &varmap, average.as_ref())?;
    write_transformer_config(out, &tc)?;

    let model = QwenImage::load(out, DType::F32, &Device::Cpu)?;
    let t0 = Instant::now();
    let mut rng = SplitMix64::new(opts.seed ^ 0x504f_4f4c);
    let mut pool = Vec::with_capacity(opts.pool);
    while pool.len() < opts.pool {
        let n = 64.min(opts.pool - pool.len());
        let scenes: Vec<Scene> = (0..n).map(|_| Scene::random_train(&mut rng)).collect();
        let img = scene_images(&scenes, DRAWN_SIDE)?;
        let z = model
            .vae()
            .normalize_latents(&model.vae().encode(&img)?.mean)?;
        let packed = pack(&z)?; // [n, S, 64]
        for (k, sc) in scenes.iter().enumerate() {
            pool.push(Example {
                latents: packed.narrow(0, k, 1)?,
                en: model.prompt_embeds(&sc.caption(Lang::En))?,
                zh: model.prompt_embeds(&sc.caption(Lang::Zh))?,
            });
        }
        progress(&TrainProgress {
            phase: Phase::Pool,
            step: pool.len(),
            of: opts.pool,
            loss: 0.0,
            elapsed: t0.elapsed(),
        });
    }
    let empty = model.prompt_embeds("")?;
    let grid = (DRAWN_SIDE as usize / 16, DRAWN_SIDE as usize / 16);
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: opts.transformer_lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
    let t0 = Instant::now();
    let b = opts.transformer_batch;
    for step in state.transformer_steps_done..opts.transformer_steps {
        opt.set_learning_rate(transformer_lr_at(opts, step));
        let mut rng =
            SplitMix64::new(opts.seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut lats = Vec::with_capacity(b);
        let mut texts = Vec::with_capacity(b);
        let mut sigmas = Vec::with_capacity(b);
        for _ in 0..b {
            let ex = &pool[(rng.next_u64() % pool.len() as u64) as usize];
            lats.push(ex.latents.clone());
            texts.push(if rng.next_f64() < CAPTION_DROPOUT {
                empty.clone()
            } else if rng.next_u64().is_multiple_of(2) {
                ex.en.clone()
            } else {
                ex.zh.clone()
            });
            // σ in (0.001, 0.999): both ends of the schedule, never exactly clean or pure noise.
            sigmas.push(shifted_sigma(0.001 + 0.998 * rng.next_f64(), opts.sigma_shift) as f32);
        }
        let x0 = Tensor::cat(&lats, 0)?; // [B, S, 64]
        let noise = Tensor::from_vec(
            gaussian(rng.next_u64(), x0.elem_count()),
            x0.shape(),
            &Device::Cpu,
        )?;
        let sigma = Tensor::from_vec(sigmas, b, &Device::Cpu)?;
        let s3 = sigma.reshape((b, 1, 1))?;
        let xt = (noise.broadcast_mul(&s3)? + x0.broadcast_mul(&s3.affine(-1.0, 1.0)?)?)?;
        let target = (&noise - &x0)?;
        let (txt, mask) = pad_text(&texts, &Device::Cpu)?;
        // Built anew every step, as the VAE is (derived weights are copies).
        let transformer = QwenImageTransformer::new(&tc, vb.clone())?;
        let pred = transformer.forward(&xt, &txt, mask.as_ref(), &sigma, grid)?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if let Some(a) = average.as_mut() {
            a.update(&varmap)?;
        }
        let done = step + 1;
        progress(&TrainProgress {
            phase: Phase::Transformer,
            step: done,
            of: opts.transformer_steps,
            loss: loss.to_scalar::<f32>()?,
            elapsed: t0.elapsed(),
        });
        if done % opts.checkpoint_every == 0 || done == opts.transformer_steps {
            save_transformer(out, &varmap, average.as_ref())?;
            state.transformer_steps_done = done;
            write_state(out, state)?;
        }
    }
    Ok(())
}

/// Writes the transformer's weights into `out`: the optimiser's into `transformer/`, or, with an
/// average, the average there and the optimiser's beside it (the optimiser's first, so an
/// interrupted checkpoint leaves the two files at most one checkpoint apart). A run without an
/// average removes an older run's optimiser file, which would otherwise be resumed from.
fn save_transformer(
    out: &Path,
    varmap: &VarMap,
    average: Option<&WeightAverage>,
) -> Result<(), TrainError> {
    let online = out.join(ONLINE_TRANSFORMER_WEIGHTS);
    match average {
        Some(a) => {
            save_vars(varmap, &online)?;
            save_vars(a.weights(), &out.join(TRANSFORMER_WEIGHTS))
        }
        None => {
            save_vars(varmap, &out.join(TRANSFORMER_WEIGHTS))?;
            match std::fs::remove_file(&online) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(EngineError::io(&online, e).into())
                }
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_noise_scales_with_each_channels_std_and_each_scenes_draw() {
        let z = Tensor::zeros((64, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let std = Tensor::from_vec(vec![1f32, 10.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let noisy = |seed| {
            noisy_latents(&z, &std, 0.3, &mut SplitMix64::new(seed))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let a = noisy(3);
        assert_eq!(a, noisy(3), "the same draw gives the same noise");
        assert_ne!(a, noisy(4));
        // Per channel, the RMS over all scenes: about level · std / √3 (u uniform in [0, 1)).
        let rms = |c: usize| {
            let v: Vec<f32> = a
                .chunks(16)
                .enumerate()
                .filter(|(i, _)| i % 2 == c)
                .flat_map(|(_, x)| x.iter().copied())
                .collect();
            (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
        };
        let expected = 0.3 / 3f32.sqrt();
        assert!((rms(0) / expected - 1.0).abs() < 0.25, "{}", rms(0));
        assert!(
            (rms(1) / (10.0 * expected) - 1.0).abs() < 0.25,
            "{}",
            rms(1)
        );
    }

    #[test]
    fn a_restarted_schedule_warms_up_and_decays_over_its_own_steps() {
        let opts = TrainOptions {
            transformer_steps: 300,
            transformer_lr: 1.0,
            schedule_start: 100,
            ..TrainOptions::default()
        };
        // 200 steps of its own: a warm-up of 10, then cosine down to a tenth.
        assert!((transformer_lr_at(&opts, 100) - 0.1).abs() < 1e-12);
        assert!((transformer_lr_at(&opts, 109) - 1.0).abs() < 1e-12);
        assert!((transformer_lr_at(&opts, 299) - 0.1).abs() < 1e-3);
        // Without a restart the same step is deep in the first run's decay.
        let whole = TrainOptions {
            schedule_start: 0,
            ..opts.clone()
        };
        // (past its warm-up of 15, 30 % into the cosine: 0.1 + 0.45·(1 + cos 0.298π) ≈ 0.82).
        assert!((transformer_lr_at(&whole, 100) - 0.82).abs() < 0.01);
        assert!(transformer_lr_at(&whole, 250) < 0.3);
    }
}
