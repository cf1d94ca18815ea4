//! What inbound RPC requests may cost this node's memory while their frames are read, node-wide
//! and per connection (so per peer: at most [`MAX_PER_PEER`] connections each), and the worst
//! case that follows.
//!
//! A frame's bytes sit in two places while it is read: in yamux's receive buffer until the
//! codec reads them (yamux lets a peer send a stream's whole receive window, [`YAMUX_WINDOW`],
//! before anyone reads), and in the codec's frame buffer. The codec therefore reads every
//! admitted frame at once, so yamux holds little of it, and refuses at once (the stream is
//! reset and its yamux buffer freed) a frame that does not fit its connection's budget. Only
//! large frames wait, for the node-wide large budget, and only [`CONNECTION_LARGE_FRAMES`] of
//! them per connection; each waiting one may have a yamux window buffered.
//!
//! Honest frames are read within milliseconds of arriving, so these budgets hold only the
//! frames of one moment: an honest peer meets them only if it sends far more at once than any
//! node does. A peer that declares long frames and stalls holds its own connection's share, at
//! most [`super::codec::SMALL_FRAME_READ_TIMEOUT`] for small frames and the RPC timeout for
//! large ones, and never another connection's.

use std::io;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::behaviour::{DEFAULT_MAX_CONNECTIONS, MAX_PER_PEER};
use super::codec::{MAX_REQUEST_BYTES, SMALL_FRAME_BYTES};

const KIB: usize = 1024;

/// The receive window yamux gives each stream before the application reads (yamux 0.14's
/// `DEFAULT_CREDIT`, fixed by the yamux specification; libp2p offers no way to lower it): the
/// most a peer can make this node buffer on one stream the codec is not reading.
pub const YAMUX_WINDOW: usize = 256 * KIB;

/// Bytes of small request frames (their declared lengths) one connection may have being read
/// at once: eight of the largest small frame (a progress event with its preview), or dozens of
/// quotes and text-to-image jobs. Honest frames overlap only when they arrive together; a
/// provider's events for a batch and a requester's burst of submissions fit many times over.
/// Past it a frame is refused rather than made to wait, because a waiting stream could hold a
/// yamux window.
pub const CONNECTION_SMALL_BYTES: usize = 8 * SMALL_FRAME_BYTES;

/// Large request frames (a job with input images over [`SMALL_FRAME_BYTES`]) one connection
/// may have being read or waiting for [`LARGE_REQUEST_BUDGET`] at once: two img2img
/// submissions from one requester at a time; a third is refused until one is read.
pub const CONNECTION_LARGE_FRAMES: usize = 2;

/// Bytes of small request frames being read at once over every connection: the default
/// connection limit times each connection's share, so at the default no connection can take
/// another's share. A node configured for more connections refuses small frames past this
/// total rather than buffer more.
pub const SMALL_REQUEST_BUDGET: usize = DEFAULT_MAX_CONNECTIONS as usize * CONNECTION_SMALL_BYTES;

/// Bytes of large request frames being read at once, node-wide: one job with both input images
/// and its latents at the largest size. A large frame waits for its whole declared length to
/// be free before any byte is read, so frames never hold parts of the budget against each
/// other; a peer that declares large frames and sends slowly delays only other large frames
/// (img2img inputs), by at most the RPC timeout, never quotes, text-to-image jobs or events.
pub const LARGE_REQUEST_BUDGET: usize = MAX_REQUEST_BYTES;

/// The most inbound request bytes hostile peers can make a node with the default connection
/// limit buffer at once, however many streams they open and whatever lengths they declare:
///
/// ```text
///   DEFAULT_MAX_CONNECTIONS × CONNECTION_SMALL_BYTES              small frames being read
/// + DEFAULT_MAX_CONNECTIONS × CONNECTION_LARGE_FRAMES × YAMUX_WINDOW  large frames waiting
/// + LARGE_REQUEST_BUDGET                                          the large frame being read
/// = 32 × 512 KiB + 32 × 2 × 256 KiB + 36.0 MiB ≈ 68 MiB
/// ```
///
/// A refused stream is reset at once, which frees its yamux buffer; a stream whose request has
/// been read holds nothing more, since the codec reads on to the sender's end of stream (bytes
/// after the frame are refused). Not counted: streams in the moment between being opened and
/// the codec's first read (each at most a window, for microseconds), and responses, which
/// arrive only for requests this node chose to send (and only a `Fetch` answer may be large).
/// `pixmarket-hostile-bench memory` measures what this costs in resident memory
/// (docs/benchmarks.md).
pub const WORST_CASE_INBOUND_BYTES: usize = DEFAULT_MAX_CONNECTIONS as usize
    * (CONNECTION_SMALL_BYTES + CONNECTION_LARGE_FRAMES * YAMUX_WINDOW)
    + LARGE_REQUEST_BUDGET;

/// The per-peer bound that follows: [`MAX_PER_PEER`] connections, each with its own share.
pub const PEER_SMALL_BYTES: usize = MAX_PER_PEER as usize * CONNECTION_SMALL_BYTES;

