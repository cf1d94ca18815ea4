//! The books check: after a run, every ledger of the market is read back from disk and
//! compared with every other and with what the requesters actually received.
//!
//! - every requester/provider pair with business: both ledgers agree on the pair's charged
//!   total and chain head, and the two chains (receipts and credit notes) are equal entry by
//!   entry, so every refund is a signed credit note both sides hold;
//! - the total charged over the providers' books equals the total paid over the requesters';
//! - no job id is charged twice, in one ledger or across ledgers, and no job of the plan was
//!   paid twice;
//! - every receipt a requester holds names only images it received, and every receipt a
//!   provider charges for is held by its requester (else the provider charged for an image that
//!   was never delivered);
//! - no acknowledged receipt went undelivered;
//! - no hold is left open, and every ledger's `verify` replay passes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pixmarket_ledger::{JobOutcome, Ledger, Role};
use pixmarket_protocol::{Hash, JobId, MicroTokens, PublicKey};

use crate::record::BooksCheck;

/// One honest node's books.
#[derive(Debug, Clone)]
pub struct Books {
    pub name: String,
    pub key: PublicKey,
    pub ledger: Arc<Ledger>,
}

/// Problems listed at most; past this they are counted.
const MAX_PROBLEMS: usize = 50;

struct Problems(Vec<String>, usize);

impl Problems {
    fn push(&mut self, p: String) {
        if self.0.len() < MAX_PROBLEMS {
            self.0.push(p);
        } else {
            self.1 += 1;
        }
    }
}

/// The digests of a pair's whole chain, in order.
fn full_chain(ledger: &Ledger, role: Role, peer: &PublicKey) -> Result<Vec<Hash>, String> {
    let mut out = Vec::new();
    loop {
        let page = ledger
            .chain(role, peer, out.last().copied())
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page.iter().map(pixmarket_protocol::ChainEntry::digest));
    }
}

/// Whether a provider-side receipt still charges (it was not credited back).
fn charges(ledger: &Ledger, job: JobId) -> bool {
    matches!(
        ledger.job(Role::Provider, job),
        Ok(Some(JobOutcome::Settled { .. }))
    )
}

