"""SentencePiece tokenizer and the chat templates of SPEC.md ("Prompt templates").

A template wraps a prompt and its response. Its leading BOS marker (`<s>`, `<bos>`) and the
response's end marker (`</s>`, `<end_of_turn>`) become token ids, never literal text: in
LLaMA's and Gemma's vocabularies `<s>` and `</s>` are also ordinary text (Gemma's HTML
strike-through tags), so only the marker's position says that it means BOS or EOS.
"""
import json
from pathlib import Path

import sentencepiece as spm

from .errors import UserError

LLAMA2_SYSTEM = "You are a helpful, respectful and honest assistant."

# name -> (BOS marker, prompt, response, end marker); "{prompt}"/"{response}" are filled in.
_FORMATS = {
    "llama2": ("<s>", f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{{prompt}} [/INST]", " {response} ", "</s>"),
    "gemma": ("<bos>", "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n", "{response}",
              "<end_of_turn>"),
    "none": ("", "{prompt}", "{response}", ""),  # BOS and EOS are still added as ids
}
TEMPLATES = tuple(_FORMATS)


class Tokenizer:
    def __init__(self, model_dir):
        path = Path(model_dir) / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"{path} is missing: minipara needs a SentencePiece tokenizer.model")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece's only report of an unreadable model
            raise UserError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0] if str(e) else 'empty'}); "
                            "copy the checkpoint's tokenizer.model again") from None
        if self.vocab_size < 1:
            raise UserError(f"{path} holds no tokens")
        self.path = path

    def check_fits(self, model_vocab: int):
        """Refuse a tokenizer whose ids the model's embedding cannot look up."""
        if self.vocab_size > model_vocab:
            raise UserError(f"{self.path} has {self.vocab_size} tokens but the model's vocabulary has "
                            f"{model_vocab} (config.json vocab_size): tokenizer and weights are from different models")

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


def _check(template: str):
    if template not in _FORMATS:
        raise UserError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


def apply_template(template: str, prompt: str, response: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) as SPEC.md writes them, markers included; response "" if None."""
    _check(template)
    bos, p, r, end = _FORMATS[template]
    return bos + p.replace("{prompt}", prompt), "" if response is None else r.replace("{response}", response) + end


def encode_example(tok: Tokenizer, template: str, prompt: str, response: str | None = None
                   ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the prompt starts with BOS; the response, when given, ends
    with the template's end marker (EOS for llama2 and none, <end_of_turn> for gemma).

    The prompt ids are what inference encodes from the prompt alone. The response ids are the
    tokens that follow them when prompt and response are encoded as one text (as the model saw
    such text in training); where the two texts merge across the boundary, the response is
    encoded on its own instead."""
    _check(template)
    _, p, r, end = _FORMATS[template]
    p = p.replace("{prompt}", prompt)
    prompt_ids = [tok.bos_id] + tok.encode(p)
    if response is None:
        return prompt_ids, []
    r = r.replace("{response}", response)
    joint = tok.encode(p + r)
    n = len(prompt_ids) - 1
    body = joint[n:] if joint[:n] == prompt_ids[1:] else tok.encode(r)
    return prompt_ids, body + [end_id(tok, template)]


def end_id(tok: Tokenizer, template: str) -> int:
    """The id that ends a response in this template (generation stops there too)."""
    _check(template)
    end = _FORMATS[template][3]
    return tok.eos_id if end in ("", "</s>") else tok.token_id(end)


def default_template(model_type: str) -> str:
    """The chat template of a model family: gemma for Gemma models, llama2 for LLaMA."""
    if model_type.startswith("gemma"):
        return "gemma"
    if model_type == "llama":
        return "llama2"
    raise UserError(f"no chat template for model type {model_type!r}; use template none", ("template",))


def resolve_template(name: str, model_type: str, model_dir) -> str:
    """A --template value: `auto` is the family's chat template if the model ships one (a
    chat-tuned model), else `none` (base models continue plain text)."""
    if name != "auto":
        _check(name)
        return name
    d = Path(model_dir)
    chat = (d / "chat_template.jinja").is_file()
    cfg = d / "tokenizer_config.json"
    if not chat and cfg.is_file():
        try:
            chat = "chat_template" in json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg} is not valid JSON ({e})") from None
    return default_template(model_type) if chat else "none"


def load_tokenizer(model_dir) -> Tokenizer:
    """The tokenizer of a model directory."""
    return Tokenizer(model_dir)
