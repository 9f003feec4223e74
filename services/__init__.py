"""The four stage services of Smart-Diffusion: text_encoder, denoiser, vae and gateway."""
