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
