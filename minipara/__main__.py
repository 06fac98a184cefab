"""`minipara COMMAND ...` (and `python -m minipara COMMAND ...`): one entry point for every program.

minipara generate "The capital of France is the city of"     # CPU-friendly
minipara train --method para --task copa                     # GPU for the papers' recipe
minipara bench --shape llama-2-7b --device cuda              # GPU
minipara serve --adapters adapters/                          # OpenAI-compatible server
minipara results --task sst2 --table-only                    # result tables
minipara loadgen --shape llama-2-7b --device cuda            # load on the server
minipara weights [NAME]                                      # convert a shipped model, print its folder
"""

import importlib
import sys

from minipara.cli import run

COMMANDS = {
    "generate": "minipara.commands.generate",
    "train": "minipara.commands.train",
    "bench": "minipara.commands.bench",
    "serve": "minipara.serve.app",
    "results": "minipara.train.results",
    "loadgen": "minipara.bench.loadgen",
    "weights": "minipara.io.weights",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    sys.argv = [f"minipara {name}", *rest]
    return importlib.import_module(COMMANDS[name]).main(rest)


def console():
    run(main)


if __name__ == "__main__":
    console()
