"""Measurements: decode speed and memory (bench.py), HF comparison, server load generator."""
