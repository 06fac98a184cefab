"""minipara: prompt-aware parameter-efficient fine-tuning in plain PyTorch.

The public API (see README, "Python"):

    load(path=None, dtype, device) -> LanguageModel   a model and its tokenizer from an HF directory
    LanguageModel.generate / load_adapter / save_adapter / new_adapter / train / evaluate
    Completion           one prompt's generated text, ids and finish reason
    GenerationConfig     decoding options (max_new_tokens, beams, temperature, ...)
    TrainConfig          the training recipe's options
    run                  a whole training run as train.py does it: files, resume, torchrun, report
    RunInterrupted       raised by run when a signal (Ctrl-C) stopped it after a checkpoint
    load_task            a task's train/dev/test examples (COPA ships with minipara)
    METHODS              the adapter methods' names
    UserError            the error raised for anything a user can fix

Names are imported on first use, so `import minipara` stays quick for the command-line scripts.
"""

__version__ = "0.1.0"

_WHERE = {
    "load": "api",
    "LanguageModel": "api",
    "Completion": "api",
    "GenerationConfig": "decode.generation",
    "TrainConfig": "train.trainer",
    "load_task": "train.tasks",
    "METHODS": "methods",
    "UserError": "errors",
    "run": "train.runs",
    "RunInterrupted": "train.runs",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
