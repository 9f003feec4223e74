"""Generated from proto/ by proto/generate.py: smartdiff.denoiser. Do not edit."""
