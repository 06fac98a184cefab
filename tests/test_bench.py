"""bench.py runs every method end to end and writes valid JSON (tiny settings: this checks
that it works, not how fast; speed is measured by bench.py runs, not by tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir

from minipara.bench.speed import VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_method_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench.py",
        "--shape",
        "gemma-3-270m",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "3",
        "--prompt-tokens",
        "12",
        "--json",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    seen = {(r["variant"], r["beams"]) for r in data["results"]}
    assert seen == {(v, b) for v in VARIANTS for b in (1, 3)}
    for r in data["results"]:
        assert r["tps"] > 0 and r["decode_tps"] > 0 and r["peak_mb"] > 0 and r["x_base"] > 0
    assert data["machine"]["torch"] and data["settings"]["shape"] == "gemma-3-270m"
    assert "para" in run.stdout and "x_base" in run.stdout  # the table


def test_bench_multi_tenant_mix(tmp_path):
    out = tmp_path / "mix.json"
    cmd = [
        sys.executable,
        "bench.py",
        "--shape",
        "gemma-3-270m",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--prompt-tokens",
        "8",
        "--batch",
        "5",
        "--tenants",
        "4",
        "--mix",
        "--methods",
        "para,iapt,lora,ia3",
        "--json",
        str(out),
        "--profile",
        str(tmp_path / "prof.txt"),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["base", "ia3+iapt+lora+para x4 mixed"]
    assert all(r["batch"] == 5 and r["tps_all_rows"] == r["tps"] * 5 for r in rows)
    prof = (tmp_path / "prof.txt").read_text()
    assert prof.count("## ") == 2 and "aten::" in prof and "profile" not in rows[0]


def test_bench_interleaved_runs_every_method(tmp_path):
    out = tmp_path / "inter.json"
    cmd = [
        sys.executable,
        "bench.py",
        "--shape",
        "gemma-3-270m",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--prompt-tokens",
        "8",
        "--methods",
        "base,para,lora-merged",
        "--beams",
        "1,3",
        "--interleave",
        "--json",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["beams"]) for r in rows] == [
        (v, b) for v in ("base", "para", "lora-merged") for b in (1, 3)
    ]
    assert all(r["tps"] > 0 and r["x_base"] > 0 for r in rows)
    assert all(r["peak_mb"] > 0 and r["kv_mb"] > 0 for r in rows)  # each row's own peak, over its own runs
    refused = subprocess.run(
        [*cmd, "--profile", str(tmp_path / "p.txt")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and refused.stderr.startswith("error: --interleave")
    # Tenant rows too: the base batch and the mixed one, in turns.
    tenants = [a for a in cmd if a != "base,para,lora-merged"]
    tenants[tenants.index("--methods") + 1 : tenants.index("--methods") + 1] = ["lora"]
    run = subprocess.run(
        [*tenants, "--beams", "1", "--batch", "3", "--tenants", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("base", 3), ("lora x2 mixed", 3)]
    assert rows[1]["x_base"] > 0 and rows[1]["tps_all_rows"] == rows[1]["tps"] * 3


def test_bench_compare_hf_runs_hf_on_the_same_weights(tmp_path):
    """--compare-hf: HF generate() (PEFT for LoRA and (IA)^3) runs each row too; on the bare model,
    with the same weights, greedy and beam search give exactly minipara's tokens."""
    pytest.importorskip("peft")
    model_dir = write_tiny_model_dir(tmp_path)
    out, md = tmp_path / "hf.json", tmp_path / "hf.md"
    common = [
        sys.executable,
        "bench.py",
        "--model",
        str(model_dir),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "5",
        "--prompt-tokens",
        "12",
        "--compare-hf",
    ]
    run = subprocess.run(
        [*common, "--methods", "base,lora,ia3,para", "--json", str(out), "--markdown", str(md)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["variant"], r["beams"]): r for r in json.loads(out.read_text())["results"]}
    for key in [("base", 1), ("base", 3), ("lora", 1), ("lora", 3), ("ia3", 1), ("ia3", 3)]:
        r = rows[key]
        assert r["hf_tps"] > 0 and r["hf_decode_tps"] > 0 and r["x_hf"] == pytest.approx(r["tps"] / r["hf_tps"])
    assert rows[("base", 1)]["hf_same_tokens"] == 1.0 and rows[("base", 3)]["hf_same_tokens"] == 1.0
    assert "hf_tps" not in rows[("para", 1)]  # no HF implementation
    assert all(r["kv_mb"] > 0 for r in rows.values())
    assert "| x_hf |" in md.read_text()
    # Many tenants: PEFT's mixed-batch LoRA beside minipara's gathered one.
    run = subprocess.run(
        [*common, "--methods", "lora,para", "--batch", "4", "--tenants", "2", "--beams", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["base"]["hf_same_tokens"] == 1.0
    assert rows["lora x2 mixed"]["hf_tps"] > 0 and "hf_tps" not in rows["para x2 mixed"]
