//! Copies a trained drawn-model folder into `engine/assets/tiny-drawn/` (weights in f16), the
//! folder the engine embeds: `cargo run -p pixmarket-engine --example ship_tiny -- TRAINED_DIR`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let src = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "tiny-drawn".into()),
    );
    let dst = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-drawn");
    pixmarket_engine::drawn::export_for_shipping(&src, &dst)?;
    println!("shipped {} → {}", src.display(), dst.display());
    Ok(())
}
