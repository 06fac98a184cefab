"""Task loaders, splits, refusals and metrics, on small fixtures written into tmp_path."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipara.errors import UserError
from minipara.train import metrics
from minipara.train.tasks import DEV_SIZE, TASKS, load_task


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def rte_rows(n):
    return [
        {"premise": f"p{i}", "hypothesis": f"h{i}", "idx": i, "label": "entailment" if i % 2 else "not_entailment"}
        for i in range(n)
    ]


def sizes(task):
    return {k: len(v) for k, v in task.splits.items()}


# ---- COPA, shipped ----
def test_copa_ships_with_its_splits_and_template():
    task = load_task("copa")
    assert sizes(task) == {"train": 400, "dev": 50, "test": 50}
    first = task.splits["train"][0]
    assert first.prompt == (
        "Premise:\nMy body cast a shadow over the grass.\nChoice 1: The sun was rising.\n"
        "Choice 2: The grass was cut.\nQuestion:\nWhat was the cause?"
    )
    assert (first.response, first.answers) == ("1", ["1"])
    assert task.metric_name == "accuracy"


@pytest.mark.parametrize(
    "name, expected, first_response",
    [
        ("rte", {"train": 2490, "dev": 138, "test": 139}, "not entailment"),  # validation halved (docs/methods.md)
        ("sst2", {"train": 66349, "dev": 1000, "test": 872}, "negative"),  # 1,000 train rows as dev; GLUE dev as test
        ("gsm8k", {"train": 6973, "dev": 500, "test": 1319}, None),  # 500 train problems as dev (docs/methods.md)
    ],
)
def test_tasks_ship_gzipped_with_their_licence(name, expected, first_response):
    from minipara.train.tasks import SHIPPED

    task = load_task(name)
    assert sizes(task) == expected
    assert (SHIPPED / name / "LICENSE").is_file()
    if first_response is not None:
        assert task.splits["train"][0].response == first_response
    assert load_task(name).splits == task.splits  # fixed split


def test_gzipped_files_are_read_from_a_data_dir(tmp_path):
    import gzip

    path = tmp_path / "rte/val.jsonl.gz"
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(3))
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rte_rows(4)))
    assert sizes(load_task("rte", str(tmp_path))) == {"train": 3, "dev": 2, "test": 2}


def test_copa_effect_query_and_second_choice(tmp_path):
    row = {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 1}
    write_jsonl(tmp_path / "copa/train.jsonl", [row])
    write_jsonl(tmp_path / "copa/val.jsonl", [row, row])
    ex = load_task("copa", str(tmp_path)).splits["train"][0]
    assert ex.prompt == "Premise:\nP.\nChoice 1: A.\nChoice 2: B.\nQuestion:\nWhat happened as a result?"
    assert ex.response == "2"


# ---- splits ----
def test_small_task_halves_validation_deterministically(tmp_path):
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(5))
    write_jsonl(tmp_path / "rte/val.jsonl", rte_rows(11))
    a, b = load_task("rte", str(tmp_path), seed=3), load_task("rte", str(tmp_path), seed=3)
    assert sizes(a) == {"train": 5, "dev": 5, "test": 6}
    assert a.splits == b.splits
    dev, test = {e.prompt for e in a.splits["dev"]}, {e.prompt for e in a.splits["test"]}
    assert not dev & test and dev | test == {
        f"sentence 1: p{i}\nsentence 2: h{i}\nAre sentence 1 and sentence 2 have entailment relation or not?"
        for i in range(11)
    }
    other = load_task("rte", str(tmp_path), seed=4)
    assert {e.prompt for e in other.splits["dev"]} != dev
    assert a.splits["train"][0].response == "not entailment" and a.splits["train"][1].response == "entailment"


def test_data_dir_may_be_the_task_folder(tmp_path):
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(3))
    write_jsonl(tmp_path / "rte/val.jsonl", rte_rows(4))
    assert load_task("rte", str(tmp_path / "rte")).splits == load_task("rte", str(tmp_path)).splits


def test_large_task_holds_out_dev_from_train(tmp_path):
    n = DEV_SIZE + 7
    lines = ["sentence\tlabel"] + [f's{i} "quoted {i}\t{i % 2}' for i in range(n)]
    write_text(tmp_path / "sst2/train.tsv", "\n".join(lines) + "\n")
    write_text(tmp_path / "sst2/dev.tsv", "text\tlabel\ngood .\t1\nbad .\t0\n")
    task = load_task("sst2", str(tmp_path), seed=1)
    assert sizes(task) == {"train": 7, "dev": DEV_SIZE, "test": 2}
    assert task.splits["test"][0].prompt == "good .\nThe sentiment of the given sentence is:"
    assert [e.response for e in task.splits["test"]] == ["positive", "negative"]
    train, dev = {e.prompt for e in task.splits["train"]}, {e.prompt for e in task.splits["dev"]}
    assert not train & dev and len(train | dev) == n
    assert load_task("sst2", str(tmp_path), seed=1).splits == task.splits


def test_large_task_with_too_few_training_examples(tmp_path):
    write_text(tmp_path / "sst2/train.tsv", "text\tlabel\na\t1\n")
    write_text(tmp_path / "sst2/dev.tsv", "text\tlabel\na\t1\n")
    with pytest.raises(UserError, match="holds 1 examples"):
        load_task("sst2", str(tmp_path))


# ---- each format ----
def test_boolq_labels_as_bools_or_strings(tmp_path):
    rows = [{"question": "q", "passage": "doc", "label": v} for v in (True, "false", "true", False)]
    write_jsonl(tmp_path / "boolq/train.jsonl", rows)
    write_jsonl(tmp_path / "boolq/val.jsonl", rows)
    task = load_task("boolq", str(tmp_path))
    assert [e.response for e in task.splits["train"]] == ["yes", "no", "yes", "no"]
    assert task.splits["train"][0].prompt == "Reference document:\ndoc\nQuestion:\nq"


def test_qnli_tsv(tmp_path):
    head = "index\tquestion\tsentence\tlabel\n"
    rows = "".join(f"{i}\tq{i}?\ts{i}.\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(DEV_SIZE + 2))
    write_text(tmp_path / "qnli/train.tsv", head + rows)
    write_text(tmp_path / "qnli/dev.tsv", head + "0\tWho?\tHim.\tnot_entailment\n")
    ex = load_task("qnli", str(tmp_path)).splits["test"][0]
    assert (
        ex.prompt
        == "sentence 1: Who?\nsentence 2: Him.\nAre sentence 1 and sentence 2 have entailment relation or not?"
    )
    assert ex.response == "not entailment"


def squad_doc(n):
    qas = [
        {
            "id": str(i),
            "question": f"q{i}?",
            "answers": [{"text": f"a{i}", "answer_start": 0}] * 2 + [{"text": f"the a{i}", "answer_start": 0}],
        }
        for i in range(n)
    ]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "ctx", "qas": qas}]}]}


def test_squad_json(tmp_path):
    write_text(tmp_path / "squad/train-v1.1.json", json.dumps(squad_doc(DEV_SIZE + 1)))
    write_text(tmp_path / "squad/dev-v1.1.json", json.dumps(squad_doc(2)))
    task = load_task("squad", str(tmp_path))
    ex = task.splits["test"][1]
    assert (ex.prompt, ex.response, ex.answers) == ("Context:\nctx\nQuestion:\nq1?", "a1", ["a1", "the a1"])
    assert task.metric(["x", "the A1!"], task.splits["test"]) == {"f1_em": 0.5, "f1": 0.5, "exact_match": 0.5}
    # The papers' SQuAD/ReCoRD score, first (primary): the mean of F1 and exact match (docs/methods.md, Metrics).
    assert task.metric_name == "f1_em"
    # "a0 b" vs "a0": F1 2/3, EM 0; "a1": F1 1, EM 1 -> F1 5/6, EM 1/2, f1_em 2/3
    assert task.metric(["a0 b", "a1"], task.splits["test"]) == pytest.approx(
        {"f1_em": 2 / 3, "f1": 5 / 6, "exact_match": 0.5}
    )
    assert list(task.metric(["a0 b", "a1"], task.splits["test"])) == ["f1_em", "f1", "exact_match"]


def test_record_jsonl(tmp_path):
    row = {
        "passage": {"text": "Story text.\n@highlight\nFirst point\n@highlight\nSecond"},
        "qas": [{"query": "@placeholder won", "answers": [{"start": 0, "end": 4, "text": "Story"}]}] * 2,
    }
    write_jsonl(tmp_path / "record/train.jsonl", [row] * (DEV_SIZE // 2 + 1))
    write_jsonl(tmp_path / "record/val.jsonl", [row])
    task = load_task("record", str(tmp_path))
    assert sizes(task) == {"train": 2, "dev": DEV_SIZE, "test": 2}
    ex = task.splits["test"][0]
    assert ex.prompt == "Context:\nStory text. First point. Second\nQuestion:\n@placeholder won"
    assert ex.answers == ["Story"]


def test_e2e_official_splits_group_references_for_evaluation(tmp_path):
    rows = "".join(f'"name[X{i}], food[Thai]","X{i} serves Thai food."\n' for i in range(5))
    write_text(tmp_path / "e2e/trainset.csv", "mr,ref\n" + rows)
    write_text(tmp_path / "e2e/devset.csv", 'mr,ref\n"name[D]","D."\n"name[D]","D!"\n')
    write_text(
        tmp_path / "e2e/testset_w_refs.csv", 'mr,ref\n"name[A]","A is nice."\n"name[A]","A, nice."\n"name[B]","B."\n'
    )
    task = load_task("e2e", str(tmp_path))
    # docs/methods.md, Splits: the official files as they are; a random hold-out of training rows would leak
    # (each meaning representation has several references).
    assert sizes(task) == {"train": 5, "dev": 1, "test": 2}
    ex = task.splits["train"][0]
    assert ex.prompt == "Reference:\nname[X0], food[Thai]\nGenerate a customer review following the given reference."
    assert [e.answers for e in task.splits["dev"]] == [["D.", "D!"]]
    assert [e.answers for e in task.splits["test"]] == [["A is nice.", "A, nice."], ["B."]]
    assert task.metric_name == "rouge_l"


def test_gsm8k_jsonl(tmp_path):
    rows = [
        {"question": f"{i}+1?", "answer": f"It is <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1:,}"}
        for i in range(DEV_SIZE + 300)
    ]
    write_jsonl(tmp_path / "gsm8k/train.jsonl", rows)
    write_jsonl(tmp_path / "gsm8k/test.jsonl", rows[1233:1234])
    task = load_task("gsm8k", str(tmp_path))
    assert sizes(task) == {"train": DEV_SIZE + 300 - 500, "dev": 500, "test": 1}  # 500 as dev (docs/methods.md, Splits)
    ex = task.splits["test"][0]
    assert ex.prompt == "Answer the following math quesition:\n1233+1?\nInstruction: please think step by step."
    assert ex.response == rows[1233]["answer"] and ex.answers == ["1,234"]
    assert task.metric(["so the total is $1234.00"], [ex]) == {"accuracy": 1.0}


def test_wikisql_renders_sql_and_executes(tmp_path):
    table = {
        "id": "t1",
        "header": ["Player", "Goals", "Team"],
        "types": ["text", "real", "text"],
        "rows": [["Ann", 3, "Red and Blue"], ["Bob", 5, "Green"], ["Cy", 7, "Red and Blue"]],
    }
    row = {
        "table_id": "t1",
        "question": "Most goals for Red and Blue?",
        "sql": {"sel": 1, "agg": 1, "conds": [[2, 0, "Red and Blue"]]},
    }
    for split, n in (("train", 3), ("dev", 2), ("test", 1)):  # the official files (docs/methods.md, Splits)
        write_jsonl(tmp_path / f"wikisql/{split}.tables.jsonl", [table])
        write_jsonl(tmp_path / f"wikisql/{split}.jsonl", [row] * n)
    task = load_task("wikisql", str(tmp_path))
    assert sizes(task) == {"train": 3, "dev": 2, "test": 1}
    ex = task.splits["test"][0]
    assert ex.prompt == (
        "Answer the following query by writing a SQL query on the given table:\n"
        "Most goals for Red and Blue?\nTable information:\nPlayer, Goals, Team."
    )
    assert ex.response == "SELECT MAX(Goals) FROM table WHERE Team = Red and Blue"
    preds = [
        "select max( goals ) from table where team = 'red and blue'",  # same query, other spelling
        "SELECT Goals FROM table WHERE Player = Cy",  # different query, same result
        "SELECT MIN(Goals) FROM table WHERE Team = Red and Blue",
        "not sql",
    ]
    scores = task.metric(preds, [ex] * 4)
    assert list(scores) == ["execution_accuracy", "exact_match"]
    assert scores == {"execution_accuracy": 0.5, "exact_match": 0.25}


def test_alpaca_holds_out_dev_and_test(tmp_path):
    items = [
        {"instruction": f"Do {i}.", "input": "" if i % 2 else f"in{i}", "output": f"out{i}"}
        for i in range(2 * DEV_SIZE + 5)
    ]
    write_text(tmp_path / "alpaca/alpaca_data.json", json.dumps(items))
    task = load_task("alpaca", str(tmp_path))
    assert sizes(task) == {"train": 5, "dev": DEV_SIZE, "test": DEV_SIZE}
    prompts = {e.prompt for e in task.splits["train"] + task.splits["dev"] + task.splits["test"]}
    assert "Do 0.\nin0" in prompts and "Do 1." in prompts and len(prompts) == len(items)


def test_custom_task(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "2+2=", "response": "4"}])
    dev = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "response": "2"}])
    task = load_task("custom", None, train=str(train), dev=str(dev))
    assert task.splits["test"] == task.splits["dev"] and task.splits["train"][0].prompt == "2+2="
    assert task.metric(["2."], task.splits["dev"])["accuracy"] == 1.0
    test = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "3+3=", "response": "6"}] * 2)
    assert len(load_task("custom", None, train=str(train), dev=str(dev), test=str(test)).splits["test"]) == 2


# ---- refusals ----
def test_unknown_task_lists_the_valid_names():
    with pytest.raises(UserError) as e:
        load_task("mnli", None)
    assert all(name in str(e.value) for name in TASKS)


def test_missing_data_dir_names_the_expected_files():
    with pytest.raises(UserError, match=r"task boolq needs data_dir.*boolq/train\.jsonl, boolq/val\.jsonl"):
        load_task("boolq", None)


def test_missing_file_is_named(tmp_path):
    write_jsonl(tmp_path / "boolq/val.jsonl", [{"question": "q", "passage": "p", "label": True}] * 2)
    with pytest.raises(UserError) as e:
        load_task("boolq", str(tmp_path))
    assert str(e.value) == f"missing file {tmp_path / 'boolq' / 'train.jsonl'}"


def test_empty_file_is_refused(tmp_path):
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(2))
    write_text(tmp_path / "rte/val.jsonl", "\n")
    with pytest.raises(UserError, match=r"val\.jsonl holds no examples"):
        load_task("rte", str(tmp_path))


def test_custom_missing_field_names_file_and_line(tmp_path):
    good = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    bad = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(UserError) as e:
        load_task("custom", None, train=str(bad), dev=str(good))
    assert str(e.value) == f"{bad}:2: missing field 'response'"
    with pytest.raises(UserError, match="needs train and dev"):
        load_task("custom", None, train=str(good))


def test_bad_label_and_bad_json_name_the_line(tmp_path):
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(2) + [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    write_text(tmp_path / "rte/val.jsonl", '{"premise": "p",\n')
    with pytest.raises(UserError, match=r"train\.jsonl:3: unknown label 'maybe'"):
        load_task("rte", str(tmp_path))
    write_jsonl(tmp_path / "rte/train.jsonl", rte_rows(2))
    with pytest.raises(UserError, match=r"val\.jsonl:1: not valid JSON"):
        load_task("rte", str(tmp_path))


# ---- metrics on hand-computed cases ----
def test_accuracy_normalises_labels():
    assert (
        metrics.accuracy(
            ["Not_Entailment.", " positive ", "yes", "no"], ["not entailment", "Positive", ["no", "yes"], "yes"]
        )
        == 0.75
    )


def test_squad_f1_and_exact_match():
    # pred tokens {cat, sat, on, mat}, ref {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert metrics.f1(["The cat sat on a mat"], [["the cat on the mat"]]) == pytest.approx(6 / 7)
    assert metrics.f1(["dog"], [["cat", "a dog!"]]) == 1.0
    assert metrics.exact_match(["The Eiffel Tower."], [["eiffel tower"]]) == 1.0
    assert metrics.exact_match(["Eiffel"], [["eiffel tower"]]) == 0.0


def test_rouge_l_known_pairs():
    # The example: "a b c" against "a b c d e f": P = 1, R = 1/2, F1 = 2/3 (the E2E
    # scripts' beta = 1.2 gave 0.629).
    assert metrics.rouge_l(["a b c"], [["a b c d e f"]]) == pytest.approx(2 / 3)
    # The best single reference by F, not best precision and best recall taken apart (which gave 1.0).
    assert metrics.rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(2 / 3)
    assert metrics.rouge_l(["Don't stop!"], [["don t STOP"]]) == 1.0  # its tokenizer: a-z0-9 runs only
    assert metrics.rouge_l([""], [["x"]]) == 0.0


rouge_text = st.text(alphabet=st.sampled_from(list("abcAB 0,.'-é\n")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(rouge_text, st.lists(rouge_text, min_size=1, max_size=3))
def test_rouge_l_equals_the_rouge_score_package(pred, refs):
    """docs/methods.md, Metrics: ROUGE-L is HF Evaluate's, i.e. rouge-score's rougeL F-measure, best over the
    references (RougeScorer.score_multi)."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    expected = rouge_scorer.RougeScorer(["rougeL"]).score_multi(refs, pred)["rougeL"].fmeasure
    assert metrics.rouge_l([pred], [refs]) == pytest.approx(expected, abs=1e-12)


