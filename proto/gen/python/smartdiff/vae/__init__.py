"""Generated from proto/ by proto/generate.py: smartdiff.vae. Do not edit."""
