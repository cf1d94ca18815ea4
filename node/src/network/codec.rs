//! The node-to-node RPC protocol `/pixmarket/rpc/3`: one request, one response, each a frame of
//! a 4-byte big-endian length and the canonical postcard bytes of a [`Request`] or [`Response`].
//! Each message variant has its own limit, checked against the length prefix and the first
//! body byte (the variant) before anything else is buffered; a frame's buffer grows with the
//! bytes that arrive, within byte budgets shared by all of the node's streams.
//!
//! Version 2 is the fair exchange (docs/protocol.md): `Completed` carries the receipt without
//! the images, and the images are the answer to a `Fetch` that carries the signed ack.

use std::io;
use std::sync::Arc;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pixmarket_protocol::codec;
use pixmarket_protocol::messages::FailReason;
use pixmarket_protocol::{
    ChainEntry, Hash, JobEvent, JobId, JobRequest, JobStatus, Quote, QuoteRequest, ReceiptAck,
    ReceiptRefusal, Signed, validate,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// Version 3: job requests carry previews, latents and a LoRA, events carry previews, and
/// refusals name relay, size and LoRA limits; a node of version 2 cannot decode them, so the
/// two never negotiate a stream.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/pixmarket/rpc/3");

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

/// The first byte of a frame's body: postcard writes an enum's variant index first, as a varint,
/// which is one byte for the few variants of [`Request`] and [`Response`].
type Tag = u8;

/// The most bytes of one frame whose variant `tag` names, in each direction. Only a job (with
/// its input images) and the images answering a `Fetch` are large; everything else is a few
/// KiB, so a peer cannot make a `Cancel` or a quote cost megabytes. Writers check the same
/// limits, so an honest node never sends a frame its peer refuses. Indexed by variant, in
/// declaration order (a test checks each tag against the encoder).
const REQUEST_LIMITS: [(&str, usize); 7] = [
    // A prompt of 2,000 characters (up to 8 KB of UTF-8), its negative, and the signature.
    ("quote", 24 * KIB),
    ("job", MAX_REQUEST_BYTES),
    // A receipt, a signed void with its reason, or progress: well under this.
    ("event", MAX_EVENT_BYTES),
    ("cancel", SMALL_BYTES),
    ("status", SMALL_BYTES),
    ("fetch", SMALL_BYTES),
    ("chain", SMALL_BYTES),
];
const RESPONSE_LIMITS: [(&str, usize); 9] = [
    ("quote", 4 * KIB),
    ("accepted", SMALL_BYTES),
    ("event ack", SMALL_BYTES),
    ("receipt refusal", 4 * KIB),
    // A completed job's status carries its receipt.
    ("status", 8 * KIB),
    ("images", MAX_RESPONSE_BYTES),
    // Up to 64 chain entries of about half a KiB each.
    ("chain", 64 * KIB),
    ("ok", SMALL_BYTES),
    // A refusal names a field and what is allowed, or an engine's message.
    ("refusal", 16 * KIB),
];

const KIB: usize = 1024;
/// The limit of the messages that carry an id, a hash or a signature and nothing else.
const SMALL_BYTES: usize = KIB;
/// The limit of a job event.
pub const MAX_EVENT_BYTES: usize = 64 * KIB;
/// Frames up to this size are read from the small-frame budget, larger ones from the large.
pub const SMALL_FRAME_BYTES: usize = 64 * KIB;
/// Bytes of small inbound frames being read at once, over every peer and stream: 256 frames
/// of the largest small size. Together with [`LARGE_FRAME_BUDGET`] it bounds what the node
/// buffers for frames not yet decoded, however many streams peers open.
pub const SMALL_FRAME_BUDGET: usize = 256 * SMALL_FRAME_BYTES;
/// Bytes of large inbound frames being read at once: one job with both input images at the
/// largest size, or one full `Fetch` answer, and room for small img2img inputs beside it. A
/// large frame waits for its whole declared length to be free before any byte is read, so
/// frames never hold parts of the budget against each other; a peer that declares large
/// frames and sends slowly delays only other large frames (img2img inputs and image
/// answers), by at most the RPC timeout, never quotes, text-to-image jobs, events or acks.
pub const LARGE_FRAME_BUDGET: usize = MAX_RESPONSE_BYTES + 8 * 1024 * KIB;
/// A small frame's body must arrive within this of its length prefix (64 KiB take well under a
/// second on any link that can use the market): a peer that announces a frame and then stalls
/// holds its share of [`SMALL_FRAME_BUDGET`] this long at most. Large frames are bounded by
/// the RPC timeout.
pub const SMALL_FRAME_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A frame buffer's first allocation: it then grows with the bytes that arrive, never with
/// what the length prefix claims.
const READ_CHUNK: usize = 64 * KIB;

/// The byte budgets inbound frames are read under, shared by every connection of a node.
#[derive(Clone, Debug)]
struct Budgets {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            small: Arc::new(Semaphore::new(SMALL_FRAME_BUDGET)),
            large: Arc::new(Semaphore::new(LARGE_FRAME_BUDGET)),
        }
    }
}

