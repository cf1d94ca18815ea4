//! `pixmarket model`: model folders. `model tiny` writes the built-in tiny model (the drawn one
//! that `--model tiny` loads, or with `--random` the random-weights one the parity and stress
//! tests use) in the diffusers layout; `model train-tiny` trains the drawn one from scratch;
//! `model quantize` writes a copy of a model folder with a GGUF-quantized transformer.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pixmarket_engine::drawn::{DRAWN_MODEL_ID, write_drawn_model};
use pixmarket_engine::quant::{QuantFormat, quantize_model};
use pixmarket_engine::text_encoder_gguf::{TEXT_ENCODER_GGUF_FILE, quantize_model_text_encoder};
use pixmarket_engine::tiny::{TINY_MODEL_ID, write_tiny_model};
use pixmarket_engine::train::{Phase, TrainOptions, train};

use super::DataDirArg;
use crate::usage::out;

#[derive(Debug, Args)]
pub(crate) struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Write the built-in tiny model (trained on drawn scenes: it draws what the grammar in
    /// the engine README asks for) in the diffusers Qwen-Image layout.
    Tiny(TinyArgs),
    /// Train the drawn tiny model from scratch on procedurally drawn scenes (CPU; about
    /// an hour on two cores), writing a loadable model folder at every checkpoint.
    TrainTiny(TrainTinyArgs),
    /// Write a copy of a model folder whose transformer is quantized (GGUF: q8_0 ≈ 21.7 GB,
    /// q5_k ≈ 14.1 GB, q4_k ≈ 11.5 GB for Qwen-Image); `--model DIR2` loads it. The VAE,
    /// tokenizer and scheduler are hard-linked (or copied) unchanged, and so is the text
    /// encoder unless `--text-encoder` quantizes it too.
    Quantize(QuantizeArgs),
}

#[derive(Debug, Args)]
struct QuantizeArgs {
    /// The diffusers Qwen-Image folder to read.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The format of the block weights.
    #[arg(long, value_parser = ["q8_0", "q5_k", "q4_k"])]
    to: String,
    /// The folder to write (must not exist, or be empty).
    #[arg(long, value_name = "DIR2")]
    out: PathBuf,
    /// Also write the text encoder's linears in the same format, as one llama.cpp-layout GGUF
    /// file (`text_encoder/model.gguf`, architecture qwen2vl; embedding and norms in f32)
    /// instead of linking its safetensors.
    #[arg(long)]
    text_encoder: bool,
}

#[derive(Debug, Args)]
struct TinyArgs {
    /// The folder to write [default: <data-dir>/models/tiny, what `--model tiny` uses].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Write the random-weights tiny model instead (its pictures are noise).
    #[arg(long)]
    random: bool,
    #[command(flatten)]
    data_dir: DataDirArg,
}

#[derive(Debug, Args)]
struct TrainTinyArgs {
    /// The model folder to train into (loadable with `--model DIR` after every checkpoint).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Continue the run recorded in DIR/train_state.json instead of starting afresh.
    #[arg(long)]
    resume: bool,
    /// VAE optimiser steps [default: the shipped model's run].
    #[arg(long)]
    vae_steps: Option<usize>,
    /// Transformer optimiser steps [default: the shipped model's run].
    #[arg(long)]
    transformer_steps: Option<usize>,
    /// Transformer blocks [default: the shipped model's]. With --resume it may be more than
    /// the checkpoint has: the new blocks start as the identity and train from there.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    transformer_layers: Option<u16>,
    /// Peak transformer learning rate [default: the shipped model's run].
    #[arg(long, value_name = "LR")]
    transformer_lr: Option<f64>,
    /// Keep a moving average of the transformer's weights with this decay (above 0 and below
    /// 1; 0, the default, keeps none): the folder then draws with the average, and --resume
    /// goes on from the optimiser's own weights, kept beside it.
    #[arg(long, value_name = "D")]
    ema_decay: Option<f64>,
    /// The transformer step the learning-rate warm-up and cosine decay start from [default: 0,
    /// the whole run]. With --resume, the steps already done give the resumed steps a schedule
    /// of their own instead of the tail of the first run's.
    #[arg(long, value_name = "STEP")]
    schedule_start: Option<usize>,
}