def test_gsm8k_final_numbers():
    assert metrics.final_number("so 3 + 4 = 7\n#### 1,234 dollars, not 5") == 1234
    assert metrics.final_number("It costs $-2.50 then 1,000.") == 1000
    assert metrics.final_number("no digits") is None
    preds = ["The answer is 1,234.", "#### 18", "18 or 19", "nothing"]
    refs = ["... #### 1234", "x\n#### 18", "#### 18", "#### 0"]
    assert metrics.gsm8k_accuracy(preds, refs) == 0.5


def test_metric_lengths_must_match():
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], ["a", "b"])


# ---- properties ----
normalisable = st.text(min_size=1).filter(lambda s: metrics.normalize_answer(s) != "")


@given(normalisable)
def test_f1_and_em_of_a_string_with_itself(x):
    assert metrics.f1([x], [[x]]) == 1.0 and metrics.exact_match([x], [[x]]) == 1.0


@given(st.text(), st.text())
def test_accuracy_is_symmetric_and_normalisation_idempotent(a, b):
    assert metrics.accuracy([a], [b]) == metrics.accuracy([b], [a])
    assert metrics.normalize_label(metrics.normalize_label(a)) == metrics.normalize_label(a)
    assert metrics.accuracy([a], [metrics.normalize_label(a)]) == 1.0


@given(st.lists(st.sampled_from("abcde"), max_size=8), st.lists(st.sampled_from("abcde"), max_size=8))
def test_rouge_l_in_unit_interval(p, r):
    score = metrics.rouge_l([" ".join(p)], [" ".join(r)])
    assert 0.0 <= score <= 1.0 and (score == 1.0) == (bool(p) and p == r)
