"""Tokenizers (SentencePiece `tokenizer.model`, or HF `tokenizer.json` through the `tokenizers`
library) and the chat templates of docs/methods.md (Prompt templates), plus ChatML and LLaMA 3's.

A template wraps a prompt and its response. For the SentencePiece families (llama2, gemma) its
leading BOS marker (`<s>`, `<bos>`) and the response's end marker (`</s>`, `<end_of_turn>`)
become token ids, never literal text: in LLaMA's and Gemma's vocabularies `<s>` and `</s>` are
also ordinary text (Gemma's HTML strike-through tags), so only the marker's position says that
it means BOS or EOS. The tokenizer.json families (chatml: `<|im_start|>` turns, llama3: header
turns) spell their markers as special tokens in the text, as transformers does; when the
checkpoint ships its own chat template of that style (tokenizer_config.json), the prompt is that
template rendered for one user message, so a default system turn comes along exactly as in
transformers' `apply_chat_template`.
"""

import json
from datetime import datetime
from pathlib import Path

import sentencepiece as spm
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Fast

from minipara.errors import UserError
from minipara.model.config import read_json_object

LLAMA2_SYSTEM = "You are a helpful, respectful and honest assistant."

# name -> (BOS marker, prompt, response, end marker); "{prompt}"/"{response}" are filled in.
_FORMATS = {
    "llama2": ("<s>", f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{{prompt}} [/INST]", " {response} ", "</s>"),
    "gemma": (
        "<bos>",
        "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
        "{response}",
        "<end_of_turn>",
    ),
    "chatml": ("", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "{response}", "<|im_end|>"),
    "llama3": (
        "<|begin_of_text|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{response}",
        "<|eot_id|>",
    ),
    "none": ("", "{prompt}", "{response}", ""),  # BOS (where the tokenizer adds one) and EOS are still added as ids
}
TEMPLATES = tuple(_FORMATS)
# Templates whose markers are special tokens written in the text; how to recognise a checkpoint's
# own chat template of that style.
_IN_TEXT = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}


class _Base:
    """What both tokenizers share: `path` (the file read) and `vocab_size` are set by each."""

    chat_template: str | None = None

    def check_fits(self, model_vocab: int):
        """Refuse a tokenizer whose ids the model's embedding cannot look up."""
        if self.vocab_size > model_vocab:
            raise UserError(
                f"{self.path} has {self.vocab_size} tokens but the model's vocabulary has "
                f"{model_vocab} (config.json vocab_size): tokenizer and weights are from different models"
            )


class Tokenizer(_Base):
    """A SentencePiece `tokenizer.model` (LLaMA 1/2, Gemma)."""

    add_bos = True  # every prompt starts with BOS

    def __init__(self, model_dir):
        path = Path(model_dir) / "tokenizer.model"
        self.chat_template = chat_template(model_dir)
        if not path.is_file():
            raise UserError(f"{path} is missing: minipara needs a SentencePiece tokenizer.model or a tokenizer.json")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece's only report of an unreadable model
            raise UserError(
                f"{path} is not a SentencePiece model ({str(e).splitlines()[0] if str(e) else 'empty'}); "
                "copy the checkpoint's tokenizer.model again"
            ) from None
        if self.vocab_size < 1:
            raise UserError(f"{path} holds no tokens")
        self.path = path

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids) -> str:
        # Models pad their vocabulary past the tokenizer's; such ids have no text.
        return self.sp.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size])

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0  # LLaMA defines no pad piece

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise UserError(f"the tokenizer has no token {piece!r}")
        return i


