"""Generated from proto/ by proto/generate.py: smartdiff.tensor.v1. Do not edit."""
