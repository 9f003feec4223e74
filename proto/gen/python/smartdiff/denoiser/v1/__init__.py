"""Generated from proto/ by proto/generate.py: smartdiff.denoiser.v1. Do not edit."""
