//! Validation limits: what a well-formed message may contain. Every check returns one typed
//! [`ValidationError`] that names the field, what it held, and what is allowed.

use std::fmt;

/// Width and height: multiples of 16 (the VAE's 8× and the 2×2 patching).
pub const DIMENSION_MULTIPLE: u32 = 16;
/// 64² is the size the built-in drawn tiny model was trained at (engine `drawn::DRAWN_SIDE`).
pub const MIN_DIMENSION: u32 = 64;
/// 2048² is 16,384 packed tokens: the largest size the 20B model serves on one 80 GB card.
pub const MAX_DIMENSION: u32 = 2048;
pub const MAX_STEPS: u32 = 100;
pub const MIN_TRUE_CFG: f32 = 1.0;
pub const MAX_TRUE_CFG: f32 = 20.0;
pub const MAX_PROMPT_CHARS: usize = 2_000;
/// A byte-level BPE yields at most one token per UTF-8 byte: 2,000 chars × 4 bytes, rounded up.
pub const MAX_PROMPT_TOKENS: u32 = 10_000;
pub const MAX_IMAGES: u32 = 4;
/// Requests may be valid for at most an hour: long enough for a queue, short enough that a
/// replayed request is soon refused as expired.
pub const MAX_EXPIRY_AHEAD_MS: u64 = 60 * 60 * 1000;
/// An input image (init image or mask) as PNG/JPEG bytes: a 2048² RGB PNG is at most ~12 MiB
/// uncompressed; 16 MiB leaves room for PNG overhead.
pub const MAX_INPUT_IMAGE_BYTES: usize = 16 * 1024 * 1024;
/// Channels of the model's latent space (Qwen-Image's VAE): the starting noise of a job is
/// `[1, LATENT_CHANNELS, H/8, W/8]`.
pub const LATENT_CHANNELS: u32 = 16;
/// A job's starting latents at the largest size: 16 × 256 × 256 little-endian f32, 4 MiB.
pub const MAX_LATENTS_BYTES: usize =
    LATENT_CHANNELS as usize * (MAX_DIMENSION as usize / 8) * (MAX_DIMENSION as usize / 8) * 4;
/// A generated PNG at 2048² is under 12.6 MiB even incompressible.
pub const MAX_OUTPUT_IMAGE_BYTES: usize = 16 * 1024 * 1024;
/// Price factors up to 1000×; keeps the metering arithmetic far inside u128.
pub const MAX_PRICE_FACTOR_PPM: u64 = 1_000 * 1_000_000;
/// Strength in per-mille: 1‰ ..= 1000‰ (1.0).
pub const MAX_STRENGTH_PERMILLE: u16 = 1_000;
/// Short text fields in adverts (GPU name, model id, precision) and notes.
pub const MAX_LABEL_CHARS: usize = 128;
pub const MAX_MEMO_CHARS: usize = 256;
pub const MAX_LISTEN_ADDRS: usize = 8;
/// Devices in one advert: an eight-GPU server twice over; more cards than this in one
/// machine are rare, and the bound keeps a signed advert under its size cap.
pub const MAX_ADVERT_DEVICES: usize = 16;
/// A device's name in an advert ("NVIDIA GeForce RTX 4090" is 23): short, since an advert
/// carries up to [`MAX_ADVERT_DEVICES`] of them.
pub const MAX_DEVICE_NAME_CHARS: usize = 48;
pub const MAX_ADDR_CHARS: usize = 256;
/// LoRAs in one advert: a provider's shelf of styles; each is a name and a hash (under 200
/// bytes), so 32 keep the signed advert well under its size cap.
pub const MAX_ADVERT_LORAS: usize = 32;
/// A job's LoRA scale in thousandths, at most 8.0: a LoRA is trained for 1; 8 already
/// saturates (the engine's `lora::MAX_SCALE`).
pub const MAX_LORA_SCALE_PERMILLE: u16 = 8_000;
/// Adverts older than this are stale; a provider re-publishes every few seconds.
pub const ADVERT_TTL_MS: u64 = 30_000;
/// Allowed clock skew between peers for timestamps that must not be in the future.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// The shape limits of one job: the market's ([`Limits::MARKET`], what every provider accepts
/// and [`crate::JobParams::validate`] enforces) and the wider ones of generating on one's own
/// machine ([`Limits::LOCAL`]). Both forms of `pixmarket generate` check their flags against one
/// of these two, so a flag means the same thing in both and the only difference is written here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Which form these are, for messages ("on the market", "locally").
    pub name: &'static str,
    pub min_dimension: u32,
    pub max_dimension: u32,
    pub max_steps: u32,
}

