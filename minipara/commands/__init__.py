"""The command-line programs: `minipara generate|train|bench|serve|results|loadgen|weights`
(and the root scripts train.py, generate.py, bench.py, which call the same mains)."""
