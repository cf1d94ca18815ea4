//! Trains the drawn tiny model without the CLI (what `pixmarket model train-tiny` runs):
//! `cargo run -p pixmarket-engine --example train_tiny -- OUT [--resume] [KEY=VALUE ...]`, where
//! KEY is a field of `TrainOptions` (e.g. `transformer_steps=100`). Prints one line per 10 steps.

use std::path::PathBuf;

use pixmarket_engine::train::{Phase, TrainOptions, train};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "tiny-drawn".into()));
    let mut resume = false;
    let mut opts = serde_json::to_value(TrainOptions::default())?;
    for a in args {
        if a == "--resume" {
            resume = true;
        } else if let Some((k, v)) = a.split_once('=') {
            opts[k] = serde_json::from_str(v)?;
        }
    }
    let opts: TrainOptions = serde_json::from_value(opts)?;
    println!("{opts:?}");
    train(&out, &opts, resume, &mut |p| {
        if p.step % 10 == 0 || p.step == p.of || (p.phase != Phase::Pool && p.step < 5) {
            println!(
                "{:?} {}/{} loss {:.5} {:.1}s",
                p.phase,
                p.step,
                p.of,
                p.loss,
                p.elapsed.as_secs_f64()
            );
        }
    })?;
    Ok(())
}
