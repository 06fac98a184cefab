"""Decoding through the cache: greedy, sampling and beam search, and the compiled step."""
