//! Wire properties of every signed message (STYLE.md "Wire types"): round trip, encoded length,
//! decoding never panics on mutated, truncated or random bytes, one flipped byte fails
//! verification, and a signature made under one domain never verifies under another.

// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pixmarket_protocol::messages::{FailReason, JobEventKind, ValidationErrorWire};
use pixmarket_protocol::{
    CapacityAdvert, CreditNote, DepositNote, DeviceCapacity, Hash, JobEvent, JobId, JobParams,
    JobRequest, JobVoid, Message, MeteredUnits, MicroTokens, Mode, PriceSchedule, PublicKey, Quote,
    QuoteId, QuoteRequest, Receipt, ReceiptAck, ReceiptRefusal, SecretKey, Signed, StepCaching,
    VerifyError,
};
use proptest::prelude::*;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

fn pk(seed: u8) -> PublicKey {
    key(seed).public()
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn arb_units() -> impl Strategy<Value = MeteredUnits> {
    (
        16u32..=128,
        16u32..=128,
        1u32..=100,
        1u32..=10_000,
        1u32..=4,
    )
        .prop_map(|(w, h, s, p, i)| MeteredUnits {
            width: w * 16,
            height: h * 16,
            steps: s,
            prompt_tokens: p,
            images: i,
        })
}

fn arb_schedule() -> impl Strategy<Value = PriceSchedule> {
    (any::<u64>(), any::<u32>()).prop_map(|(price_factor_ppm, min_prompt_tokens)| PriceSchedule {
        price_factor_ppm,
        min_prompt_tokens,
    })
}

fn arb_mode() -> impl Strategy<Value = Mode> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        Just(Mode::TextToImage),
        (bytes(), any::<u16>()).prop_map(|(init_image, strength_permille)| Mode::ImageToImage {
            init_image,
            strength_permille
        }),
        (bytes(), bytes(), any::<u16>()).prop_map(|(init_image, mask, strength_permille)| {
            Mode::Inpaint {
                init_image,
                mask,
                strength_permille,
            }
        }),
    ]
}

fn arb_params() -> impl Strategy<Value = JobParams> {
    (
        arb_text(64),
        arb_text(16),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        // Finite floats only: NaN != NaN would make the round-trip comparison meaningless.
        -100.0f32..100.0,
        any::<u64>(),
        any::<u32>(),
        arb_mode(),
    )
        .prop_map(
            |(
                prompt,
                negative_prompt,
                width,
                height,
                steps,
                true_cfg_scale,
                seed,
                images,
                mode,
            )| {
                JobParams {
                    prompt,
                    negative_prompt,
                    width,
                    height,
                    steps,
                    true_cfg_scale,
                    seed,
                    images,
                    mode,
                    exact: seed.is_multiple_of(2),
                    lora: None,
                    latents: None,
                }
            },
        )
}

fn arb_job_request() -> impl Strategy<Value = JobRequest> {
    (
        any::<[u8; 16]>(),
        arb_params(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(id, params, max_cost, created, expires, quoted)| JobRequest {
                job_id: JobId(id),
                provider: pk(9),
                params,
                max_cost: MicroTokens(max_cost),
                created_at_ms: created,
                expires_at_ms: expires,
                quote_id: quoted.then_some(QuoteId(id)),
                previews: 0,
            },
        )
}

fn arb_receipt() -> impl Strategy<Value = Receipt> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        arb_units(),
        arb_schedule(),
        any::<u64>(),
        proptest::collection::vec(any::<[u8; 32]>(), 0..4),
        any::<(u64, u64, u64, u64)>(),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(id, req, units, schedule, cost, images, (q, r, cum, at), prev)| Receipt {
                job_id: JobId(id),
                request_hash: Hash::of(&req),
                provider: pk(1),
                requester: pk(2),
                units,
                schedule,
                cost: MicroTokens(cost),
                image_hashes: images.iter().map(|b| Hash::of(b)).collect(),
                queued_ms: q,
                run_ms: r,
                cumulative_charged: MicroTokens(cum),
                prev_entry_hash: prev.map(|p| Hash::of(&p)),
                issued_at_ms: at,
                step_caching: step_caching(at),
            },
        )
}

