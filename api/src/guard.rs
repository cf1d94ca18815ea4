//! The layers every request passes before a handler runs, in order: the rate limit (so
//! guessing tokens is slow too), the `Origin` check (a web page in a browser may not drive
//! this API), and the bearer token, whose [`Grant`] the scope check of each route group reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::token::{Grant, Scope, Tokens};

/// Requests allowed per second, sustained, across all callers: a person's tools and scripts
/// make a few a second; a job's status polled every 100 ms by ten clients is 100.
pub const DEFAULT_RATE_PER_SECOND: u32 = 200;
/// Requests allowed at once above the sustained rate: a client opening a page of jobs.
pub const DEFAULT_BURST: u32 = 400;

/// A token bucket over all requests.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    burst: u32,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            state: Mutex::new((f64::from(burst), Instant::now())),
        }
    }

    /// Takes one request's token, or says how long until one is there.
    fn take(&self) -> Result<(), Duration> {
        let Ok(mut s) = self.state.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * f64::from(self.per_second);
        s.0 = (s.0 + refill).min(f64::from(self.burst));
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else if self.per_second == 0 {
            Err(Duration::from_secs(u64::MAX / 4))
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - s.0) / f64::from(self.per_second),
            ))
        }
    }
}

/// What the guard needs.
#[derive(Debug)]
pub(crate) struct Guard {
    pub(crate) tokens: Tokens,
    pub(crate) limiter: RateLimiter,
    /// Origins a browser may send (this API's own address): `http://HOST:PORT`.
    pub(crate) own_origins: Vec<String>,
}

pub(crate) async fn guard(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    if let Err(wait) = g.limiter.take() {
        return ApiError::RateLimited {
            retry_after_s: wait.as_secs().max(1),
        }
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(not text)");
        if !g.own_origins.iter().any(|o| o == origin) {
            return ApiError::ForeignOrigin(origin.to_owned()).into_response();
        }
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b""));
    let grant = match presented {
        None => {
            return ApiError::Unauthenticated(
                "no Authorization header; send `Authorization: Bearer <token>` with the token from <data-dir>/api.token",
            )
            .into_response();
        }
        Some(p) => match g.tokens.check(p) {
            Some(grant) => grant.clone(),
            None => {
                return ApiError::Unauthenticated(
                    "the bearer token is not one this node knows (the node writes a fresh one to <data-dir>/api.token at each start)",
                )
                .into_response();
            }
        },
    };
    req.extensions_mut().insert(grant);
    next.run(req).await
}

/// The rate limit alone, for the dashboard's static assets (they hold no data, so no token).
pub(crate) async fn rate_only(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match g.limiter.take() {
        Ok(()) => next.run(req).await,
        Err(wait) => ApiError::RateLimited {
            retry_after_s: wait.as_secs().max(1),
        }
        .into_response(),
    }
}

/// The scope check of one route group.
pub(crate) async fn require(needed: Scope, req: Request, next: Next) -> Response {
    match req.extensions().get::<Grant>() {
        Some(g) if g.allows(needed) => next.run(req).await,
        _ => ApiError::Forbidden {
            needed: needed.name(),
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_at_its_rate() {
        let l = RateLimiter::new(2, 3);
        for _ in 0..3 {
            l.take().unwrap();
        }
        let wait = l.take().unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        l.take().unwrap();
        assert!(l.take().is_err());
    }
}
