//! What this requester has seen of each provider, as opposed to what the provider claims: jobs
//! delivered, failures, results paid for and never delivered, and the time each delivered job
//! took. Ranking uses these first and the advert's claims only as a prior that cannot beat the
//! market's measured record (see [`Standings::prior_ms`]).
//!
//! Survives restarts through the books: at start every receipt the requester acknowledged counts
//! as a delivery (or as undelivered, when marked so), and its `queued_ms + run_ms` (the
//! provider's signed account of the job's time) seeds the speed. Jobs of this session replace
//! that with the time this node measured itself, from submission to the receipt.

use std::collections::BTreeMap;

use pixmarket_ledger::{Ledger, Role};
use pixmarket_protocol::{MeteredUnits, PublicKey};

/// Providers whose record is kept; past this the one with the least history goes (never one
/// that has delivered to us while another has not). A record is a few dozen bytes.
pub(crate) const MAX_STANDINGS: usize = 20_000;

/// One provider's record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// Jobs it delivered to us (images received and matching the receipt).
    pub delivered: u32,
    /// Attempts that failed over (refused after admission, silent, bad receipt, expired).
    pub failures: u32,
    /// Results it was paid for and did not deliver.
    pub undelivered: u32,
    /// The measured time of one standard image (1024², 50 steps), queue wait included: an
    /// exponentially weighted mean, each new job a quarter of it.
    pub ms_per_standard: Option<u64>,
}

/// The weight of the newest sample in [`Standing::ms_per_standard`], as a divisor.
const SPEED_SMOOTHING: u64 = 4;

impl Standing {
    fn sample(&mut self, ms_per_standard: u64) {
        let s = ms_per_standard.max(1);
        self.ms_per_standard = Some(match self.ms_per_standard {
            None => s,
            Some(old) => (old * (SPEED_SMOOTHING - 1) + s) / SPEED_SMOOTHING,
        });
    }
}

/// The time of one standard image, from a job's time and its units (true CFG is not in the
/// units, so a guided job counts as half the work it was: slower, never faster).
pub(crate) fn per_standard(ms: u64, units: &MeteredUnits) -> Option<u64> {
    let work = u64::from(units.width)
        * u64::from(units.height)
        * u64::from(units.steps)
        * u64::from(units.images);
    let standard = 1024 * 1024 * 50;
    (work > 0).then(|| ms.saturating_mul(standard) / work)
}

/// Every provider's record.
#[derive(Debug, Default)]
pub(crate) struct Standings {
    by_provider: BTreeMap<PublicKey, Standing>,
}

impl Standings {
    /// The records the books imply: acknowledged receipts are deliveries (or undelivered).
    pub(crate) fn from_books(ledger: &Ledger) -> Self {
        let mut s = Self::default();
        let Ok(receipts) = ledger.receipts(None) else {
            return s;
        };
        for r in receipts {
            if r.role != Role::Requester || r.ack.is_none() || r.refunded.is_some() {
                continue;
            }
            let Ok(body) = r.receipt.verify() else {
                continue;
            };
            let e = s.entry(r.receipt.signer());
            if r.undelivered.is_some() {
                e.undelivered = e.undelivered.saturating_add(1);
            } else {
                e.delivered = e.delivered.saturating_add(1);
                if let Some(ms) =
                    per_standard(body.queued_ms.saturating_add(body.run_ms), &body.units)
                {
                    e.sample(ms);
                }
            }
        }
        s
    }

    fn entry(&mut self, key: PublicKey) -> &mut Standing {
        if self.by_provider.len() >= MAX_STANDINGS && !self.by_provider.contains_key(&key) {
            let least = self
                .by_provider
                .iter()
                .min_by_key(|(_, s)| (s.delivered, s.undelivered, s.failures))
                .map(|(k, _)| *k);
            if let Some(k) = least {
                self.by_provider.remove(&k);
            }
        }
        self.by_provider.entry(key).or_default()
    }

    pub(crate) fn get(&self, key: &PublicKey) -> Standing {
        self.by_provider.get(key).copied().unwrap_or_default()
    }

