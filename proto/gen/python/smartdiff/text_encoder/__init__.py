"""Generated from proto/ by proto/generate.py: smartdiff.text_encoder. Do not edit."""
