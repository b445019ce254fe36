"""The OpenAI-compatible HTTP server (`sparsed-engine serve`)."""
