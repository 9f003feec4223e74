"""Generated from proto/ by proto/generate.py: smartdiff.text_encoder.v1. Do not edit."""
