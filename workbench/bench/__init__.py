"""Benchmarks: commands that measure ours against a peer in the same run and print ratios."""
