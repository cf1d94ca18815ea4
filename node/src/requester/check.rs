//! What a requester checks in what it is billed: the receipt against the request, the quote
//! and the metering function, and the delivered images against the receipt's hashes.

use pixmarket_protocol::{
    Hash, JobRequest, MicroTokens, PublicKey, Quote, Receipt, Signed, StepCaching, validate,
};

/// Why a receipt was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptProblem {
    #[error("receipt signature does not verify")]
    BadSignature,
    #[error("receipt {field} does not match: expected {expected}, got {got}")]
    Mismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error(transparent)]
    Cost(#[from] pixmarket_protocol::CostMismatch),
    #[error("charged {cost}, more than max_cost {max_cost}")]
    OverMax {
        cost: MicroTokens,
        max_cost: MicroTokens,
    },
    #[error("image {index} does not match its hash in the receipt")]
    ImageHash { index: usize },
    #[error("the job required exact computation; the receipt records {0}")]
    NotExact(StepCaching),
}

fn mismatch<T: std::fmt::Debug>(field: &'static str, expected: T, got: T) -> ReceiptProblem {
    ReceiptProblem::Mismatch {
        field,
        expected: format!("{expected:?}"),
        got: format!("{got:?}"),
    }
}

/// Checks a completed job's receipt against what was asked and quoted (the images come later,
/// and are checked against the receipt's hashes with [`check_images`]).
pub fn check_receipt(
    receipt: &Signed<Receipt>,
    request: &Signed<JobRequest>,
    quote: &Quote,
    provider: &PublicKey,
) -> Result<Receipt, ReceiptProblem> {
    let r = receipt.verify().map_err(|_| ReceiptProblem::BadSignature)?;
    let req = request.verify().map_err(|_| ReceiptProblem::BadSignature)?;
    let eq = |field, a: String, b: String| {
        if a == b {
            Ok(())
        } else {
            Err(mismatch(field, a, b))
        }
    };
    eq("signer", provider.to_string(), receipt.signer().to_string())?;
    eq("provider", provider.to_string(), r.provider.to_string())?;
    eq(
        "requester",
        request.signer().to_string(),
        r.requester.to_string(),
    )?;
    eq("job id", req.job_id.to_string(), r.job_id.to_string())?;
    eq(
        "request hash",
        request.digest().to_string(),
        r.request_hash.to_string(),
    )?;
    // The mode that ran: exact when the request required it, and what the quote promised.
    if req.params.exact && r.step_caching != StepCaching::Exact {
        return Err(ReceiptProblem::NotExact(r.step_caching));
    }
    if r.step_caching != quote.step_caching {
        return Err(mismatch("step caching", quote.step_caching, r.step_caching));
    }
    let want = req.params.metered_units(quote.units.prompt_tokens);
    if r.units != want {
        return Err(mismatch("metered units", want, r.units));
    }
    if r.schedule != quote.schedule {
        return Err(mismatch("price schedule", quote.schedule, r.schedule));
    }
    r.check_cost()?;
    if r.cost > req.max_cost {
        return Err(ReceiptProblem::OverMax {
            cost: r.cost,
            max_cost: req.max_cost,
        });
    }
    if r.image_hashes.len() != req.params.images as usize {
        return Err(mismatch(
            "image count",
            req.params.images as usize,
            r.image_hashes.len(),
        ));
    }
    Ok(r)
}

