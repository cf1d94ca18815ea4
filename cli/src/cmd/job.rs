//! The one job builder: `generate --local` and the market form of `generate` turn the same flags
//! ([`super::generate::JobArgs`]) into the same [`JobParams`] here, checked against the
//! protocol's limits for their form ([`Limits::LOCAL`] or [`Limits::MARKET`]), before anything
//! is loaded, bought or run. The market sends these params; the local form runs exactly them.
//!
//! Sizes come from, in order: `--width`/`--height`, the outpaint canvas, the init image's own
//! size, the form's default. An init image or mask of another size than the picture is refused
//! unless `--resize` asks for it to be stretched.

use std::path::Path;

use anyhow::Context;
use pixmarket_engine::image_io::{image_size, outpaint_canvas, resize_png};
use pixmarket_protocol::validate::{self as v, Limits};
use pixmarket_protocol::{JobParams, Mode};

use super::generate::JobArgs;
use crate::usage::{UsageError, usage};

/// Defaults for real weights, local or bought: the reference pipeline's (1024², 50 steps,
/// true CFG 4).
pub(crate) const DEFAULT_SIDE: u32 = 1024;
pub(crate) const DEFAULT_STEPS: u32 = 50;
pub(crate) const DEFAULT_TRUE_CFG: f32 = 4.0;
/// Defaults for the tiny model, the drawn one: the size it was trained at, and the steps and
/// CFG (off) measured to draw best (engine README, "The drawn tiny model").
pub(crate) const TINY_SIDE: u32 = pixmarket_engine::drawn::DRAWN_SIDE;
pub(crate) const TINY_STEPS: u32 = pixmarket_engine::drawn::DRAWN_STEPS;
pub(crate) const TINY_TRUE_CFG: f32 = pixmarket_engine::drawn::DRAWN_CFG;
/// Image-to-image and inpaint repaint this much of the init image unless told: diffusers'
/// default strength, 0.6.
pub(crate) const DEFAULT_STRENGTH_PERMILLE: u16 = 600;
/// Outpainting repaints a blank border: all of it.
const OUTPAINT_STRENGTH_PERMILLE: u16 = 1000;

/// Where the job will run: decides the limits and the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// `--local`; `tiny` picks the tiny model's small defaults.
    Local { tiny: bool },
    /// Bought from a provider.
    Market,
}

impl Form {
    fn limits(self) -> Limits {
        match self {
            Form::Local { .. } => Limits::LOCAL,
            Form::Market => Limits::MARKET,
        }
    }

    /// Side, steps and true CFG scale when the flags leave them out.
    fn defaults(self) -> (u32, u32, f32) {
        match self {
            Form::Local { tiny: true } => (TINY_SIDE, TINY_STEPS, TINY_TRUE_CFG),
            Form::Local { tiny: false } | Form::Market => {
                (DEFAULT_SIDE, DEFAULT_STEPS, DEFAULT_TRUE_CFG)
            }
        }
    }
}

fn read_image(flag: &str, path: &Path) -> anyhow::Result<(Vec<u8>, (u32, u32))> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read {flag} {}", path.display()))
        .map_err(|e| anyhow::Error::new(UsageError(format!("{e:#}"))))?;
    v::bytes("init_image", bytes.len(), 1, v::MAX_INPUT_IMAGE_BYTES)
        .map_err(|e| usage!("{flag} {}: {e}", path.display()))?;
    let size = image_size(&bytes, "image")
        .map_err(|_| usage!("{flag} {} is not a readable PNG or JPEG", path.display()))?;
    Ok((bytes, size))
}

/// The mode with its init image and mask stretched to `width × height`.
fn resized(mode: Mode, width: u32, height: u32) -> anyhow::Result<Mode> {
    let image = |b: &[u8]| {
        resize_png(b, width, height, "init image", false).context("cannot resize --init-image")
    };
    Ok(match mode {
        Mode::TextToImage => Mode::TextToImage,
        Mode::ImageToImage {
            init_image,
            strength_permille,
        } => Mode::ImageToImage {
            init_image: image(&init_image)?,
            strength_permille,
        },
        Mode::Inpaint {
            init_image,
            mask,
            strength_permille,
        } => Mode::Inpaint {
            init_image: image(&init_image)?,
            mask: resize_png(&mask, width, height, "mask", true).context("cannot resize --mask")?,
            strength_permille,
        },
    })
}

