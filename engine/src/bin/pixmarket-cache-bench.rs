//! `pixmarket-cache-bench`: step caching's speed against its cost in quality, side by side in
//! one run, on the same models, prompts and latents.
//!
//! For each model (`random`: the random tiny pipeline, 2 blocks; `deep`: the same pipeline with
//! a 12-block random transformer; `drawn`: the shipped trained tiny model), every image is
//! generated with step caching off and at each `--thresholds` value. Per mode it reports:
//! the denoising loop's wall time per image (median over `--reps` interleaved repetitions; the
//! VAE decode, the same for every mode, is left out), transformer row-forwards whose remaining
//! blocks ran and those reused per image, the speedup (off's median over the mode's), and the
//! quality against the uncached image of the same prompt and seed: PSNR over all pixels of all
//! images (8-bit RGB) and the largest difference of one channel of one pixel. On the drawn
//! model it also counts images whose scene is still drawn right (`scenes::check_adherence`).
//!
//! Prompt embeddings are computed once per prompt before timing (the prompt cache), so the
//! times are the denoising loop alone. See `docs/benchmarks.md` for the command and figures.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use pixmarket_engine::drawn::{DRAWN_SIDE, install_drawn_model};
use pixmarket_engine::scenes::{Lang, Scene, check_adherence, held_out_set};
use pixmarket_engine::tiny::{ensure_random_tiny_model, transformer_config, write_tiny_model_with};
use pixmarket_engine::{GenerateRequest, QwenImage, StepCacheMode};
use serde_json::{Value, json};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: pixmarket-cache-bench [--models random,deep,drawn]
  [--thresholds 0.02,0.05,0.1,0.2,0.4] [--images 8] [--reps 3] [--json OUT.json]";

/// Blocks of the `deep` random transformer: enough that the first block is a small part of a
/// forward, as in the real model (1 of 60), while a CPU run stays within minutes.
const DEEP_LAYERS: usize = 12;
/// Prompts of the random pipelines (the drawn model gets held-out scene captions).
const PROMPTS: [&str; 4] = [
    "a red fox in the snow",
    "a lighthouse on a cliff at dusk",
    "a bowl of ramen, steam rising",
    "an old map of a harbour town",
];
/// Seed of the drawn model's held-out scenes.
const SCENE_SEED: u64 = 0x4341_4348;
/// Steps and true CFG of the drawn model's runs: 8 steps with CFG off, as docs/benchmarks.md
/// measured them, so its figures reproduce; the model's own defaults (`drawn::DRAWN_STEPS`,
/// 4 with CFG 3) leave a step cache fewer steps to skip.
const BENCH_DRAWN_STEPS: u32 = 8;
const BENCH_DRAWN_CFG: f32 = 1.0;

struct Opts {
    models: Vec<String>,
    thresholds: Vec<f32>,
    images: usize,
    reps: usize,
    json: Option<String>,
}

