//! `pixmarket model tiny` and `pixmarket generate --local` run as a person runs them: the real
//! binary on temp folders. Bad input must give one clear line, a non-zero exit and no panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pixmarket(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pixmarket"))
        .args(args)
        .env("PIXMARKET_DATA_DIR", data_dir)
        .output()
        .expect("run pixmarket")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn engine_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/pipeline")
        .join(name)
}

/// One `error: ...` line on stderr, nothing like a panic.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("note:") && !l.starts_with("loaded "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
}

fn png_text(path: &Path) -> Vec<(String, String)> {
    pixmarket_engine::image_io::png_text_chunks(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn model_tiny_then_generate_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let o = pixmarket(
        tmp.path(),
        &["model", "tiny", "--out", dir.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("tiny-qwen-image-drawn"),
        "{}",
        stdout(&o)
    );
    assert!(dir.join("model_index.json").is_file());
    let random = tmp.path().join("random");
    let o = pixmarket(
        tmp.path(),
        &[
            "model",
            "tiny",
            "--random",
            "--out",
            random.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("noise"), "{}", stdout(&o));

    let out = tmp.path().join("fox.png");
    let args = [
        "generate",
        "a red fox in the snow",
        "--local",
        "--model",
        dir.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--seed",
        "3",
        "-o",
        out.to_str().unwrap(),
    ];
    let o = pixmarket(tmp.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("/step"), "{}", stdout(&o));
    let text = png_text(&out);
    assert!(text.contains(&("prompt".into(), "a red fox in the snow".into())));
    assert!(text.contains(&("seed".into(), "3".into())));
    assert!(text.contains(&("size".into(), "64x48".into())));
    let first = std::fs::read(&out).unwrap();
    // Same seed, same bytes.
    let o = pixmarket(tmp.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), first);
}

#[test]
fn model_tiny_is_created_in_the_data_dir_on_first_use() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.png");
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "a cat",
            "--local",
            "--model",
            "tiny",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
            "--true-cfg-scale",
            "1",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("draws one or two shapes"),
        "{}",
        stderr(&o)
    );
    assert!(tmp.path().join("models/tiny/model_index.json").is_file());
    assert!(out.is_file());
}

#[test]
fn the_diffusers_fixture_loads_with_given_latents_and_images() {
    // A folder written by diffusers' QwenImagePipeline.save_pretrained, with the init image,
    // the mask and a latents file of the parity fixtures: inpaint through the CLI.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inpaint.png");
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "A red cat",
            "--local",
            "--model",
            engine_fixture("model").to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "4",
            "--strength",
            "0.75",
            "--true-cfg-scale",
            "1",
            "--init-image",
            engine_fixture("init.png").to_str().unwrap(),
            "--mask",
            engine_fixture("mask.png").to_str().unwrap(),
            "--latents",
            engine_fixture("inpaint_latents.safetensors")
                .to_str()
                .unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = png_text(&out);
    assert!(text.contains(&("mode".into(), "inpaint".into())));
    assert!(text.contains(&("seed".into(), "given latents".into())));
    assert!(stdout(&o).contains("3 steps"), "{}", stdout(&o));
}

#[test]
fn outpaint_grows_the_canvas() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wide.png");
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "a cat",
            "--local",
            "--model",
            engine_fixture("model").to_str().unwrap(),
            "--init-image",
            engine_fixture("init.png").to_str().unwrap(),
            "--outpaint",
            "16,0,0,16",
            "--steps",
            "2",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = png_text(&out);
    assert!(text.contains(&("size".into(), "80x64".into())), "{text:?}");
    assert!(text.contains(&("mode".into(), "inpaint".into())));
    assert!(text.contains(&("strength".into(), "1".into())));
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "a cat",
            "--local",
            "--model",
            engine_fixture("model").to_str().unwrap(),
            "--init-image",
            engine_fixture("init.png").to_str().unwrap(),
            "--outpaint",
            "3,0,0,0",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_one_line_error(&o, "outpaint canvas is 67×48");
}

#[test]
fn a_model_with_misshapen_weights_gives_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&engine_fixture("model"), &model);
    // Another model's transformer weights under the right config: every tensor misshapen.
    let t = model.join("transformer/diffusion_pytorch_model.safetensors");
    std::fs::copy(
        engine_fixture(
            "../transformer/model_single_bf16/transformer/diffusion_pytorch_model.safetensors",
        ),
        &t,
    )
    .unwrap();
    let out = tmp.path().join("x.png");
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "a cat",
            "--local",
            "--model",
            model.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "48",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_one_line_error(&o, "has shape");
    assert!(stderr(&o).contains("transformer"), "{}", stderr(&o));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

