"""Generated from proto/ by proto/generate.py: smartdiff.vae.v1. Do not edit."""
