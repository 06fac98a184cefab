"""The public Python API: a model with its tokenizer, adapters, text generation and training.

    import minipara
    lm = minipara.load()                                  # the default model, converted on first use
    print(lm.generate("The capital of France is the city of", max_new_tokens=8).text)
    adapter = lm.load_adapter("runs/para-copa-seed0.safetensors")
    outs = lm.generate(["first prompt", "second prompt"], adapter=[adapter, None])  # one tenant each

The library owns what turns text into a request and back: the prompt template (the one an
adapter was trained with, else the model family's chat template for chat models, else plain
text), where generation stops (the model's EOS ids and the template's end marker, which the
returned text leaves out) and what happens to prompts longer than the context.

Every argument is checked on the way in, by minipara.checks' rules (the command lines'), and a
wrong one is a UserError that names the parameter, before any work starts.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from minipara import checks
from minipara.decode.generation import Decoder, GenerationConfig, context_room, generate
from minipara.errors import UserError
from minipara.io.adapters import load_adapter, save_adapter
from minipara.io.checkpoints import load_pretrained, parse_device, parse_dtype
from minipara.io.export import export_merged, export_peft
from minipara.io.files import check_output
from minipara.io.identity import base_record, canonical_args, compare_base
from minipara.io.tokenizer import TEMPLATES, encode_example, end_id, resolve_template
from minipara.methods import build_adapter
from minipara.methods.base import Adapter, check_values
from minipara.train.tasks import Task, load_task
from minipara.train.trainer import Progress, TrainConfig, Trainer, evaluate, prepare_task

GENERATION_OPTIONS = tuple(f.name for f in fields(GenerationConfig) if f.name != "eos_ids")


@dataclass
class Completion:
    """One prompt's result. `text` is the generated text without the end marker; `tokens` are
    the generated ids (the end marker included when produced); `prompt_tokens` the ids the
    model read (template applied, truncated if asked); `finish_reason` is "stop" when an end
    marker ended it, "length" when max_new_tokens did."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str

    def __str__(self) -> str:
        return self.text


