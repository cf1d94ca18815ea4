//! Every message of the market, version 1 (the version is part of each message's signing
//! domain). The job flow (DESIGN.md "A job, end to end"):
//!
//! provider ──[`CapacityAdvert`]──▶ everyone (gossip)
//! requester ──[`QuoteRequest`]──▶ provider ──[`Quote`]──▶ requester
//! requester ──[`JobRequest`]──▶ provider ──[`JobEvent`]s──▶ requester (accepted, progress,
//!   completed with the signed [`Receipt`] and no images, or failed/cancelled with a signed
//!   void)
//! requester ──[`ReceiptAck`]──▶ provider ──images──▶ requester (the fair exchange: the
//!   images are released only against the signed acknowledgement; see [`crate::exchange`])
//! operator records a [`DepositNote`] in their own ledger when a peer prepays.

use serde::{Deserialize, Serialize};

use crate::exchange::JobVoid;
use crate::identity::{Hash, PublicKey};
use crate::metering::{self, MeterError, MeteredUnits, MicroTokens, PriceSchedule};
use crate::preview::Preview;
use crate::signed::{Message, Signed};
use crate::validate::{self as v, ValidationError};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(rand::random())
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(&self.0[..4]))
            }
        }
        impl std::str::FromStr for $name {
            type Err = crate::identity::KeyError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut b = [0u8; 16];
                if s.len() != 32 {
                    return Err(crate::identity::KeyError::Length { expected: 16, got: s.len() / 2 });
                }
                hex::decode_to_slice(s, &mut b).map_err(|_| crate::identity::KeyError::Hex)?;
                Ok(Self(b))
            }
        }
    };
}

id_type!(
    /// A job's id: random, chosen by the requester and kept before sending, so a retry of the
    /// same request is recognised as a duplicate rather than run twice.
    JobId
);
id_type!(
    /// A quote's id, echoed by the provider's answer.
    QuoteId
);

/// What kind of generation a job asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    TextToImage,
    /// Start from `init_image` (PNG or JPEG bytes), keeping `1 − strength` of it.
    ImageToImage {
        init_image: Vec<u8>,
        strength_permille: u16,
    },
    /// Regenerate where `mask` (white = repaint) covers `init_image`.
    Inpaint {
        init_image: Vec<u8>,
        mask: Vec<u8>,
        strength_permille: u16,
    },
}

impl Mode {
    pub fn strength_permille(&self) -> Option<u16> {
        match self {
            Mode::TextToImage => None,
            Mode::ImageToImage {
                strength_permille, ..
            }
            | Mode::Inpaint {
                strength_permille, ..
            } => Some(*strength_permille),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::TextToImage => "text-to-image",
            Mode::ImageToImage { .. } => "image-to-image",
            Mode::Inpaint { .. } => "inpaint",
        }
    }

    fn validate(&self) -> Result<(), ValidationError> {
        let check_strength = |s: u16| {
            v::range(
                "strength",
                u64::from(s),
                1,
                u64::from(v::MAX_STRENGTH_PERMILLE),
            )
        };
        match self {
            Mode::TextToImage => Ok(()),
            Mode::ImageToImage {
                init_image,
                strength_permille,
            } => {
                v::bytes("init_image", init_image.len(), 1, v::MAX_INPUT_IMAGE_BYTES)?;
                check_strength(*strength_permille)
            }
            Mode::Inpaint {
                init_image,
                mask,
                strength_permille,
            } => {
                v::bytes("init_image", init_image.len(), 1, v::MAX_INPUT_IMAGE_BYTES)?;
                v::bytes("mask", mask.len(), 1, v::MAX_INPUT_IMAGE_BYTES)?;
                check_strength(*strength_permille)
            }
        }
    }
}

