//! The CLI's way into a running node's API: [`ApiClient::find`] reads the address and token
//! files the node wrote in its data folder, and [`ApiClient::call`] sends one JSON request over
//! HTTP/1.1 (hyper) on loopback. When no node runs there, `find` gives `None` (no files) or
//! `call` fails with [`ClientError::NotRunning`] (files left by a node that was killed), and
//! the caller opens the ledger itself.

use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
pub use axum::http::Method;
use axum::http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::token::{ADDR_FILE, TOKEN_FILE};

/// How long one call may take: operator calls answer within moments (one fsync).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a page of receipts is well under it.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Why a call to the API gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no node answers at {addr} (the API files in the data folder are left from one that stopped)"
    )]
    NotRunning { addr: String },
    #[error("the node's API at {addr} did not answer within {} s", CALL_TIMEOUT.as_secs())]
    Timeout { addr: String },
    #[error("talking to the node's API at {addr}")]
    Http {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The API answered with an error in OpenAI's shape.
    #[error("the node refused: {message}")]
    Refused { status: StatusCode, message: String },
}

/// A running node's API, as its data folder tells.
#[derive(Clone, Debug)]
pub struct ApiClient {
    addr: String,
    token: String,
}

impl ApiClient {
    /// The API of the node that runs in `data_dir`, if its files are there.
    pub fn find(data_dir: &Path) -> Option<Self> {
        let token = std::fs::read_to_string(data_dir.join(TOKEN_FILE)).ok()?;
        let addr = std::fs::read_to_string(data_dir.join(ADDR_FILE)).ok()?;
        Some(Self {
            addr: addr.trim().to_owned(),
            token: token.trim().to_owned(),
        })
    }

    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            token: token.into(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `method path` with `body` as JSON; the answer's JSON on a 2xx status.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                addr: self.addr.clone(),
            }),
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let http = |e: Box<dyn std::error::Error + Send + Sync>| ClientError::Http {
            addr: self.addr.clone(),
            source: e,
        };
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                    addr: self.addr.clone(),
                },
                _ => http(e.into()),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
        let conn = tokio::spawn(conn);
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| http(e.into()))?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes)).map_err(|e| http(e.into()))?;
        let answer = sender.send_request(req).await.map_err(|e| http(e.into()))?;
        let status = answer.status();
        let collected = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        conn.abort();
        let value: Value = serde_json::from_slice(&collected).map_err(|e| http(e.into()))?;
        if status.is_success() {
            Ok(value)
        } else {
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_owned();
            Err(ClientError::Refused { status, message })
        }
    }
}