#[test]
fn bad_input_gives_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = engine_fixture("model");
    let model = model.to_str().unwrap();
    let out = tmp.path().join("x.png");
    let out = out.to_str().unwrap();
    let not_image = tmp.path().join("not.png");
    std::fs::write(&not_image, b"hello").unwrap();
    let not_image = not_image.to_str().unwrap();
    let latents = engine_fixture("t2i_2step_latents.safetensors");
    let latents = latents.to_str().unwrap();
    let base = |extra: &[&'static str]| {
        let mut v = vec!["generate", "a cat", "--local", "--model"];
        v.push(model);
        v.extend_from_slice(&["-o", out]);
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (base(&["--width", "100"]), "multiple of 16"),
        (
            vec![
                "generate",
                "a cat",
                "--local",
                "--model",
                "/nonexistent/qwen",
                "-o",
                out,
            ],
            "does not exist",
        ),
        (
            vec!["generate", "a cat", "--model", model, "-o", out],
            "--model needs --local",
        ),
        (
            {
                let mut v = base(&["--width", "64", "--height", "48", "--init-image"]);
                v.push(not_image);
                v
            },
            "not a readable PNG or JPEG",
        ),
        (
            {
                let mut v = base(&["--width", "128", "--height", "48", "--latents"]);
                v.push(latents);
                v
            },
            "needs [1, 16, 6, 16]",
        ),
        (
            {
                let mut v = base(&["--latents"]);
                v.push(not_image);
                v
            },
            "bad latents file",
        ),
        (base(&["--device", "cuda"]), "cuda"),
        (
            base(&["--strength", "0.5"]),
            "--strength needs --init-image",
        ),
    ];
    for (args, needle) in cases {
        let o = pixmarket(tmp.path(), &args);
        assert_one_line_error(&o, needle);
    }
    // A folder that is not a model.
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "a cat",
            "--local",
            "--model",
            tmp.path().to_str().unwrap(),
            "-o",
            out,
        ],
    );
    assert_one_line_error(&o, "model_index.json");
}