/// The budgets every connection of a node shares.
#[derive(Debug)]
pub struct NodeBudget {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Default for NodeBudget {
    fn default() -> Self {
        Self {
            small: Arc::new(Semaphore::new(SMALL_REQUEST_BUDGET)),
            large: Arc::new(Semaphore::new(LARGE_REQUEST_BUDGET)),
        }
    }
}

/// One connection's share.
#[derive(Debug)]
pub struct ConnectionBudget {
    small: Arc<Semaphore>,
    large_frames: Arc<Semaphore>,
}

impl Default for ConnectionBudget {
    fn default() -> Self {
        Self {
            small: Arc::new(Semaphore::new(CONNECTION_SMALL_BYTES)),
            large_frames: Arc::new(Semaphore::new(CONNECTION_LARGE_FRAMES)),
        }
    }
}

/// What a frame holds while it is read; dropping it returns everything.
#[derive(Debug)]
pub struct FramePermit {
    _parts: Vec<OwnedSemaphorePermit>,
}

fn refused(what: &str, len: usize, whose: &str, limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{what} frame of {len} bytes refused: {whose} already has its {limit} bytes of \
             frames being read"
        ),
    )
}

fn permits(len: usize) -> u32 {
    // Every frame limit is far below u32::MAX; a longer one is refused by the semaphore.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Takes what a request frame of `len` declared bytes needs from `connection` and `node`:
/// a small frame is granted at once or refused; a large one takes one of the connection's
/// large places at once (or is refused), then waits for the node's large budget.
pub async fn admit(
    what: &str,
    len: usize,
    connection: &ConnectionBudget,
    node: &NodeBudget,
) -> io::Result<FramePermit> {
    let stopping = |_| io::Error::other("the node is stopping");
    if len <= SMALL_FRAME_BYTES {
        let mine = match connection
            .small
            .clone()
            .try_acquire_many_owned(permits(len))
        {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                return Err(refused(
                    what,
                    len,
                    "this connection",
                    CONNECTION_SMALL_BYTES,
                ));
            }
            Err(TryAcquireError::Closed) => return Err(io::Error::other("the node is stopping")),
        };
        let shared = match node.small.clone().try_acquire_many_owned(permits(len)) {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                return Err(refused(what, len, "the node", SMALL_REQUEST_BUDGET));
            }
            Err(TryAcquireError::Closed) => return Err(io::Error::other("the node is stopping")),
        };
        return Ok(FramePermit {
            _parts: vec![mine, shared],
        });
    }
    let place = match connection.large_frames.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{what} frame of {len} bytes refused: this connection already has \
                     {CONNECTION_LARGE_FRAMES} large frames being read or waiting"
                ),
            ));
        }
    };
    let bytes = node
        .large
        .clone()
        .acquire_many_owned(permits(len))
        .await
        .map_err(stopping)?;
    Ok(FramePermit {
        _parts: vec![place, bytes],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_case_is_the_sum_of_its_parts_and_under_100_mb() {
        assert_eq!(
            WORST_CASE_INBOUND_BYTES,
            32 * 512 * KIB + 32 * 2 * 256 * KIB + MAX_REQUEST_BYTES
        );
        const { assert!(WORST_CASE_INBOUND_BYTES < 100_000_000) };
        assert_eq!(PEER_SMALL_BYTES, 2 * 1024 * KIB);
    }

    #[tokio::test]
    async fn one_connection_at_its_share_does_not_block_another() {
        let node = NodeBudget::default();
        let (hog, honest) = (ConnectionBudget::default(), ConnectionBudget::default());
        // The hog fills its share with stalled frames of the largest small size.
        let mut held = Vec::new();
        for _ in 0..CONNECTION_SMALL_BYTES / SMALL_FRAME_BYTES {
            held.push(admit("t", SMALL_FRAME_BYTES, &hog, &node).await.unwrap());
        }
        let err = admit("t", 10, &hog, &node).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            err.to_string().contains("this connection already has"),
            "{err}"
        );
        // Another connection is served at once, small and large.
        assert!(admit("t", SMALL_FRAME_BYTES, &honest, &node).await.is_ok());
        let large = admit("t", SMALL_FRAME_BYTES + 1, &honest, &node)
            .await
            .unwrap();
        drop(large);
        // What a stalled hog held comes back when its streams end.
        drop(held);
        assert_eq!(node.small.available_permits(), SMALL_REQUEST_BUDGET);
    }

    #[tokio::test]
    async fn a_third_large_frame_on_one_connection_is_refused_without_waiting() {
        let node = NodeBudget::default();
        let c = ConnectionBudget::default();
        let first = admit("t", MAX_REQUEST_BYTES, &c, &node).await.unwrap();
        // The second waits for the node's large budget, holding the connection's last place.
        let node = Arc::new(node);
        let c = Arc::new(c);
        let second = tokio::spawn({
            let (node, c) = (node.clone(), c.clone());
            async move { admit("t", MAX_REQUEST_BYTES, &c, &node).await.map(drop) }
        });
        while c.large_frames.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let err = admit("t", MAX_REQUEST_BYTES, &c, &node).await.unwrap_err();
        assert!(err.to_string().contains("2 large frames"), "{err}");
        drop(first);
        assert!(second.await.unwrap().is_ok());
    }
}
