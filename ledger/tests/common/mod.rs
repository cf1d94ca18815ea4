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

use pixmarket_ledger::{HoldTerms, Ledger, LedgerError, ReceiptLink, Role};
use pixmarket_protocol::{
    ChainEntry, DepositNote, Hash, JobId, Message, MeteredUnits, MicroTokens, PriceSchedule,
    PublicKey, Receipt, ReceiptAck, SecretKey, Signed, metering,
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

/// The receipt body `provider` would sign for `steps` steps, linked after `link`.
pub fn receipt_body(
    provider: PublicKey,
    requester: PublicKey,
    job: JobId,
    steps: u32,
    link: ReceiptLink,
) -> Receipt {
    let cost = cost_of(steps);
    Receipt {
        job_id: job,
        request_hash: Hash::of(&job.0),
        provider,
        requester,
        units: units(steps),
        schedule: PriceSchedule::default(),
        cost,
        image_hashes: vec![Hash::of(b"png")],
        queued_ms: 1,
        run_ms: 2,
        cumulative_charged: link.charged_so_far.checked_add(cost).unwrap(),
        prev_entry_hash: link.prev_entry_hash,
        issued_at_ms: 1_000,
        step_caching: pixmarket_protocol::StepCaching::Exact,
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
    sign(
        provider,
        &receipt_body(provider.public(), requester, job, steps, link),
    )
}

pub fn sign<T: Message>(key: &SecretKey, body: &T) -> Signed<T> {
    Signed::sign(key, body).unwrap()
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

/// The pair's whole chain, read page by page ([`Ledger::chain`] answers at most
/// `MAX_CHAIN_ENTRIES` at a time).
pub fn full_chain(ledger: &Ledger, role: Role, peer: &PublicKey) -> Vec<ChainEntry> {
    let mut all: Vec<ChainEntry> = Vec::new();
    loop {
        let page = ledger
            .chain(role, peer, all.last().map(ChainEntry::digest))
            .unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Checks that a chain is linear: each entry names the one before it, its cumulative total is
/// the one before it plus a receipt's cost or minus a credit note's amount, and each credit
/// note takes back a receipt earlier in the chain, at most once. Returns the final total.
pub fn assert_linear(chain: &[ChainEntry]) -> MicroTokens {
    let mut prev = None;
    let mut total = MicroTokens::ZERO;
    let mut receipts = std::collections::BTreeMap::new();
    for (i, e) in chain.iter().enumerate() {
        let link = e.link().unwrap();
        assert_eq!(
            link.prev, prev,
            "entry {i} does not name the entry before it"
        );
        total = match e {
            ChainEntry::Receipt(r) => {
                let cost = r.verify().unwrap().cost;
                receipts.insert(r.digest(), cost);
                total.checked_add(cost).unwrap()
            }
            ChainEntry::Credit(c) => {
                let note = c.verify().unwrap();
                let cost = receipts
                    .remove(&note.receipt_hash)
                    .unwrap_or_else(|| panic!("entry {i} credits no earlier, uncredited receipt"));
                assert_eq!(note.amount, cost, "entry {i} credits another amount");
                total.checked_sub(cost).unwrap()
            }
        };
        assert_eq!(
            link.cumulative_charged, total,
            "entry {i}'s cumulative total"
        );
        prev = Some(e.digest());
    }
    total
}

/// The link a ledger's owner, as requester, expects the next receipt from `provider` to carry.
pub fn mirror_link(ledger: &Ledger, provider: &PublicKey) -> ReceiptLink {
    let a = ledger
        .account(Role::Requester, provider)
        .unwrap()
        .unwrap_or_default();
    ReceiptLink {
        charged_so_far: a.charged,
        prev_entry_hash: a.last_entry,
    }
}

/// The error's variant name, for comparing refusals with a model or a table.
pub fn kind(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::InsufficientCredit { .. } => "InsufficientCredit",
        LedgerError::DuplicateJob { .. } => "DuplicateJob",
        LedgerError::Expired { .. } => "Expired",
        LedgerError::UnknownHold { .. } => "UnknownHold",
        LedgerError::AlreadyFinished { .. } => "AlreadyFinished",
        LedgerError::ChargeExceedsHold { .. } => "ChargeExceedsHold",
        LedgerError::AlreadyAcked { .. } => "AlreadyAcked",
        LedgerError::NotSettled { .. } => "NotSettled",
        LedgerError::DuplicateDeposit { .. } => "DuplicateDeposit",
        LedgerError::CreditBelowUse { .. } => "CreditBelowUse",
        LedgerError::Invalid { .. } => "Invalid",
        LedgerError::Refunded { .. } => "Refunded",
        LedgerError::HoldExpired { .. } => "HoldExpired",
        LedgerError::CumulativeMismatch { .. } => "CumulativeMismatch",
        LedgerError::PrevReceiptMismatch { .. } => "PrevReceiptMismatch",
        LedgerError::Mismatch { .. } => "Mismatch",
        LedgerError::WrongSigner { .. } => "WrongSigner",
        LedgerError::BadSignature { .. } => "BadSignature",
        LedgerError::NotOwnerKey => "NotOwnerKey",
        LedgerError::UnknownEntry { .. } => "UnknownEntry",
        other => panic!("unexpected error {other}"),
    }
}

/// Closes the ledger and edits its sled trees directly, as an attacker or a bad disk would.
pub fn tamper(path: &std::path::Path, f: impl FnOnce(&sled::Db)) {
    let db = sled::open(path).unwrap();
    f(&db);
    db.flush().unwrap();
}

pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
