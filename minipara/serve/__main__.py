"""`python -m minipara.serve`: the OpenAI-compatible server."""

from minipara.cli import run
from minipara.serve.app import main

run(main)
