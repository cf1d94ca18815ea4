//! The API's one error type and its response: OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, on every route (the async and operator
//! routes too, so a client parses one shape), with the status that says who must act.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What went wrong with a request; each variant has one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is wrong: `param` names it, the message says what is allowed.
    #[error("{message}")]
    Invalid {
        param: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("this token lacks the `{needed}` scope this route needs")]
    Forbidden { needed: &'static str },
    #[error(
        "requests from the web page at origin {0:?} are refused: this API serves programs on this machine, not browsers"
    )]
    ForeignOrigin(String),
    #[error("no {what} {id:?}")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{method} is not a method {path} takes")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body is larger than the {limit} bytes this route accepts")]
    TooLarge { limit: usize },
    #[error("too many requests; retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    /// Every provider (or this node's own job slots) is busy; `retry_after_s`, when known, is
    /// the soonest a provider said it would take more.
    #[error("{message}")]
    MarketBusy {
        message: String,
        retry_after_s: Option<u64>,
    },
    #[error("{0}")]
    InsufficientCredit(String),
    #[error("{0}")]
    NoProviders(String),
    #[error("{0}")]
    Market(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientCredit(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden { .. } | ApiError::ForeignOrigin(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } | ApiError::MarketBusy { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::NoProviders(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Market(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Invalid { .. } => ("invalid_request_error", "invalid_value"),
            ApiError::Unauthenticated(_) => ("invalid_request_error", "invalid_api_key"),
            ApiError::Forbidden { .. } => ("invalid_request_error", "insufficient_scope"),
            ApiError::ForeignOrigin(_) => ("invalid_request_error", "foreign_origin"),
            ApiError::NotFound { .. } => ("invalid_request_error", "not_found"),
            ApiError::Conflict(_) => ("invalid_request_error", "conflict"),
            ApiError::MethodNotAllowed { .. } => ("invalid_request_error", "method_not_allowed"),
            ApiError::TooLarge { .. } => ("invalid_request_error", "body_too_large"),
            ApiError::RateLimited { .. } => ("rate_limit_error", "rate_limit_exceeded"),
            ApiError::MarketBusy { .. } => ("rate_limit_error", "market_busy"),
            ApiError::InsufficientCredit(_) => ("insufficient_quota", "insufficient_credit"),
            ApiError::NoProviders(_) => ("api_error", "no_providers"),
            ApiError::Market(_) => ("api_error", "market_failed"),
            ApiError::Internal(_) => ("server_error", "internal_error"),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: String,
    r#type: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (r#type, code) = self.kind();
        let param = match &self {
            ApiError::Invalid { param, .. } => param.as_deref(),
            _ => None,
        };
        let body = Body {
            error: Inner {
                message: self.to_string(),
                r#type,
                param,
                code,
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        let retry_after_s = match &self {
            ApiError::RateLimited { retry_after_s } => Some(*retry_after_s),
            ApiError::MarketBusy { retry_after_s, .. } => *retry_after_s,
            _ => None,
        };
        if let Some(retry_after_s) = retry_after_s
            && let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if matches!(self, ApiError::Unauthenticated(_)) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pixmarket\""),
            );
        }
        response
    }
}
