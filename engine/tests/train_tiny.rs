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