/// Checks the books of `providers` and `requesters` (honest nodes only) against the images
/// the requesters received (`delivered`) and the number of plan jobs paid more than once.
pub fn check(
    providers: &[Books],
    requesters: &[Books],
    delivered: &BTreeSet<Hash>,
    plan_jobs_paid_twice: u32,
) -> BooksCheck {
    let mut c = BooksCheck {
        double_charged: plan_jobs_paid_twice,
        ..BooksCheck::default()
    };
    let mut problems = Problems(Vec::new(), 0);
    if plan_jobs_paid_twice > 0 {
        problems.push(format!(
            "{plan_jobs_paid_twice} jobs of the plan were paid twice"
        ));
    }
    let requester_keys: BTreeMap<PublicKey, &Books> =
        requesters.iter().map(|b| (b.key, b)).collect();
    let mut charged_jobs: BTreeMap<JobId, String> = BTreeMap::new();
    let mut charged = MicroTokens::ZERO;
    let mut paid = MicroTokens::ZERO;
    let mut receipts = 0u32;

    for p in providers {
        if let Ok(report) = p.ledger.verify() {
            c.credit_notes += u32::try_from(report.credit_notes).unwrap_or(u32::MAX);
        }
        let list = match p.ledger.receipts(None) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{}: cannot read receipts: {e}", p.name));
                continue;
            }
        };
        for stored in list.iter().filter(|s| s.role == Role::Provider) {
            let Ok(r) = stored.receipt.verify() else {
                problems.push(format!("{}: a stored receipt does not verify", p.name));
                continue;
            };
            if !charges(&p.ledger, r.job_id) {
                continue;
            }
            receipts += 1;
            if let Some(other) = charged_jobs.insert(r.job_id, p.name.clone()) {
                c.double_charged += 1;
                problems.push(format!(
                    "job {} charged by both {other} and {}",
                    r.job_id, p.name
                ));
            }
            if let Some(req) = requester_keys.get(&r.requester) {
                let held = req.ledger.receipt(Role::Requester, r.job_id).ok().flatten();
                if held.is_none() {
                    c.receipts_without_image += 1;
                    problems.push(format!(
                        "{} charged {} for job {}, whose receipt {} never stored: the image was \
                         not delivered",
                        p.name, req.name, r.job_id, req.name
                    ));
                }
            }
        }
        match p.ledger.holds() {
            Ok(h) if !h.is_empty() => {
                c.open_holds += u32::try_from(h.len()).unwrap_or(u32::MAX);
                problems.push(format!("{}: {} holds still open", p.name, h.len()));
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{}: cannot read holds: {e}", p.name)),
        }
        for r in requesters {
            let theirs = p.ledger.account(Role::Provider, &r.key).ok().flatten();
            let mine = r.ledger.account(Role::Requester, &p.key).ok().flatten();
            if theirs.is_none() && mine.is_none() {
                continue;
            }
            c.pairs += 1;
            let (t, m) = (theirs.unwrap_or_default(), mine.unwrap_or_default());
            charged = charged.checked_add(t.charged).unwrap_or(charged);
            if t.charged == m.charged && t.last_entry == m.last_entry {
                c.pairs_agreeing += 1;
            } else {
                problems.push(format!(
                    "{} and {} disagree: provider says {} charged, requester {} paid",
                    p.name, r.name, t.charged, m.charged
                ));
            }
            match (
                full_chain(&p.ledger, Role::Provider, &r.key),
                full_chain(&r.ledger, Role::Requester, &p.key),
            ) {
                (Ok(a), Ok(b)) if a == b => c.chains_equal += 1,
                (Ok(a), Ok(b)) => problems.push(format!(
                    "{} and {} hold different chains: {} entries and {}",
                    p.name,
                    r.name,
                    a.len(),
                    b.len()
                )),
                (Err(e), _) | (_, Err(e)) => problems.push(format!(
                    "{} and {}: cannot read a chain: {e}",
                    p.name, r.name
                )),
            }
        }
    }

    for r in requesters {
        let list = match r.ledger.receipts(None) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{}: cannot read receipts: {e}", r.name));
                continue;
            }
        };
        let mut seen = BTreeSet::new();
        for stored in list.iter().filter(|s| s.role == Role::Requester) {
            // Credited back: it no longer charges (and was never acknowledged or delivered).
            if stored.refunded.is_some() {
                continue;
            }
            if let Some(why) = &stored.undelivered {
                c.undelivered += 1;
                problems.push(format!(
                    "{}: paid for a result never delivered: {why}",
                    r.name
                ));
            }
            let Ok(body) = stored.receipt.verify() else {
                problems.push(format!("{}: a stored receipt does not verify", r.name));
                continue;
            };
            if !seen.insert(body.job_id) {
                c.double_charged += 1;
                problems.push(format!("{}: job {} paid twice", r.name, body.job_id));
            }
            paid = paid.checked_add(body.cost).unwrap_or(paid);
            if !body.image_hashes.iter().all(|h| delivered.contains(h)) {
                c.receipts_without_image += 1;
                problems.push(format!(
                    "{}: receipt for job {} names an image it never received",
                    r.name, body.job_id
                ));
            }
        }
        if let Ok(h) = r.ledger.holds()
            && !h.is_empty()
        {
            c.open_holds += u32::try_from(h.len()).unwrap_or(u32::MAX);
            problems.push(format!("{}: {} holds still open", r.name, h.len()));
        }
    }

    for b in providers.iter().chain(requesters) {
        c.ledgers += 1;
        match b.ledger.verify() {
            Ok(_) => c.ledgers_verified += 1,
            Err(e) => problems.push(format!("{}: verify failed: {e}", b.name)),
        }
    }
    c.receipts = receipts;
    c.charged_micros = charged.0;
    c.paid_micros = paid.0;
    if c.charged_micros != c.paid_micros {
        problems.push(format!(
            "providers charged {} in all, requesters paid {}",
            charged, paid
        ));
    }
    if problems.1 > 0 {
        let more = problems.1;
        problems.0.push(format!("… and {more} more problems"));
    }
    c.problems = problems.0;
    c
}
