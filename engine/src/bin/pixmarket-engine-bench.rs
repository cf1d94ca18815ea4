//! `pixmarket-engine-bench`: times the Qwen-Image engine (transformer forwards, VAE decode, text
//! encoder, an end-to-end CFG image) and writes a JSON report, optionally checking one forward
//! against a reference dumped by `engine/bench/bench_diffusers.py`.
//!
//! Weights are either random (`--config real|tiny|DIR`: every tensor is drawn with `randn` **on
//! the target device** in f32, scaled and cast one tensor at a time, so the 20B preset never
//! touches host memory) or loaded (`--model DIR` for a diffusers folder, `--weights PATH` for a
//! transformer folder or one `.safetensors` file saved by the torch script).
//!
//! Timing: every measured region ends with `Device::synchronize`, warm-up runs are discarded,
//! and the median of `--iters` runs is reported. Peak GPU memory (CUDA builds only) is sampled:
//! a thread polls the driver's `cuMemGetInfo` (through cudarc, `total - free`) every
//! millisecond during each measured section, so it is device-wide used memory (CUDA context and
//! any other process included) and a very short spike between two polls can be missed.
//!
//! See `docs/benchmarks.md` for the method and the exact commands.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::pipeline::{device_from_name, dtype_from_name};
use pixmarket_engine::text_encoder::{QwenTextEncoder, TextEncoderConfig};
use pixmarket_engine::transformer::QwenImageTransformer;
use pixmarket_engine::vae::{AutoencoderKLQwenImage, VaeConfig};
use pixmarket_engine::{guidance, tiny};
use serde_json::{Value, json};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: pixmarket-engine-bench [--device cpu|cuda] [--dtype bf16|f32|f16]
  [--config real|tiny|DIR] [--model DIR] [--weights DIR|FILE.safetensors]
  [--sizes 512,1024,1328] [--batch 1,2] [--text-len 100] [--warmup 2] [--iters 5]
  [--vae-size 1024 | --no-vae] [--no-text-encoder] [--e2e-steps 50] [--e2e-size 1024]
  [--cfg-scale 4] [--peak-tflops 790] [--seed 0] [--compare-with REF.safetensors]
  [--compare-tol 0.02] [--json OUT.json]";

/// Command-line options.
#[derive(Debug, Clone)]
struct Opts {
    device: String,
    dtype: Option<String>,
    config: String,
    model: Option<PathBuf>,
    weights: Option<PathBuf>,
    sizes: Vec<usize>,
    batches: Vec<usize>,
    text_len: usize,
    warmup: usize,
    iters: usize,
    vae_size: Option<usize>,
    text_encoder: bool,
    e2e_steps: usize,
    e2e_size: usize,
    cfg_scale: f64,
    peak_tflops: f64,
    seed: u64,
    compare_with: Option<PathBuf>,
    compare_tol: f64,
    json: Option<PathBuf>,
}

fn parse_list(s: &str) -> BoxResult<Vec<usize>> {
    let v = s
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(v)
}

fn parse_args(args: &[String]) -> BoxResult<Opts> {
    let mut o = Opts {
        device: "cpu".into(),
        dtype: None,
        config: "tiny".into(),
        model: None,
        weights: None,
        sizes: vec![512, 1024, 1328],
        batches: vec![1, 2],
        text_len: 100,
        warmup: 2,
        iters: 5,
        vae_size: Some(1024),
        text_encoder: true,
        e2e_steps: 50,
        e2e_size: 1024,
        cfg_scale: 4.0,
        peak_tflops: 790.0,
        seed: 0,
        compare_with: None,
        compare_tol: 2e-2,
        json: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--device" => o.device = val()?,
            "--dtype" => o.dtype = Some(val()?),
            "--config" => o.config = val()?,
            "--model" => o.model = Some(PathBuf::from(val()?)),
            "--weights" => o.weights = Some(PathBuf::from(val()?)),
            "--sizes" => o.sizes = parse_list(&val()?)?,
            "--batch" => o.batches = parse_list(&val()?)?,
            "--text-len" => o.text_len = val()?.parse()?,
            "--warmup" => o.warmup = val()?.parse()?,
            "--iters" => o.iters = val()?.parse()?,
            "--vae-size" => o.vae_size = Some(val()?.parse()?),
            "--no-vae" => o.vae_size = None,
            "--no-text-encoder" => o.text_encoder = false,
            "--e2e-steps" => o.e2e_steps = val()?.parse()?,
            "--e2e-size" => o.e2e_size = val()?.parse()?,
            "--cfg-scale" => o.cfg_scale = val()?.parse()?,
            "--peak-tflops" => o.peak_tflops = val()?.parse()?,
            "--seed" => o.seed = val()?.parse()?,
            "--compare-with" => o.compare_with = Some(PathBuf::from(val()?)),
            "--compare-tol" => o.compare_tol = val()?.parse()?,
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}").into()),
        }
    }
    if o.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    for &s in o.sizes.iter().chain(o.vae_size.iter()).chain([&o.e2e_size]) {
        if s == 0 || s % 16 != 0 {
            return Err(format!("image sizes must be positive multiples of 16, got {s}").into());
        }
    }
    Ok(o)
}

