"""Serving: a multi-adapter engine over the kernel op, and an OpenAI-compatible HTTP server."""