class LanguageModel:
    """A loaded model (`model`, a minipara Transformer), its `tokenizer` and the directory it
    came from (`path`). Made by `minipara.load`."""

    def __init__(self, model, tokenizer, path):
        self.model, self.tokenizer, self.path = model, tokenizer, Path(path)
        self.decoder = Decoder(model)  # kept, so repeated calls reuse cache buffers (and compiled steps)

    @property
    def args(self):
        """The model's ModelArgs (read from config.json)."""
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def compile(self, **options):
        """Capture the one-token decode step with torch.compile (and on CUDA the prefill as
        CUDA graphs); options go to minipara.decode.compiled.compile_decoder. Returns self."""
        from minipara.decode.compiled import compile_decoder  # heavy: torch.compile's machinery

        compile_decoder(self.decoder, **options)
        return self

    # ---- adapters -----------------------------------------------------------------------------
    def new_adapter(self, method: str, seed: int | None = None, **options) -> Adapter:
        """A fresh, untrained adapter of `method` (para, pedro, parade, iapt, lora, ia3, bitfit,
        ptuning_v2) on this model's device; `options` override the method's config defaults and
        `seed` fixes its initial values."""
        checks.check(method, "method", str)
        if checks.check_seed(seed, optional=True) is not None:
            torch.manual_seed(seed)
        try:
            adapter = build_adapter(method, self.args, **options)
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build the {method} adapter: {e}") from None
        return adapter.to(self.device)

    def load_adapter(self, path) -> Adapter:
        """The adapter stored at `path` (a minipara .safetensors file or a PEFT directory), on
        this model's device; refused with a UserError if it was made for another base model."""
        return load_adapter(checks.check_path(path, "path"), self.args, self.model.weights_id).to(self.device)

    def save_adapter(self, path, adapter: Adapter, template: str | None = None):
        """Write `adapter` to the file `path` atomically, recording this base model (and the
        prompt template it was trained with, so generation picks the same one)."""
        path, adapter = checks.check_path(path, "path"), self._adapter(adapter)
        checks.check(template, "template", str, optional=True)
        template = template if template is not None else adapter.template
        save_adapter(path, adapter, self.args, template, self.model.weights_id, reads=(self.path,))

    def export_peft(self, adapter: Adapter, out_dir):
        """Write a LoRA or (IA)^3 adapter as a PEFT directory that `peft` loads onto the HF model
        of this checkpoint; other methods are refused with the reason (minipara.io.export)."""
        return export_peft(self._adapter(adapter), checks.check_path(out_dir, "out_dir"), base_model=str(self.path))

    def export_merged(self, adapter: Adapter | None, out_dir):
        """Write this model with a LoRA, (IA)^3 or BitFit adapter folded into its weights as an
        HF-format directory (config, safetensors, this checkpoint's tokenizer files)."""
        return export_merged(
            self.model, self._adapter(adapter, optional=True), checks.check_path(out_dir, "out_dir"), self.path
        )

    def _adapter(self, adapter, name: str = "adapter", optional: bool = False):
        """adapter, if it is an Adapter made for this model (or None, if optional): anything
        else is refused here, naming the parameter, rather than deep inside a matmul."""
        if adapter is None and optional:
            return None
        if isinstance(adapter, (str, os.PathLike)):
            raise UserError(
                f"{name} is a path ({adapter}), not an adapter: load it with lm.load_adapter(path) and pass that",
                (name,),
            )
        if not isinstance(adapter, Adapter):
            raise UserError(
                f"{name} must be an Adapter (from new_adapter or load_adapter){' or None' * optional}, "
                f"got {checks.short(adapter)}",
                (name,),
            )
        if adapter.args != self.args:  # the one comparison adapter files get (minipara.io.identity)
            refusal, _ = compare_base(base_record(adapter.args, None), canonical_args(adapter.args), self.args, None)
            raise UserError(f"{name} was {refusal}: build or load it with this model", (name,))
        return adapter

    # ---- templates and prompts ----------------------------------------------------------------
    def template(self, name: str = "auto", adapters=()) -> str:
        """The template a request uses: `name` unless it is "auto"; then the one the adapters
        were trained with, else the family's chat template if the model ships one, else none."""
        checks.check(name, "template", str)
        if name == "auto":
            trained_with = {a.template for a in adapters if a is not None} - {None}
            if len(trained_with) > 1:
                raise UserError(
                    f"the adapters were trained with different templates "
                    f"({', '.join(sorted(trained_with))}): choose a template",
                    ("template",),
                )
            if trained_with:
                return trained_with.pop()
        elif name not in TEMPLATES:
            raise UserError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)}, auto", ("template",))
        return resolve_template(name, self.args.model_type, self.path)

    def stop_ids(self, template: str) -> tuple[int, ...]:
        """Ids that end a generation under `template`: the model's EOS ids and the template's
        end marker (Gemma's <end_of_turn>)."""
        return tuple(dict.fromkeys((*self.args.eos_ids, end_id(self.tokenizer, template))))

    def encode_prompt(self, text: str, template: str = "none") -> list[int]:
        """The ids of `text` wrapped in `template` (a resolved name), BOS first."""
        if not text.strip():
            raise UserError("empty prompt: give some text to continue")
        return encode_example(self.tokenizer, template, text)[0]

    def fit_prompt(
        self, ids: list[int], max_new_tokens: int, truncate: bool = False, n_prefix: int = 0, which: str = "the prompt"
    ) -> list[int]:
        """`ids`, if they leave room for max_new_tokens in the context; else, with `truncate`,
        BOS and the newest tokens that fit (the oldest text is dropped); else a UserError."""
        room = context_room(self.args.max_seq_len, max_new_tokens, n_prefix)  # for the prompt
        if len(ids) <= room:
            return ids
        if not truncate or room < 2:
            slots = f" and {n_prefix} prefix slots of the adapter" if n_prefix else ""
            raise UserError(
                f"{which} has {len(ids)} tokens; with max_new_tokens {max_new_tokens}{slots} that exceeds "
                f"the model's context of {self.args.max_seq_len}"
                + (" (set truncate to keep only the end of the prompt)" if room >= 2 else ""),
                ("max_new_tokens", "truncate"),
            )
        return ids[:1] + ids[len(ids) - room + 1 :]

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str],
        adapter=None,
        template: str = "auto",
        truncate: bool = False,
        on_text=None,
        config: GenerationConfig | None = None,
        **options,
    ):
        """Generate text from text: a Completion for a prompt, a list of them for a list of
        prompts (decoded as one left-padded batch).

        adapter: None, one Adapter for every prompt, or a list with one entry (Adapter or
            None) per prompt: a mixed batch of tenants.
        template: llama2 | gemma | none | auto (see `template`).
        truncate: drop the oldest text of prompts that leave no room for max_new_tokens.
        on_text(row, piece): called with each new piece of text as soon as it decodes cleanly
            (greedy and sampling); the pieces of a row add up to its Completion's text.
        config / options: a GenerationConfig, or its fields as keywords (max_new_tokens,
            beams, temperature, top_k, top_p, length_penalty, seed).
        """
        single = isinstance(prompt, str)
        if not single and not (isinstance(prompt, (list, tuple)) and all(isinstance(t, str) for t in prompt)):
            raise UserError(f"prompt must be a string or a list of strings, got {checks.short(prompt)}", ("prompt",))
        texts = [prompt] if single else list(prompt)
        if not texts:
            raise UserError("no prompt given", ("prompt",))
        cfg = self._config(config, options)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(texts)
        if len(adapters) != len(texts):
            raise UserError(
                f"{len(adapters)} adapters for {len(texts)} prompts: give adapter one entry per prompt (None: none)",
                ("adapter",),
            )
        adapters = [self._adapter(a, optional=True) for a in adapters]
        checks.check(truncate, "truncate", bool)
        if on_text is not None and not callable(on_text):
            raise UserError(f"on_text must be a function (row, piece), got {checks.short(on_text)}", ("on_text",))
        _check_adapters(adapters, single=not isinstance(adapter, (list, tuple)))
        name = self.template(template, adapters)
        if cfg.eos_ids is None:
            cfg.eos_ids = self.stop_ids(name)
        batch_adapter = _batch_adapter(adapters)
        if batch_adapter is not None:
            batch_adapter = batch_adapter.to(self.device)
        n_pre = batch_adapter.n_prefix if batch_adapter is not None else 0
        ids = [
            self.fit_prompt(
                self.encode_prompt(t, name),
                cfg.max_new_tokens,
                truncate,
                n_pre,
                "the prompt" if single else f"prompt {i + 1}",
            )
            for i, t in enumerate(texts)
        ]
        stream = _TextStream(self.tokenizer, set(cfg.eos_ids), on_text) if on_text is not None else None
        outs = generate(
            self.model,
            ids,
            cfg,
            adapter=batch_adapter,
            decoder=self.decoder,
            on_token=stream.token if stream is not None else None,
        )
        done = []
        for row, (p, out) in enumerate(zip(ids, outs)):
            stopped = bool(out) and out[-1] in cfg.eos_ids
            text = self.tokenizer.decode(out[:-1] if stopped else out)
            if stream is not None:
                stream.finish(row, text)
            done.append(Completion(text, out, p, "stop" if stopped else "length"))
        return done[0] if single else done

    @staticmethod
    def _config(config, options) -> GenerationConfig:
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise UserError(f"generate() has no option {unknown[0]!r}; options: {', '.join(GENERATION_OPTIONS)}")
        if config is not None and options:
            raise UserError("give a GenerationConfig or its fields as keywords, not both")
        if config is not None and not isinstance(config, GenerationConfig):
            raise UserError(f"config must be a GenerationConfig, got {checks.short(config)}", ("config",))
        cfg = GenerationConfig(**(config.__dict__ if config is not None else options))  # a copy: eos_ids is filled in
        cfg.check()
        return cfg

    # ---- training -----------------------------------------------------------------------------
    def trainer(
        self,
        adapter: Adapter,
        task,
        config=None,
        template: str = "auto",
        checkpoint=None,
        log=None,
        progress: bool = True,
        max_eval: int | None = None,
        max_new_tokens: int | None = None,
        on_best=None,
    ):
        """A minipara.train.trainer.Trainer for `adapter` on `task` (a Task from minipara.load_task, or
        a task name such as "copa"), with the papers' recipe (config: a TrainConfig). Call
        `.run()` to train, `.request_stop()` to interrupt, `.resume()` to continue from
        `checkpoint`. `log(event)` receives evaluation records; `on_best(adapter)` is called
        with each new best adapter (by dev loss, or TrainConfig.select)."""
        adapter, task = self._adapter(adapter), _task(task)
        if config is not None and not isinstance(config, TrainConfig):
            raise UserError(f"config must be a TrainConfig, got {checks.short(config)}", ("config",))
        checks.check(max_eval, "max_eval", int, least=1, optional=True)
        checks.check(max_new_tokens, "max_new_tokens", int, least=1, optional=True)
        checks.check(progress, "progress", bool)
        for fn, fname in ((log, "log"), (on_best, "on_best")):
            if fn is not None and not callable(fn):
                raise UserError(f"{fname} must be a function, got {checks.short(fn)}", (fname,))
        name = self.template(template, [adapter])
        train, dev, dev_eval, _ = prepare_task(task, self.tokenizer, name, max_eval, max_new_tokens)
        adapter.template = name  # saved with it, so generation uses the same template
        return Trainer(
            self.model,
            adapter,
            train,
            dev,
            dev_eval,
            config or TrainConfig(),
            ckpt_path=checkpoint,
            log=log,
            on_best=on_best,
            progress=Progress() if progress else None,
        )

    def train(self, adapter: Adapter, task, config=None, template: str = "auto", out=None, **options):
        """Train `adapter` in place on `task` (see `trainer` for the options) and leave the best
        adapter (by dev loss, or TrainConfig.select) in it; with `out`, that adapter is also written there each time it
        improves. Returns the training Result (steps, best dev metrics, history)."""
        bad = sorted(set(options) - {"checkpoint", "log", "progress", "max_eval", "max_new_tokens", "on_best"})
        if bad:  # (lr and the like are TrainConfig's)
            raise UserError(
                f"train() has no option {bad[0]!r}: training options go in config=minipara.TrainConfig(...)",
                ("config",),
            )
        if out is not None:  # refused before training, not at the first evaluation
            task = _task(task)
            check_output(checks.check_path(out, "out"), "out", (self.path, *task.files), ("out",))
            options["on_best"] = lambda ad: self.save_adapter(out, ad)
        tr = self.trainer(adapter, task, config, template, **options)
        result = tr.run()
        tr.load_best()
        return result

    def evaluate(
        self,
        adapter: Adapter | None,
        task,
        split: str = "test",
        template: str = "auto",
        beams: int = 3,
        batch: int = 16,
        max_eval: int | None = None,
    ) -> dict:
        """The task metric of `adapter` (None: the bare model) on a split (dev or test),
        decoding as training evaluates."""
        adapter, task = self._adapter(adapter, optional=True), _task(task)
        _check_adapters([adapter])
        if split not in ("dev", "test"):
            raise UserError(f"split must be dev or test, not {split!r}", ("split",))
        checks.check(beams, "beams", int, least=1)
        checks.check(batch, "batch", int, least=1)
        checks.check(max_eval, "max_eval", int, least=1, optional=True)
        data = prepare_task(task, self.tokenizer, self.template(template, [adapter]), max_eval)
        return evaluate(self.model, adapter, data[2 if split == "dev" else 3], beams, batch, self.decoder)


