"""Task registry: each task's files, prompt template, splits and metric.

Prompts are the bare templates of docs/methods.md, Prompt templates (paper 002, Appendix C);
chat wrapping is done later, per model family. COPA, RTE, SST-2 and GSM8K ship with
minipara (minipara/data/<task>/, gzip-compressed where large, each with its licence);
every other task reads the files listed in `FILES` from `--data-dir`. A file may be given
as it is or gzip-compressed (`<name>.gz`).
"""

import csv
import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from minipara.errors import UserError
from minipara.train import metrics

TASKS = ("copa", "boolq", "rte", "sst2", "qnli", "squad", "record", "e2e", "gsm8k", "wikisql", "alpaca", "custom")
SHIPPED = Path(__file__).resolve().parents[1] / "data"
SHIPPED_TASKS = ("copa", "rte", "sst2", "gsm8k")  # their files are in SHIPPED/<task>/
DEV_SIZE = 1000  # large tasks: training examples held out as dev (docs/methods.md, Splits)
DEV_SIZES = {"gsm8k": 500}  # docs/methods.md, Splits: GSM8K holds out 500 problems
SMALL = ("copa", "rte", "boolq")  # their original validation split is halved into dev and test

# Files each task reads, relative to --data-dir (or directly inside it when it is the task's
# own folder). Tasks with official "dev" and "test" files (E2E, WikiSQL) use them as they are.
# Otherwise "val" is the original held-out split: halved into dev/test for the SMALL tasks,
# the test split for the others, whose dev is held out of the training file (500 problems for
# GSM8K, whose test split stands in for the missing validation split, 1,000 otherwise);
# Alpaca has no held-out split at all, so its dev and test both come from the training file.
# WikiSQL also reads each split's `.tables.jsonl` beside it (WikiSQL's own layout).
FILES = {
    "copa": {"train": "copa/train.jsonl", "val": "copa/val.jsonl"},  # SuperGLUE
    "boolq": {"train": "boolq/train.jsonl", "val": "boolq/val.jsonl"},  # SuperGLUE
    "rte": {"train": "rte/train.jsonl", "val": "rte/val.jsonl"},  # SuperGLUE
    "sst2": {"train": "sst2/train.tsv", "val": "sst2/dev.tsv"},  # GLUE
    "qnli": {"train": "qnli/train.tsv", "val": "qnli/dev.tsv"},  # GLUE
    "squad": {"train": "squad/train-v1.1.json", "val": "squad/dev-v1.1.json"},
    "record": {"train": "record/train.jsonl", "val": "record/val.jsonl"},  # SuperGLUE
    "e2e": {"train": "e2e/trainset.csv", "dev": "e2e/devset.csv", "test": "e2e/testset_w_refs.csv"},  # E2E NLG
    "gsm8k": {"train": "gsm8k/train.jsonl", "val": "gsm8k/test.jsonl"},
    "wikisql": {
        "train": "wikisql/train.jsonl",
        "train_tables": "wikisql/train.tables.jsonl",
        "dev": "wikisql/dev.jsonl",
        "dev_tables": "wikisql/dev.tables.jsonl",
        "test": "wikisql/test.jsonl",
        "test_tables": "wikisql/test.tables.jsonl",
    },
    "alpaca": {"train": "alpaca/alpaca_data.json"},
}


@dataclass
class Example:
    prompt: str  # the filled-in template, before chat wrapping
    response: str  # the training target
    answers: list[str]  # references the metric accepts
    meta: dict = field(default_factory=dict, repr=False)  # what a metric needs beyond text (WikiSQL: table, sql)


@dataclass
class Task:
    name: str
    splits: dict[str, list[Example]]  # train, dev, test
    metric_name: str  # the primary key of metric()'s result
    metric: Callable[[list[str], list[Example]], dict[str, float]]  # scores are fractions in [0, 1]
    files: tuple[Path, ...] = ()  # the files it was read from (a run must never write over them)


# ---- reading files: every bad row is reported as path:line (or path:item) ----
def read_text(path, what: str = "file") -> str:
    """A UTF-8 text file (through gzip when its name ends in .gz); a byte that is not UTF-8
    is reported as path:line."""
    try:
        data = Path(path).read_bytes()
        if Path(path).suffix == ".gz":
            data = gzip.decompress(data)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except EOFError:
        raise UserError(f"{path} is truncated (its gzip stream ends early)") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from None


