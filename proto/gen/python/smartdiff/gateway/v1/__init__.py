"""Generated from proto/ by proto/generate.py: smartdiff.gateway.v1. Do not edit."""
