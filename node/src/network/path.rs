//! The path a connection takes (direct, hole-punched, or through a relay), and whether a job's
//! result fits through a relayed one.

use pixmarket_protocol::messages::FailReason;

use super::Request;

/// How an inbound request reached this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A direct connection (dialled either way, or made by a hole punch).
    Direct,
    /// A relayed circuit; `circuit_bytes` is what the relay lets it carry (`None`: no limit told).
    Relayed { circuit_bytes: Option<u64> },
}

/// How this node reached a peer, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    HolePunched,
    Relayed,
    NotConnected,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::HolePunched => "hole-punched",
            PathKind::Relayed => "relayed",
            PathKind::NotConnected => "not connected",
        }
    }
}

/// Bytes a PNG of `width`×`height` RGB may take at most besides its pixels: a filter byte per
/// row, deflate's stored-block headers (5 bytes per 64 KiB) and the chunks around them.
const PNG_OVERHEAD: u64 = 64 * 1024;
/// The job's events, receipt and framing beside the images.
const RESULT_OVERHEAD: u64 = 64 * 1024;

/// The most bytes a result of `images` images of `width`×`height` can take on the wire
/// (incompressible pixels stored as they are).
pub fn result_bytes(width: u32, height: u32, images: u32) -> u64 {
    let pixels = u64::from(width) * u64::from(height);
    // Saturating: a hostile width × height must not overflow into a small figure.
    let one = pixels
        .saturating_mul(3)
        .saturating_add(u64::from(height))
        .saturating_add(PNG_OVERHEAD);
    one.saturating_mul(u64::from(images))
        .saturating_add(RESULT_OVERHEAD)
}

/// The refusal a provider answers a job submission with when its result could not cross the
/// relayed circuit it came over; `None` when it can (or the request is not a submission).
pub fn relay_refusal(request: &Request, via: Via) -> Option<FailReason> {
    let Via::Relayed {
        circuit_bytes: Some(limit),
    } = via
    else {
        return None;
    };
    // The submission, not the quote: a quote may cross the relay while the hole punch is still
    // under way, and the submission that follows then goes direct. Either way nothing has run.
    let needed = match request {
        // A request that does not verify is left to the provider, which refuses it.
        Request::Job(j) => {
            let p = j.verify().ok()?.params;
            result_bytes(p.width, p.height, p.images)
        }
        _ => return None,
    };
    (needed > limit).then_some(FailReason::RelayLimit {
        circuit_bytes: limit,
        needed_bytes: needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordination_circuit_carries_no_image_but_a_results_relay_does() {
        let small = super::super::behaviour::COORDINATION_CIRCUIT_BYTES;
        assert!(result_bytes(64, 64, 1) > small);
        assert!(result_bytes(1024, 1024, 1) < 8 * 1024 * 1024);
        assert_eq!(result_bytes(u32::MAX, u32::MAX, u32::MAX), u64::MAX);
    }
}
