//! Per-peer rate limits on inbound requests: a token bucket per peer and kind of request, so a
//! peer that floods quotes, jobs or events is answered `Busy { retry_after_ms }` at once, at the
//! cost of a map lookup, while every other peer is served as before.
//!
//! Each rate is far above what an honest peer sends: a requester asks one quote and sends one
//! job per purchase, then a status now and then; a provider sends a few events per job and
//! step. Times come from `tokio::time`, so tests can pause the clock.

use std::collections::BTreeMap;

use libp2p::PeerId;
use tokio::time::{Duration, Instant};

use crate::network::Request;

/// What a request costs and how fast its bucket refills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `Quote`: each tokenizes a prompt of up to 2,000 characters.
    Quote,
    /// `Job`: each is validated, priced, and may hold credit (a ledger write).
    Job,
    /// `Event`: a provider's news of a job; `Completed` may write the ledger.
    Event,
    /// `Status`, `Fetch`, `Chain`, `Cancel`: reads, or an ack stored once.
    Other,
}

impl Kind {
    pub fn of(request: &Request) -> Self {
        match request {
            Request::Quote(_) => Kind::Quote,
            Request::Job(_) => Kind::Job,
            Request::Event(_) => Kind::Event,
            Request::Status(_) | Request::Fetch(_) | Request::Chain { .. } | Request::Cancel(_) => {
                Kind::Other
            }
        }
    }

    /// (requests per second, burst): the burst is what a peer may send at once after a pause.
    const fn limits(self) -> (u32, u32) {
        match self {
            // A buyer comparing providers quotes each once; twenty a second is a script.
            Kind::Quote => (QUOTES_PER_SECOND, 2 * QUOTES_PER_SECOND),
            Kind::Job => (JOBS_PER_SECOND, 2 * JOBS_PER_SECOND),
            // A provider running a batch reports every step of every job in it.
            Kind::Event => (EVENTS_PER_SECOND, 2 * EVENTS_PER_SECOND),
            Kind::Other => (OTHERS_PER_SECOND, 2 * OTHERS_PER_SECOND),
        }
    }
}

/// Quotes one peer may ask for per second.
pub const QUOTES_PER_SECOND: u32 = 20;
/// Jobs one peer may submit per second (the queue's own bound applies as well).
pub const JOBS_PER_SECOND: u32 = 20;
/// Job events one peer may send per second: a batch of 8 jobs at 25 steps a second is 200.
pub const EVENTS_PER_SECOND: u32 = 200;
/// Status, fetch, chain and cancel requests one peer may send per second.
pub const OTHERS_PER_SECOND: u32 = 50;
/// Peers whose buckets are kept; past this the bucket used longest ago goes (a peer it
/// belonged to starts again with a full burst, which a flood of fresh keys gains nothing by:
/// each key's burst is small and connections per address are limited).
pub const MAX_TRACKED_PEERS: usize = 4_096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens, in thousandths of a request.
    milli: u64,
    at: Instant,
}

/// The buckets of every peer heard from recently.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: BTreeMap<(PeerId, Kind), Bucket>,
}

impl RateLimits {
    /// Takes one request of `kind` from `peer`'s bucket: `Ok` to serve it, or `Err` with how
    /// long until the bucket holds a request again.
    pub fn admit(&mut self, peer: PeerId, kind: Kind) -> Result<(), Duration> {
        let now = Instant::now();
        let (rate, burst) = kind.limits();
        let (rate, full) = (u64::from(rate), u64::from(burst) * 1_000);
        if self.buckets.len() >= MAX_TRACKED_PEERS && !self.buckets.contains_key(&(peer, kind)) {
            let oldest = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.buckets.remove(&k);
            }
        }
        let b = self.buckets.entry((peer, kind)).or_insert(Bucket {
            milli: full,
            at: now,
        });
        let elapsed = u64::try_from(now.duration_since(b.at).as_millis()).unwrap_or(u64::MAX);
        // `rate` requests a second is `rate` thousandths of a request a millisecond.
        b.milli = b
            .milli
            .saturating_add(elapsed.saturating_mul(rate))
            .min(full);
        b.at = now;
        if b.milli >= 1_000 {
            b.milli -= 1_000;
            Ok(())
        } else {
            let missing = 1_000 - b.milli;
            Err(Duration::from_millis(missing.div_ceil(rate.max(1))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate_and_a_hint_that_is_true() {
        let mut limits = RateLimits::default();
        let peer = PeerId::random();
        let (rate, burst) = Kind::Quote.limits();
        for _ in 0..burst {
            assert!(limits.admit(peer, Kind::Quote).is_ok());
        }
        let wait = limits.admit(peer, Kind::Quote).unwrap_err();
        assert_eq!(wait, Duration::from_millis(1_000 / u64::from(rate)));
        // Another peer, and another kind of the same peer, are not affected.
        assert!(limits.admit(PeerId::random(), Kind::Quote).is_ok());
        assert!(limits.admit(peer, Kind::Other).is_ok());
        // After the hint, exactly one more.
        tokio::time::advance(wait).await;
        assert!(limits.admit(peer, Kind::Quote).is_ok());
        assert!(limits.admit(peer, Kind::Quote).is_err());
        // A second later, `rate` more.
        tokio::time::advance(Duration::from_secs(1)).await;
        let served = (0..burst)
            .filter(|_| limits.admit(peer, Kind::Quote).is_ok())
            .count();
        assert_eq!(served, usize::try_from(rate).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let mut limits = RateLimits::default();
        for _ in 0..MAX_TRACKED_PEERS + 100 {
            let _ = limits.admit(PeerId::random(), Kind::Job);
        }
        assert!(limits.buckets.len() <= MAX_TRACKED_PEERS);
    }
}
