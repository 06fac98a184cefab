"""Generate text with a base model, optionally through one adapter or a mixed batch of adapters.

    python generate.py "The capital of France is the city of"
    python generate.py --prompts prompts.txt --adapters a.safetensors,b.safetensors --json
"""
import argparse
import json
import sys

from minipara import cli
from minipara.errors import UserError


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE)")
    p.add_argument("--prompts", help="a file with one prompt per line, generated as one left-padded batch")
    cli.add_model_args(p)
    p.add_argument("--template", default="auto",
                   help="llama2 | gemma | none | auto (default: the template the adapter was trained with; "
                        "without one, the family's chat template when the model ships one in "
                        "tokenizer_config.json, else none: plain continuation for base models)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--adapter", help="an adapter file (its method is read from the file)")
    p.add_argument("--adapters", help="comma-separated adapter files, one per --prompts line ('-' for none)")
    p.add_argument("--truncate", action="store_true",
                   help="drop the start of prompts that would not fit the context with --max-new-tokens")
    p.add_argument("--compile", action="store_true", help="capture the decode step with torch.compile")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: prompt_tokens, tokens (generated ids), text")
    return p.parse_args()


def read_prompts(a) -> list[str]:
    if (a.prompt is None) == (a.prompts is None):
        raise UserError("give exactly one of a PROMPT argument or --prompts FILE")
    if a.prompt is not None:
        return [a.prompt]
    try:
        with open(a.prompts, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as e:
        raise UserError(f"cannot read --prompts file {a.prompts}: {e.strerror}") from None
    lines = [x for x in lines if x.strip()]
    if not lines:
        raise UserError(f"--prompts file {a.prompts} holds no prompt")
    return lines


def adapters_for(a, n_prompts: int, model_args):
    """(the adapter or Mixture to use or None, the templates the adapters were trained with)."""
    from minipara.adapter_io import load_adapter
    if a.adapter and a.adapters:
        raise UserError("give --adapter or --adapters, not both")
    if a.adapter:
        ad = load_adapter(a.adapter, model_args)
        return ad, {ad.template} - {None}
    if not a.adapters:
        return None, set()
    from minipara.methods.mixture import Mixture
    files = [f.strip() for f in a.adapters.split(",")]
    if len(files) != n_prompts:
        raise UserError(f"--adapters names {len(files)} files for {n_prompts} prompts: give one per prompt line")
    loaded, rows = {}, []
    for f in files:
        if f in ("-", "none", ""):
            rows.append(None)
            continue
        if f not in loaded:
            loaded[f] = len(loaded)
        rows.append(loaded[f])
    ads = [load_adapter(f, model_args) for f in loaded]
    mix = Mixture(ads + [None], [len(ads) if r is None else r for r in rows])
    return mix, {ad.template for ad in ads} - {None}


def main():
    a = parse()
    from minipara.generation import Decoder, GenerationConfig, generate
    from minipara.tokenizer import encode_example, end_id, resolve_template

    texts = read_prompts(a)
    if any(not t.strip() for t in texts):
        raise UserError("empty prompt: give some text to continue")
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, beams=a.beams, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, length_penalty=a.length_penalty, seed=a.seed)
    cfg.check()
    model, tok, path = cli.load(a)
    adapter, trained_with = adapters_for(a, len(texts), model.args)
    template = a.template
    if template == "auto" and trained_with:
        if len(trained_with) > 1:
            raise UserError(f"the adapters were trained with different templates ({', '.join(sorted(trained_with))}): "
                            "give --template")
        template = trained_with.pop()
    template = resolve_template(template, model.args.model_type, path)
    cfg.eos_ids = tuple(dict.fromkeys((*model.args.eos_ids, end_id(tok, template))))  # e.g. Gemma's <end_of_turn>
    prompts = [encode_example(tok, template, t)[0] for t in texts]
    room = model.args.max_seq_len - a.max_new_tokens
    for i, p in enumerate(prompts):
        if len(p) > room:
            if not a.truncate:
                raise UserError(f"prompt {i + 1} has {len(p)} tokens; with --max-new-tokens {a.max_new_tokens} "
                                f"that exceeds the model's context of {model.args.max_seq_len} "
                                "(pass --truncate to keep only the end of the prompt)")
            prompts[i] = p[:1] + p[len(p) - room + 1:]  # keep BOS, drop the oldest text
    if adapter is not None:  # adapter files load on the CPU
        adapter = adapter.to(model.tok_embeddings.weight.device)
    decoder = Decoder(model)
    if a.compile:
        from minipara.fast import compile_decoder
        compile_decoder(decoder)

    stream = len(prompts) == 1 and not a.json and a.beams == 1
    shown = []

    def on_token(row, token):  # print each new piece as soon as it decodes cleanly
        shown.append(token)
        text = tok.decode(shown)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(on_token.printed):])
            sys.stdout.flush()
            on_token.printed = text
    on_token.printed = ""

    outs = generate(model, prompts, cfg, adapter=adapter, decoder=decoder, on_token=on_token if stream else None)
    if stream:
        sys.stdout.write(tok.decode(outs[0])[len(on_token.printed):] + "\n")
        return 0
    for text, p, out in zip(texts, prompts, outs):
        if a.json:
            print(json.dumps({"prompt": text, "prompt_tokens": p, "tokens": out, "text": tok.decode(out)},
                             ensure_ascii=False))
        else:
            print(f"{text}{tok.decode(out)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
