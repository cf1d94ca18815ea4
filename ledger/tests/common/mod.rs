//! Fixtures shared by the ledger's integration tests: fixed keys, and receipts, acks and
//! deposit notes built the way a node builds them.
// Test helpers outside #[test] fns may unwrap: a failure is a test failure.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use pixmarket_ledger::{HoldTerms, Ledger, ReceiptLink};
use pixmarket_protocol::{
    DepositNote, Hash, JobId, MeteredUnits, MicroTokens, PriceSchedule, PublicKey, Receipt,
    ReceiptAck, SecretKey, Signed, metering,
};

/// Far in the future, so holds made with it do not expire during a test.
pub const FAR: u64 = u64::MAX / 2;

pub fn provider() -> SecretKey {
    SecretKey::from_seed(&[1; 32])
}

pub fn requester(i: u8) -> SecretKey {
    SecretKey::from_seed(&[100u8.wrapping_add(i); 32])
}

pub fn tokens(t: u64) -> MicroTokens {
    MicroTokens::from_tokens(t).unwrap()
}

/// 512², `steps` steps, a 100-token prompt: costs `steps / 2` tokens.
pub fn units(steps: u32) -> MeteredUnits {
    MeteredUnits {
        width: 512,
        height: 512,
        steps,
        prompt_tokens: 100,
        images: 1,
    }
}

pub fn cost_of(steps: u32) -> MicroTokens {
    metering::cost(&units(steps), &PriceSchedule::default()).unwrap()
}

pub fn job(n: u64) -> JobId {
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&n.to_be_bytes());
    JobId(b)
}

pub fn terms(job: JobId, requester: PublicKey, max_cost: MicroTokens) -> HoldTerms {
    HoldTerms {
        job,
        requester,
        max_cost,
        expires_at_ms: FAR,
        request_hash: None,
    }
}

/// A receipt signed by `provider` for `steps` steps, linked after `link`.
pub fn receipt_with(
    provider: &SecretKey,
    requester: PublicKey,
    job: JobId,
    steps: u32,
    link: ReceiptLink,
) -> Signed<Receipt> {
    let cost = cost_of(steps);
    Signed::sign(
        provider,
        &Receipt {
            job_id: job,
            request_hash: Hash::of(&job.0),
            provider: provider.public(),
            requester,
            units: units(steps),
            schedule: PriceSchedule::default(),
            cost,
            image_hashes: vec![Hash::of(b"png")],
            queued_ms: 1,
            run_ms: 2,
            cumulative_charged: link.charged_so_far.checked_add(cost).unwrap(),
            prev_receipt_hash: link.prev_receipt_hash,
            issued_at_ms: 1_000,
        },
    )
    .unwrap()
}

/// The receipt the ledger's provider would issue next for `requester`.
pub fn receipt(
    ledger: &Ledger,
    provider: &SecretKey,
    requester: PublicKey,
    job: JobId,
    steps: u32,
) -> Signed<Receipt> {
    let link = ledger.receipt_link(&requester).unwrap();
    receipt_with(provider, requester, job, steps, link)
}

pub fn ack(requester: &SecretKey, receipt: &Signed<Receipt>) -> Signed<ReceiptAck> {
    let body = receipt.verify().unwrap();
    Signed::sign(
        requester,
        &ReceiptAck {
            job_id: body.job_id,
            receipt_hash: receipt.digest(),
            acked_at_ms: 2_000,
        },
    )
    .unwrap()
}

pub fn deposit_note(
    signer: &SecretKey,
    account: PublicKey,
    id: u8,
    amount: MicroTokens,
) -> Signed<DepositNote> {
    Signed::sign(
        signer,
        &DepositNote {
            deposit_id: [id; 16],
            account,
            amount,
            memo: "test".into(),
            recorded_at_ms: 1,
        },
    )
    .unwrap()
}
