"""Code every service uses: model configs, checkpoint reading, request parameters, errors."""
