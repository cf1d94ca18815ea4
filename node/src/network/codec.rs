//! The node-to-node RPC protocol `/pixmarket/rpc/1`: one request, one response, each a frame of
//! a 4-byte big-endian length and the canonical postcard bytes of a [`Request`] or [`Response`].
//! A frame longer than its direction's limit is refused before any of it is buffered.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pixmarket_protocol::codec;
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{JobEvent, JobId, JobRequest, Quote, QuoteRequest, ReceiptAck, Signed};
use serde::{Deserialize, Serialize};

pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/pixmarket/rpc/1");

/// The largest request: a completed-job event with four full-size images dominates.
pub const MAX_REQUEST_BYTES: usize = Signed::<JobEvent>::max_encoded() + 64;
/// Responses are small: quotes, acceptances, acknowledgements and typed refusals.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// What one peer asks another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// requester → provider: what would this cost?
    Quote(Signed<QuoteRequest>),
    /// requester → provider: run this job.
    Job(Signed<JobRequest>),
    /// provider → requester: something happened to a job of yours. Events need no signature
    /// of their own (the connection is authenticated); the receipt inside `Completed` is signed.
    Event(JobEvent),
    /// requester → provider: stop this job at the next step.
    Cancel(JobId),
    /// requester → provider: a receipt acknowledgement sent again (the first rides on the
    /// response to the `Completed` event).
    Ack(Signed<ReceiptAck>),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Quote(Signed<Quote>),
    Accepted {
        queue_position: u32,
        eta_ms: u64,
    },
    /// The answer to an event; for `Completed`, the requester's signed acknowledgement.
    EventAck(Option<Signed<ReceiptAck>>),
    Ok,
    Refused(FailReason),
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Quote(_) => "quote",
            Request::Job(_) => "job",
            Request::Event(_) => "event",
            Request::Cancel(_) => "cancel",
            Request::Ack(_) => "ack",
        }
    }
}

/// Length-prefixed postcard frames with a size limit per direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcCodec;

async fn read_frame<T, R>(io: &mut R, what: &'static str, max: usize) -> io::Result<T>
where
    T: Serialize + serde::de::DeserializeOwned,
    R: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    codec::decode(what, &buf, max).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T, W>(io: &mut W, what: &'static str, value: &T, max: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    let bytes = codec::encode(what, value, max)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, "rpc request", MAX_REQUEST_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, "rpc response", MAX_RESPONSE_BYTES).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, "rpc request", &req, MAX_REQUEST_BYTES).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, "rpc response", &res, MAX_RESPONSE_BYTES).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut codec = RpcCodec;
        let req = Request::Cancel(JobId([7; 16]));
        let mut buf = Vec::new();
        codec
            .write_request(&RPC_PROTOCOL, &mut buf, req.clone())
            .await
            .unwrap();
        let back = codec
            .read_request(&RPC_PROTOCOL, &mut buf.as_slice())
            .await
            .unwrap();
        assert_eq!(back, req);

        // A length prefix over the limit is refused without reading the body.
        let huge = u32::try_from(MAX_RESPONSE_BYTES + 1).unwrap().to_be_bytes();
        let err = codec
            .read_response(&RPC_PROTOCOL, &mut huge.as_slice())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // Garbage inside a well-sized frame is a decode error, not a panic.
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend([0xff; 5]);
        assert!(
            codec
                .read_request(&RPC_PROTOCOL, &mut junk.as_slice())
                .await
                .is_err()
        );
    }
}
