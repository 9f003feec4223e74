"""Denoiser stage: Wan DiT (one or two experts), flow-matching samplers and the denoising loop."""