class JsonTokenizer(_Base):
    """An HF `tokenizer.json` (LLaMA 3, SmolLM2, ...) through the `tokenizers` library, with the
    special tokens and BOS rule of the checkpoint's tokenizer_config.json / config.json."""

    def __init__(self, model_dir):
        d = Path(model_dir)
        self.path = d / "tokenizer.json"
        try:
            self.tk = Fast.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise UserError(f"{d / 'tokenizer.json'} is not a valid tokenizer ({e})") from None
        cfg = _json(d / "tokenizer_config.json")
        model_cfg = _json(d / "config.json")
        self.bos_id = self._special(cfg.get("bos_token"), model_cfg.get("bos_token_id"))
        self.eos_id = self._special(cfg.get("eos_token"), model_cfg.get("eos_token_id"))
        pad = self._special(cfg.get("pad_token"), model_cfg.get("pad_token_id"))
        self.pad_id = pad if pad is not None else 0
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        if "add_bos_token" in cfg:
            self.add_bos = bool(cfg["add_bos_token"]) and self.bos_id is not None
        else:  # the post-processor decides, as in transformers
            self.add_bos = self.bos_id is not None and self.tk.encode("a").ids[:1] == [self.bos_id]
        self.chat_template = chat_template(d)
        self.special_tokens = {
            k: _content(cfg.get(k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if cfg.get(k) is not None
        }

    def _special(self, token, fallback):
        token = _content(token)
        if token is not None and self.tk.token_to_id(token) is not None:
            return self.tk.token_to_id(token)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def token_id(self, piece: str) -> int:
        i = self.tk.token_to_id(piece)
        if i is None:
            raise UserError(f"the tokenizer has no token {piece!r}")
        return i


def _content(token):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _json(f: Path) -> dict:
    if not f.is_file():
        return {}
    return read_json_object(f)


def load_tokenizer(model_dir):
    """The tokenizer of a model directory: tokenizer.model (SentencePiece) when there is one,
    else tokenizer.json (the `tokenizers` library)."""
    d = Path(model_dir)
    if not (d / "tokenizer.model").is_file() and (d / "tokenizer.json").is_file():
        return JsonTokenizer(d)
    return Tokenizer(d)


def chat_template(model_dir) -> str | None:
    """The checkpoint's own chat template (Jinja): chat_template.jinja or tokenizer_config.json."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{cfg} is not a valid JSON object ({e})") from None
    if isinstance(t, list):  # several named templates: the default one
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def render_chat(
    template: str, messages: list[dict], special_tokens: dict | None = None, add_generation_prompt: bool = True
) -> str:
    """A chat template (Jinja) filled in as transformers' apply_chat_template does (sandboxed)."""

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except TemplateError as e:
        raise UserError(f"the model's chat template failed: {e}") from None


def _check(template: str):
    if template not in _FORMATS:
        raise UserError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}", ("template",))


def _prompt_text(tok, template: str, prompt: str) -> str:
    """The prompt wrapped in the template, as text (markers of the in-text families included)."""
    bos, p, _, _ = _FORMATS[template]
    own = getattr(tok, "chat_template", None)
    if template in _IN_TEXT and own and _IN_TEXT[template] in own:
        return render_chat(own, [{"role": "user", "content": prompt}], getattr(tok, "special_tokens", {}))
    return (bos if template in _IN_TEXT else "") + p.replace("{prompt}", prompt)


def encode_chat(tok, template: str, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ({"role", "content"} dicts: system, user, assistant) in an
    in-text template (chatml, llama3), ready for the assistant's next turn: the checkpoint's own
    chat template when it has one of that style, else the fixed format turn by turn. One user
    message gives exactly encode_example's prompt."""
    _check(template)
    if template not in _IN_TEXT:
        raise UserError(f"encode_chat takes chatml or llama3, not {template}")
    own = getattr(tok, "chat_template", None)
    if own and _IN_TEXT[template] in own:
        return tok.encode(render_chat(own, messages, getattr(tok, "special_tokens", {})))
    if template == "chatml":
        turn, head = "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"
    else:
        turn, head = (
            "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        )
    text = "".join(turn.format(role=m["role"], content=m["content"]) for m in messages)
    return tok.encode(_FORMATS[template][0] + text + head)


def apply_template(template: str, prompt: str, response: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) as docs/methods.md writes them, markers included; response "" if None."""
    _check(template)
    bos, p, r, end = _FORMATS[template]
    return bos + p.replace("{prompt}", prompt), "" if response is None else r.replace("{response}", response) + end


def encode_example(tok, template: str, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the prompt starts with BOS where the tokenizer adds one (or
    the template writes it); the response, when given, ends with the template's end marker (EOS
    for llama2 and none, <end_of_turn> for gemma, <|im_end|> for chatml, <|eot_id|> for llama3).

    The prompt ids are what inference encodes from the prompt alone. The response ids are the
    tokens that follow them when prompt and response are encoded as one text (as the model saw
    such text in training); where the two texts merge across the boundary, the response is
    encoded on its own instead."""
    _check(template)
    p, r = _prompt_text(tok, template, prompt), _FORMATS[template][2]
    lead = [tok.bos_id] if tok.add_bos and template not in _IN_TEXT else []
    prompt_ids = lead + tok.encode(p)
    if response is None:
        return prompt_ids, []
    r = r.replace("{response}", response)
    joint = tok.encode(p + r)
    n = len(prompt_ids) - len(lead)
    body = joint[n:] if joint[:n] == prompt_ids[len(lead) :] else tok.encode(r)
    return prompt_ids, body + [end_id(tok, template)]


def end_id(tok, template: str) -> int:
    """The id that ends a response in this template (generation stops there too)."""
    _check(template)
    end = _FORMATS[template][3]
    if end in ("", "</s>"):
        return tok.eos_id
    try:
        return tok.token_id(end)
    except UserError:
        raise UserError(
            f"template {template} ends responses with {end}, a token this model's tokenizer does not "
            "have: choose another template",
            ("template",),
        ) from None


def default_template(model_type: str) -> str:
    """The chat template of a model family: gemma for Gemma models, llama2 for LLaMA."""
    if model_type.startswith("gemma"):
        return "gemma"
    if model_type == "llama":
        return "llama2"
    raise UserError(f"no chat template for model type {model_type!r}; use template none", ("template",))


def resolve_template(name: str, model_type: str, model_dir) -> str:
    """A template name: `auto` is the chat template the model ships, when it ships one (a
    chat-tuned model): chatml or llama3 by its markers, else the family's; else `none` (base
    models continue plain text)."""
    if name != "auto":
        _check(name)
        return name
    own = chat_template(model_dir)
    if own is None:
        return "none"
    return next((t for t, marker in _IN_TEXT.items() if marker in own), None) or default_template(model_type)


def encode_conversation(tok, template: str, turns: list[tuple[str, str]]) -> list[int]:
    """Token ids of a conversation ((role, text) turns: system, user, assistant; the last the
    user's) ready for the assistant's reply: the templates above extended to several turns.
    One user message gives exactly encode_example's prompt."""
    _check(template)
    if template in _IN_TEXT:  # tokenizer.json chat models: their own template, all roles
        return encode_chat(tok, template, [{"role": r, "content": c} for r, c in turns])
    system = "\n\n".join(c for r, c in turns if r == "system")
    turns = [(r, c) for r, c in turns if r != "system"]
    if template == "none":  # a base model: the conversation as plain text
        return encode_example(tok, "none", "\n".join(([system] if system else []) + [c for _, c in turns]))[0]
    if template == "gemma":  # Gemma has no system role: it goes before the first user turn
        text = ""
        for i, (role, c) in enumerate(turns):
            if i == 0 and system:
                c = f"{system}\n\n{c}"
            text += f"<start_of_turn>{'user' if role == 'user' else 'model'}\n{c}<end_of_turn>\n"
        return [tok.bos_id] + tok.encode(text + "<start_of_turn>model\n")
    # llama2: [INST] user [/INST] answer </s><s>[INST] ...
    ids, sys_block = [], f"<<SYS>>\n{system or LLAMA2_SYSTEM}\n<</SYS>>\n\n"
    for i, (role, c) in enumerate(turns):
        if role == "user":
            ids += [tok.bos_id] + tok.encode(f"[INST] {sys_block if i == 0 else ''}{c} [/INST]")
        else:
            ids += tok.encode(f" {c} ") + [tok.eos_id]
    return ids