/// Denoising steps actually run for `steps` at `strength` (per-mille): `⌈steps × strength⌉`,
/// at least 1, as the reference image-to-image pipeline runs them.
pub fn effective_steps(steps: u32, strength_permille: Option<u16>) -> u32 {
    match strength_permille {
        None => steps,
        Some(s) => {
            let run = (u64::from(steps) * u64::from(s)).div_ceil(1000);
            u32::try_from(run).unwrap_or(steps).clamp(1, steps.max(1))
        }
    }
}

/// How a provider runs the denoising loop: advertised, quoted for each job, and recorded in
/// the receipt of the job that ran. Metering does not depend on it: a job is billed by the steps
/// it asked for, and a provider that saves work by caching keeps the saving or prices it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepCaching {
    /// Every step runs every transformer block: the exact computation.
    Exact,
    /// First-block step caching: a step whose first block's output changed by less than
    /// `threshold_permille`/1000 (relative L1) since that image's last full step reuses the
    /// rest of that step's work. The image is close to the exact one, not equal to it.
    FirstBlock { threshold_permille: u16 },
}

impl StepCaching {
    /// What a job runs with on a provider that caches with `self`: exact when the requester
    /// requires it.
    pub fn for_job(self, exact_required: bool) -> Self {
        if exact_required { Self::Exact } else { self }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Exact => Ok(()),
            Self::FirstBlock { threshold_permille } => v::range(
                "step_caching.threshold_permille",
                u64::from(*threshold_permille),
                1,
                1000,
            ),
        }
    }
}

impl std::fmt::Display for StepCaching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact => f.write_str("exact"),
            Self::FirstBlock { threshold_permille } => write!(
                f,
                "first-block step caching at {}",
                f64::from(*threshold_permille) / 1000.0
            ),
        }
    }
}

/// A LoRA a provider offers: a name for people and the blake3 hash of its file, which is what
/// a job names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraOffer {
    pub name: String,
    pub hash: Hash,
}

/// The LoRA a job runs with: the hash of a file its provider offers, and its scale in
/// thousandths (1000 = the scale it was trained for).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraChoice {
    pub hash: Hash,
    pub scale_permille: u16,
}

impl LoraChoice {
    pub fn validate(&self) -> Result<(), ValidationError> {
        v::range(
            "lora.scale",
            u64::from(self.scale_permille),
            1,
            u64::from(v::MAX_LORA_SCALE_PERMILLE),
        )
    }
}

/// Everything that determines the picture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// True classifier-free guidance; 1.0 turns it off (one forward per step).
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Number of images to generate, each with seed `seed + i`.
    pub images: u32,
    pub mode: Mode,
    /// The requester requires the exact computation ([`StepCaching::Exact`]): a provider that
    /// caches steps runs this job without caching, or refuses it at the quote.
    pub exact: bool,
    /// A LoRA the provider offers, applied to the transformer for this job.
    #[serde(default)]
    pub lora: Option<LoraChoice>,
    /// The starting noise instead of the seed's: `[1, 16, height/8, width/8]` as little-endian
    /// f32 in row-major order, every value finite; only with `images == 1`. Signed with the
    /// request like every field; the price does not depend on it.
    pub latents: Option<Vec<u8>>,
}

impl JobParams {
    pub fn validate(&self) -> Result<(), ValidationError> {
        v::text("prompt", &self.prompt, 1, v::MAX_PROMPT_CHARS)?;
        if self.prompt.trim().is_empty() {
            return Err(ValidationError::new(
                "prompt",
                "only whitespace",
                "1..=2000 characters of text",
            ));
        }
        v::text(
            "negative_prompt",
            &self.negative_prompt,
            0,
            v::MAX_PROMPT_CHARS,
        )?;
        v::dimension("width", self.width)?;
        v::dimension("height", self.height)?;
        v::range("steps", u64::from(self.steps), 1, u64::from(v::MAX_STEPS))?;
        v::true_cfg_scale(self.true_cfg_scale)?;
        v::range(
            "images",
            u64::from(self.images),
            1,
            u64::from(v::MAX_IMAGES),
        )?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Some(latents) = &self.latents {
            self.validate_latents(latents)?;
        }
        self.mode.validate()
    }

