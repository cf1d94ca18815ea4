//! What the node's integration tests share: a generator that takes a set time per step, and
//! a small job.

#![allow(dead_code, unreachable_pub)]

use std::ops::ControlFlow;
use std::time::Duration;

use pixmarket_node::generator::{GenError, Generator, GeneratorInfo};
use pixmarket_protocol::{JobParams, Mode};

/// A generator that sleeps `step` per step and returns a few bytes per image.
pub struct SlowGenerator {
    pub step: Duration,
}

impl Generator for SlowGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            model_id: "slow-test".into(),
            precision: "f32".into(),
            device_name: "test".into(),
            device_memory_mib: 0,
            supports_image_to_image: false,
            supports_inpaint: false,
            step_caching: pixmarket_protocol::StepCaching::Exact,
            serves_exact: true,
        }
    }

    fn count_prompt_tokens(&self, prompt: &str) -> Result<u32, GenError> {
        u32::try_from(prompt.split_whitespace().count())
            .map_err(|e| GenError::Failed(e.to_string()))
    }

    fn generate(
        &self,
        jobs: &[JobParams],
        progress: &mut dyn FnMut(u32, u32) -> ControlFlow<()>,
    ) -> Result<Vec<Vec<Vec<u8>>>, GenError> {
        let steps = jobs.first().map_or(0, |j| j.steps);
        for step in 1..=steps {
            std::thread::sleep(self.step);
            if progress(step, steps).is_break() {
                return Err(GenError::Cancelled);
            }
        }
        Ok(jobs
            .iter()
            .map(|j| {
                (0..j.images)
                    .map(|i| format!("{} #{i}", j.prompt).into_bytes())
                    .collect()
            })
            .collect())
    }
}

/// A 256² text-to-image job of `steps` steps, one image, no true CFG.
pub fn job_with_steps(prompt: &str, steps: u32) -> JobParams {
    JobParams {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: 256,
        height: 256,
        steps,
        true_cfg_scale: 1.0,
        seed: 7,
        images: 1,
        mode: Mode::TextToImage,
        exact: false,
        lora: None,
        latents: None,
    }
}
