"""Gateway stage: the public API, request validation and orchestration, and the `smartdiff` CLI."""
