"""Generation speed and memory of every method against the bare model: `python bench.py --help`.

The same as `minipara bench` (minipara/commands/bench.py).
"""

from minipara.cli import run
from minipara.commands.bench import main

if __name__ == "__main__":
    run(main)