    /// The latents' byte length for this size: 16 × (H/8) × (W/8) f32.
    pub fn latents_len(&self) -> usize {
        v::LATENT_CHANNELS as usize * (self.height as usize / 8) * (self.width as usize / 8) * 4
    }

    fn validate_latents(&self, latents: &[u8]) -> Result<(), ValidationError> {
        if self.images != 1 {
            return Err(ValidationError::new(
                "latents",
                format!("latents with images = {}", self.images),
                "latents only with images = 1 (each image needs its own noise)",
            ));
        }
        let want = self.latents_len();
        if latents.len() != want {
            return Err(ValidationError::new(
                "latents",
                format!("{} bytes", latents.len()),
                format!(
                    "{want} bytes: [1, 16, {}, {}] little-endian f32 for {}×{}",
                    self.height / 8,
                    self.width / 8,
                    self.width,
                    self.height
                ),
            ));
        }
        if let Some(i) = latents
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        {
            return Err(ValidationError::new(
                "latents",
                format!("a NaN or infinite value at index {i}"),
                "finite f32 values",
            ));
        }
        Ok(())
    }

    /// The latents as f32 values (for the engine), when given.
    pub fn latents_f32(&self) -> Option<Vec<f32>> {
        self.latents.as_ref().map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The job's work against one standard image (1024², 50 steps, one image, no true CFG), in
    /// parts per million: for estimates of time, never for prices.
    pub fn standard_work_ppm(&self) -> u64 {
        let px = u64::from(self.width) * u64::from(self.height);
        let steps = u64::from(effective_steps(self.steps, self.mode.strength_permille()));
        let cfg = if self.true_cfg_scale > 1.0 { 2 } else { 1 };
        px * steps * u64::from(self.images) * cfg * 1_000_000 / (1024 * 1024 * 50)
    }

    /// The units this job is billed on, given the prompt's token count in the model tokenizer.
    pub fn metered_units(&self, prompt_tokens: u32) -> MeteredUnits {
        MeteredUnits {
            width: self.width,
            height: self.height,
            steps: effective_steps(self.steps, self.mode.strength_permille()),
            prompt_tokens,
            images: self.images,
        }
    }
}

/// A provider's signed statement of what it offers. Published on gossip every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityAdvert {
    /// Increases with every advert from this provider; older ones are dropped.
    pub seq: u64,
    pub issued_at_ms: u64,
    pub listen_addrs: Vec<String>,
    pub gpu_name: String,
    pub gpu_memory_mib: u64,
    pub model_id: String,
    /// `f32`, `bf16` or `f16`.
    pub precision: String,
    pub supports_image_to_image: bool,
    pub supports_inpaint: bool,
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
    pub max_images: u32,
    pub schedule: PriceSchedule,
    pub queue_depth: u32,
    pub max_queue: u32,
    /// Measured time for one standard image (1024², 50 steps), in milliseconds, on the
    /// fastest device that serves (one job runs on one device, so this is a job's best time).
    pub ms_per_standard_image: u64,
    /// Every device that serves now, one worker each (a failed device is left out). Empty
    /// means one device, as `gpu_name`, `gpu_memory_mib` and `ms_per_standard_image` say.
    pub devices: Vec<DeviceCapacity>,
    /// How this provider runs jobs that do not require exact computation.
    pub step_caching: StepCaching,
    /// Whether it runs jobs that require exact computation (else it refuses them at the quote).
    pub serves_exact: bool,
    /// The LoRAs a job may name (by hash); a job naming another is refused at the quote.
    #[serde(default)]
    pub loras: Vec<LoraOffer>,
}

/// One device of a provider: one engine, one worker, its own copy of the weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCapacity {
    pub name: String,
    pub memory_mib: u64,
    /// Measured time for one standard image on this device, in milliseconds.
    pub ms_per_standard_image: u64,
}

