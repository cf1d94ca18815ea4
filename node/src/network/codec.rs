//! The node-to-node RPC protocol `/pixmarket/rpc/3`: one request, one response, each a frame of
//! a 4-byte big-endian length and the canonical postcard bytes of a [`Request`] or [`Response`].
//! Each message variant has its own limit, checked against the length prefix and the first
//! body byte (the variant) before anything else is buffered; a frame's buffer grows with the
//! bytes that arrive, within byte budgets per connection and node-wide
//! ([`super::inbound_budget`]); a stream carries one frame each way and then ends.
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

use super::inbound_budget::{self, ConnectionBudget, NodeBudget};

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
/// Frames up to this size are small: every request but a job with input images, every
/// response but the images answering a `Fetch`. Requests are read within the budgets of
/// [`super::inbound_budget`]; responses within [`SMALL_RESPONSE_BUDGET`] and
/// [`LARGE_RESPONSE_BUDGET`].
pub const SMALL_FRAME_BYTES: usize = 64 * KIB;
/// Bytes of small response frames being read at once, over every peer: 256 of the largest.
/// Responses arrive only for requests this node sent, and an answer to anything but a `Fetch`
/// must be a small frame.
pub const SMALL_RESPONSE_BUDGET: usize = 256 * SMALL_FRAME_BYTES;
/// Bytes of large response frames being read at once: one full `Fetch` answer, and room for
/// small image answers beside it. A large frame waits for its whole declared length to be free
/// before any byte is read, so frames never hold parts of the budget against each other.
pub const LARGE_RESPONSE_BUDGET: usize = MAX_RESPONSE_BYTES + 8 * 1024 * KIB;
/// A small frame's body, and the end of stream after any frame, must arrive within this of its
/// length prefix (64 KiB take well under a second on any link that can use the market): a peer
/// that announces a frame and then stalls holds its share of a budget this long at most. Large
/// frames are bounded by the RPC timeout.
pub const SMALL_FRAME_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How much of a frame is read at a time: its buffer grows with the bytes that arrive (never
/// past the declared length), never with what the length prefix claims.
const READ_CHUNK: usize = 64 * KIB;

/// The byte budgets inbound responses are read under, shared by every connection of a node.
#[derive(Debug)]
struct ResponseBudgets {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Default for ResponseBudgets {
    fn default() -> Self {
        Self {
            small: Arc::new(Semaphore::new(SMALL_RESPONSE_BUDGET)),
            large: Arc::new(Semaphore::new(LARGE_RESPONSE_BUDGET)),
        }
    }
}

/// Length-prefixed postcard frames with a size limit per message variant, read within the
/// node's and the connection's byte budgets.
///
/// One codec is built per node. libp2p's request-response clones the behaviour's codec once
/// for each connection and that copy once for each stream (a stream's request and its
/// response go through one copy). So a clone of the node's codec starts a connection's
/// budget, and a clone of a connection's copy shares it; the node's budgets are shared by all.
/// `behaviour_clones_share_the_node_and_split_connections` below, and the hostile-peer tests
/// over real libp2p, hold this to what libp2p does.
#[derive(Debug, Default)]
pub struct RpcCodec {
    node: Arc<NodeBudget>,
    responses: Arc<ResponseBudgets>,
    /// `None` in the node's own codec; a connection's copies share one.
    connection: Option<Arc<ConnectionBudget>>,
    /// Whether the request this copy wrote was a `Fetch` (the only request with a large answer);
    /// `None` before it wrote one.
    asked_fetch: Option<bool>,
}

impl Clone for RpcCodec {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            responses: self.responses.clone(),
            connection: Some(self.connection.clone().unwrap_or_default()),
            asked_fetch: None,
        }
    }
}

impl RpcCodec {
    fn connection(&mut self) -> Arc<ConnectionBudget> {
        self.connection.get_or_insert_with(Arc::default).clone()
    }
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

/// A frame's declared length and variant, checked against the variant's limit; nothing of the
/// body is read.
async fn read_header<R>(
    io: &mut R,
    what: &'static str,
    limits: &[(&'static str, usize)],
) -> io::Result<(usize, Tag, usize)>
where
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
    Ok((len, tag[0], max))
}

/// The rest of a frame of `len` bytes whose first is `tag`, then the sender's end of stream
/// (one request or response per stream; bytes after the frame are refused). The buffer grows
/// with what arrives, at most doubling, and never past `len`.
async fn read_body<R>(io: &mut R, what: &'static str, len: usize, tag: Tag) -> io::Result<Vec<u8>>
where
    R: AsyncRead + Unpin + Send,
{
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    buf.push(tag);
    let body = async {
        while buf.len() < len {
            let filled = buf.len();
            let want = (len - filled).min(READ_CHUNK);
            if buf.capacity() < filled + want {
                let target = (buf.capacity() * 2).clamp(filled + want, len);
                buf.reserve_exact(target - filled);
            }
            buf.resize(filled + want, 0);
            let n = io.read(&mut buf[filled..]).await?;
            buf.truncate(filled + n);
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{what} frame ended after {filled} of {len} bytes"),
                ));
            }
        }
        Ok(())
    };
    if len <= SMALL_FRAME_BYTES {
        tokio::time::timeout(SMALL_FRAME_READ_TIMEOUT, body)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{what} frame of {len} bytes not received within {} s",
                        SMALL_FRAME_READ_TIMEOUT.as_secs()
                    ),
                )
            })??;
    } else {
        body.await?;
    }
    let mut after = [0u8; 1];
    let end = tokio::time::timeout(SMALL_FRAME_READ_TIMEOUT, io.read(&mut after))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{what} stream not closed within {} s of its frame",
                    SMALL_FRAME_READ_TIMEOUT.as_secs()
                ),
            )
        })??;
    if end != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} stream carries bytes after its frame of {len} bytes"),
        ));
    }
    Ok(buf)
}

