//! Validation: every limit names its field and the allowed range; nothing panics.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pixmarket_protocol::messages::effective_steps;
use pixmarket_protocol::{
    CapacityAdvert, DepositNote, DeviceCapacity, JobId, JobParams, JobRequest, MicroTokens, Mode,
    PriceSchedule, SecretKey, Signed, validate,
};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000_000;

fn params() -> JobParams {
    JobParams {
        prompt: "a red fox in the snow, 水墨画".into(),
        negative_prompt: String::new(),
        width: 1024,
        height: 768,
        steps: 30,
        true_cfg_scale: 4.0,
        seed: 42,
        images: 1,
        mode: Mode::TextToImage,
        exact: false,
        lora: None,
        latents: None,
    }
}

fn request(params: JobParams) -> JobRequest {
    JobRequest {
        job_id: JobId([3; 16]),
        provider: SecretKey::from_seed(&[1; 32]).public(),
        params,
        max_cost: MicroTokens(100_000_000),
        created_at_ms: NOW,
        expires_at_ms: NOW + 60_000,
        quote_id: None,
        previews: 0,
    }
}

fn field_of(p: JobParams) -> (String, String) {
    let e = p.validate().unwrap_err();
    (e.field.to_owned(), e.to_string())
}

#[test]
fn a_good_request_validates() {
    request(params()).validate(NOW).unwrap();
}

#[test]
fn each_bad_field_is_named_with_its_range() {
    let cases: Vec<(JobParams, &str, &str)> = vec![
        (
            JobParams {
                width: 1000,
                ..params()
            },
            "width",
            "multiple of 16 in 64..=2048",
        ),
        (
            JobParams {
                height: 48,
                ..params()
            },
            "height",
            "64..=2048",
        ),
        (
            JobParams {
                width: 2064,
                ..params()
            },
            "width",
            "64..=2048",
        ),
        (
            JobParams {
                steps: 0,
                ..params()
            },
            "steps",
            "1..=100",
        ),
        (
            JobParams {
                steps: 101,
                ..params()
            },
            "steps",
            "1..=100",
        ),
        (
            JobParams {
                true_cfg_scale: f32::NAN,
                ..params()
            },
            "true_cfg_scale",
            "finite",
        ),
        (
            JobParams {
                true_cfg_scale: 0.5,
                ..params()
            },
            "true_cfg_scale",
            "1.0..=20.0",
        ),
        (
            JobParams {
                true_cfg_scale: f32::INFINITY,
                ..params()
            },
            "true_cfg_scale",
            "finite",
        ),
        (
            JobParams {
                prompt: String::new(),
                ..params()
            },
            "prompt",
            "1..=2000",
        ),
        (
            JobParams {
                prompt: "   ".into(),
                ..params()
            },
            "prompt",
            "1..=2000",
        ),
        (
            JobParams {
                prompt: "x".repeat(2001),
                ..params()
            },
            "prompt",
            "1..=2000",
        ),
        (
            JobParams {
                images: 0,
                ..params()
            },
            "images",
            "1..=4",
        ),
        (
            JobParams {
                images: 5,
                ..params()
            },
            "images",
            "1..=4",
        ),
        (
            JobParams {
                mode: Mode::ImageToImage {
                    init_image: vec![],
                    strength_permille: 500,
                },
                ..params()
            },
            "init_image",
            "bytes",
        ),
        (
            JobParams {
                mode: Mode::ImageToImage {
                    init_image: vec![1],
                    strength_permille: 1001,
                },
                ..params()
            },
            "strength",
            "1..=1000",
        ),
    ];
    for (p, field, allowed) in cases {
        let (got_field, msg) = field_of(p);
        assert_eq!(got_field, field, "{msg}");
        assert!(msg.contains(allowed), "{msg} should mention {allowed}");
    }
}