fn lora_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/fixtures/lora")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn lora_and_the_lightning_preset_change_the_image_and_the_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = engine_fixture("model");
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "generate",
            "A red cat",
            "--local",
            "--model",
            model.to_str().unwrap(),
            "--width",
            "64",
            "--height",
            "48",
            "--seed",
            "5",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = pixmarket(tmp.path(), &args);
        (o, out)
    };
    let (o, plain) = run("plain.png", &["--steps", "4", "--true-cfg-scale", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let comfy = lora_fixture("comfy.safetensors");
    let kohya = format!("{}:0.5", lora_fixture("kohya.safetensors"));
    let (o, lit) = run(
        "lightning.png",
        &[
            "--lora",
            &comfy,
            "--lora",
            &kohya,
            "--preset",
            "lightning-4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("applied LoRA"), "{}", stderr(&o));
    let text = png_text(&lit);
    assert!(text.contains(&("steps".into(), "4".into())), "{text:?}");
    assert!(
        text.contains(&("true_cfg_scale".into(), "1".into())),
        "{text:?}"
    );
    assert_ne!(std::fs::read(&plain).unwrap(), std::fs::read(&lit).unwrap());

    // A file that is not a LoRA, a scale out of range, the preset without a LoRA or beside
    // --steps, and --lora on the market: one line each.
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let (o, _) = run("x.png", &["--lora", readme.to_str().unwrap()]);
    assert_one_line_error(&o, "not a safetensors file");
    let bad_scale = format!("{comfy}:9");
    let (o, _) = run("x.png", &["--lora", &bad_scale]);
    assert!(
        !o.status.success() && stderr(&o).contains("[-8, 8]"),
        "{}",
        stderr(&o)
    );
    let (o, _) = run("x.png", &["--preset", "lightning-8"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--lora"),
        "{}",
        stderr(&o)
    );
    let (o, _) = run(
        "x.png",
        &["--preset", "lightning-8", "--lora", &comfy, "--steps", "3"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("--steps"),
        "{}",
        stderr(&o)
    );
    let out = tmp.path().join("m.png");
    let o = pixmarket(
        tmp.path(),
        &[
            "generate",
            "A red cat",
            "--lora",
            &comfy,
            "-o",
            out.to_str().unwrap(),
        ],
    );
    // A LoRA now travels over the market too (named by an offer), so a file without --local is
    // a market job, refused before anything is bought because it names nowhere to buy.
    assert_one_line_error(&o, "say where to buy");
}

#[test]
fn train_tiny_refuses_a_decay_or_schedule_start_it_cannot_use_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trained");
    let train = |extra: &[&str]| {
        let mut args = vec!["model", "train-tiny", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        pixmarket(tmp.path(), &args)
    };
    for d in ["1", "-0.5", "NaN"] {
        let o = train(&[&format!("--ema-decay={d}")]);
        assert_one_line_error(&o, "is not a decay");
        assert!(stderr(&o).contains(d), "{}", stderr(&o));
    }
    let o = train(&["--transformer-steps", "100", "--schedule-start", "100"]);
    assert_one_line_error(&o, "--schedule-start 100 leaves no steps to schedule");
    assert!(
        stderr(&o).contains("100 transformer steps"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// `model quantize --model MODEL --to FORMAT [EXTRA…] --out OUT`.
fn quantize(data_dir: &Path, model: &Path, format: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "model",
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--to",
        format,
    ];
    args.extend_from_slice(extra);
    args.extend(["--out", out.to_str().unwrap()]);
    pixmarket(data_dir, &args)
}

/// A small local image from `model` (64×48, 2 steps, CFG off) with `extra` arguments, to `out`.
fn generate_small(data_dir: &Path, model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "A red cat",
        "--local",
        "--model",
        model.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "2",
        "--true-cfg-scale",
        "1",
    ];
    args.extend_from_slice(extra);
    args.extend(["-o", out.to_str().unwrap()]);
    pixmarket(data_dir, &args)
}

#[test]
fn model_quantize_writes_a_folder_that_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q8");
    let model = engine_fixture("model");
    let o = quantize(tmp.path(), &model, "q8_0", &q, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("28 transformer tensors in q8_0"),
        "{}",
        stdout(&o)
    );
    let out = tmp.path().join("q.png");
    let o = generate_small(tmp.path(), &q, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A LoRA on the quantized model runs beside its quantized matmuls and changes the picture.
    let with_lora = tmp.path().join("q-lora.png");
    let comfy = lora_fixture("comfy.safetensors");
    let o = generate_small(tmp.path(), &q, &with_lora, &["--lora", &comfy]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("applied LoRA"), "{}", stderr(&o));
    assert_ne!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&with_lora).unwrap()
    );
    // Again into the same folder: refused, nothing overwritten.
    let o = quantize(tmp.path(), &model, "q4_k", &q, &[]);
    assert_one_line_error(&o, "exists and is not empty");
}

#[test]
fn model_quantize_text_encoder_writes_a_llama_cpp_gguf_that_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q8te");
    let model = engine_fixture("model");
    let o = quantize(tmp.path(), &model, "q8_0", &q, &["--text-encoder"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("text_encoder/model.gguf in llama.cpp's layout"),
        "{}",
        stdout(&o)
    );
    let te = q.join("text_encoder");
    assert!(te.join("model.gguf").is_file());
    assert!(
        std::fs::read_dir(&te)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".safetensors"))
    );
    // The source keeps its own text encoder weights.
    assert!(
        std::fs::read_dir(model.join("text_encoder"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".safetensors"))
    );
    let out = tmp.path().join("q.png");
    let o = generate_small(tmp.path(), &q, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.is_file());
}

#[test]
fn device_memory_prints_the_plan_and_reaches_the_largest_side() {
    let tmp = tempfile::tempdir().unwrap();
    let model = engine_fixture("model");
    let out = tmp.path().join("p.png");
    let run = |gib: &str, side: &str| {
        pixmarket(
            tmp.path(),
            &[
                "generate",
                "A red cat",
                "--local",
                "--model",
                model.to_str().unwrap(),
                "--width",
                side,
                "--height",
                side,
                "--steps",
                "1",
                "--device-memory",
                gib,
                "--text-encoder-on-cpu",
                "-o",
                out.to_str().unwrap(),
            ],
        )
    };
    let o = run("2", "64");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("plan for 2 GiB: text encoder on the"),
        "{}",
        stderr(&o)
    );
    // 1 GiB: the reserve is an eighth of it and the chunks shrink to what is left, so small
    // sizes fit (this once found no size at all). The VAE's mid-block attention is planned at
    // the chunk it sizes from that memory, so this fixture now reaches the largest side, 4096²
    // (it stopped at 2704² while the attention was counted at its default 2048-row chunk); the
    // refusal of a size beyond the plan is `newcomer.rs`'s, on the tiny model at 1 GiB.
    let o = run("1", "64");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("up to 4096×4096 with CFG"),
        "{}",
        stderr(&o)
    );
}