async fn read_request<R>(
    io: &mut R,
    connection: &ConnectionBudget,
    node: &NodeBudget,
) -> io::Result<Request>
where
    R: AsyncRead + Unpin + Send,
{
    let what = "rpc request";
    let (len, tag, max) = read_header(io, what, &REQUEST_LIMITS).await?;
    let _permit = inbound_budget::admit(what, len, connection, node).await?;
    let buf = read_body(io, what, len, tag).await?;
    codec::decode(what, &buf, max).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn read_response<R>(
    io: &mut R,
    budgets: &ResponseBudgets,
    asked_fetch: Option<bool>,
) -> io::Result<Response>
where
    R: AsyncRead + Unpin + Send,
{
    let what = "rpc response";
    let (len, tag, max) = read_header(io, what, &RESPONSE_LIMITS).await?;
    if asked_fetch == Some(false) && len > SMALL_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what} frame of {len} bytes exceeds {SMALL_FRAME_BYTES}, the most an answer \
                 to anything but a fetch may be"
            ),
        ));
    }
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
    let buf = read_body(io, what, len, tag).await?;
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
        let connection = self.connection();
        read_request(io, &connection, &self.node).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io, &self.responses, self.asked_fetch).await
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
        self.asked_fetch = Some(matches!(req, Request::Fetch(_)));
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
        for (_, max) in REQUEST_LIMITS {
            assert!(max <= inbound_budget::LARGE_REQUEST_BUDGET);
        }
        for (_, max) in RESPONSE_LIMITS {
            assert!(max <= LARGE_RESPONSE_BUDGET);
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
        let connection = codec.connection();
        let again = inbound_budget::admit("t", MAX_REQUEST_BYTES, &connection, &codec.node).await;
        assert!(again.is_ok());
    }

    /// Yields `bytes`, then never anything more: a peer that stalls with its stream open.
    struct Stall {
        bytes: Vec<u8>,
        at: usize,
    }

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let at = self.at;
            let n = out.len().min(self.bytes.len() - at);
            if n == 0 {
                return std::task::Poll::Pending;
            }
            out[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn behaviour_clones_share_the_node_and_split_connections() {
        // As request-response clones: the node's codec once per connection, each connection's
        // copy once per stream.
        let node = RpcCodec::default();
        let mut a = node.clone();
        let mut a_stream = a.clone();
        let mut b = node.clone();
        assert!(Arc::ptr_eq(&a.connection(), &a_stream.connection()));
        assert!(!Arc::ptr_eq(&a.connection(), &b.connection()));
        assert!(Arc::ptr_eq(&a.node, &b.node) && Arc::ptr_eq(&a_stream.node, &node.node));
        assert!(Arc::ptr_eq(&a.responses, &b.responses));
    }

    #[tokio::test]
    async fn a_connection_stalling_at_its_budget_does_not_block_another() {
        let node = RpcCodec::default();
        let hog = node.clone();
        // The hog declares events of the largest small size and stalls one byte short, on
        // as many streams as its connection's share holds.
        let stalled = frame(u32::try_from(MAX_EVENT_BYTES).unwrap(), &[2; 100]);
        let mut held = Vec::new();
        for _ in 0..inbound_budget::CONNECTION_SMALL_BYTES / MAX_EVENT_BYTES {
            let mut stream = hog.clone();
            let mut io = Stall {
                bytes: stalled.clone(),
                at: 0,
            };
            held.push(tokio::spawn(async move {
                stream.read_request(&RPC_PROTOCOL, &mut io).await
            }));
        }
        // Wait until every one of them holds its share.
        let mut probe = hog.clone();
        let refusal = loop {
            let small = frame(1, &[3]);
            match probe
                .read_request(&RPC_PROTOCOL, &mut small.as_slice())
                .await
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break e,
                _ => tokio::task::yield_now().await,
            }
        };
        assert!(
            refusal.to_string().contains("this connection already has"),
            "{refusal}"
        );
        // Another peer's connection is served: a cancel, read whole.
        let mut honest = node.clone();
        let req = Request::Cancel(JobId([7; 16]));
        let mut buf = Vec::new();
        honest
            .write_request(&RPC_PROTOCOL, &mut buf, req.clone())
            .await
            .unwrap();
        let back = honest
            .read_request(&RPC_PROTOCOL, &mut buf.as_slice())
            .await
            .unwrap();
        assert_eq!(back, req);
        // When the hog's streams end, its share is back.
        for h in held {
            h.abort();
            let _ = h.await;
        }
        let mut again = hog.clone();
        let mut small = Vec::new();
        again
            .write_request(&RPC_PROTOCOL, &mut small, req.clone())
            .await
            .unwrap();
        assert!(
            again
                .read_request(&RPC_PROTOCOL, &mut small.as_slice())
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn bytes_after_a_frame_and_large_answers_to_small_questions_are_refused() {
        let mut codec = RpcCodec::default().clone();
        let mut buf = Vec::new();
        let req = Request::Cancel(JobId([7; 16]));
        codec
            .write_request(&RPC_PROTOCOL, &mut buf, req)
            .await
            .unwrap();
        buf.extend_from_slice(&[0; 1000]);
        let err = codec
            .read_request(&RPC_PROTOCOL, &mut buf.as_slice())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bytes after its frame"), "{err}");
        // This copy asked for a cancel; an `Images` answer of a megabyte is refused at its
        // header, before anything is buffered.
        let images = frame(1 << 20, &[5]);
        let err = codec
            .read_response(&RPC_PROTOCOL, &mut images.as_slice())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("anything but a fetch"), "{err}");
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
