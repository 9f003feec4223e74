"""Code every service uses: model configs, checkpoint reading, request parameters, errors, gRPC plumbing."""

import os

# The VAE stage runs ffmpeg as a subprocess. gRPC's fork handlers exist for forking Python workers, which we
# never do, and they log a warning at every fork while calls are in flight; this must be set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