/// Builds the job the flags describe for `form`, or says which flag is wrong and what is allowed
/// (a [`UsageError`]).
pub(crate) fn build(job: &JobArgs, form: Form) -> anyhow::Result<JobParams> {
    let limits = form.limits();
    let invalid = |e: v::ValidationError| usage!("{e}");
    if job.strength.is_some() && job.init_image.is_none() {
        return Err(usage!("--strength needs --init-image"));
    }
    v::text("prompt", &job.prompt, 1, v::MAX_PROMPT_CHARS).map_err(invalid)?;
    if job.prompt.trim().is_empty() {
        return Err(usage!(
            "the prompt is only whitespace; describe the picture in 1..={} characters",
            v::MAX_PROMPT_CHARS
        ));
    }
    v::text(
        "negative_prompt",
        &job.negative_prompt,
        0,
        v::MAX_PROMPT_CHARS,
    )
    .map_err(invalid)?;
    let (side, default_steps, default_cfg) = form.defaults();
    let true_cfg_scale = job.true_cfg_scale.unwrap_or(default_cfg);
    v::true_cfg_scale(true_cfg_scale).map_err(invalid)?;

    // The inputs, and the size they imply.
    let mut implied = None;
    let mut inputs = Vec::new();
    let mode = match (&job.init_image, &job.mask, job.outpaint) {
        (None, _, _) => Mode::TextToImage,
        (Some(img), None, Some(pad)) => {
            let (bytes, _) = read_image("--init-image", img)?;
            if pad == [0; 4] {
                return Err(usage!(
                    "--outpaint 0,0,0,0 adds no border to paint; give the pixels to add on each side"
                ));
            }
            let (init_image, mask, w, h) =
                outpaint_canvas(&bytes, pad).map_err(|e| usage!("{e}"))?;
            if (job.width.is_none() || job.height.is_none())
                && (!w.is_multiple_of(v::DIMENSION_MULTIPLE)
                    || !h.is_multiple_of(v::DIMENSION_MULTIPLE))
            {
                return Err(usage!(
                    "the outpaint canvas is {w}×{h}; choose padding that makes both sides \
                     multiples of {}, or give --width and --height",
                    v::DIMENSION_MULTIPLE
                ));
            }
            implied = Some((w, h));
            inputs.push(("the outpaint canvas", (w, h)));
            Mode::Inpaint {
                init_image,
                mask,
                strength_permille: job.strength.unwrap_or(OUTPAINT_STRENGTH_PERMILLE),
            }
        }
        (Some(img), None, None) => {
            let (init_image, size) = read_image("--init-image", img)?;
            implied = Some(size);
            inputs.push(("--init-image", size));
            Mode::ImageToImage {
                init_image,
                strength_permille: job.strength.unwrap_or(DEFAULT_STRENGTH_PERMILLE),
            }
        }
        (Some(img), Some(mask), _) => {
            let (init_image, size) = read_image("--init-image", img)?;
            let (mask, mask_size) = read_image("--mask", mask)?;
            implied = Some(size);
            inputs.push(("--init-image", size));
            inputs.push(("--mask", mask_size));
            Mode::Inpaint {
                init_image,
                mask,
                strength_permille: job.strength.unwrap_or(DEFAULT_STRENGTH_PERMILLE),
            }
        }
    };

    let width = job.width.or(implied.map(|s| s.0)).unwrap_or(side);
    let height = job.height.or(implied.map(|s| s.1)).unwrap_or(side);
    limits.dimension("width", width).map_err(invalid)?;
    limits.dimension("height", height).map_err(invalid)?;
    let steps = job.steps.unwrap_or(default_steps);
    limits.steps(steps).map_err(invalid)?;
    let mode = if job.resize {
        // Stretched here, so the job carries exactly the size it is billed and run at.
        resized(mode, width, height)?
    } else {
        for (flag, (w, h)) in inputs {
            if (w, h) != (width, height) {
                return Err(usage!(
                    "{flag} is {w}×{h} but the picture is {width}×{height}; give --width {w} \
                     --height {h} (or leave them out), or --resize to stretch it"
                ));
            }
        }
        mode
    };
    let params = JobParams {
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        width,
        height,
        steps,
        true_cfg_scale,
        seed: job.seed.unwrap_or_else(rand::random),
        images: 1,
        mode,
        exact: false,
        lora: None,
        latents: None,
    };
    if form == Form::Market {
        // The provider's own check, so nothing it would refuse is sent.
        params.validate().map_err(invalid)?;
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        job: JobArgs,
    }

    fn fixture(name: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../engine/tests/fixtures/pipeline")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    fn flags(extra: &[&str]) -> JobArgs {
        let mut args = vec!["generate", "a cat", "-o", "x.png", "--seed", "7"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args).unwrap().job
    }

    /// Issue 12's "done when": `--outpaint` bought on the market is exactly what `--local` runs
    /// (the market form once dropped the padding and billed a full image-to-image).
    #[test]
    fn outpaint_builds_the_same_params_local_and_market() {
        let init = fixture("init.png");
        // The fixture is 64×48; padding to 256×256 makes a canvas the market accepts too.
        let job = flags(&["--init-image", &init, "--outpaint", "96,104,96,104"]);
        let local = build(&job, Form::Local { tiny: false }).unwrap();
        let market = build(&job, Form::Market).unwrap();
        assert_eq!(local, market);
        assert_eq!((market.width, market.height), (256, 256));
        match &market.mode {
            Mode::Inpaint {
                strength_permille, ..
            } => assert_eq!(*strength_permille, OUTPAINT_STRENGTH_PERMILLE),
            other => panic!("outpaint must be an inpaint job, got {}", other.name()),
        }
    }

    #[test]
    fn every_mode_builds_the_same_params_in_both_forms() {
        let init = fixture("init.png");
        let mask = fixture("mask.png");
        for extra in [
            vec!["--width", "512", "--height", "256", "--steps", "20"],
            vec![
                "--init-image",
                &init,
                "--resize",
                "--width",
                "256",
                "--height",
                "256",
                "--strength",
                "0.5",
            ],
            vec![
                "--init-image",
                &init,
                "--mask",
                &mask,
                "--resize",
                "--width",
                "256",
                "--height",
                "256",
            ],
        ] {
            let job = flags(&extra);
            assert_eq!(
                build(&job, Form::Local { tiny: false }).unwrap(),
                build(&job, Form::Market).unwrap(),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn resize_sends_images_of_the_pictures_size() {
        let init = fixture("init.png");
        let mask = fixture("mask.png");
        let job = flags(&[
            "--init-image",
            &init,
            "--mask",
            &mask,
            "--resize",
            "--width",
            "256",
            "--height",
            "256",
        ]);
        let p = build(&job, Form::Market).unwrap();
        let Mode::Inpaint {
            init_image, mask, ..
        } = &p.mode
        else {
            panic!("expected inpaint");
        };
        assert_eq!(image_size(init_image, "init").unwrap(), (256, 256));
        assert_eq!(image_size(mask, "mask").unwrap(), (256, 256));
    }

    /// `--model tiny` is the drawn model: its trained size and measured steps and CFG, unless
    /// the flags say otherwise; real weights and the market keep the reference's defaults.
    #[test]
    fn tiny_defaults_are_the_drawn_models() {
        let job = flags(&[]);
        let p = build(&job, Form::Local { tiny: true }).unwrap();
        assert_eq!((p.width, p.height, p.steps), (64, 64, 4));
        assert_eq!(p.true_cfg_scale, 3.0);
        for form in [Form::Local { tiny: false }, Form::Market] {
            let p = build(&job, form).unwrap();
            assert_eq!((p.width, p.height, p.steps), (1024, 1024, 50), "{form:?}");
            assert_eq!(p.true_cfg_scale, 4.0, "{form:?}");
        }
        let job = flags(&["--true-cfg-scale", "1", "--steps", "2", "--width", "128"]);
        let p = build(&job, Form::Local { tiny: true }).unwrap();
        assert_eq!((p.width, p.height, p.steps), (128, 64, 2));
        assert_eq!(p.true_cfg_scale, 1.0);
        // The drawn model's size is one the market takes too.
        let job = flags(&["--width", "64", "--height", "64"]);
        assert_eq!(build(&job, Form::Market).unwrap().width, 64);
    }

    #[test]
    fn the_market_refuses_what_only_local_allows() {
        let job = flags(&["--width", "64", "--height", "48", "--steps", "200"]);
        assert!(build(&job, Form::Local { tiny: true }).is_ok());
        let e = format!("{:#}", build(&job, Form::Market).unwrap_err());
        assert!(e.contains("64..=2048 on the market"), "{e}");
    }

    #[test]
    fn an_init_image_of_another_size_needs_resize() {
        let init = fixture("init.png");
        let job = flags(&["--init-image", &init, "--width", "128", "--height", "128"]);
        let e = format!("{:#}", build(&job, Form::Local { tiny: true }).unwrap_err());
        assert!(e.contains("64×48 but the picture is 128×128"), "{e}");
        // Without a size the picture takes the init image's.
        let job = flags(&["--init-image", &init]);
        let p = build(&job, Form::Local { tiny: true }).unwrap();
        assert_eq!((p.width, p.height), (64, 48));
    }
}
