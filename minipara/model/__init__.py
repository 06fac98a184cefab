"""The forward pass: model args, the transformer, its KV cache and the LayerState contract
through which adapters act on it. Imports nothing above it."""