def read_text_lines(path, what: str = "file") -> list[str]:
    return read_text(path, what).splitlines()


def _jsonl(path: Path):
    for lineno, line in enumerate(io.StringIO(read_text(path)), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _table(path: Path, delimiter: str):
    # GLUE's tsv files hold unbalanced quotes inside sentences, so quoting is off there.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    try:
        for row in rows:
            yield rows.line_num, row
    except csv.Error as e:  # e.g. a field over csv's 131,072-character limit (its line is not yet counted)
        raise UserError(f"{path}:{rows.line_num + 1}: {e}") from None


def _json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _build(path: Path, rows, make) -> list[Example]:
    out = []
    for where, row in rows:
        if not isinstance(row, dict):  # e.g. a jsonl line holding an array
            raise UserError(f"{path}:{where}: expected a JSON object of named fields, got {type(row).__name__}")
        try:
            made = make(row)
        except KeyError as e:
            raise UserError(f"{path}:{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"{path}:{where}: {str(e) or type(e).__name__}") from None
        out.extend(made if isinstance(made, list) else [made])
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


def _label(mapping: dict, value) -> str:
    if isinstance(value, str):
        value = value.strip().lower()
    if value not in mapping:
        raise ValueError(f"unknown label {value!r} (expected one of {sorted(map(str, mapping))})")
    return mapping[value]


def _example(prompt: str, response: str) -> Example:
    return Example(prompt, response, [response])


# ---- templates, one reader per format ----
ENTAIL = "sentence 1: {}\nsentence 2: {}\nAre sentence 1 and sentence 2 have entailment relation or not?"
ENTAIL_LABELS = {"entailment": "entailment", "not_entailment": "not entailment"}
QA = "Context:\n{}\nQuestion:\n{}"


def _copa(path):
    def make(r):
        query = "What was the cause?" if r["question"] == "cause" else "What happened as a result?"
        prompt = f"Premise:\n{r['premise']}\nChoice 1: {r['choice1']}\nChoice 2: {r['choice2']}\nQuestion:\n{query}"
        return _example(prompt, _label({0: "1", 1: "2"}, r["label"]))

    return _build(path, _jsonl(path), make)


def _boolq(path):
    labels = {True: "yes", False: "no", "true": "yes", "false": "no"}  # bool, or strings in some copies
    return _build(
        path,
        _jsonl(path),
        lambda r: _example(
            f"Reference document:\n{r['passage']}\nQuestion:\n{r['question']}", _label(labels, r["label"])
        ),
    )


def _rte(path):
    return _build(
        path,
        _jsonl(path),
        lambda r: _example(ENTAIL.format(r["premise"], r["hypothesis"]), _label(ENTAIL_LABELS, r["label"])),
    )


def _sst2(path):
    def make(r):
        sentence = r["sentence"] if "sentence" in r else r["text"]  # GLUE's header, or `text`
        return _example(
            f"{sentence.strip()}\nThe sentiment of the given sentence is:",
            _label({"1": "positive", "0": "negative"}, r["label"]),
        )

    return _build(path, _table(path, "\t"), make)


def _qnli(path):
    return _build(
        path,
        _table(path, "\t"),
        lambda r: _example(ENTAIL.format(r["question"], r["sentence"]), _label(ENTAIL_LABELS, r["label"])),
    )


def _qa(prompt: str, texts: list[str]) -> Example:
    answers = list(dict.fromkeys(t.strip() for t in texts))  # keep order, drop repeats
    if not answers:
        raise ValueError("no answers")
    return Example(prompt, answers[0], answers)


def _squad(path):
    doc = _json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f'{path}: expected SQuAD v1.1 json, {{"data": [{{"paragraphs": [...]}}, ...]}}')
    return _build(
        path,
        ((f"article {i}", a) for i, a in enumerate(doc["data"])),
        lambda article: [
            _qa(QA.format(p["context"], qa["question"]), [a["text"] for a in qa["answers"]])
            for p in article["paragraphs"]
            for qa in p["qas"]
        ],
    )


def _record(path):
    def make(r):
        # The passage marks its highlights with "@highlight" lines; join them as sentences (as T5 does).
        text = re.sub(r"\n@highlight\n", ". ", re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", r["passage"]["text"]))
        return [_qa(QA.format(text, qa["query"]), [a["text"] for a in qa["answers"]]) for qa in r["qas"]]

    return _build(path, _jsonl(path), make)


def _e2e(path):
    # The template's {ref} is E2E's meaning representation (`mr`); the target is the human text (`ref`).
    prompt = "Reference:\n{}\nGenerate a customer review following the given reference."
    return _build(path, _table(path, ","), lambda r: _example(prompt.format(r["mr"]), r["ref"]))


def _e2e_grouped(path):
    # Evaluation is multi-reference: one example per meaning representation, all its texts accepted.
    grouped = {}
    for ex in _e2e(path):
        grouped.setdefault(ex.prompt, []).append(ex.response)
    return [Example(prompt, refs[0], refs) for prompt, refs in grouped.items()]


def _gsm8k(path):
    prompt = (
        "Answer the following math quesition:\n{}\nInstruction: please think step by step."  # sic, as in the papers
    )
    return _build(
        path,
        _jsonl(path),
        lambda r: Example(prompt.format(r["question"]), r["answer"], [r["answer"].rsplit("####", 1)[-1].strip()]),
    )


def _wikisql(path):
    tables_path = path.with_name(path.stem + ".tables.jsonl")
    tables = dict(_build(tables_path, _jsonl(tables_path), lambda t: [(t["id"], t)]))

    def make(r):
        table = tables.get(r["table_id"])
        if table is None:
            raise ValueError(f"table {r['table_id']!r} is not in {tables_path}")
        sql = metrics.render_sql(r["sql"], table["header"])
        prompt = (
            f"Answer the following query by writing a SQL query on the given table:\n{r['question']}\n"
            f"Table information:\n{', '.join(table['header'])}."
        )
        return Example(prompt, sql, [sql], {"sql": r["sql"], "table": table})

    return _build(path, _jsonl(path), make)


def _alpaca(path):
    # Alpaca has no template in the papers: the instruction, then its input (if any) on the next line.
    items = _json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of {{instruction, input, output}}")
    return _build(
        path,
        ((f"item {i}", r) for i, r in enumerate(items)),
        lambda r: _example(r["instruction"] + (f"\n{r['input']}" if r.get("input") else ""), r["output"]),
    )


def _custom(path):
    def make(r):
        for key in ("prompt", "response"):
            if not isinstance(r[key], str):
                raise ValueError(f"field {key!r} is not a string")
        return _example(r["prompt"], r["response"])

    return _build(path, _jsonl(path), make)


# ---- metrics per task: the primary metric first ----
def _answers(examples):
    return [e.answers for e in examples]


def _labels(preds, examples):
    return {"accuracy": metrics.accuracy(preds, _answers(examples))}


def _span(preds, examples):
    # The papers report the mean of F1 and exact match for SQuAD and ReCoRD (docs/methods.md, Metrics).
    f1, em = metrics.f1(preds, _answers(examples)), metrics.exact_match(preds, _answers(examples))
    return {"f1_em": (f1 + em) / 2, "f1": f1, "exact_match": em}


def _rouge(preds, examples):
    return {"rouge_l": metrics.rouge_l(preds, _answers(examples))}


def _math(preds, examples):
    return {"accuracy": metrics.gsm8k_accuracy(preds, _answers(examples))}


def _sql(preds, examples):
    return {
        "execution_accuracy": metrics.wikisql_execution_accuracy(
            preds, [e.meta["sql"] for e in examples], [e.meta["table"] for e in examples]
        ),
        "exact_match": metrics.wikisql_exact_match(preds, _answers(examples)),
    }


def _free(preds, examples):
    # Custom data may be labels or free text: label accuracy leads, overlap scores follow.
    a = _answers(examples)
    return {"accuracy": metrics.accuracy(preds, a), "f1": metrics.f1(preds, a), "rouge_l": metrics.rouge_l(preds, a)}


# name -> (reader of the train file, reader of the val file, metric, its primary key)
_REGISTRY = {
    "copa": (_copa, _copa, _labels, "accuracy"),
    "boolq": (_boolq, _boolq, _labels, "accuracy"),
    "rte": (_rte, _rte, _labels, "accuracy"),
    "sst2": (_sst2, _sst2, _labels, "accuracy"),
    "qnli": (_qnli, _qnli, _labels, "accuracy"),
    "squad": (_squad, _squad, _span, "f1_em"),
    "record": (_record, _record, _span, "f1_em"),
    "e2e": (_e2e, _e2e_grouped, _rouge, "rouge_l"),
    "gsm8k": (_gsm8k, _gsm8k, _math, "accuracy"),
    "wikisql": (_wikisql, _wikisql, _sql, "execution_accuracy"),
    "alpaca": (_alpaca, None, _rouge, "rouge_l"),
    "custom": (_custom, _custom, _free, "accuracy"),
}


# ---- splits ----
def _split(examples: list, seed: int, sizes: list[int]) -> list[list]:
    """Shuffle indices with the seed, cut pieces of the given sizes, the rest last; each piece
    keeps file order, so a split's order never depends on the seed."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cuts = [0]
    for n in sizes:
        cuts.append(cuts[-1] + n)
    cuts.append(len(order))
    return [[examples[i] for i in sorted(order[a:b])] for a, b in zip(cuts, cuts[1:])]


def _task_dir(name: str, data_dir: str | None) -> Path:
    if data_dir is None:
        if name in SHIPPED_TASKS:
            return SHIPPED / name
        expected = ", ".join(FILES[name].values())
        raise UserError(f"task {name} needs data_dir, a folder holding {expected}", ("data_dir",))
    root = Path(data_dir)
    folder = Path(FILES[name]["train"]).parent.name
    # Accept the task's own folder too: it is named after the task or already holds its files.
    inside = root.name == folder or any(_find(root / Path(p).name) for p in FILES[name].values())
    return root if inside and not (root / folder).is_dir() else root / folder


def _find(path: Path) -> Path | None:
    """path, or path.gz, whichever exists."""
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def _need(path: Path) -> Path:
    found = _find(path)
    if found is None:
        raise UserError(f"missing file {path}")
    return found


def load_task(
    name: str,
    data_dir: str | None = None,
    seed: int = 0,
    train: str | None = None,
    dev: str | None = None,
    test: str | None = None,
) -> Task:
    """Load a task's train/dev/test examples; `seed` fixes which examples become dev/test.

    train/dev/test are paths for the `custom` task only (jsonl, one {"prompt", "response"}
    per line; without test, the dev split is also the test split)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    read_train, read_val, metric, metric_name = _REGISTRY[name]
    if name == "custom":
        if not (train and dev):
            raise UserError(
                'task custom needs train and dev: jsonl files of {"prompt": ..., "response": ...}', ("train", "dev")
            )
        splits = {"train": read_train(_need(Path(train))), "dev": read_val(_need(Path(dev)))}
        splits["test"] = read_val(_need(Path(test))) if test else splits["dev"]
        return Task(name, splits, metric_name, metric, tuple(Path(f) for f in (train, dev, test) if f))
    if train or dev or test:
        raise UserError(f"train/dev/test files are for the custom task; task {name} reads data_dir", ("data_dir",))
    base = _task_dir(name, data_dir)
    files = {key: _need(base / Path(rel).name) for key, rel in FILES[name].items()}
    examples = read_train(files["train"])
    if "test" in files:  # official train / dev / test files (docs/methods.md, Splits: E2E, WikiSQL)
        splits = {"train": examples, "dev": read_val(files["dev"]), "test": read_val(files["test"])}
    elif name in SMALL:
        val = read_val(files["val"])
        dev_part, test_part = _split(val, seed, [len(val) // 2])
        splits = {"train": examples, "dev": dev_part, "test": test_part}
    else:
        size = DEV_SIZES.get(name, DEV_SIZE)
        held = [size] if read_val else [size, size]
        if len(examples) <= sum(held):
            raise UserError(
                f"{files['train']} holds {len(examples)} examples; {name} needs more than "
                f"{sum(held)}, as {sum(held)} of them are held out"
            )
        dev_part, *rest = _split(examples, seed, held)
        test_part = read_val(files["val"]) if read_val else rest.pop(0)
        splits = {"train": rest[0], "dev": dev_part, "test": test_part}
    for split, items in splits.items():
        if not items:
            raise UserError(f"task {name}: the {split} split is empty")
    return Task(name, splits, metric_name, metric, tuple(files.values()))
