"""Evaluation metrics. Every score is a fraction in [0, 1], never a percentage.

Each metric takes the predictions and, per example, its accepted reference answers (one
string or a list of strings); an example scores its best match over its references.
"""

import re
import string
from collections import Counter

_TRAILING = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+$")
_PUNCTUATION = frozenset(string.punctuation)


def _refs(answers) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def _mean_best(preds, answers, score) -> float:
    preds, answers = list(preds), list(answers)
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} examples")
    if not preds:
        raise ValueError("no predictions to score")
    return sum(max(score(p, r) for r in _refs(a)) for p, a in zip(preds, answers)) / len(preds)


# ---- labels (classification tasks) ----
def normalize_label(text: str) -> str:
    """Lowercase, `_` as a space (so not_entailment == not entailment), no trailing
    punctuation ("Positive." is a hit), whitespace collapsed."""
    text = _TRAILING.sub("", text.lower().replace("_", " "))
    return " ".join(text.split())


def accuracy(preds, answers) -> float:
    return _mean_best(preds, answers, lambda p, r: float(normalize_label(p) == normalize_label(r)))


# ---- SQuAD (the official v1.1 evaluation script's normalisation and scores) ----
def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def f1(preds, answers) -> float:
    return _mean_best(preds, answers, _token_f1)


def exact_match(preds, answers) -> float:
    return _mean_best(preds, answers, lambda p, r: float(normalize_answer(p) == normalize_answer(r)))


# ---- ROUGE-L ----
# The `rouge-score` package's rougeL (what HF Evaluate's "rouge" reports), re-implemented so
# that it is no runtime dependency (it pulls in nltk and absl): its default tokenizer
# (lower-case, every run of characters outside a-z0-9 a separator, no stemming), the LCS,
# F = 2PR / (P + R), and for several references the one with the highest F.
# tests/test_tasks.py checks it against the package on generated text.
_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l_f(pred: str, ref: str) -> float:
    cand, target = rouge_tokens(pred), rouge_tokens(ref)
    if not cand or not target:
        return 0.0
    lcs = _lcs(target, cand)
    p, r = lcs / len(cand), lcs / len(target)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_l(preds, answers) -> float:
    """Mean over examples of the rougeL F-measure against the best-matching reference."""
    return _mean_best(preds, answers, _rouge_l_f)


# ---- GSM8K ----
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The first number after the last `####` (GSM8K's answer marker), else the last number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    return float(found[0].replace(",", "")) if found else None


def gsm8k_accuracy(preds, answers) -> float:
    def score(pred, ref):
        got = final_number(pred)
        return float(got is not None and got == final_number(ref))

    return _mean_best(preds, answers, score)


# ---- WikiSQL ----
AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")  # WikiSQL's lib/query.py order
COND_OPS = ("=", ">", "<")


def render_sql(sql: dict, header: list[str]) -> str:
    """WikiSQL's canonical query string, with column names instead of col0, col1, ..."""
    col = header[sql["sel"]]
    text = f"SELECT {AGG_OPS[sql['agg']]}({col})" if sql["agg"] else f"SELECT {col}"
    text += " FROM table"
    if sql["conds"]:
        text += " WHERE " + " AND ".join(f"{header[c]} {COND_OPS[o]} {v}" for c, o, v in sql["conds"])
    return text


def normalize_sql(text: str) -> str:
    """Lowercase, quotes dropped, no spaces inside parentheses, whitespace collapsed."""
    text = re.sub(r"\s*([()])\s*", r"\1", text.lower().replace('"', "").replace("'", ""))
    return " ".join(text.split())


def wikisql_exact_match(preds, answers) -> float:
    return _mean_best(preds, answers, lambda p, r: float(normalize_sql(p) == normalize_sql(r)))


def parse_sql(text: str, header: list[str]) -> dict | None:
    """Read a query written like `render_sql` back into WikiSQL's {sel, agg, conds}; None if it
    does not fit the table. Conditions are matched column by column, so values may hold 'and'."""
    m = re.fullmatch(r"\s*select\s+(.+?)\s+from\s+table(?:\s+where\s+(.+?))?\s*;?\s*", text, re.I | re.S)
    if not m:
        return None
    index = {}
    for i, name in enumerate(header):
        index.setdefault(name.lower(), i)
    sel_text, where = m.groups()
    agg = re.fullmatch(r"(max|min|count|sum|avg)\s*\(\s*(.+?)\s*\)", sel_text, re.I)
    sel = index.get((agg[2] if agg else sel_text).strip().lower())
    if sel is None:
        return None
    # Longest names first, so a column whose name extends another's is not cut short.
    cols = "|".join(re.escape(h) for h in sorted(index, key=len, reverse=True))
    cond = re.compile(rf"({cols})\s*([=<>])\s*(.*?)(?=\s+and\s+(?:{cols})\s*[=<>]|$)", re.I | re.S)
    conds, pos = [], 0
    while where is not None and pos < len(where):
        c = cond.match(where, pos)
        if not c:
            return None
        conds.append([index[c[1].lower()], COND_OPS.index(c[2]), c[3].strip().strip("'\"")])
        sep = re.compile(r"\s+and\s+", re.I).match(where, c.end())
        pos = sep.end() if sep else c.end()
        if not sep and pos < len(where):
            return None
    return {"sel": sel, "agg": AGG_OPS.index(agg[1].upper()) if agg else 0, "conds": conds}


def _cell(value, kind: str):
    """Numbers compare as numbers in `real` columns, text case-insensitively (as WikiSQL's
    DBEngine lowercases query values)."""
    if kind == "real":
        try:
            return float(str(value).replace(",", ""))
        except ValueError:
            pass
    return str(value).strip().lower()


def execute_sql(sql: dict, table: dict) -> list:
    """Run a {sel, agg, conds} query on a WikiSQL table ({header, types, rows}) in Python."""
    types = table.get("types") or ["text"] * len(table["header"])

    def holds(row, c, o, v):
        a, b = _cell(row[c], types[c]), _cell(v, types[c])
        if type(a) is not type(b):
            return False
        return a == b if o == 0 else (a > b if o == 1 else a < b)

    rows = [r for r in table["rows"] if all(holds(r, c, o, v) for c, o, v in sql["conds"])]
    values = [_cell(r[sql["sel"]], types[sql["sel"]]) for r in rows]
    agg = AGG_OPS[sql["agg"]]
    if agg == "COUNT":
        return [len(values)]
    if not agg:
        return values
    if agg in ("MAX", "MIN"):
        same_type = values and len({type(v) for v in values}) == 1
        return [(max if agg == "MAX" else min)(values) if same_type else None]
    nums = [v for v in values if isinstance(v, float)]
    if not nums:
        return [None]
    return [sum(nums) if agg == "SUM" else sum(nums) / len(nums)]


def wikisql_execution_accuracy(preds, gold: list[dict], tables: list[dict]) -> float:
    """A prediction is right when it runs on its table and gives the gold query's result."""

    def score(pred, pair):
        sql, table = pair
        parsed = parse_sql(pred, table["header"])
        return float(parsed is not None and execute_sql(parsed, table) == execute_sql(sql, table))

    return _mean_best(preds, [[pair] for pair in zip(gold, tables)], score)