impl CapacityAdvert {
    /// How many jobs the provider runs at once: its serving devices (at least one).
    pub fn device_count(&self) -> u32 {
        u32::try_from(self.devices.len()).unwrap_or(u32::MAX).max(1)
    }

    /// Estimated time until a new standard image would be finished here: the jobs ahead
    /// (`depth`) spread over the devices, then the job itself, each at the advertised speed.
    pub fn estimated_finish_ms(&self, depth: u32) -> u64 {
        let rounds = u64::from(depth / self.device_count()).saturating_add(1);
        self.ms_per_standard_image.saturating_mul(rounds)
    }
}

impl CapacityAdvert {
    /// Checks the fields and that the advert is fresh at `now_ms`.
    pub fn validate(&self, now_ms: u64) -> Result<(), ValidationError> {
        if self.issued_at_ms > now_ms.saturating_add(v::MAX_CLOCK_SKEW_MS)
            || self.issued_at_ms.saturating_add(v::ADVERT_TTL_MS) < now_ms
        {
            return Err(ValidationError::new(
                "issued_at",
                format!("{} ms (now is {now_ms} ms)", self.issued_at_ms),
                format!("within the last {} s", v::ADVERT_TTL_MS / 1000),
            ));
        }
        if self.listen_addrs.len() > v::MAX_LISTEN_ADDRS {
            return Err(ValidationError::new(
                "listen_addrs",
                format!("{} addresses", self.listen_addrs.len()),
                format!("at most {}", v::MAX_LISTEN_ADDRS),
            ));
        }
        for a in &self.listen_addrs {
            v::text("listen_addrs", a, 1, v::MAX_ADDR_CHARS)?;
        }
        v::text("gpu_name", &self.gpu_name, 1, v::MAX_LABEL_CHARS)?;
        if self.devices.len() > v::MAX_ADVERT_DEVICES {
            return Err(ValidationError::new(
                "devices",
                format!("{} devices", self.devices.len()),
                format!("at most {}", v::MAX_ADVERT_DEVICES),
            ));
        }
        for d in &self.devices {
            v::text("devices.name", &d.name, 1, v::MAX_DEVICE_NAME_CHARS)?;
            if d.ms_per_standard_image == 0 {
                return Err(ValidationError::new(
                    "devices.ms_per_standard_image",
                    0,
                    "at least 1 ms",
                ));
            }
        }
        v::text("model_id", &self.model_id, 1, v::MAX_LABEL_CHARS)?;
        if !matches!(self.precision.as_str(), "f32" | "bf16" | "f16") {
            return Err(ValidationError::new(
                "precision",
                &self.precision,
                "f32, bf16 or f16",
            ));
        }
        v::dimension("max_width", self.max_width)?;
        v::dimension("max_height", self.max_height)?;
        v::range(
            "max_steps",
            u64::from(self.max_steps),
            1,
            u64::from(v::MAX_STEPS),
        )?;
        v::range(
            "max_images",
            u64::from(self.max_images),
            1,
            u64::from(v::MAX_IMAGES),
        )?;
        if self.loras.len() > v::MAX_ADVERT_LORAS {
            return Err(ValidationError::new(
                "loras",
                format!("{} LoRAs", self.loras.len()),
                format!("at most {}", v::MAX_ADVERT_LORAS),
            ));
        }
        for l in &self.loras {
            v::text("loras.name", &l.name, 1, v::MAX_LABEL_CHARS)?;
        }
        self.step_caching.validate()?;
        self.schedule.validate()
    }

    /// The offer of LoRA `hash`, if this provider has it.
    pub fn lora(&self, hash: &Hash) -> Option<&LoraOffer> {
        self.loras.iter().find(|l| l.hash == *hash)
    }
}