fn parse() -> BoxResult<Opts> {
    let mut o = Opts {
        models: vec!["random".into(), "deep".into(), "drawn".into()],
        thresholds: vec![0.02, 0.05, 0.1, 0.2, 0.4],
        images: 8,
        reps: 3,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--models" => o.models = val()?.split(',').map(String::from).collect(),
            "--thresholds" => {
                o.thresholds = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--images" => o.images = val()?.parse()?,
            "--reps" => o.reps = val()?.parse()?,
            "--json" => o.json = Some(val()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }
    if o.images == 0 || o.reps == 0 {
        return Err("--images and --reps must be at least 1".into());
    }
    Ok(o)
}

/// A model to measure and the requests it gets.
struct Case {
    name: String,
    model: QwenImage,
    requests: Vec<GenerateRequest>,
    scenes: Option<Vec<Scene>>,
}

fn case(name: &str, images: usize, dir: &Path) -> BoxResult<Case> {
    let dir = dir.join(name);
    let random_requests = |n: usize| {
        (0..n)
            .map(|i| {
                let mut r =
                    GenerateRequest::text_to_image(PROMPTS[i % PROMPTS.len()], 128, 128, 20);
                r.true_cfg_scale = 4.0;
                r.negative_prompt = " ".into();
                r.seed = i as u64;
                r
            })
            .collect::<Vec<_>>()
    };
    let (requests, scenes) = match name {
        "random" => {
            ensure_random_tiny_model(&dir)?;
            (random_requests(images), None)
        }
        "deep" => {
            let tc = pixmarket_engine::config::TransformerConfig {
                num_layers: DEEP_LAYERS,
                ..transformer_config()
            };
            write_tiny_model_with(&dir, &tc)?;
            (random_requests(images), None)
        }
        "drawn" => {
            install_drawn_model(&dir)?;
            let scenes = held_out_set(SCENE_SEED, images);
            let reqs = scenes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut r = GenerateRequest::text_to_image(
                        s.caption(Lang::En),
                        DRAWN_SIDE,
                        DRAWN_SIDE,
                        BENCH_DRAWN_STEPS,
                    );
                    r.true_cfg_scale = BENCH_DRAWN_CFG;
                    r.seed = i as u64;
                    r
                })
                .collect();
            (reqs, Some(scenes))
        }
        other => return Err(format!("unknown model {other}: random, deep or drawn").into()),
    };
    let model = QwenImage::load(&dir, DType::F32, &Device::Cpu)?;
    Ok(Case {
        name: name.into(),
        model,
        requests,
        scenes,
    })
}

