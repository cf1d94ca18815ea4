//! The transformer's configuration: `transformer/config.json` of a diffusers checkpoint.
//!
//! Owns parsing (lenient: unknown keys such as `_class_name` are ignored, missing keys take the
//! diffusers constructor defaults, which equal the shipped 20B config), validation of what this
//! port supports, the derived sizes, and the list of every tensor name and shape the config
//! implies (used to count parameters and by the shapes-only 20B test).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a config could not be read or is not one this port runs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("cannot parse {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The values are inconsistent or name a variant this port does not implement.
    #[error("unsupported transformer config: {0}")]
    Unsupported(String),
}

/// `QwenImageTransformer2DModel`'s constructor arguments. Defaults are the diffusers defaults,
/// which are also the values shipped with Qwen/Qwen-Image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    /// Side of a latent patch (2: each token packs 2×2 latent pixels).
    pub patch_size: usize,
    /// Channels of a packed token (`out_channels · patch_size²`, 64 for the real model).
    pub in_channels: usize,
    /// Latent channels (16). `null` in the JSON means "same as `in_channels`", as in diffusers.
    pub out_channels: Option<usize>,
    /// Number of double-stream blocks.
    pub num_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Number of attention heads; `heads · head_dim` is the model width.
    pub num_attention_heads: usize,
    /// Width of the text encoder's hidden states.
    pub joint_attention_dim: usize,
    /// Guidance-distilled variant (not used by Qwen-Image; unsupported here).
    pub guidance_embeds: bool,
    /// RoPE dims per axis (frame, height, width); sums to `attention_head_dim`.
    pub axes_dims_rope: [usize; 3],
    /// Edit-2511 variant (unsupported here).
    pub zero_cond_t: bool,
    /// Layered variant (unsupported here).
    pub use_additional_t_cond: bool,
    /// Layered variant (unsupported here).
    pub use_layer3d_rope: bool,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self::qwen_image_20b()
    }
}

impl TransformerConfig {
    /// The real Qwen-Image 20B configuration (spec §1.1).
    pub fn qwen_image_20b() -> Self {
        Self {
            patch_size: 2,
            in_channels: 64,
            out_channels: Some(16),
            num_layers: 60,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 3584,
            guidance_embeds: false,
            axes_dims_rope: [16, 56, 56],
            zero_cond_t: false,
            use_additional_t_cond: false,
            use_layer3d_rope: false,
        }
    }

    /// Parses a config from JSON text; [`Self::validate`] checks it.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads and validates `path` (a `transformer/config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_json(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the sizes agree and no unsupported variant is switched on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Unsupported(msg));
        if self.guidance_embeds || self.zero_cond_t || self.use_additional_t_cond {
            return bad(
                "guidance_embeds, zero_cond_t and use_additional_t_cond must be false \
                        (variants other than Qwen-Image text-to-image)"
                    .into(),
            );
        }
        if self.use_layer3d_rope {
            return bad("use_layer3d_rope (Qwen-Image-Layered) is not implemented".into());
        }
        if self.patch_size == 0
            || self.num_attention_heads == 0
            || self.attention_head_dim == 0
            || self.joint_attention_dim == 0
        {
            return bad(
                "patch_size, heads, head dim and joint_attention_dim must be positive".into(),
            );
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return bad(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.in_channels != self.out_channels() * self.patch_size * self.patch_size {
            return bad(format!(
                "in_channels {} must equal out_channels {} × patch_size² ({}): the output \
                 velocity lives in the packed input space",
                self.in_channels,
                self.out_channels(),
                self.patch_size * self.patch_size
            ));
        }
        Ok(())
    }

    /// Latent channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Model width, `heads · head_dim` (3072).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// MLP hidden width (4 × inner, diffusers `FeedForward`'s default mult).
    pub fn ffn_dim(&self) -> usize {
        4 * self.inner_dim()
    }

    /// Width of `proj_out`'s output, `patch² · out_channels`.
    pub fn out_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels()
    }

    /// Every parameter tensor's checkpoint name and shape, top level first, then the blocks.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.inner_dim();
        let f = self.ffn_dim();
        let hd = self.attention_head_dim;
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: &str, o: usize, i: usize| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        linear(&mut out, "img_in", d, self.in_channels);
        out.push(("txt_norm.weight".into(), vec![self.joint_attention_dim]));
        linear(&mut out, "txt_in", d, self.joint_attention_dim);
        linear(
            &mut out,
            "time_text_embed.timestep_embedder.linear_1",
            d,
            TIMESTEP_CHANNELS,
        );
        linear(&mut out, "time_text_embed.timestep_embedder.linear_2", d, d);
        linear(&mut out, "norm_out.linear", 2 * d, d);
        linear(&mut out, "proj_out", self.out_dim(), d);
        for i in 0..self.num_layers {
            let b = format!("transformer_blocks.{i}");
            linear(&mut out, &format!("{b}.img_mod.1"), 6 * d, d);
            linear(&mut out, &format!("{b}.txt_mod.1"), 6 * d, d);
            for p in [
                "to_q",
                "to_k",
                "to_v",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
            ] {
                linear(&mut out, &format!("{b}.attn.{p}"), d, d);
            }
            linear(&mut out, &format!("{b}.attn.to_out.0"), d, d);
            linear(&mut out, &format!("{b}.attn.to_add_out"), d, d);
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                out.push((format!("{b}.attn.{n}.weight"), vec![hd]));
            }
            for m in ["img_mlp", "txt_mlp"] {
                linear(&mut out, &format!("{b}.{m}.net.0.proj"), f, d);
                linear(&mut out, &format!("{b}.{m}.net.2"), d, f);
            }
        }
        out
    }

    /// Total number of parameters (20,430,401,088 for the real config).
    pub fn param_count(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().map(|&x| x as u64).product::<u64>())
            .sum()
    }
}

/// Width of the sinusoidal timestep features (diffusers `Timesteps(num_channels=256)`).
pub const TIMESTEP_CHANNELS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_parse_keeps_defaults_and_ignores_unknown_keys() {
        let cfg = TransformerConfig::from_json(
            r#"{"_class_name": "QwenImageTransformer2DModel", "num_layers": 2, "future_key": [1]}"#,
        )
        .unwrap();
        assert_eq!(cfg.num_layers, 2);
        assert_eq!(cfg.inner_dim(), 3072);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn real_config_counts_the_published_parameters() {
        let cfg = TransformerConfig::qwen_image_20b();
        cfg.validate().unwrap();
        assert_eq!(cfg.param_count(), 20_430_401_088);
    }

    #[test]
    fn inconsistent_configs_are_rejected() {
        let mut cfg = TransformerConfig::qwen_image_20b();
        cfg.axes_dims_rope = [16, 56, 58];
        assert!(cfg.validate().is_err());
        let mut cfg = TransformerConfig::qwen_image_20b();
        cfg.zero_cond_t = true;
        assert!(cfg.validate().is_err());
        let mut cfg = TransformerConfig::qwen_image_20b();
        cfg.in_channels = 32;
        assert!(cfg.validate().is_err());
    }
}