/// A `VarBuilder` backend that makes every tensor asked for with `randn` on the target device,
/// scaled like a usual init: linear/conv weights `N(0, 1/fan_in)`, biases `0.02·N`, norm weights
/// `1 + 0.1·N`, embeddings `N(0, 1)`. Drawn in f32 (candle's CUDA `randn` has no bf16) and cast
/// right away, so at most one f32 tensor exists at a time.
#[derive(Debug, Clone)]
struct DeviceRandom;

impl SimpleBackend for DeviceRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_norm = leaf == "gamma"
            || (leaf == "weight" && dims.len() == 1)
            || name.contains("norm.weight");
        let (mean, std) = if is_norm {
            (1.0f32, 0.1f32)
        } else if leaf == "bias" {
            (0.0, 0.02)
        } else if name.contains("embed_tokens") {
            (0.0, 1.0)
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            (0.0, 1.0 / (fan_in as f32).sqrt())
        };
        Tensor::randn(mean, std, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} was requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(DeviceRandom), dtype, device.clone())
}

/// The three configs of a run.
#[derive(Debug, Clone)]
struct Configs {
    transformer: TransformerConfig,
    vae: VaeConfig,
    text: TextEncoderConfig,
}

fn configs(name: &str) -> BoxResult<Configs> {
    Ok(match name {
        "real" => Configs {
            transformer: TransformerConfig::qwen_image_20b(),
            vae: VaeConfig::default(),
            text: TextEncoderConfig::qwen2_5_vl_7b(),
        },
        "tiny" => Configs {
            transformer: tiny::transformer_config(),
            vae: tiny::vae_config(),
            text: tiny::text_encoder_config(),
        },
        dir => {
            let dir = Path::new(dir);
            let text = std::fs::read_to_string(dir.join("text_encoder/config.json"))?;
            Configs {
                transformer: TransformerConfig::from_file(&dir.join("transformer/config.json"))?,
                vae: AutoencoderKLQwenImage::load_config(&dir.join("vae"))?,
                text: TextEncoderConfig::from_json(&text)?,
            }
        }
    })
}

/// FLOPs of one transformer forward (multiply-add = 2 FLOPs), batch `b`, `s_i` image tokens,
/// `s_t` text tokens, `N = s_i + s_t`, width `d`, MLP width `f = 4d`, `L` blocks, `c` packed
/// channels, `j` text width:
///
/// ```text
/// per block:  linears on tokens   2·N·(4·d² + 2·d·f)     (q,k,v,out of both streams; 2 MLP mats)
///             attention           4·N²·d                  (QKᵀ and P·V, all heads)
///             modulation          2·2·(d·6d)              (img_mod and txt_mod on temb)
/// outside:    2·s_i·c·d (img_in) + 2·s_t·j·d (txt_in) + 2·s_i·d·c (proj_out)
///             + 2·(256·d + d·d) (timestep MLP) + 2·d·2d (norm_out)
/// total = b · (L · per block + outside)
/// ```
///
/// At 1024², `s_t = 100`: 57.0 TF linears + 13.0 TF attention ≈ 70.0 TFLOP (spec §5.1).
/// Norms, RoPE, softmax and activations are left out (memory-bound, < 1 %).
fn forward_flops(cfg: &TransformerConfig, b: usize, s_i: usize, s_t: usize) -> f64 {
    let d = cfg.inner_dim() as f64;
    let f = cfg.ffn_dim() as f64;
    let n = (s_i + s_t) as f64;
    let c = cfg.in_channels as f64;
    let j = cfg.joint_attention_dim as f64;
    let per_block = 2.0 * n * (4.0 * d * d + 2.0 * d * f) + 4.0 * n * n * d + 4.0 * 6.0 * d * d;
    let outside = 2.0 * s_i as f64 * c * d
        + 2.0 * s_t as f64 * j * d
        + 2.0 * s_i as f64 * d * c
        + 2.0 * (256.0 * d + d * d)
        + 4.0 * d * d;
    b as f64 * (cfg.num_layers as f64 * per_block + outside)
}

