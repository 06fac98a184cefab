"""Generate text with a base model, optionally through one adapter or a mixed batch of adapters.

    python generate.py "The capital of France is the city of"
    python generate.py --prompts prompts.txt --adapters a.safetensors,b.safetensors --json

A thin shell over the Python API (minipara.load, LanguageModel.generate).
"""

import argparse
import json
import sys

from minipara import cli
from minipara.commands import model_args
from minipara.decode.generation import GenerationConfig
from minipara.errors import UserError
from minipara.train.tasks import read_text_lines

D = GenerationConfig  # the option defaults live there, once


def parse(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE)")
    p.add_argument("--prompts", help="a file with one prompt per line, generated as one left-padded batch")
    model_args.add_model_args(p)
    p.add_argument(
        "--template",
        default="auto",
        help="llama2 | gemma | chatml | llama3 | none | auto (default: the template the adapter was trained with; "
        "without one, the family's chat template when the model ships one in "
        "tokenizer_config.json, else none: plain continuation for base models)",
    )
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
    p.add_argument("--beams", type=int, default=D.beams)
    p.add_argument("--length-penalty", type=cli.finite, default=D.length_penalty)
    p.add_argument("--temperature", type=cli.finite, default=D.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=D.top_k)
    p.add_argument("--top-p", type=cli.finite, default=D.top_p)
    p.add_argument("--seed", type=cli.seed, default=D.seed)
    p.add_argument("--adapter", help="an adapter file (its method is read from the file)")
    p.add_argument("--adapters", help="comma-separated adapter files, one per --prompts line ('-' for none)")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="drop the start of prompts that would not fit the context with --max-new-tokens",
    )
    p.add_argument("--compile", action="store_true", help="capture the decode step with torch.compile")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per prompt: prompt_tokens, tokens (generated ids), text",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse takes "-,b.safetensors" (the first prompt without an adapter) for an option.
    for i in range(len(argv) - 1):
        if argv[i] == "--adapters" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"--adapters={argv[i + 1]}"]
            break
    return p.parse_args(argv)


def read_prompts(a) -> list[str]:
    if (a.prompt is None) == (a.prompts is None):
        raise UserError("give exactly one of a PROMPT argument or --prompts FILE")
    if a.prompt is not None:
        try:
            a.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
            raise UserError(f"the prompt is not valid UTF-8 text (at character {e.start + 1})") from None
        return [a.prompt]
    lines = [x for x in read_text_lines(a.prompts, "--prompts file") if x.strip()]
    if not lines:
        raise UserError(f"--prompts file {a.prompts} holds no prompt")
    return lines


def check_adapter_options(a, n_prompts: int):
    """Before the model loads: the adapter options name files, one per prompt for --adapters."""
    if a.adapter is not None and a.adapters is not None:
        raise UserError("give --adapter or --adapters, not both")
    if a.adapter == "" or a.adapters == "":
        raise UserError(
            f"--adapter{'s' if a.adapters == '' else ''} is empty: give an adapter file "
            "(leave the option out to use the bare model)"
        )
    if a.adapters is not None:
        files = [f.strip() for f in a.adapters.split(",")]
        if len(files) != n_prompts:
            raise UserError(f"--adapters names {len(files)} files for {n_prompts} prompts: give one per prompt line")
        if "" in files:
            raise UserError(f"--adapters {a.adapters!r} has an empty entry: name a file, or '-' for no adapter")


def adapters_for(a, lm):
    """The adapter for every prompt, or one per prompt line (None where '-')."""
    if a.adapter:
        return lm.load_adapter(a.adapter)
    if not a.adapters:
        return None
    files = [f.strip() for f in a.adapters.split(",")]  # checked by check_adapter_options
    loaded = {f: lm.load_adapter(f) for f in dict.fromkeys(files) if f not in ("-", "none")}
    return [loaded.get(f) for f in files]


def main(argv=None):
    a = parse(argv)
    texts = read_prompts(a)
    cfg = GenerationConfig(
        max_new_tokens=a.max_new_tokens,
        beams=a.beams,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        length_penalty=a.length_penalty,
        seed=a.seed,
    )
    cfg.check()  # before loading the model
    check_adapter_options(a, len(texts))
    lm = model_args.load_lm(a)
    adapter = adapters_for(a, lm)
    if a.compile:
        lm.compile()

    def show(row, piece):  # stream the single prompt's text as it decodes
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream = len(texts) == 1 and not a.json and a.beams == 1
    outs = lm.generate(
        texts, adapter=adapter, template=a.template, truncate=a.truncate, on_text=show if stream else None, config=cfg
    )
    if stream:
        print()
        return 0
    for text, out in zip(texts, outs):
        if a.json:
            print(
                json.dumps(
                    {
                        "prompt": text,
                        "prompt_tokens": out.prompt_tokens,
                        "tokens": out.tokens,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(f"{text}{out.text}")
    return 0