/// A requester asks a provider what a job would cost and when it would finish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuoteRequest {
    pub quote_id: QuoteId,
    pub provider: PublicKey,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub images: u32,
    /// For image-to-image and inpaint; `None` for text-to-image.
    pub strength_permille: Option<u16>,
    /// The job will require exact computation (see [`JobParams::exact`]).
    pub exact: bool,
    /// The LoRA the job will name ([`JobParams::lora`]), by its file's hash.
    #[serde(default)]
    pub lora: Option<Hash>,
}

impl QuoteRequest {
    pub fn validate(&self) -> Result<(), ValidationError> {
        v::text("prompt", &self.prompt, 1, v::MAX_PROMPT_CHARS)?;
        v::dimension("width", self.width)?;
        v::dimension("height", self.height)?;
        v::range("steps", u64::from(self.steps), 1, u64::from(v::MAX_STEPS))?;
        v::range(
            "images",
            u64::from(self.images),
            1,
            u64::from(v::MAX_IMAGES),
        )?;
        if let Some(s) = self.strength_permille {
            v::range(
                "strength",
                u64::from(s),
                1,
                u64::from(v::MAX_STRENGTH_PERMILLE),
            )?;
        }
        Ok(())
    }
}

/// A provider's signed price for a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    pub quote_id: QuoteId,
    pub requester: PublicKey,
    pub units: MeteredUnits,
    pub schedule: PriceSchedule,
    pub cost: MicroTokens,
    pub queue_position: u32,
    pub eta_ms: u64,
    pub valid_until_ms: u64,
    /// How the job would run: [`StepCaching::Exact`] whenever the request requires it.
    pub step_caching: StepCaching,
}

impl Quote {
    /// Checks the quoted cost against the metering function.
    pub fn check_cost(&self) -> Result<(), CostMismatch> {
        check_cost(&self.units, &self.schedule, self.cost)
    }
}

/// A signed request to run a job on one named provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: JobId,
    /// The provider this request is for; any other provider must refuse it.
    pub provider: PublicKey,
    pub params: JobParams,
    /// The most the requester agrees to pay.
    pub max_cost: MicroTokens,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub quote_id: Option<QuoteId>,
    /// Previews of the first image wanted with the progress events, 0 to
    /// [`crate::preview::MAX_PREVIEWS`]; free, and bounded to thumbnails (see
    /// [`crate::preview`]). Not part of [`JobParams`]: they do not change the picture.
    pub previews: u8,
}

impl JobRequest {
    pub fn validate(&self, now_ms: u64) -> Result<(), ValidationError> {
        self.params.validate()?;
        v::range(
            "previews",
            u64::from(self.previews),
            0,
            u64::from(crate::preview::MAX_PREVIEWS),
        )?;
        v::expiry("expires_at", self.expires_at_ms, now_ms)
    }
}