/// Samples device-wide used GPU memory while alive (CUDA builds); a no-op elsewhere.
struct MemSampler {
    #[cfg(feature = "cuda")]
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    #[cfg(feature = "cuda")]
    handle: Option<std::thread::JoinHandle<usize>>,
}

impl MemSampler {
    #[cfg(feature = "cuda")]
    fn used_now(device: &Device) -> Option<usize> {
        match device {
            Device::Cuda(d) => {
                let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
                Some(total - free)
            }
            _ => None,
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn used_now(_device: &Device) -> Option<usize> {
        None
    }

    #[cfg(feature = "cuda")]
    fn start(device: &Device) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let handle = match device {
            Device::Cuda(d) => {
                let ctx = d.cuda_stream().context().clone();
                let stop = stop.clone();
                Some(std::thread::spawn(move || {
                    let mut peak = 0usize;
                    loop {
                        if let Ok((free, total)) = ctx.mem_get_info() {
                            peak = peak.max(total - free);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break peak;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }))
            }
            _ => None,
        };
        Self { stop, handle }
    }

    #[cfg(not(feature = "cuda"))]
    fn start(_device: &Device) -> Self {
        Self {}
    }

    /// Stops sampling; the peak in bytes (`None` without CUDA).
    #[cfg(feature = "cuda")]
    fn finish(mut self) -> Option<usize> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok())
    }

    #[cfg(not(feature = "cuda"))]
    fn finish(self) -> Option<usize> {
        None
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `f` `warmup` times untimed, then `iters` times, synchronising after each; returns the
/// sorted milliseconds.
fn time_ms(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        device.synchronize()?;
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        out.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn timing_json(ms: &mut [f64]) -> Value {
    json!({
        "median_ms": median(ms),
        "min_ms": ms.first().copied().unwrap_or(0.0),
        "max_ms": ms.last().copied().unwrap_or(0.0),
        "iters": ms.len(),
    })
}

fn randn(shape: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype)
}

/// Packed-token grid `(h, w)` of a square image of side `size` (VAE /8, patch 2).
fn grid(cfg: &TransformerConfig, size: usize) -> (usize, usize) {
    let s = size / 8 / cfg.patch_size;
    (s, s)
}

fn bench_forward(
    model: &QwenImageTransformer,
    o: &Opts,
    device: &Device,
    dtype: DType,
    size: usize,
    b: usize,
) -> BoxResult<Value> {
    let cfg = model.config();
    let (h, w) = grid(cfg, size);
    let s_i = h * w;
    let img = randn(&[b, s_i, cfg.in_channels], dtype, device)?;
    let txt = randn(&[b, o.text_len, cfg.joint_attention_dim], dtype, device)?;
    let t = Tensor::full(0.5f32, b, device)?;
    let mem = MemSampler::start(device);
    let mut ms = time_ms(device, o.warmup, o.iters, || {
        model.forward(&img, &txt, None, &t, (h, w)).map(drop)
    })?;
    let peak = mem.finish();
    let flops = forward_flops(cfg, b, s_i, o.text_len);
    let med = median(&mut ms);
    let floor_ms = flops / (o.peak_tflops * 1e12) * 1e3;
    let mut v = timing_json(&mut ms);
    let extra = json!({
        "size": size, "batch": b, "s_img": s_i, "s_txt": o.text_len,
        "tflop": flops / 1e12,
        "achieved_tflops": flops / (med * 1e-3) / 1e12,
        "floor_ms": floor_ms,
        "ratio_to_floor": med / floor_ms,
        "peak_mem_bytes": peak,
    });
    merge(&mut v, extra);
    Ok(v)
}

fn merge(a: &mut Value, b: Value) {
    if let (Value::Object(a), Value::Object(b)) = (a, b) {
        a.extend(b);
    }
}

fn bench_vae(
    vae: &AutoencoderKLQwenImage,
    o: &Opts,
    device: &Device,
    dtype: DType,
    size: usize,
) -> BoxResult<Value> {
    let z = randn(&[1, vae.config().z_dim, size / 8, size / 8], dtype, device)?;
    let mem = MemSampler::start(device);
    let mut ms = time_ms(device, o.warmup.min(1), o.iters, || {
        vae.decode(&z).map(drop)
    })?;
    let peak = mem.finish();
    let mut v = timing_json(&mut ms);
    merge(&mut v, json!({"size": size, "peak_mem_bytes": peak}));
    Ok(v)
}

fn prompt_ids(
    te: &QwenTextEncoder,
    len: usize,
    seed: u64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let vocab = te.config().vocab_size as u64;
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let ids: Vec<u32> = (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % vocab) as u32
        })
        .collect();
    let ids = Tensor::from_vec(ids, (1, len), device)?;
    let mask = Tensor::ones((1, len), DType::U32, device)?;
    Ok((ids, mask))
}

fn bench_text_encoder(te: &QwenTextEncoder, o: &Opts, device: &Device) -> BoxResult<Value> {
    let (ids, mask) = prompt_ids(te, o.text_len, o.seed, device)?;
    let mem = MemSampler::start(device);
    let mut ms = time_ms(device, o.warmup, o.iters, || {
        te.encode(&ids, &mask).map(drop)
    })?;
    let peak = mem.finish();
    let mut v = timing_json(&mut ms);
    merge(
        &mut v,
        json!({"tokens": o.text_len, "peak_mem_bytes": peak}),
    );
    Ok(v)
}

/// One image: text encoder on two prompts (positive, negative), `steps` Euler steps of true CFG
/// (two batch-1 forwards a step, as diffusers runs them), VAE decode. Linear sigmas 1 → 0; the
/// schedule's shape does not change the cost.
fn bench_e2e(
    model: &QwenImageTransformer,
    vae: &AutoencoderKLQwenImage,
    te: &QwenTextEncoder,
    o: &Opts,
    device: &Device,
    dtype: DType,
) -> BoxResult<Value> {
    let cfg = model.config();
    let (h, w) = grid(cfg, o.e2e_size);
    let steps = o.e2e_steps;
    let mem = MemSampler::start(device);
    device.synchronize()?;
    let t0 = Instant::now();
    let (ids, mask) = prompt_ids(te, o.text_len, o.seed, device)?;
    let (nids, nmask) = prompt_ids(te, o.text_len, o.seed + 1, device)?;
    let pos = te.encode(&ids, &mask)?.to_dtype(dtype)?;
    let neg = te.encode(&nids, &nmask)?.to_dtype(dtype)?;
    device.synchronize()?;
    let t_te = t0.elapsed().as_secs_f64();
    let mut x = randn(&[1, h * w, cfg.in_channels], DType::F32, device)?;
    for i in 0..steps {
        let s = 1.0 - i as f64 / steps as f64;
        let s_next = 1.0 - (i + 1) as f64 / steps as f64;
        let t = Tensor::full(s as f32, 1, device)?;
        let xin = x.to_dtype(dtype)?;
        let vc = model.forward(&xin, &pos, None, &t, (h, w))?;
        let vu = model.forward(&xin, &neg, None, &t, (h, w))?;
        let v = guidance::true_cfg(&vc, &vu, o.cfg_scale)?.to_dtype(DType::F32)?;
        x = (x + (v * (s_next - s))?)?;
    }
    device.synchronize()?;
    let t_dn = t0.elapsed().as_secs_f64();
    // Unpack [1, h·w, 16·2·2] → [1, 16, 2h, 2w].
    let p = cfg.patch_size;
    let c = cfg.out_channels();
    let lat = x
        .reshape((1, h, w, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((1, c, h * p, w * p))?
        .to_dtype(dtype)?;
    let img = vae.decode(&lat)?;
    drop(img);
    device.synchronize()?;
    let total = t0.elapsed().as_secs_f64();
    let peak = mem.finish();
    let fwd_flops = forward_flops(cfg, 1, h * w, o.text_len);
    Ok(json!({
        "size": o.e2e_size, "steps": steps, "cfg": true, "forwards": 2 * steps,
        "total_s": total,
        "text_encoder_s": t_te,
        "denoise_s": t_dn - t_te,
        "vae_decode_s": total - t_dn,
        "per_forward_ms": if steps > 0 { (t_dn - t_te) / (2 * steps) as f64 * 1e3 } else { 0.0 },
        "denoise_tflop": fwd_flops * (2 * steps) as f64 / 1e12,
        "peak_mem_bytes": peak,
    }))
}

/// Relative error `‖a − b‖₂ / ‖b‖₂` and max `|a − b|`, in f32.
fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<(f64, f64)> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let d = (&a - &b)?;
    let num = d.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let max = d.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(((num / den.max(f64::MIN_POSITIVE)).sqrt(), max))
}

/// Runs one forward on the inputs of a file written by `bench_diffusers.py --save-io`
/// (`img`, `txt`, optional `txt_mask`, `timestep`, `img_hw` (i64 `[h, w]`), `out`) and compares.
fn compare(
    model: &QwenImageTransformer,
    path: &Path,
    o: &Opts,
    device: &Device,
) -> BoxResult<Value> {
    let t = candle_core::safetensors::load(path, device)?;
    let get = |k: &str| {
        t.get(k)
            .ok_or_else(|| format!("{}: no tensor {k}", path.display()))
    };
    let hw = get("img_hw")?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if hw.len() != 2 {
        return Err("img_hw must hold [h, w]".into());
    }
    let out = model.forward(
        get("img")?,
        get("txt")?,
        t.get("txt_mask"),
        &get("timestep")?.to_dtype(DType::F32)?,
        (hw[0] as usize, hw[1] as usize),
    )?;
    let (rel, max_abs) = rel_err(&out, get("out")?)?;
    Ok(json!({
        "file": path.display().to_string(),
        "shape": out.dims(),
        "rel_err": rel, "max_abs_err": max_abs,
        "tolerance": o.compare_tol, "pass": rel <= o.compare_tol,
    }))
}

fn section(report: &mut serde_json::Map<String, Value>, key: &str, r: BoxResult<Value>) {
    match r {
        Ok(v) => {
            eprintln!("{key}: {v}");
            report.insert(key.into(), v);
        }
        Err(e) => {
            eprintln!("{key}: error: {e}");
            report.insert(key.into(), json!({"error": e.to_string()}));
        }
    }
}

fn run(o: &Opts) -> BoxResult<Value> {
    let device = device_from_name(&o.device)?;
    let default_dtype = if device.is_cpu() { "f32" } else { "bf16" };
    let dtype_name = o.dtype.clone().unwrap_or_else(|| default_dtype.into());
    let dtype = dtype_from_name(&dtype_name).ok_or("dtype must be f32, bf16 or f16")?;
    // candle's CPU backend cannot be seeded (its randn is thread-random); CUDA's curand can.
    if !device.is_cpu() {
        device.set_seed(o.seed)?;
    }
    let cfgs = match &o.model {
        Some(dir) => configs(&dir.display().to_string())?,
        None => configs(&o.config)?,
    };
    let mut report = serde_json::Map::new();
    report.insert(
        "tool".into(),
        json!({"name": "pixmarket-engine-bench", "version": env!("CARGO_PKG_VERSION"),
               "cuda_feature": cfg!(feature = "cuda")}),
    );
    let weights_desc = match (&o.model, &o.weights) {
        (_, Some(w)) => format!("transformer from {}", w.display()),
        (Some(m), None) => format!("folder {}", m.display()),
        (None, None) => "random on device".into(),
    };
    report.insert(
        "setup".into(),
        json!({
            "device": o.device, "dtype": dtype_name, "config": o.config, "weights": weights_desc,
            "transformer_params": cfgs.transformer.param_count(),
            "layers": cfgs.transformer.num_layers, "width": cfgs.transformer.inner_dim(),
            "text_len": o.text_len, "warmup": o.warmup, "iters": o.iters,
            "peak_tflops": o.peak_tflops, "seed": o.seed,
            "memory_method": if cfg!(feature = "cuda") {
                "cuMemGetInfo (total - free) polled every 1 ms by a thread, device-wide"
            } else { "not measured (CPU build)" },
        }),
    );
    let mem0 = MemSampler::used_now(&device);

    let t0 = Instant::now();
    let model = match (&o.weights, &o.model) {
        (Some(w), _) => {
            let (dir, stem) = if w.is_dir() {
                (w.clone(), "diffusion_pytorch_model".to_string())
            } else {
                let stem = w
                    .file_name()
                    .and_then(|s| s.to_str())
                    .map(|s| s.trim_end_matches(".safetensors").to_string())
                    .ok_or("--weights: bad file name")?;
                let dir = w
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
                (dir, stem)
            };
            let vb = pixmarket_engine::weights::ComponentWeights::open(&dir, &stem)?
                .into_var_builder(dtype, &device);
            QwenImageTransformer::new(&cfgs.transformer, vb)?
        }
        (None, Some(m)) => QwenImageTransformer::load(&m.join("transformer"), dtype, &device)?,
        (None, None) => QwenImageTransformer::new(&cfgs.transformer, random_vb(dtype, &device))?,
    };
    device.synchronize()?;
    report.insert(
        "transformer_build".into(),
        json!({"seconds": t0.elapsed().as_secs_f64(),
               "mem_before_bytes": mem0, "mem_after_bytes": MemSampler::used_now(&device)}),
    );

    if let Some(path) = &o.compare_with {
        section(&mut report, "compare", compare(&model, path, o, &device));
    }

    let mut fwd = Vec::new();
    for &size in &o.sizes {
        for &b in &o.batches {
            let r = bench_forward(&model, o, &device, dtype, size, b);
            match r {
                Ok(v) => {
                    eprintln!("forward {size}² B={b}: {v}");
                    fwd.push(v);
                }
                Err(e) => {
                    eprintln!("forward {size}² B={b}: error: {e}");
                    fwd.push(json!({"size": size, "batch": b, "error": e.to_string()}));
                }
            }
        }
    }
    report.insert("forward".into(), Value::Array(fwd));

    let need_vae = o.vae_size.is_some() || o.e2e_steps > 0;
    let need_te = o.text_encoder || o.e2e_steps > 0;
    let vae = if need_vae {
        Some(match &o.model {
            Some(m) => AutoencoderKLQwenImage::load(&m.join("vae"), dtype, &device)?,
            None => AutoencoderKLQwenImage::new(&cfgs.vae, random_vb(dtype, &device))?,
        })
    } else {
        None
    };
    let te = if need_te {
        Some(match &o.model {
            Some(m) => QwenTextEncoder::load(&m.join("text_encoder"), dtype, &device)?,
            None => QwenTextEncoder::new(&cfgs.text, random_vb(dtype, &device))?,
        })
    } else {
        None
    };
    if let (Some(size), Some(vae)) = (o.vae_size, &vae) {
        section(
            &mut report,
            "vae_decode",
            bench_vae(vae, o, &device, dtype, size),
        );
    }
    if let (true, Some(te)) = (o.text_encoder, &te) {
        section(
            &mut report,
            "text_encoder",
            bench_text_encoder(te, o, &device),
        );
    }
    if let (true, Some(vae), Some(te)) = (o.e2e_steps > 0, &vae, &te) {
        section(
            &mut report,
            "e2e",
            bench_e2e(&model, vae, te, o, &device, dtype),
        );
    }
    Ok(Value::Object(report))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match run(&opts) {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Some(path) = &opts.json
                && let Err(e) = std::fs::write(path, format!("{text}\n"))
            {
                eprintln!("cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
            println!("{text}");
        }
        Err(e) => {
            eprintln!("pixmarket-engine-bench: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_match_the_spec_anchor_at_1024() {
        let cfg = TransformerConfig::qwen_image_20b();
        let (h, w) = grid(&cfg, 1024);
        let tf = forward_flops(&cfg, 1, h * w, 100) / 1e12;
        // Spec §5.1: 57.0 TF linears + 13.0 TF attention ≈ 70.0 TF.
        assert!((tf - 70.0).abs() < 0.5, "{tf}");
        let tf2 = forward_flops(&cfg, 2, h * w, 100) / 1e12;
        assert!((tf2 - 2.0 * tf).abs() < 1e-9);
    }

    #[test]
    fn args_parse_lists_and_reject_bad_sizes() {
        let a = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let o = parse_args(&a("--sizes 64,128 --batch 1 --iters 2 --no-vae")).unwrap();
        assert_eq!(o.sizes, vec![64, 128]);
        assert_eq!(o.batches, vec![1]);
        assert!(o.vae_size.is_none());
        assert!(parse_args(&a("--sizes 100")).is_err());
        assert!(parse_args(&a("--iters 0")).is_err());
        assert!(parse_args(&a("--bogus")).is_err());
    }
}
