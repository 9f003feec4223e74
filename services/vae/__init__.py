"""VAE stage: Wan2.1 causal video VAE, latents -> uint8 frames -> mp4."""