/// The engine's own ceiling for a local run: 256 patches per side keeps RoPE positions inside
/// the reference's ±4096 table with room for 512 text tokens. Whether the device has the memory
/// is a separate estimate made before the model runs.
pub const LOCAL_MAX_DIMENSION: u32 = 4096;
/// A local run may be as small as one packed token per side: tests and the tiny model run at
/// 32² or 64×48 in a fraction of a second.
pub const LOCAL_MIN_DIMENSION: u32 = DIMENSION_MULTIPLE;
/// 1000 is the length of the training schedule; more steps only re-sample the same sigmas.
pub const LOCAL_MAX_STEPS: u32 = 1000;

impl Limits {
    /// What a provider accepts.
    pub const MARKET: Limits = Limits {
        name: "on the market",
        min_dimension: MIN_DIMENSION,
        max_dimension: MAX_DIMENSION,
        max_steps: MAX_STEPS,
    };
    /// What `generate --local` accepts: it spends nobody's tokens, so it may go smaller, larger
    /// and longer (memory permitting).
    pub const LOCAL: Limits = Limits {
        name: "locally",
        min_dimension: LOCAL_MIN_DIMENSION,
        max_dimension: LOCAL_MAX_DIMENSION,
        max_steps: LOCAL_MAX_STEPS,
    };

    pub fn dimension(&self, field: &'static str, value: u32) -> Result<(), ValidationError> {
        if (self.min_dimension..=self.max_dimension).contains(&value)
            && value.is_multiple_of(DIMENSION_MULTIPLE)
        {
            Ok(())
        } else {
            Err(ValidationError::new(
                field,
                value,
                format!(
                    "a multiple of {DIMENSION_MULTIPLE} in {}..={} {}",
                    self.min_dimension, self.max_dimension, self.name
                ),
            ))
        }
    }

    pub fn steps(&self, value: u32) -> Result<(), ValidationError> {
        if (1..=self.max_steps).contains(&value) {
            Ok(())
        } else {
            Err(ValidationError::new(
                "steps",
                value,
                format!("1..={} {}", self.max_steps, self.name),
            ))
        }
    }
}

/// A field is outside what the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: got {got}; allowed: {allowed}")]
pub struct ValidationError {
    pub field: &'static str,
    pub got: String,
    pub allowed: String,
}

impl ValidationError {
    pub fn new(field: &'static str, got: impl fmt::Display, allowed: impl Into<String>) -> Self {
        Self {
            field,
            got: got.to_string(),
            allowed: allowed.into(),
        }
    }
}

pub fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ValidationError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(field, value, format!("{min}..={max}")))
    }
}

/// A width or height within the market's limits.
pub fn dimension(field: &'static str, value: u32) -> Result<(), ValidationError> {
    Limits::MARKET.dimension(field, value)
}

pub fn true_cfg_scale(value: f32) -> Result<(), ValidationError> {
    if value.is_finite() && (MIN_TRUE_CFG..=MAX_TRUE_CFG).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::new(
            "true_cfg_scale",
            value,
            format!("a finite number in {MIN_TRUE_CFG:.1}..={MAX_TRUE_CFG:.1}"),
        ))
    }
}

pub fn text(
    field: &'static str,
    value: &str,
    min_chars: usize,
    max_chars: usize,
) -> Result<(), ValidationError> {
    let n = value.chars().count();
    if n < min_chars || n > max_chars {
        let allowed = if min_chars > 0 {
            format!("{min_chars}..={max_chars} characters")
        } else {
            format!("at most {max_chars} characters")
        };
        return Err(ValidationError::new(
            field,
            format!("{n} characters"),
            allowed,
        ));
    }
    if value.chars().any(|c| c == '\0') {
        return Err(ValidationError::new(
            field,
            "a NUL character",
            "text without NUL characters",
        ));
    }
    Ok(())
}

pub fn bytes(
    field: &'static str,
    len: usize,
    min: usize,
    max: usize,
) -> Result<(), ValidationError> {
    if (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{len} bytes"),
            format!("{min}..={max} bytes"),
        ))
    }
}

/// An expiry must be in the future and at most [`MAX_EXPIRY_AHEAD_MS`] ahead of `now_ms`.
pub fn expiry(field: &'static str, expires_at_ms: u64, now_ms: u64) -> Result<(), ValidationError> {
    let latest = now_ms.saturating_add(MAX_EXPIRY_AHEAD_MS);
    if expires_at_ms > now_ms && expires_at_ms <= latest {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{expires_at_ms} ms (now is {now_ms} ms)"),
            format!(
                "after now and at most {} minutes ahead",
                MAX_EXPIRY_AHEAD_MS / 60_000
            ),
        ))
    }
}