    pub(crate) fn delivered(&mut self, key: PublicKey, ms_per_standard: Option<u64>) {
        let e = self.entry(key);
        e.delivered = e.delivered.saturating_add(1);
        if let Some(ms) = ms_per_standard {
            e.sample(ms);
        }
    }

    pub(crate) fn failed(&mut self, key: PublicKey) {
        let e = self.entry(key);
        e.failures = e.failures.saturating_add(1);
    }

    pub(crate) fn undelivered(&mut self, key: PublicKey) {
        let e = self.entry(key);
        e.undelivered = e.undelivered.saturating_add(1);
    }

    /// A result counted undelivered came after all: a delivery now, as the books say (the job
    /// is settled again), so the standing rebuilt from them after a restart is the same.
    pub(crate) fn delivered_late(&mut self, key: PublicKey) {
        let e = self.entry(key);
        e.undelivered = e.undelivered.saturating_sub(1);
        e.delivered = e.delivered.saturating_add(1);
    }

    /// The speed assumed for a provider this requester has not measured: its advert's claim,
    /// but never faster than the slowest provider that has delivered to us. A new key (or a
    /// thousand of them claiming 1 ms) so ranks below every known-good provider at the same
    /// queue, and is tried when those are busy; once it delivers, its measured time counts.
    pub(crate) fn prior_ms(&self, claimed: u64) -> u64 {
        let slowest_known = self
            .by_provider
            .values()
            .filter(|s| s.delivered > 0)
            .filter_map(|s| s.ms_per_standard)
            .max();
        claimed.max(slowest_known.unwrap_or(0)).max(1)
    }

    /// Whether `key` has delivered to us at least once and never kept a paid result.
    pub(crate) fn known_good(&self, key: &PublicKey) -> bool {
        let s = self.get(key);
        s.delivered > 0 && s.undelivered == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmarket_protocol::SecretKey;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    #[test]
    fn a_claim_cannot_beat_the_slowest_provider_that_delivered() {
        let mut s = Standings::default();
        assert_eq!(s.prior_ms(1), 1, "nothing measured: the claim stands");
        s.delivered(key(1), Some(20_000));
        s.delivered(key(2), Some(50_000));
        assert_eq!(s.prior_ms(1), 50_000);
        assert_eq!(
            s.prior_ms(90_000),
            90_000,
            "a slower claim is taken at its word"
        );
        // A provider that failed without delivering sets no bar.
        s.failed(key(3));
        assert_eq!(s.prior_ms(1), 50_000);
        assert!(s.known_good(&key(1)) && !s.known_good(&key(3)));
        s.undelivered(key(1));
        assert!(!s.known_good(&key(1)));
    }

    #[test]
    fn speed_is_a_smoothed_mean_of_what_was_measured() {
        let mut s = Standings::default();
        s.delivered(key(1), Some(1_000));
        s.delivered(key(1), Some(5_000));
        assert_eq!(s.get(&key(1)).ms_per_standard, Some(2_000));
        assert_eq!(s.get(&key(1)).delivered, 2);
        let units = MeteredUnits {
            width: 512,
            height: 512,
            steps: 25,
            prompt_tokens: 5,
            images: 1,
        };
        // An eighth of a standard image in 1 s: 8 s per standard image.
        assert_eq!(per_standard(1_000, &units), Some(8_000));
    }

    #[test]
    fn the_record_is_bounded_and_keeps_the_providers_that_delivered() {
        let mut s = Standings::default();
        s.delivered(key(0), Some(1_000));
        for i in 0..MAX_STANDINGS + 10 {
            let seed = [
                u8::try_from(i % 251).unwrap_or(0),
                u8::try_from(i / 251).unwrap_or(0),
            ];
            let mut bytes = [7u8; 32];
            bytes[..2].copy_from_slice(&seed);
            s.failed(SecretKey::from_seed(&bytes).public());
        }
        assert!(s.by_provider.len() <= MAX_STANDINGS);
        assert_eq!(s.get(&key(0)).delivered, 1);
    }
}