/// Exact for even `n`, else first-block caching at 1..=1000 ‰.
fn step_caching(n: u64) -> StepCaching {
    if n.is_multiple_of(2) {
        StepCaching::Exact
    } else {
        StepCaching::FirstBlock {
            threshold_permille: u16::try_from(n % 1000).unwrap() + 1,
        }
    }
}

fn arb_advert() -> impl Strategy<Value = CapacityAdvert> {
    (
        any::<(u64, u64, u64, u64)>(),
        proptest::collection::vec(arb_text(20), 0..3),
        arb_text(20),
        arb_schedule(),
        any::<(u32, u32, u32, u32, u32, u32, bool, bool)>(),
        proptest::collection::vec((arb_text(20), any::<(u64, u64)>()), 0..4),
    )
        .prop_map(
            |((seq, at, mem, ms), addrs, gpu, schedule, (w, h, s, i, q, mq, i2i, inp), devs)| {
                CapacityAdvert {
                    seq,
                    issued_at_ms: at,
                    listen_addrs: addrs,
                    gpu_name: gpu,
                    gpu_memory_mib: mem,
                    model_id: "Qwen/Qwen-Image".into(),
                    precision: "bf16".into(),
                    supports_image_to_image: i2i,
                    supports_inpaint: inp,
                    max_width: w,
                    max_height: h,
                    max_steps: s,
                    max_images: i,
                    schedule,
                    queue_depth: q,
                    max_queue: mq,
                    ms_per_standard_image: ms,
                    devices: devs
                        .into_iter()
                        .map(|(name, (memory_mib, ms))| DeviceCapacity {
                            name,
                            memory_mib,
                            ms_per_standard_image: ms,
                        })
                        .collect(),
                    step_caching: step_caching(ms),
                    serves_exact: i2i,
                    loras: Vec::new(),
                }
            },
        )
}

fn arb_fail_reason() -> impl Strategy<Value = FailReason> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(n, a)| FailReason::InsufficientCredit {
            needed: MicroTokens(n),
            available: MicroTokens(a)
        }),
        any::<u64>().prop_map(|retry_after_ms| FailReason::Busy { retry_after_ms }),
        (arb_text(10), arb_text(10)).prop_map(|(field, got)| FailReason::Invalid(
            ValidationErrorWire {
                field,
                got,
                allowed: "1..=4".into()
            }
        )),
        Just(FailReason::Expired),
        Just(FailReason::Duplicate),
        Just(FailReason::WrongProvider),
        arb_text(30).prop_map(FailReason::Engine),
    ]
}

fn arb_event() -> impl Strategy<Value = JobEvent> {
    let receipt = arb_receipt().prop_map(|r| Signed::sign(&key(1), &r).unwrap());
    let kind = prop_oneof![
        any::<(u32, u64)>().prop_map(|(queue_position, eta_ms)| JobEventKind::Accepted {
            queue_position,
            eta_ms
        }),
        any::<(u32, u32)>().prop_map(|(step, of)| JobEventKind::Progress {
            step,
            of,
            preview: None
        }),
        (
            any::<(u32, u32, u32)>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|((step, of, side), png)| JobEventKind::Progress {
                step,
                of,
                preview: Some(pixmarket_protocol::Preview {
                    width: side,
                    height: side,
                    png
                })
            }),
        receipt.prop_map(|receipt| JobEventKind::Completed { receipt }),
        (arb_fail_reason(), arb_void()).prop_map(|(reason, v)| JobEventKind::Failed {
            reason,
            void: Signed::sign(&key(1), &v).unwrap()
        }),
        arb_void().prop_map(|v| JobEventKind::Cancelled {
            void: Signed::sign(&key(1), &v).unwrap()
        }),
    ];
    (any::<[u8; 16]>(), kind).prop_map(|(id, kind)| JobEvent {
        job_id: JobId(id),
        kind,
    })
}

