//! Qwen-Image in candle (issues 4 and 5): config, weight loading from the diffusers layout,
//! text encoder, MMDiT transformer, VAE, flow-match scheduler, pipelines and the tiny model.
