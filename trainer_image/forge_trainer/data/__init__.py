"""Data: sources, tokenisation, packing, the token-exact mixer and per-rank batches."""