/// CPU time of this process (all threads, user + system) in milliseconds, from
/// `/proc/self/stat` (ticks of 10 ms); `None` off Linux. Less sensitive than wall time to other
/// processes on a shared machine, since time spent waiting for a core is not counted.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures one case; returns its table rows as JSON.
fn measure(c: &Case, modes: &[StepCacheMode], reps: usize) -> BoxResult<Vec<Value>> {
    let n = c.requests.len();
    // Warm the prompt cache and the allocator: one untimed run per mode.
    let mut latents: Vec<Vec<Tensor>> = vec![Vec::new(); modes.len()];
    let mut forwards = vec![(0u64, 0u64); modes.len()];
    for (m, mode) in modes.iter().enumerate() {
        for r in &c.requests {
            let (l, s) =
                c.model
                    .generate_latents_with(std::slice::from_ref(r), *mode, &mut |_| {
                        ControlFlow::Continue(())
                    })?;
            latents[m].extend(l);
            forwards[m].0 += s.full_forwards;
            forwards[m].1 += s.reused_forwards;
        }
    }
    // Timed: the modes take turns on each image, so drift in the machine's load falls on
    // every mode alike; one repetition's time of a mode is its sum over the images.
    let mut times = vec![Vec::with_capacity(reps); modes.len()];
    let mut cpu = vec![Vec::with_capacity(reps); modes.len()];
    for _ in 0..reps {
        let mut sums = vec![0f64; modes.len()];
        let mut cpu_sums = vec![0f64; modes.len()];
        for r in &c.requests {
            for (m, mode) in modes.iter().enumerate() {
                let (t0, c0) = (Instant::now(), cpu_ms());
                c.model
                    .generate_latents_with(std::slice::from_ref(r), *mode, &mut |_| {
                        ControlFlow::Continue(())
                    })?;
                sums[m] += t0.elapsed().as_secs_f64() * 1000.0;
                if let (Some(a), Some(b)) = (c0, cpu_ms()) {
                    cpu_sums[m] += b - a;
                }
            }
        }
        for (m, (sum, cpu_sum)) in sums.into_iter().zip(cpu_sums).enumerate() {
            times[m].push(sum / n as f64);
            cpu[m].push(cpu_sum / n as f64);
        }
    }
    let rgb: Vec<Vec<Vec<u8>>> = latents
        .iter()
        .map(|ls| ls.iter().map(|l| c.model.decode_to_rgb8(l)).collect())
        .collect::<Result<_, _>>()?;
    let off_ms = median(&mut times[0].clone());
    let off_cpu = median(&mut cpu[0].clone());
    let mut rows = Vec::new();
    for (m, mode) in modes.iter().enumerate() {
        let (mut sq, mut count, mut max_diff) = (0f64, 0u64, 0u8);
        for (a, b) in rgb[0].iter().zip(&rgb[m]) {
            for (x, y) in a.iter().zip(b) {
                let d = x.abs_diff(*y);
                max_diff = max_diff.max(d);
                sq += f64::from(d) * f64::from(d);
                count += 1;
            }
        }
        let mse = sq / count.max(1) as f64;
        let psnr = if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255.0f64 * 255.0 / mse).log10()
        };
        let ms = median(&mut times[m].clone());
        let cpu_ms = median(&mut cpu[m].clone());
        let adherent = c.scenes.as_ref().map(|scenes| {
            scenes
                .iter()
                .zip(&rgb[m])
                .filter(|(s, img)| check_adherence(s, img, DRAWN_SIDE).ok())
                .count()
        });
        let threshold = match mode {
            StepCacheMode::Off => Value::from("off"),
            StepCacheMode::FirstBlock { threshold } => {
                json!((f64::from(*threshold) * 1000.0).round() / 1000.0)
            }
        };
        let (full, reused) = forwards[m];
        let row = json!({
            "model": c.name,
            "threshold": threshold,
            "images": n,
            "steps": c.requests[0].steps,
            "full_forwards_per_image": full as f64 / n as f64,
            "reused_forwards_per_image": reused as f64 / n as f64,
            "reused_fraction": reused as f64 / (full + reused).max(1) as f64,
            "denoise_ms_per_image_median": ms,
            "denoise_ms_min_max": [
                times[m].iter().copied().fold(f64::INFINITY, f64::min),
                times[m].iter().copied().fold(0.0, f64::max),
            ],
            "speedup": off_ms / ms,
            "cpu_ms_per_image_median": cpu_ms,
            "cpu_speedup": off_cpu / cpu_ms,
            "psnr_db": if psnr.is_finite() { json!(psnr) } else { json!("inf") },
            "max_pixel_diff": max_diff,
            "adherent_images": adherent,
        });
        eprintln!(
            "{:6} {:>6} | reused {:5.2}/{:5.2} per image ({:4.1} %) | {:8.1} ms/image | ×{:.2} | CPU ×{:.2} | PSNR {} dB | max Δ {:3}{}",
            c.name,
            row["threshold"].to_string().trim_matches('"'),
            reused as f64 / n as f64,
            (full + reused) as f64 / n as f64,
            100.0 * reused as f64 / (full + reused).max(1) as f64,
            ms,
            off_ms / ms,
            off_cpu / cpu_ms,
            if psnr.is_finite() {
                format!("{psnr:5.1}")
            } else {
                "  inf".into()
            },
            max_diff,
            adherent.map_or(String::new(), |a| format!(" | adherent {a}/{n}")),
        );
        rows.push(row);
    }
    Ok(rows)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pixmarket-cache-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> BoxResult<()> {
    let o = parse()?;
    let tmp = std::env::temp_dir().join(format!("pixmarket-cache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut modes = vec![StepCacheMode::Off];
    modes.extend(
        o.thresholds
            .iter()
            .map(|&threshold| StepCacheMode::FirstBlock { threshold }),
    );
    let mut all = Vec::new();
    for name in &o.models {
        let c = case(name, o.images, &tmp)?;
        eprintln!("{}: {}", c.name, c.model.description());
        all.extend(measure(&c, &modes, o.reps)?);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let report = json!({ "rows": all, "reps": o.reps });
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
