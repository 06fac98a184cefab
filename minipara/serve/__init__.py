"""The OpenAI-compatible server: HTTP app, continuous-batching engine, adapter pool.
`python -m minipara.serve` starts it."""
