//! Request bodies: JSON and multipart extractors whose rejections (malformed, wrong type,
//! too large) become [`ApiError`]s in OpenAI's shape instead of axum's plain-text ones.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `Json<T>` with the API's errors.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(&rejection, crate::MAX_JSON_BODY)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::TooLarge { limit };
    }
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::Invalid {
            param: None,
            message: "the body must be JSON, sent with Content-Type: application/json".into(),
        },
        other => ApiError::Invalid {
            param: None,
            message: format!(
                "the body is not the JSON this route takes: {}",
                other.body_text()
            ),
        },
    }
}

/// `Query<T>` with the API's errors.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::Invalid {
                param: None,
                message: format!(
                    "the query string is not one this route takes: {}",
                    rejection.body_text()
                ),
            }),
        }
    }
}
