"""Train an adapter on a task with the papers' recipe: `python train.py --help`.

The same as `minipara train` (minipara/commands/train.py).
"""

from minipara.cli import run
from minipara.commands.train import main

if __name__ == "__main__":
    run(main)
