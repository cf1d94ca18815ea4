//! The node-to-node RPC protocol `/pixmarket/rpc/2`: one request, one response, each a frame of
//! a 4-byte big-endian length and the canonical postcard bytes of a [`Request`] or [`Response`].
//! A frame longer than its direction's limit is refused before any of it is buffered.
//!
//! Version 2 is the fair exchange (docs/protocol.md): `Completed` carries the receipt without
//! the images, and the images are the answer to a `Fetch` that carries the signed ack.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pixmarket_protocol::codec;
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{
    ChainEntry, Hash, JobEvent, JobId, JobRequest, JobStatus, Quote, QuoteRequest, ReceiptAck,
    ReceiptRefusal, Signed, validate,
};
use serde::{Deserialize, Serialize};

pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/pixmarket/rpc/2");

/// The largest request: a job with its two input images (init and mask) dominates.
pub const MAX_REQUEST_BYTES: usize = Signed::<JobRequest>::max_encoded() + 64;
/// The largest response: the images of a job (at most four, each at most the output limit)
/// answering a `Fetch`; everything else is a few KiB.
pub const MAX_RESPONSE_BYTES: usize =
    validate::MAX_IMAGES as usize * (validate::MAX_OUTPUT_IMAGE_BYTES + 8) + 1024;

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
    /// requester → provider: where is this job? Answered with `Response::Status`.
    Status(JobId),
    /// requester → provider: the images of an acknowledged job. The signed ack travels with
    /// it, so a `Fetch` also delivers an ack whose first copy was lost; answered with
    /// `Response::Images` once the ack is stored.
    Fetch(Signed<ReceiptAck>),
    /// requester → provider: the pair's chain entries after `after` (from the start for
    /// `None`), so a requester learns the credit notes it missed.
    Chain { after: Option<Hash> },
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
    /// The answer to `Completed` when the requester will not pay: signed, so it is final.
    ReceiptRefused(Signed<ReceiptRefusal>),
    Status(JobStatus),
    /// The answer to `Fetch`: the images, in the receipt's order.
    Images {
        job_id: JobId,
        images: Vec<Vec<u8>>,
    },
    Chain(Vec<ChainEntry>),
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
            Request::Status(_) => "status",
            Request::Fetch(_) => "fetch",
            Request::Chain { .. } => "chain",
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
