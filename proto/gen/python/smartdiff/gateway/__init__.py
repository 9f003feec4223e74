"""Generated from proto/ by proto/generate.py: smartdiff.gateway. Do not edit."""
