//! Parity of packing, the flow-match Euler schedule and one true-CFG Euler step against
//! diffusers (`QwenImagePipeline._pack_latents`/`_unpack_latents`,
//! `FlowMatchEulerDiscreteScheduler` with the shipped Qwen-Image config, the pipeline's CFG
//! rescale). Metric: `max|ours − ref| / max|ref|` (see `transformer_support::rel_err`).

// A test crate: its helpers may panic on a broken fixture exactly as `#[test]` functions may
// (clippy's allow-*-in-tests covers only the latter); sizes are tiny, so casts cannot truncate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

mod transformer_support;

use candle_core::{Device, Tensor};
use pixmarket_engine::guidance::true_cfg;
use pixmarket_engine::latents::{pack, patch_grid, unpack};
use pixmarket_engine::scheduler::{FlowMatchEuler, FlowMatchEulerConfig};
use transformer_support::{BF16_TOL, F32_TOL, check, fixtures, get, meta, reference};

#[test]
fn pack_and_unpack_match_the_pipeline() {
    let r = reference();
    let lat = get(&r, "pack.latents");
    let packed = pack(lat).unwrap();
    check("pack", &packed, get(&r, "pack.packed"), 0.0);
    // The pipeline unpacks to [B, C, 1, H, W]; ours is [B, C, H, W].
    let reference_unpacked = get(&r, "pack.unpacked").squeeze(2).unwrap();
    check(
        "unpack",
        &unpack(&packed, patch_grid(48, 64)).unwrap(),
        &reference_unpacked,
        0.0,
    );
}

fn scheduler() -> FlowMatchEuler {
    let path = fixtures().join("model_sharded/scheduler/scheduler_config.json");
    let s = FlowMatchEuler::from_file(&path).unwrap();
    assert_eq!(s.config(), &FlowMatchEulerConfig::qwen_image());
    s
}

#[test]
fn sigma_schedules_match_at_four_sizes() {
    let m = meta();
    let mut s = scheduler();
    for side in [256, 512, 1024, 1328] {
        for steps in [50usize, 20] {
            let case = &m["schedules"][format!("{side}_{steps}")];
            let (h, w) = patch_grid(side, side);
            assert_eq!(case["image_seq_len"].as_u64(), Some((h * w) as u64));
            s.set_timesteps(steps, h * w).unwrap();
            let mu = case["mu"].as_f64().unwrap();
            assert!((s.config().mu(h * w) - mu).abs() < 1e-12, "mu at {side}");
            let want: Vec<f32> = case["sigmas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let want_t: Vec<f32> = case["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let dev = Device::Cpu;
            let ours = Tensor::new(s.sigmas(), &dev).unwrap();
            check(
                &format!("sigmas {side}² × {steps}"),
                &ours,
                &Tensor::new(want.as_slice(), &dev).unwrap(),
                F32_TOL,
            );
            let ours_t = Tensor::new(s.timesteps().as_slice(), &dev).unwrap();
            check(
                &format!("timesteps {side}² × {steps}"),
                &ours_t,
                &Tensor::new(want_t.as_slice(), &dev).unwrap(),
                F32_TOL,
            );
        }
    }
}

fn cfg_step(tag: &str, tol: f64) {
    let r = reference();
    let m = meta();
    let c = &m["cfg_step"];
    let k = |s: &str| get(&r, &format!("cfg.{tag}.{s}"));
    let pred = true_cfg(k("cond"), k("uncond"), c["scale"].as_f64().unwrap()).unwrap();
    check(&format!("{tag} true CFG prediction"), &pred, k("pred"), tol);
    let mut s = scheduler();
    s.set_timesteps(
        c["steps"].as_u64().unwrap() as usize,
        c["image_seq_len"].as_u64().unwrap() as usize,
    )
    .unwrap();
    let dtype = k("model_timestep").dtype();
    let i = c["step_index"].as_u64().unwrap() as usize;
    let t = s.model_timestep(i, 2, dtype, &Device::Cpu).unwrap();
    check(
        &format!("{tag} model timestep"),
        &t,
        k("model_timestep"),
        0.0,
    );
    let next = s
        .step(
            &pred,
            k("sample"),
            c["step_index"].as_u64().unwrap() as usize,
        )
        .unwrap();
    assert_eq!(next.dtype(), k("next").dtype());
    check(&format!("{tag} CFG Euler step"), &next, k("next"), tol);
}

#[test]
fn cfg_rescaled_euler_step_f32() {
    cfg_step("f32", F32_TOL);
}

#[test]
fn cfg_rescaled_euler_step_bf16() {
    cfg_step("bf16", BF16_TOL);
}
