"""Text encoder stage: umT5-XXL encoder and tokenizer, prompts -> per-prompt embeddings."""
