//! What a requester lets through of the previews a provider sends: at most the number its
//! signed request asked for, each within the protocol's bounds for the job's size
//! ([`Preview::validate`]): a provider cannot push the full image, or a stream of pictures,
//! through the free channel.

use pixmarket_protocol::{JobRequest, Preview};

/// The previews one job may still pass on.
#[derive(Debug, Clone, Copy)]
pub(super) struct PreviewGate {
    left: u8,
    width: u32,
    height: u32,
}

impl PreviewGate {
    pub(super) fn for_request(request: &JobRequest) -> Self {
        Self {
            left: request
                .previews
                .min(pixmarket_protocol::preview::MAX_PREVIEWS),
            width: request.params.width,
            height: request.params.height,
        }
    }

    /// The preview if it may be passed on; a refused one is logged and dropped (the step's
    /// progress still counts).
    pub(super) fn admit(&mut self, preview: Option<Preview>) -> Option<Preview> {
        let preview = preview?;
        if self.left == 0 {
            tracing::debug!("preview dropped: more than the request asked for");
            return None;
        }
        if let Err(e) = preview.validate(self.width, self.height) {
            tracing::debug!(error = %e, "preview dropped");
            return None;
        }
        self.left -= 1;
        Some(preview)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmarket_protocol::{JobId, JobParams, MicroTokens, Mode, SecretKey};

    fn png(side: u32) -> Vec<u8> {
        let rgb = vec![7u8; 3 * side as usize * side as usize];
        pixmarket_engine::image_io::encode_png(&rgb, side, side, &[]).unwrap()
    }

    fn gate(previews: u8) -> PreviewGate {
        PreviewGate::for_request(&JobRequest {
            job_id: JobId([1; 16]),
            provider: SecretKey::from_seed(&[2; 32]).public(),
            params: JobParams {
                prompt: "a fox".into(),
                negative_prompt: String::new(),
                width: 64,
                height: 64,
                steps: 8,
                true_cfg_scale: 1.0,
                seed: 0,
                images: 1,
                mode: Mode::TextToImage,
                exact: false,
                latents: None,
                lora: None,
            },
            max_cost: MicroTokens(1),
            created_at_ms: 0,
            expires_at_ms: 1,
            quote_id: None,
            previews,
        })
    }

    fn preview(side: u32) -> Preview {
        Preview {
            width: side,
            height: side,
            png: png(side),
        }
    }

    #[test]
    fn a_provider_gets_through_only_what_was_asked_and_never_the_image() {
        let mut g = gate(2);
        assert_eq!(g.admit(None), None);
        // The full 64×64 image passed off as a preview.
        assert_eq!(g.admit(Some(preview(64))), None);
        // A 16×16 preview whose header claims another size.
        let lying = Preview {
            png: png(32),
            ..preview(16)
        };
        assert_eq!(g.admit(Some(lying)), None);
        assert!(g.admit(Some(preview(16))).is_some());
        assert!(g.admit(Some(preview(16))).is_some());
        // A third, when two were asked for.
        assert_eq!(g.admit(Some(preview(16))), None);
        // None asked: none passed.
        assert_eq!(gate(0).admit(Some(preview(16))), None);
    }
}