/// Why a job did not complete. Admission rejections carry the numbers a person needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FailReason {
    #[error("insufficient credit: the job needs up to {needed} tokens, {available} are available")]
    InsufficientCredit {
        needed: MicroTokens,
        available: MicroTokens,
    },
    #[error("provider busy; retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u64 },
    #[error("invalid request: {0}")]
    Invalid(ValidationErrorWire),
    #[error("request expired")]
    Expired,
    #[error("duplicate job id")]
    Duplicate,
    #[error("request is addressed to another provider")]
    WrongProvider,
    #[error("the job's cost {cost} exceeds its max_cost {max_cost}")]
    OverBudget {
        cost: MicroTokens,
        max_cost: MicroTokens,
    },
    #[error("request signature does not verify")]
    BadSignature,
    #[error("this provider does not support {0}")]
    Unsupported(String),
    #[error("generation failed: {0}")]
    Engine(String),
    #[error("provider is shutting down")]
    ShuttingDown,
    #[error("cancelled")]
    Cancelled,
    #[error("the request expired before the job ran")]
    HoldExpired,
    #[error("the provider restarted and lost the job")]
    Restarted,
    #[error("the receipt was credited back; nothing is owed and nothing is delivered")]
    Credited,
    #[error("the result is no longer kept for re-delivery")]
    ResultGone,
    #[error("no settled receipt for this job")]
    NotSettled,
    #[error("this provider does not run jobs that require exact computation (it runs {offered})")]
    ExactUnavailable { offered: StepCaching },
    /// The job is larger than the provider's memory plan runs: its size, or its images at
    /// that size (with CFG, in one batch).
    #[error(
        "{width}×{height} with {images} image(s) does not fit this provider's memory: it runs at \
         most {max_side}×{max_side}, and {max_images} image(s) at this size"
    )]
    TooLarge {
        width: u32,
        height: u32,
        images: u32,
        max_side: u32,
        max_images: u32,
    },
    /// The job names a LoRA this provider does not offer.
    #[error("this provider does not offer the LoRA with hash {}", hex::encode(hash.as_bytes()))]
    LoraUnavailable { hash: Hash },
    /// The requester reaches this provider only through a relay whose circuits carry fewer
    /// bytes than the result would take; refused before any work. Hole punching, a public
    /// address on either side, or a relay that carries results would lift it.
    #[error(
        "the result (up to {needed_bytes} bytes) cannot cross the relayed connection, which \
         carries at most {circuit_bytes} bytes; hole punching did not connect us directly"
    )]
    RelayLimit {
        circuit_bytes: u64,
        needed_bytes: u64,
    },
}

/// A [`ValidationError`] as it travels on the wire (owned field name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationErrorWire {
    pub field: String,
    pub got: String,
    pub allowed: String,
}

impl std::fmt::Display for ValidationErrorWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid {}: got {}; allowed: {}",
            self.field, self.got, self.allowed
        )
    }
}

impl From<ValidationError> for ValidationErrorWire {
    fn from(e: ValidationError) -> Self {
        Self {
            field: e.field.to_owned(),
            got: e.got,
            allowed: e.allowed,
        }
    }
}

/// What happened to a job, streamed from provider to requester. Each echoes the job id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: JobId,
    pub kind: JobEventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobEventKind {
    Accepted {
        queue_position: u32,
        eta_ms: u64,
    },
    /// `step` of `of` steps are done; `preview` is a picture of the job's first image at this
    /// step, sent only at the steps [`crate::preview::preview_steps`] names when the request
    /// asked for previews.
    Progress {
        step: u32,
        of: u32,
        preview: Option<Preview>,
    },
    /// The provider-signed receipt (with the images' hashes), sent once it is durable. The
    /// images themselves are released only against the requester's signed acknowledgement.
    Completed {
        receipt: Signed<Receipt>,
    },
    /// The job ended without a charge; the signed void lets the requester fail over.
    Failed {
        reason: FailReason,
        void: Signed<JobVoid>,
    },
    Cancelled {
        void: Signed<JobVoid>,
    },
}

/// The provider's signed bill for one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub job_id: JobId,
    /// The digest of the signed [`JobRequest`] this receipt answers.
    pub request_hash: Hash,
    pub provider: PublicKey,
    pub requester: PublicKey,
    pub units: MeteredUnits,
    pub schedule: PriceSchedule,
    pub cost: MicroTokens,
    /// blake3 of each PNG delivered, in order.
    pub image_hashes: Vec<Hash>,
    pub queued_ms: u64,
    pub run_ms: u64,
    /// Everything this provider has charged this requester, this receipt included.
    pub cumulative_charged: MicroTokens,
    /// The pair's previous chain entry (a receipt or a credit note; its signed digest),
    /// `None` for the first.
    pub prev_entry_hash: Option<Hash>,
    pub issued_at_ms: u64,
    /// How the job ran: [`StepCaching::Exact`], or the step caching its images came from.
    pub step_caching: StepCaching,
}

/// A price that does not match the metering function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostMismatch {
    #[error("charged {charged} tokens, the metering function gives {expected}")]
    Wrong {
        charged: MicroTokens,
        expected: MicroTokens,
    },
    #[error(transparent)]
    Meter(#[from] MeterError),
}

