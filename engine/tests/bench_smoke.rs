#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Smoke test of `pixmarket-engine-bench`: the binary runs on the CPU with the tiny config,
//! one iteration, and its JSON report has every section with positive numbers. No timing is
//! asserted (the machine is shared); this only proves the code paths run.

use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x} in {v}");
    x
}

#[test]
fn tiny_cpu_run_reports_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let status = Command::new(env!("CARGO_BIN_EXE_pixmarket-engine-bench"))
        .args([
            "--device",
            "cpu",
            "--config",
            "tiny",
            "--sizes",
            "64,128",
            "--batch",
            "1,2",
            "--text-len",
            "16",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--vae-size",
            "64",
            "--e2e-steps",
            "2",
            "--e2e-size",
            "64",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["setup"]["config"], "tiny");
    let fwd = r["forward"].as_array().unwrap();
    assert_eq!(fwd.len(), 4);
    for f in fwd {
        for k in [
            "median_ms",
            "tflop",
            "achieved_tflops",
            "floor_ms",
            "ratio_to_floor",
        ] {
            positive(f, k);
        }
    }
    assert_eq!(fwd[3]["size"], 128);
    assert_eq!(fwd[3]["batch"], 2);
    assert_eq!(fwd[3]["s_img"], 64);
    positive(&r["vae_decode"], "median_ms");
    positive(&r["text_encoder"], "median_ms");
    assert_eq!(r["text_encoder"]["tokens"], 16);
    for k in [
        "total_s",
        "denoise_s",
        "text_encoder_s",
        "vae_decode_s",
        "per_forward_ms",
    ] {
        positive(&r["e2e"], k);
    }
    assert_eq!(r["e2e"]["forwards"], 4);
}