fn arb_quote_request() -> impl Strategy<Value = QuoteRequest> {
    (
        any::<[u8; 16]>(),
        arb_text(64),
        any::<(u32, u32, u32, u32)>(),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(
            |(id, prompt, (width, height, steps, images), strength_permille)| QuoteRequest {
                quote_id: QuoteId(id),
                provider: pk(3),
                prompt,
                width,
                height,
                steps,
                images,
                strength_permille,
                exact: steps.is_multiple_of(2),
                lora: None,
            },
        )
}

fn arb_quote() -> impl Strategy<Value = Quote> {
    (
        any::<[u8; 16]>(),
        arb_units(),
        arb_schedule(),
        any::<(u64, u32, u64, u64)>(),
    )
        .prop_map(
            |(id, units, schedule, (cost, queue_position, eta_ms, valid_until_ms))| Quote {
                quote_id: QuoteId(id),
                requester: pk(4),
                units,
                schedule,
                cost: MicroTokens(cost),
                queue_position,
                eta_ms,
                valid_until_ms,
                step_caching: step_caching(eta_ms),
            },
        )
}

fn arb_ack() -> impl Strategy<Value = ReceiptAck> {
    (any::<[u8; 16]>(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(id, h, at)| ReceiptAck {
        job_id: JobId(id),
        receipt_hash: Hash::of(&h),
        acked_at_ms: at,
    })
}

fn arb_void() -> impl Strategy<Value = JobVoid> {
    (any::<[u8; 16]>(), arb_text(40), any::<u64>()).prop_map(|(id, reason, at)| JobVoid {
        job_id: JobId(id),
        reason,
        voided_at_ms: at,
    })
}

fn arb_refusal() -> impl Strategy<Value = ReceiptRefusal> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        arb_text(40),
        any::<u64>(),
    )
        .prop_map(|(id, h, reason, at)| ReceiptRefusal {
            job_id: JobId(id),
            receipt_hash: Hash::of(&h),
            reason,
            refused_at_ms: at,
        })
}

fn arb_credit() -> impl Strategy<Value = CreditNote> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        any::<(u64, u64)>(),
        proptest::option::of(any::<[u8; 32]>()),
        arb_text(40),
        any::<u64>(),
    )
        .prop_map(|(id, h, (amount, cum), prev, reason, at)| CreditNote {
            job_id: JobId(id),
            receipt_hash: Hash::of(&h),
            provider: pk(1),
            requester: pk(2),
            amount: MicroTokens(amount),
            cumulative_charged: MicroTokens(cum),
            prev_entry_hash: prev.map(|p| Hash::of(&p)),
            reason,
            issued_at_ms: at,
        })
}

fn arb_deposit() -> impl Strategy<Value = DepositNote> {
    (any::<[u8; 16]>(), any::<u64>(), arb_text(40), any::<u64>()).prop_map(
        |(deposit_id, amount, memo, recorded_at_ms)| DepositNote {
            deposit_id,
            account: pk(5),
            amount: MicroTokens(amount),
            memo,
            recorded_at_ms,
        },
    )
}

