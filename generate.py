"""Generate text with a base model, optionally through adapters: `python generate.py --help`.

The same as `minipara generate` (minipara/commands/generate.py).
"""

from minipara.cli import run
from minipara.commands.generate import main

if __name__ == "__main__":
    run(main)