def load(path=None, dtype="float32", device="cpu", shard=None) -> LanguageModel:
    """A LanguageModel from an HF-format directory (config.json, safetensors weights and a
    tokenizer.model or tokenizer.json), or a shipped model by name (gemma-3-270m, the default,
    or smollm2-135m-instruct), converted on first use.
    dtype: float32 | bfloat16 | float16; device: cpu | cuda | cuda:N. shard(model): applied
    before the weights are read, e.g. distributed.shard_layers under torchrun."""
    checks.check_path(path, "path", optional=True)
    device, dtype = parse_device(device), parse_dtype(dtype)
    return LanguageModel(*load_pretrained(path, dtype, device, shard))


def _check_adapters(adapters: list, single: bool = True):
    """Refuse adapters holding NaN, inf or absurd values (methods.base.check_values), each once:
    edited or trained in Python they never passed a file's checks, and would answer garbage."""
    for i, a in enumerate(adapters):
        if isinstance(a, Adapter) and all(a is not b for b in adapters[:i]):
            check_values(a, "the adapter" if single else f"the adapter of prompt {i + 1}")


def _task(task):
    """A Task, or the one a name (copa, rte, ...) stands for."""
    if isinstance(task, Task):
        return task
    return load_task(checks.check(task, "task", str))


def _batch_adapter(adapters: list):
    """One adapter for the batch: None, the shared adapter, or a Mixture of the rows' adapters."""
    from minipara.methods.mixture import Mixture  # heavy: imports torch._dynamo (torch.compiler.disable)

    distinct = list({id(a): a for a in adapters if a is not None}.values())
    if not distinct:
        return None
    if len(distinct) == 1 and all(a is not None for a in adapters):
        return distinct[0]
    index = {id(a): i for i, a in enumerate(distinct)}
    return Mixture(distinct, [None if a is None else index[id(a)] for a in adapters])


class _TextStream:
    """Turns generated ids into text pieces per row, holding back a piece until it decodes
    cleanly (no half of a multi-byte character) and leaving out the end marker."""

    def __init__(self, tokenizer, stop: set, on_text):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.ids, self.shown = {}, {}

    def token(self, row: int, token: int):
        if token in self.stop:
            return
        ids = self.ids.setdefault(row, [])
        ids.append(token)
        text = self.tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            self._emit(row, text)

    def finish(self, row: int, text: str):
        self._emit(row, text)

    def _emit(self, row: int, text: str):
        old = self.shown.get(row, "")
        if len(text) > len(old):
            self.on_text(row, text[len(old) :])
            self.shown[row] = text
