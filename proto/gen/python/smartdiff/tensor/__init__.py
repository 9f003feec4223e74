"""Generated from proto/ by proto/generate.py: smartdiff.tensor. Do not edit."""