pub(crate) fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Tiny(a) => {
            let out = match a.out {
                Some(p) => p,
                None => a.data_dir.path()?.join("models").join("tiny"),
            };
            if a.random {
                write_tiny_model(&out)
            } else {
                write_drawn_model(&out)
            }
            .with_context(|| format!("cannot write the tiny model to {}", out.display()))?;
            if a.random {
                out!(
                    "wrote {TINY_MODEL_ID} to {} (random weights: it draws noise)",
                    out.display()
                )?;
            } else {
                out!("wrote {DRAWN_MODEL_ID} to {}", out.display())?;
            }
            Ok(())
        }
        ModelCommand::TrainTiny(a) => train_tiny(a),
        ModelCommand::Quantize(a) => {
            let format = QuantFormat::parse(&a.to)?;
            if !a.model.join("model_index.json").is_file() {
                return Err(crate::usage::usage!(
                    "{} is not a model folder (no model_index.json)",
                    a.model.display()
                ));
            }
            let report = quantize_model(&a.model, &a.out, format).with_context(|| {
                format!("cannot write the {} copy of {}", a.to, a.model.display())
            })?;
            out!(
                "wrote {} ({} transformer tensors in {}, {} kept in f32; {:.1} MB)",
                a.out.display(),
                report.quantized,
                a.to,
                report.kept,
                report.bytes as f64 / 1e6
            )?;
            if a.text_encoder {
                let te =
                    quantize_model_text_encoder(&a.model, &a.out, format).with_context(|| {
                        format!(
                            "cannot write the {} text encoder of {}",
                            a.to,
                            a.model.display()
                        )
                    })?;
                out!(
                    "wrote {}/text_encoder/{TEXT_ENCODER_GGUF_FILE} in llama.cpp's layout ({} \
                     linears in {}, {} tensors kept in f32; {:.1} MB)",
                    a.out.display(),
                    te.quantized,
                    a.to,
                    te.kept,
                    te.bytes as f64 / 1e6
                )?;
            }
            Ok(())
        }
    }
}

fn train_tiny(a: TrainTinyArgs) -> anyhow::Result<()> {
    let mut opts = TrainOptions::default();
    if let Some(n) = a.vae_steps {
        opts.vae_steps = n;
    }
    if let Some(n) = a.transformer_steps {
        opts.transformer_steps = n;
    }
    if let Some(n) = a.transformer_layers {
        opts.transformer_layers = usize::from(n);
    }
    if let Some(lr) = a.transformer_lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            return Err(crate::usage::usage!(
                "--transformer-lr {lr} is not a learning rate: give a number above 0 and below 1"
            ));
        }
        opts.transformer_lr = lr;
    }
    if let Some(d) = a.ema_decay {
        opts.ema_decay = d;
    }
    if let Some(n) = a.schedule_start {
        if n >= opts.transformer_steps {
            return Err(crate::usage::usage!(
                "--schedule-start {n} leaves no steps to schedule: give a step below the run's \
                 {} transformer steps (--transformer-steps)",
                opts.transformer_steps
            ));
        }
        opts.schedule_start = n;
    }
    // The engine's own refusal of options no run can use, as a usage error.
    opts.check().map_err(|e| crate::usage::usage!("{e}"))?;
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bar: Option<(Phase, ProgressBar)> = None;
    let started = std::time::Instant::now();
    let quiet = super::quiet();
    train(&a.out, &opts, a.resume, &mut |p| {
        if bar.as_ref().is_none_or(|(phase, _)| *phase != p.phase) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = if quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(p.of as u64).with_style(style.clone())
            };
            b.set_prefix(match p.phase {
                Phase::Vae => "vae",
                Phase::Decoder => "decoder",
                Phase::Pool => "encode pool",
                Phase::Transformer => "transformer",
            });
            bar = Some((p.phase, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(p.step as u64);
            if p.phase != Phase::Pool {
                b.set_message(format!("loss {:.4}", p.loss));
            }
        }
    })
    .with_context(|| format!("training into {} failed", a.out.display()))?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    out!(
        "trained {DRAWN_MODEL_ID} into {} in {:.1} min; load it with --model {}",
        a.out.display(),
        started.elapsed().as_secs_f64() / 60.0,
        a.out.display()
    )?;
    Ok(())
}