/// Starting latents: exactly the size's noise, finite, one image; the largest signs and fits
/// the job's size cap.
#[test]
fn latents_must_fit_the_size_be_finite_and_come_with_one_image() {
    let small = |latents: Vec<u8>, images: u32| JobParams {
        width: 64,
        height: 128,
        images,
        latents: Some(latents),
        ..params()
    };
    let noise = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect() };
    // [1, 16, 16, 8] for 64 wide and 128 high.
    let good = small(noise(16 * 16 * 8), 1);
    good.validate().unwrap();
    assert_eq!(good.latents_len(), 16 * 16 * 8 * 4);
    assert_eq!(good.latents_f32().unwrap()[5], 5.0);

    let (field, text) = field_of(small(noise(16 * 8 * 8), 1));
    assert_eq!(field, "latents");
    assert!(text.contains("8192 bytes: [1, 16, 16, 8]"), "{text}");
    let (_, text) = field_of(small(noise(16 * 16 * 8), 2));
    assert!(text.contains("only with images = 1"), "{text}");
    let mut bad = noise(16 * 16 * 8);
    bad[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    let (_, text) = field_of(small(bad, 1));
    assert!(text.contains("index 10"), "{text}");
    let mut bad = noise(16 * 16 * 8);
    bad[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(field_of(small(bad, 1)).0, "latents");
    let (_, text) = field_of(small(vec![0; 3], 1));
    assert!(text.contains("3 bytes"), "{text}");

    // The largest job: 2048², latents and both input images at their limits, signs.
    let side = validate::MAX_DIMENSION;
    let biggest = JobParams {
        width: side,
        height: side,
        latents: Some(vec![0; validate::MAX_LATENTS_BYTES]),
        mode: Mode::Inpaint {
            init_image: vec![1; validate::MAX_INPUT_IMAGE_BYTES],
            mask: vec![2; validate::MAX_INPUT_IMAGE_BYTES],
            strength_permille: 500,
        },
        ..params()
    };
    biggest.validate().unwrap();
    let key = SecretKey::from_seed(&[9; 32]);
    let signed = Signed::sign(&key, &request(biggest)).unwrap();
    assert_eq!(
        signed.verify().unwrap().params.latents.unwrap().len(),
        4 << 20
    );
}

#[test]
fn a_2000_character_chinese_prompt_is_allowed() {
    // Characters, not bytes: 2,000 CJK characters are 6,000 UTF-8 bytes.
    JobParams {
        prompt: "山".repeat(2000),
        ..params()
    }
    .validate()
    .unwrap();
}

#[test]
fn expiry_must_be_future_and_within_an_hour() {
    let past = JobRequest {
        expires_at_ms: NOW - 1,
        ..request(params())
    };
    assert_eq!(past.validate(NOW).unwrap_err().field, "expires_at");
    let now = JobRequest {
        expires_at_ms: NOW,
        ..request(params())
    };
    assert_eq!(now.validate(NOW).unwrap_err().field, "expires_at");
    let far = JobRequest {
        expires_at_ms: NOW + 3_600_001,
        ..request(params())
    };
    let err = far.validate(NOW).unwrap_err();
    assert_eq!(err.field, "expires_at");
    assert!(err.to_string().contains("60 minutes"), "{err}");
    JobRequest {
        expires_at_ms: NOW + 3_600_000,
        ..request(params())
    }
    .validate(NOW)
    .unwrap();
}

#[test]
fn strength_reduces_metered_steps_like_the_reference() {
    assert_eq!(effective_steps(50, None), 50);
    assert_eq!(effective_steps(50, Some(500)), 25);
    assert_eq!(effective_steps(3, Some(500)), 2); // ⌈1.5⌉
    assert_eq!(effective_steps(10, Some(1)), 1);
    assert_eq!(effective_steps(10, Some(1000)), 10);
}

#[test]
fn deposit_note_needs_an_amount() {
    let note = DepositNote {
        deposit_id: [0; 16],
        account: SecretKey::from_seed(&[1; 32]).public(),
        amount: MicroTokens::ZERO,
        memo: String::new(),
        recorded_at_ms: NOW,
    };
    assert_eq!(note.validate().unwrap_err().field, "amount");
}

fn advert() -> CapacityAdvert {
    CapacityAdvert {
        seq: 1,
        issued_at_ms: NOW,
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        gpu_name: "NVIDIA H100 80GB HBM3".into(),
        gpu_memory_mib: 81_559,
        model_id: "Qwen/Qwen-Image".into(),
        precision: "bf16".into(),
        supports_image_to_image: true,
        supports_inpaint: true,
        max_width: 2048,
        max_height: 2048,
        max_steps: 100,
        max_images: 4,
        schedule: PriceSchedule::default(),
        queue_depth: 0,
        max_queue: 16,
        ms_per_standard_image: 18_500,
        devices: vec![h100(18_500); 2],
        step_caching: pixmarket_protocol::StepCaching::Exact,
        serves_exact: true,
        loras: Vec::new(),
    }
}

fn h100(ms: u64) -> DeviceCapacity {
    DeviceCapacity {
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_mib: 81_559,
        ms_per_standard_image: ms,
    }
}

#[test]
fn adverts_expire_and_are_checked() {
    advert().validate(NOW).unwrap();
    assert_eq!(
        advert().validate(NOW + 31_000).unwrap_err().field,
        "issued_at"
    );
    assert_eq!(
        advert().validate(NOW - 31_000).unwrap_err().field,
        "issued_at"
    );
    let bad = CapacityAdvert {
        precision: "fp8".into(),
        ..advert()
    };
    assert_eq!(bad.validate(NOW).unwrap_err().field, "precision");
    let many = CapacityAdvert {
        listen_addrs: vec!["/ip4/1.2.3.4/tcp/1".into(); 9],
        ..advert()
    };
    assert_eq!(many.validate(NOW).unwrap_err().field, "listen_addrs");
    let crowded = CapacityAdvert {
        devices: vec![h100(18_500); validate::MAX_ADVERT_DEVICES + 1],
        ..advert()
    };
    assert_eq!(crowded.validate(NOW).unwrap_err().field, "devices");
    let unmeasured = CapacityAdvert {
        devices: vec![h100(18_500), h100(0)],
        ..advert()
    };
    assert_eq!(
        unmeasured.validate(NOW).unwrap_err().field,
        "devices.ms_per_standard_image"
    );
    let long_name = CapacityAdvert {
        devices: vec![DeviceCapacity {
            name: "x".repeat(validate::MAX_DEVICE_NAME_CHARS + 1),
            ..h100(18_500)
        }],
        ..advert()
    };
    assert_eq!(long_name.validate(NOW).unwrap_err().field, "devices.name");
}

/// The largest advert validation allows fits its size cap, so every valid advert can be sent.
#[test]
fn the_largest_valid_advert_fits_its_cap() {
    let wide = "文".repeat(validate::MAX_LABEL_CHARS);
    let big = CapacityAdvert {
        listen_addrs: vec!["文".repeat(validate::MAX_ADDR_CHARS); validate::MAX_LISTEN_ADDRS],
        gpu_name: wide.clone(),
        model_id: wide,
        seq: u64::MAX,
        gpu_memory_mib: u64::MAX,
        ms_per_standard_image: u64::MAX,
        devices: vec![
            DeviceCapacity {
                name: "文".repeat(validate::MAX_DEVICE_NAME_CHARS),
                memory_mib: u64::MAX,
                ms_per_standard_image: u64::MAX,
            };
            validate::MAX_ADVERT_DEVICES
        ],
        ..advert()
    };
    big.validate(NOW).unwrap();
    let signed = Signed::sign(&SecretKey::from_seed(&[9; 32]), &big).unwrap();
    assert!(signed.verify().is_ok());
}

#[test]
fn finish_estimates_spread_the_queue_over_the_devices() {
    let two = advert();
    // Two devices: the first two jobs ahead run beside ours; a third waits one image.
    assert_eq!(two.estimated_finish_ms(0), 18_500);
    assert_eq!(two.estimated_finish_ms(1), 18_500);
    assert_eq!(two.estimated_finish_ms(2), 37_000);
    let one = CapacityAdvert {
        devices: Vec::new(),
        ..advert()
    };
    assert_eq!(one.device_count(), 1);
    assert_eq!(one.estimated_finish_ms(1), 37_000);
}

proptest! {
    /// Validation never panics, whatever the fields hold.
    #[test]
    fn validation_never_panics(
        w in any::<u32>(), h in any::<u32>(), s in any::<u32>(), c in any::<f32>(),
        i in any::<u32>(), p in ".{0,50}", exp in any::<u64>(), now in any::<u64>(),
    ) {
        let r = JobRequest {
            expires_at_ms: exp,
            ..request(JobParams { width: w, height: h, steps: s, true_cfg_scale: c, images: i, prompt: p, ..params() })
        };
        let _ = r.validate(now);
    }
}