/// Checks delivered images against the hashes the receipt signed.
pub fn check_images(receipt: &Receipt, images: &[Vec<u8>]) -> Result<(), ReceiptProblem> {
    if images.len() != receipt.image_hashes.len() {
        return Err(mismatch(
            "image count",
            receipt.image_hashes.len(),
            images.len(),
        ));
    }
    for (i, (img, h)) in images.iter().zip(&receipt.image_hashes).enumerate() {
        if img.len() > validate::MAX_OUTPUT_IMAGE_BYTES || Hash::of(img) != *h {
            return Err(ReceiptProblem::ImageHash { index: i });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use pixmarket_protocol::{
        JobId, JobParams, MeteredUnits, Mode, PriceSchedule, QuoteId, SecretKey, metering,
    };

    use super::*;

    const CACHED: StepCaching = StepCaching::FirstBlock {
        threshold_permille: 200,
    };

    /// A request, its quote and a receipt that passes every check, for a job that does or does
    /// not require exact computation, quoted and billed with `mode`.
    fn exchange(exact: bool, mode: StepCaching) -> (Signed<JobRequest>, Quote, Receipt, SecretKey) {
        let (requester, provider) = (
            SecretKey::from_seed(&[1; 32]),
            SecretKey::from_seed(&[2; 32]),
        );
        let params = JobParams {
            prompt: "a fox".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 8,
            true_cfg_scale: 1.0,
            seed: 1,
            images: 1,
            mode: Mode::TextToImage,
            exact,
            lora: None,
            latents: None,
        };
        let units: MeteredUnits = params.metered_units(2);
        let schedule = PriceSchedule::default();
        let cost = metering::cost(&units, &schedule).unwrap();
        let request = JobRequest {
            job_id: JobId([7; 16]),
            provider: provider.public(),
            params,
            max_cost: cost,
            created_at_ms: 0,
            expires_at_ms: 1,
            quote_id: None,
            previews: 0,
        };
        let signed = Signed::sign(&requester, &request).unwrap();
        let quote = Quote {
            quote_id: QuoteId([8; 16]),
            requester: requester.public(),
            units,
            schedule,
            cost,
            queue_position: 0,
            eta_ms: 0,
            valid_until_ms: 1,
            step_caching: mode,
        };
        let receipt = Receipt {
            job_id: request.job_id,
            request_hash: signed.digest(),
            provider: provider.public(),
            requester: requester.public(),
            units,
            schedule,
            cost,
            image_hashes: vec![Hash::of(b"png")],
            queued_ms: 0,
            run_ms: 0,
            cumulative_charged: cost,
            prev_entry_hash: None,
            issued_at_ms: 0,
            step_caching: mode,
        };
        (signed, quote, receipt, provider)
    }

    fn check(
        request: &Signed<JobRequest>,
        quote: &Quote,
        receipt: &Receipt,
        key: &SecretKey,
    ) -> Result<Receipt, ReceiptProblem> {
        check_receipt(
            &Signed::sign(key, receipt).unwrap(),
            request,
            quote,
            &key.public(),
        )
    }

    #[test]
    fn a_cached_receipt_for_an_exact_job_is_refused() {
        let (request, quote, receipt, key) = exchange(true, StepCaching::Exact);
        assert!(check(&request, &quote, &receipt, &key).is_ok());
        // The provider quoted exact, then ran (and billed) the job cached.
        let cached = Receipt {
            step_caching: CACHED,
            ..receipt
        };
        assert_eq!(
            check(&request, &quote, &cached, &key).unwrap_err(),
            ReceiptProblem::NotExact(CACHED)
        );
        // Even with a quote that said cached (the requester's quote check refuses that first).
        let quote = Quote {
            step_caching: CACHED,
            ..quote
        };
        assert_eq!(
            check(&request, &quote, &cached, &key).unwrap_err(),
            ReceiptProblem::NotExact(CACHED)
        );
    }

    #[test]
    fn a_receipt_must_record_the_quoted_mode() {
        let (request, quote, receipt, key) = exchange(false, CACHED);
        assert!(check(&request, &quote, &receipt, &key).is_ok());
        for other in [
            StepCaching::Exact,
            StepCaching::FirstBlock {
                threshold_permille: 500,
            },
        ] {
            let r = Receipt {
                step_caching: other,
                ..receipt.clone()
            };
            let e = check(&request, &quote, &r, &key).unwrap_err();
            assert!(
                matches!(
                    e,
                    ReceiptProblem::Mismatch {
                        field: "step caching",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
}
