//! Prints the two tables of `docs/memory.md` from the configs (nothing is loaded or measured):
//! `cargo run --example memory_table` from the workspace root.
//!
//! 1. Per placement and quantization: the full-size model's device weights and the working
//!    memory of one 1024² and one 1328² image with CFG (fixed 1 GiB attention chunks, the VAE
//!    decode whole), and which cards hold it with the plan's 1 GiB reserve.
//! 2. The placement plan (`placement::plan`) for the devices `placement::tests` pins.

use pixmarket_engine::config::TransformerConfig;
use pixmarket_engine::memory::{
    ForwardShape, WeightFormat, forward_peak_bytes, text_encoder_quantized_bytes,
    text_encoder_weight_bytes, transformer_weight_bytes, vae_decode_bytes, vae_weight_bytes,
};
use pixmarket_engine::placement::{
    Footprint, Plan, RESERVE_BYTES, TextEncoderPlace, plan, table_formats,
};
use pixmarket_engine::quant::QuantFormat;
use pixmarket_engine::text_encoder::TextEncoderConfig;
use pixmarket_engine::transformer::DEFAULT_ATTENTION_BUDGET;
use pixmarket_engine::vae::VaeConfig;

const GIB: f64 = (1u64 << 30) as f64;
/// Text tokens a job is planned for (the pipeline's most).
const TEXT_TOKENS: usize = 512;
/// Bytes per value of the compute dtype (bf16).
const DTYPE_BYTES: u64 = 2;
/// The cards the table names, by memory in GiB; the consumer ones are set in bold.
const CARDS: [(u64, bool); 5] = [
    (16, true),
    (24, true),
    (32, false),
    (48, false),
    (80, false),
];

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// One image with CFG at `side`²: the larger of one forward (1 GiB chunks) and the whole decode.
fn work(side: u32) -> u64 {
    let cfg = TransformerConfig::qwen_image_20b();
    let shape = ForwardShape::for_size(2, side, side, TEXT_TOKENS);
    let forward = forward_peak_bytes(&cfg, shape, DTYPE_BYTES, DEFAULT_ATTENTION_BUDGET);
    forward.max(vae_decode_bytes(
        side,
        side,
        VaeConfig::default().base_dim,
        DTYPE_BYTES,
    ))
}

fn fits(total: u64) -> String {
    let names: Vec<String> = CARDS
        .iter()
        .filter(|(card, _)| total + RESERVE_BYTES <= card << 30)
        .map(|&(card, bold)| {
            if bold {
                format!("**{card}**")
            } else {
                card.to_string()
            }
        })
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}, {last} GB", rest.join(", ")),
        Some((last, _)) => format!("{last} GB"),
        None => "—".into(),
    }
}

fn placement_table() {
    let cfg = TransformerConfig::qwen_image_20b();
    let te = TextEncoderConfig::qwen2_5_vl_7b();
    let vae = vae_weight_bytes(&VaeConfig::default(), DTYPE_BYTES);
    let te_full = text_encoder_weight_bytes(&te, DTYPE_BYTES);
    println!(
        "| transformer | text encoder | weights | work 1024² | total 1024² | work 1328² | \
         total 1328² | fits at 1024² | fits at 1328² |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|---|");
    let (w1024, w1328) = (work(1024), work(1328));
    let row = |name: String, te_name: String, weights: u64| {
        let (t1024, t1328) = (weights + w1024, weights + w1328);
        println!(
            "| {name} | {te_name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            gib(weights),
            gib(w1024),
            gib(t1024),
            gib(w1328),
            gib(t1328),
            fits(t1024),
            fits(t1328)
        );
    };
    for (name, format) in table_formats() {
        let t = transformer_weight_bytes(&cfg, format);
        row(
            format!("{name} ({:.1} GB)", t as f64 / 1e9),
            "device".into(),
            t + vae + te_full,
        );
        row(name.into(), "CPU".into(), t + vae);
    }
    for (name, format) in table_formats() {
        let WeightFormat::Quantized(q) = format else {
            continue;
        };
        let t = transformer_weight_bytes(&cfg, format);
        let te_q = text_encoder_quantized_bytes(&te, q, DTYPE_BYTES);
        row(name.into(), format!("{name} on device"), t + vae + te_q);
    }
    println!();
    println!(
        "Text encoder (language model, bf16): {:.2} GB; as llama.cpp-layout GGUF: Q8_0 {:.2}, \
         Q5_K {:.2}, Q4_K {:.2} GB; VAE {:.2} GB.",
        te_full as f64 / 1e9,
        text_encoder_quantized_bytes(&te, QuantFormat::Q8_0, DTYPE_BYTES) as f64 / 1e9,
        text_encoder_quantized_bytes(&te, QuantFormat::Q5K, DTYPE_BYTES) as f64 / 1e9,
        text_encoder_quantized_bytes(&te, QuantFormat::Q4K, DTYPE_BYTES) as f64 / 1e9,
        vae as f64 / 1e9
    );
}

fn place_name(p: &Plan) -> &'static str {
    match p.text_encoder {
        TextEncoderPlace::Device => "device",
        TextEncoderPlace::EncodeThenFree => "encode-then-free",
        TextEncoderPlace::Cpu => "CPU",
    }
}

fn plan_table() {
    let gib_bytes = |g: u64| g << 30;
    let rows: [(&str, &str, u64); 6] = [
        ("16 GiB", "q4_k", gib_bytes(16)),
        ("24 GiB", "q8_0", gib_bytes(24)),
        ("24 GiB", "q5_k", gib_bytes(24)),
        ("36 GiB", "q8_0", gib_bytes(36)),
        ("44 GiB", "q8_0", gib_bytes(44)),
        ("80 GB", "bf16", 80_000_000_000),
    ];
    println!(
        "| device | transformer | text encoder | working memory | largest side | images per \
         batch at 1024² |"
    );
    println!("|---|---|---|---:|---:|---:|");
    let line = |device: &str, model: &str, p: &Plan| {
        println!(
            "| {device} | {model} | {} | {:.1} GB | {} | {} |",
            place_name(p),
            p.working_memory as f64 / 1e9,
            p.largest_side.map_or("—".into(), |s| s.to_string()),
            p.batch_at_1024
        );
    };
    for (device, name, memory) in rows {
        let Some((_, format)) = table_formats().into_iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let p = plan(
            &TransformerConfig::qwen_image_20b(),
            &TextEncoderConfig::qwen2_5_vl_7b(),
            &VaeConfig::default(),
            Footprint::qwen_image(format),
            DTYPE_BYTES,
            memory,
        );
        line(device, name, &p);
    }
    let (t, te, vae) = (
        pixmarket_engine::tiny::transformer_config(),
        pixmarket_engine::tiny::text_encoder_config(),
        pixmarket_engine::tiny::vae_config(),
    );
    let f = Footprint {
        transformer: transformer_weight_bytes(&t, WeightFormat::Float(4)),
        text_encoder: text_encoder_weight_bytes(&te, 4),
        text_encoder_quantized: None,
        vae: vae_weight_bytes(&vae, 4),
    };
    line(
        "1 GiB",
        "tiny model (f32)",
        &plan(&t, &te, &vae, f, 4, 1 << 30),
    );
}

fn main() {
    placement_table();
    println!();
    plan_table();
}