/// The properties every message type must have, checked on one value.
fn check_wire<T: Message + PartialEq + std::fmt::Debug + Clone>(
    value: &T,
    flip_at: usize,
    flip_bit: u8,
    cut_at: usize,
) -> Result<(), TestCaseError> {
    let sk = key(7);
    let signed = Signed::sign(&sk, value).unwrap();
    let bytes = signed.to_bytes().unwrap();

    // Round trip: bytes -> envelope -> verified value.
    let back = Signed::<T>::from_bytes(&bytes).unwrap();
    prop_assert_eq!(&back, &signed);
    prop_assert_eq!(&back.verify().unwrap(), value);
    prop_assert_eq!(back.signer(), sk.public());

    // Encoded length: key + body with its varint length + signature with its varint length.
    let varint_len = |n: usize| {
        if n < 128 {
            1
        } else if n < 16384 {
            2
        } else {
            3
        }
    };
    let body = signed.body().len();
    prop_assert_eq!(bytes.len(), 32 + varint_len(body) + body + 1 + 64);
    prop_assert!(bytes.len() <= Signed::<T>::max_encoded());

    // One flipped bit anywhere: either the envelope no longer decodes, or it fails to verify.
    let mut flipped = bytes.clone();
    let i = flip_at % flipped.len();
    flipped[i] ^= 1 << (flip_bit % 8);
    if let Ok(env) = Signed::<T>::from_bytes(&flipped) {
        prop_assert!(env.verify().is_err(), "flipped byte {} still verifies", i);
    }

    // Truncated: never decodes as the same envelope, never panics.
    let cut = cut_at % bytes.len();
    if let Ok(env) = Signed::<T>::from_bytes(&bytes[..cut]) {
        prop_assert!(env.verify().is_err());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn advert_wire(v in arb_advert(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn quote_request_wire(v in arb_quote_request(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn quote_wire(v in arb_quote(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn job_request_wire(v in arb_job_request(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn job_event_wire(v in arb_event(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn receipt_wire(v in arb_receipt(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn ack_wire(v in arb_ack(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn deposit_wire(v in arb_deposit(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn credit_note_wire(v in arb_credit(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn refusal_wire(v in arb_refusal(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }
    #[test]
    fn void_wire(v in arb_void(), f in any::<usize>(), b in any::<u8>(), c in any::<usize>()) {
        check_wire(&v, f, b, c)?;
    }

    /// Random bytes never panic any decoder, at the envelope or the body level.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        fn try_all<T: Message>(bytes: &[u8]) {
            if let Ok(env) = Signed::<T>::from_bytes(bytes) {
                let _ = env.verify();
            }
            let _ = pixmarket_protocol::codec::decode::<T>(T::DOMAIN, bytes, T::MAX_ENCODED);
        }
        try_all::<CapacityAdvert>(&bytes);
        try_all::<QuoteRequest>(&bytes);
        try_all::<Quote>(&bytes);
        try_all::<JobRequest>(&bytes);
        try_all::<JobEvent>(&bytes);
        try_all::<Receipt>(&bytes);
        try_all::<ReceiptAck>(&bytes);
        try_all::<DepositNote>(&bytes);
        try_all::<CreditNote>(&bytes);
        try_all::<ReceiptRefusal>(&bytes);
        try_all::<JobVoid>(&bytes);
    }

    /// A body that is valid for one type but signed as another must not verify as the other,
    /// even when its bytes happen to decode: the domain is inside the signed digest.
    #[test]
    fn wrong_domain_fails(v in arb_ack()) {
        let sk = key(8);
        let signed = Signed::sign(&sk, &v).unwrap();
        let foreign = Signed::<DepositNote>::from_parts(signed.signer(), signed.body().to_vec(), signed.signature());
        let err = foreign.verify().unwrap_err();
        let is_bad_signature = matches!(err, VerifyError::BadSignature { .. });
        prop_assert!(is_bad_signature);
    }
}

#[test]
fn a_signature_by_another_key_fails() {
    let ack = ReceiptAck {
        job_id: JobId([1; 16]),
        receipt_hash: Hash::of(b"r"),
        acked_at_ms: 5,
    };
    let signed = Signed::sign(&key(1), &ack).unwrap();
    let forged =
        Signed::<ReceiptAck>::from_parts(pk(2), signed.body().to_vec(), signed.signature());
    assert!(matches!(
        forged.verify(),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn oversized_envelope_is_refused_before_parsing() {
    let huge = vec![0u8; Signed::<ReceiptAck>::max_encoded() + 1];
    let err = Signed::<ReceiptAck>::from_bytes(&huge).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let ack = ReceiptAck {
        job_id: JobId([1; 16]),
        receipt_hash: Hash::of(b"r"),
        acked_at_ms: 5,
    };
    let mut bytes = Signed::sign(&key(1), &ack).unwrap().to_bytes().unwrap();
    bytes.push(0);
    let err = Signed::<ReceiptAck>::from_bytes(&bytes).unwrap_err();
    assert!(err.to_string().contains("trailing"), "{err}");
}

#[test]
fn over_long_integer_encodings_are_refused() {
    // A one-byte varint 5 for `acked_at_ms` and the same value written as two bytes.
    let ack = ReceiptAck {
        job_id: JobId([1; 16]),
        receipt_hash: Hash::of(b"r"),
        acked_at_ms: 5,
    };
    let body = pixmarket_protocol::codec::encode("ack", &ack, 128).unwrap();
    assert_eq!(*body.last().unwrap(), 5);
    let mut long = body.clone();
    *long.last_mut().unwrap() = 0x85;
    long.push(0x00);
    let err = pixmarket_protocol::codec::decode::<ReceiptAck>("ack", &long, 128).unwrap_err();
    assert!(
        matches!(err, pixmarket_protocol::DecodeError::NonCanonical { .. }),
        "{err}"
    );
}

#[test]
fn digest_depends_on_domain_and_body() {
    let ack = ReceiptAck {
        job_id: JobId([1; 16]),
        receipt_hash: Hash::of(b"r"),
        acked_at_ms: 5,
    };
    let a = Signed::sign(&key(1), &ack).unwrap();
    let b = Signed::sign(&key(2), &ack).unwrap();
    // Same body: same digest whoever signs (it identifies the content).
    assert_eq!(a.digest(), b.digest());
    let ack2 = ReceiptAck {
        acked_at_ms: 6,
        ..ack
    };
    assert_ne!(a.digest(), Signed::sign(&key(1), &ack2).unwrap().digest());
}

#[test]
fn signing_is_deterministic() {
    let ack = ReceiptAck {
        job_id: JobId([1; 16]),
        receipt_hash: Hash::of(b"r"),
        acked_at_ms: 5,
    };
    let a = Signed::sign(&key(1), &ack).unwrap().to_bytes().unwrap();
    let b = Signed::sign(&key(1), &ack).unwrap().to_bytes().unwrap();
    assert_eq!(a, b);
}

/// The step-caching mode a receipt records is inside the signed body: a receipt re-encoded
/// with another mode under the provider's signature does not verify.
#[test]
fn a_receipt_s_mode_is_covered_by_its_signature() {
    let key = SecretKey::from_seed(&[5; 32]);
    let body = Receipt {
        job_id: JobId([1; 16]),
        request_hash: Hash::of(b"request"),
        provider: key.public(),
        requester: pk(2),
        units: MeteredUnits {
            width: 64,
            height: 64,
            steps: 8,
            prompt_tokens: 4,
            images: 1,
        },
        schedule: PriceSchedule::default(),
        cost: MicroTokens(10),
        image_hashes: vec![Hash::of(b"png")],
        queued_ms: 1,
        run_ms: 2,
        cumulative_charged: MicroTokens(10),
        prev_entry_hash: None,
        issued_at_ms: 3,
        step_caching: StepCaching::FirstBlock {
            threshold_permille: 200,
        },
    };
    let signed = Signed::sign(&key, &body).unwrap();
    let claimed = Receipt {
        step_caching: StepCaching::Exact,
        ..body
    };
    let forged = Signed::<Receipt>::from_parts(
        key.public(),
        pixmarket_protocol::codec::encode("receipt", &claimed, 4096).unwrap(),
        signed.signature(),
    );
    assert!(forged.verify().is_err());
    assert_eq!(
        signed.verify().unwrap().step_caching,
        StepCaching::FirstBlock {
            threshold_permille: 200
        }
    );
}
