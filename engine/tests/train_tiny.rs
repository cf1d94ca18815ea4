//! `train::train` (what `pixmarket model train-tiny` runs), at a few steps a phase: the folder
//! it writes loads as a model and draws; a resumed run goes on from the recorded steps; a
//! resumed run may grow the transformer (the grown model draws what the checkpoint drew) but
//! not shrink it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device};
use pixmarket_engine::drawn::DRAWN_SIDE;
use pixmarket_engine::train::{Phase, TrainError, TrainOptions, train};
use pixmarket_engine::{GenerateRequest, QwenImage};

/// A run small enough for a debug test build: a few steps of every phase.
fn short_run(layers: usize, transformer_steps: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        vae_steps: 2,
        vae_batch: 2,
        decoder_steps: 2,
        decoder_batch: 1,
        transformer_steps,
        transformer_layers: layers,
        transformer_batch: 2,
        transformer_lr: lr,
        pool: 4,
        checkpoint_every: 1,
        ..TrainOptions::default()
    }
}

/// Trains `opts` into `dir` and returns the transformer steps reported.
fn run(dir: &Path, opts: &TrainOptions, resume: bool) -> Result<Vec<usize>, TrainError> {
    let mut steps = Vec::new();
    train(dir, opts, resume, &mut |p| {
        if p.phase == Phase::Transformer {
            steps.push(p.step);
        }
    })?;
    Ok(steps)
}

fn draw(dir: &Path) -> (usize, Vec<u8>) {
    let model = QwenImage::load(dir, DType::F32, &Device::Cpu).unwrap();
    let mut r = GenerateRequest::text_to_image(
        "a small red circle on the left on a blue background",
        DRAWN_SIDE,
        DRAWN_SIDE,
        2,
    );
    r.seed = 3;
    let img = model
        .generate(&[r], &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .remove(0);
    (model.transformer_config().num_layers, img.rgb)
}

#[test]
fn a_trained_folder_loads_resumes_and_grows_but_does_not_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");

    assert_eq!(run(&out, &short_run(2, 2, 1e-3), false).unwrap(), [1, 2]);
    let (layers, before) = draw(&out);
    assert_eq!(layers, 2);
    assert_eq!(before.len(), 3 * (DRAWN_SIDE * DRAWN_SIDE) as usize);

    // Resumed with one more step and one more block: only the new step runs, and at a
    // learning rate too small to move a weight the grown model draws the same picture.
    assert_eq!(run(&out, &short_run(3, 3, 1e-12), true).unwrap(), [3]);
    let (layers, after) = draw(&out);
    assert_eq!(layers, 3);
    let worst = before
        .iter()
        .zip(&after)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "the grown model drew differently: {worst} levels"
    );

    // Fewer blocks than the checkpoint has would throw trained blocks away.
    match run(&out, &short_run(1, 4, 1e-3), true) {
        Err(TrainError::Shrink { have: 3, asked: 1 }) => {}
        other => panic!("expected a refusal to shrink, got {other:?}"),
    }
    assert_eq!(draw(&out).0, 3, "the refused run left the folder as it was");
}

/// The folder's transformer tensors, by name, in f32.
fn weights(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn max_diff(
    a: &std::collections::HashMap<String, Vec<f32>>,
    b: &std::collections::HashMap<String, Vec<f32>>,
) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn an_averaged_run_draws_with_the_average_and_resumes_from_the_optimiser() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let folder = out.join("transformer/diffusion_pytorch_model.safetensors");
    let online = out.join("transformer_online.safetensors");

    assert_eq!(run(&out, &short_run(2, 2, 1e-3), false).unwrap(), [1, 2]);
    assert!(
        !online.exists(),
        "a run without an average writes no optimiser file"
    );
    for bad in [1.0, -0.1, f64::NAN] {
        let opts = TrainOptions {
            ema_decay: bad,
            ..short_run(2, 4, 1e-2)
        };
        assert!(matches!(run(&out, &opts, true), Err(TrainError::Decay(_))));
    }
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        let opts = TrainOptions {
            decoder_noise: bad,
            ..short_run(2, 4, 1e-2)
        };
        assert!(matches!(
            run(&out, &opts, true),
            Err(TrainError::DecoderNoise(_))
        ));
    }

    // Two steps with an average, restarting the schedule: the folder holds the average,
    // which lags the optimiser's weights, and still loads and draws.
    let averaged = TrainOptions {
        ema_decay: 0.9,
        schedule_start: 2,
        ..short_run(2, 4, 1e-2)
    };
    assert_eq!(run(&out, &averaged, true).unwrap(), [3, 4]);
    let (avg, opt) = (weights(&folder), weights(&online));
    assert!(
        max_diff(&avg, &opt) > 1e-6,
        "the average is the optimiser's weights"
    );
    assert_eq!(draw(&out).0, 2);

    // Resumed without an average, at a rate too small to move a weight: training went on from
    // the optimiser's weights (not the average), which the folder now holds, and the
    // optimiser file is gone.
    assert_eq!(run(&out, &short_run(2, 5, 1e-12), true).unwrap(), [5]);
    assert!(!online.exists());
    let after = weights(&folder);
    assert!(
        max_diff(&after, &opt) < 1e-6,
        "did not resume from the optimiser's weights"
    );
    assert!(max_diff(&after, &avg) > 1e-6);
}