/// Length-prefixed postcard frames with a size limit per message variant, read within the
/// node's byte budgets. One codec is built per node; libp2p clones it for every connection,
/// and the clones share the budgets.
#[derive(Clone, Debug, Default)]
pub struct RpcCodec {
    budgets: Budgets,
}

/// The limit of the variant `tag` names, or why the frame is refused.
fn limit_of(
    what: &'static str,
    limits: &[(&'static str, usize)],
    tag: Tag,
    len: usize,
) -> io::Result<(&'static str, usize)> {
    let Some(&(variant, max)) = limits.get(usize::from(tag)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} frame names variant {tag}, which does not exist"),
        ));
    };
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} frame of {len} bytes for a {variant} exceeds its limit of {max}"),
        ));
    }
    Ok((variant, max))
}

async fn read_frame<T, R>(
    io: &mut R,
    what: &'static str,
    limits: &[(&'static str, usize)],
    budgets: &Budgets,
) -> io::Result<T>
where
    T: Serialize + serde::de::DeserializeOwned,
    R: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("empty {what} frame"),
        ));
    }
    let mut tag = [0u8; 1];
    io.read_exact(&mut tag).await?;
    let (_, max) = limit_of(what, limits, tag[0], len)?;
    let budget = if len <= SMALL_FRAME_BYTES {
        &budgets.small
    } else {
        &budgets.large
    };
    // Within the limit, which is at most the budget: the whole length can always be granted.
    let permits = u32::try_from(len).unwrap_or(u32::MAX);
    let _permit = budget
        .acquire_many(permits)
        .await
        .map_err(|_| io::Error::other("the node is stopping"))?;
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    buf.push(tag[0]);
    let rest = u64::try_from(len - 1).unwrap_or(u64::MAX);
    let mut body = io.take(rest);
    let read = body.read_to_end(&mut buf);
    let got = if len <= SMALL_FRAME_BYTES {
        tokio::time::timeout(SMALL_FRAME_READ_TIMEOUT, read)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{what} frame of {len} bytes not received within {} s",
                        SMALL_FRAME_READ_TIMEOUT.as_secs()
                    ),
                )
            })??
    } else {
        read.await?
    };
    if u64::try_from(got).unwrap_or(u64::MAX) != rest {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{what} frame ended after {} of {len} bytes", got + 1),
        ));
    }
    codec::decode(what, &buf, max).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T, W>(
    io: &mut W,
    what: &'static str,
    value: &T,
    limits: &[(&'static str, usize)],
) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    let largest = limits.iter().map(|(_, m)| *m).max().unwrap_or(0);
    let bytes = codec::encode(what, value, largest)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tag = bytes.first().copied().unwrap_or(Tag::MAX);
    limit_of(what, limits, tag, bytes.len())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
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
        read_frame(io, "rpc request", &REQUEST_LIMITS, &self.budgets).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, "rpc response", &RESPONSE_LIMITS, &self.budgets).await
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
        write_frame(io, "rpc request", &req, &REQUEST_LIMITS).await
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
        write_frame(io, "rpc response", &res, &RESPONSE_LIMITS).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    use pixmarket_protocol::messages::{JobEventKind, ValidationErrorWire};
    use pixmarket_protocol::{MeteredUnits, MicroTokens, PriceSchedule, QuoteId, SecretKey};

    fn key() -> SecretKey {
        SecretKey::from_seed(&[3; 32])
    }

    fn ack() -> Signed<ReceiptAck> {
        let ack = ReceiptAck {
            job_id: JobId([1; 16]),
            receipt_hash: Hash::of(b"receipt"),
            acked_at_ms: 1,
        };
        Signed::sign(&key(), &ack).unwrap()
    }

    /// One of each request variant that is quick to build, each with the name its limit has.
    fn requests() -> Vec<(&'static str, Request)> {
        let quote = QuoteRequest {
            quote_id: QuoteId([2; 16]),
            provider: key().public(),
            prompt: "a heron".into(),
            width: 64,
            height: 64,
            steps: 2,
            images: 1,
            strength_permille: None,
            exact: false,
            lora: None,
        };
        vec![
            (
                "quote",
                Request::Quote(Signed::sign(&key(), &quote).unwrap()),
            ),
            (
                "event",
                Request::Event(JobEvent {
                    job_id: JobId([1; 16]),
                    kind: JobEventKind::Progress {
                        step: 1,
                        of: 2,
                        preview: None,
                    },
                }),
            ),
            ("cancel", Request::Cancel(JobId([1; 16]))),
            ("status", Request::Status(JobId([1; 16]))),
            ("fetch", Request::Fetch(ack())),
            ("chain", Request::Chain { after: None }),
        ]
    }

    fn responses() -> Vec<(&'static str, Response)> {
        let quote = Quote {
            quote_id: QuoteId([2; 16]),
            requester: key().public(),
            units: MeteredUnits {
                width: 64,
                height: 64,
                steps: 2,
                prompt_tokens: 3,
                images: 1,
            },
            schedule: PriceSchedule::default(),
            cost: MicroTokens(5),
            queue_position: 0,
            eta_ms: 0,
            valid_until_ms: 1,
            step_caching: pixmarket_protocol::StepCaching::Exact,
        };
        let refusal = ReceiptRefusal {
            job_id: JobId([1; 16]),
            receipt_hash: Hash::of(b"receipt"),
            reason: "no".into(),
            refused_at_ms: 1,
        };
        vec![
            (
                "quote",
                Response::Quote(Signed::sign(&key(), &quote).unwrap()),
            ),
            (
                "accepted",
                Response::Accepted {
                    queue_position: 0,
                    eta_ms: 0,
                },
            ),
            ("event ack", Response::EventAck(Some(ack()))),
            (
                "receipt refusal",
                Response::ReceiptRefused(Signed::sign(&key(), &refusal).unwrap()),
            ),
            ("status", Response::Status(JobStatus::Unknown)),
            (
                "images",
                Response::Images {
                    job_id: JobId([1; 16]),
                    images: vec![vec![0; 10]],
                },
            ),
            ("chain", Response::Chain(Vec::new())),
            ("ok", Response::Ok),
            ("refusal", Response::Refused(FailReason::Expired)),
        ]
    }

    #[test]
    fn each_variant_is_checked_against_its_own_limit() {
        for (name, r) in requests() {
            let bytes = codec::encode("test", &r, MAX_REQUEST_BYTES).unwrap();
            let tag = usize::from(bytes[0]);
            assert_eq!(REQUEST_LIMITS[tag].0, name, "{r:?}");
            assert_eq!(r.kind(), name);
        }
        for (name, r) in responses() {
            let bytes = codec::encode("test", &r, MAX_RESPONSE_BYTES).unwrap();
            let tag = usize::from(bytes[0]);
            assert_eq!(RESPONSE_LIMITS[tag].0, name, "{r:?}");
        }
        // The one request not built above sits in the one slot left.
        assert_eq!(REQUEST_LIMITS[1], ("job", MAX_REQUEST_BYTES));
        assert_eq!(REQUEST_LIMITS.len(), requests().len() + 1);
        assert_eq!(RESPONSE_LIMITS.len(), responses().len());
        // Every limit fits the budget it is read from, so a frame can always be granted.
        for (_, max) in REQUEST_LIMITS.iter().chain(RESPONSE_LIMITS.iter()) {
            assert!(*max <= LARGE_FRAME_BUDGET);
        }
    }

    fn frame(len: u32, body: &[u8]) -> Vec<u8> {
        let mut f = len.to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[tokio::test]
    async fn a_small_message_cannot_claim_a_large_frame() {
        let mut codec = RpcCodec::default();
        // A cancel (tag 3) that claims a megabyte: refused on its first byte, naming the limit.
        let claim = frame(1 << 20, &[3]);
        let err = codec
            .read_request(&RPC_PROTOCOL, &mut claim.as_slice())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .contains("for a cancel exceeds its limit of 1024"),
            "{err}"
        );
        // A variant that does not exist.
        let junk = frame(10, &[200]);
        let err = codec
            .read_request(&RPC_PROTOCOL, &mut junk.as_slice())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        // An empty frame.
        let empty = frame(0, &[]);
        assert!(
            codec
                .read_request(&RPC_PROTOCOL, &mut empty.as_slice())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_large_claim_buffers_only_what_arrives_and_returns_its_budget() {
        let mut codec = RpcCodec::default();
        // A job (tag 1) that claims the largest job frame and sends ten bytes, then ends.
        let claim = u32::try_from(MAX_REQUEST_BYTES).unwrap();
        let short = frame(claim, &[1; 11]);
        let err = codec
            .read_request(&RPC_PROTOCOL, &mut short.as_slice())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("ended after 11 of"), "{err}");
        // The budget it held is back: the whole of it can be granted again.
        let all = u32::try_from(LARGE_FRAME_BUDGET).unwrap();
        let permit = codec.budgets.large.try_acquire_many(all).unwrap();
        drop(permit);
        let small = u32::try_from(SMALL_FRAME_BUDGET).unwrap();
        assert!(codec.budgets.small.try_acquire_many(small).is_ok());
    }

    #[tokio::test]
    async fn a_frame_over_its_limit_is_never_written() {
        let mut codec = RpcCodec::default();
        let long = Response::Refused(FailReason::Invalid(ValidationErrorWire {
            field: "x".into(),
            got: "y".repeat(20 * 1024),
            allowed: String::new(),
        }));
        let mut out = Vec::new();
        let err = codec
            .write_response(&RPC_PROTOCOL, &mut out, long)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(out.is_empty(), "nothing written");
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut codec = RpcCodec::default();
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
        let mut huge = u32::try_from(MAX_RESPONSE_BYTES + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        huge.push(5); // images, the largest response
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