fn check_cost(
    units: &MeteredUnits,
    schedule: &PriceSchedule,
    charged: MicroTokens,
) -> Result<(), CostMismatch> {
    let expected = metering::cost(units, schedule)?;
    if expected == charged {
        Ok(())
    } else {
        Err(CostMismatch::Wrong { charged, expected })
    }
}

impl Receipt {
    /// Checks the billed cost against the metering function.
    pub fn check_cost(&self) -> Result<(), CostMismatch> {
        check_cost(&self.units, &self.schedule, self.cost)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        self.units.validate()?;
        self.schedule.validate()?;
        self.step_caching.validate()?;
        v::range(
            "image_hashes",
            self.image_hashes.len() as u64,
            1,
            u64::from(v::MAX_IMAGES),
        )
    }
}

/// The requester's signed acknowledgement of a receipt. With it, the receipt is doubly signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptAck {
    pub job_id: JobId,
    /// The signed digest of the acknowledged receipt.
    pub receipt_hash: Hash,
    pub acked_at_ms: u64,
}

/// An operator's signed record that `account` prepaid `amount` to this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepositNote {
    /// Unique per operator, so the same deposit is never recorded twice.
    pub deposit_id: [u8; 16],
    pub account: PublicKey,
    pub amount: MicroTokens,
    pub memo: String,
    pub recorded_at_ms: u64,
}

impl DepositNote {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.amount == MicroTokens::ZERO {
            return Err(ValidationError::new("amount", "0", "more than 0 tokens"));
        }
        v::text("memo", &self.memo, 0, v::MAX_MEMO_CHARS)
    }
}

const KIB: usize = 1024;
/// Prompt text (2,000 chars × 4 bytes) twice, plus fixed fields.
const JOB_TEXT_BUDGET: usize = 2 * 4 * v::MAX_PROMPT_CHARS + KIB;

impl Message for CapacityAdvert {
    const DOMAIN: &'static str = "pixmarket/v1/capacity-advert";
    /// The largest advert validation allows: 8 addresses of 256 chars and two labels of 128,
    /// at 4 bytes a char, and 16 devices of 48 chars with two integers each: under 13 KiB.
    const MAX_ENCODED: usize = 16 * KIB;
}
impl Message for QuoteRequest {
    const DOMAIN: &'static str = "pixmarket/v1/quote-request";
    const MAX_ENCODED: usize = JOB_TEXT_BUDGET;
}
impl Message for Quote {
    const DOMAIN: &'static str = "pixmarket/v1/quote";
    const MAX_ENCODED: usize = KIB;
}
impl Message for JobRequest {
    const DOMAIN: &'static str = "pixmarket/v1/job-request";
    /// Two input images (init and mask), the starting latents, plus the texts.
    const MAX_ENCODED: usize =
        2 * (v::MAX_INPUT_IMAGE_BYTES + 8) + v::MAX_LATENTS_BYTES + 8 + JOB_TEXT_BUDGET;
}
impl Message for Receipt {
    const DOMAIN: &'static str = "pixmarket/v1/receipt";
    const MAX_ENCODED: usize = 2 * KIB;
}
impl Message for JobEvent {
    const DOMAIN: &'static str = "pixmarket/v1/job-event";
    /// A signed receipt or a signed void, with room for a failure's message, or progress with
    /// a preview.
    const MAX_ENCODED: usize = crate::preview::MAX_PREVIEW_BYTES + 8 * KIB;
}
impl Message for ReceiptAck {
    const DOMAIN: &'static str = "pixmarket/v1/receipt-ack";
    const MAX_ENCODED: usize = 128;
}
impl Message for DepositNote {
    const DOMAIN: &'static str = "pixmarket/v1/deposit-note";
    const MAX_ENCODED: usize = 2 * KIB;
}
