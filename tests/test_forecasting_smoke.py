"""Smoke test of the forecasting benchmark's quick mode (benchmarks/forecasting.py), in-process, < 60 s."""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forecasting import FORECASTERS, QUICK, render_tables, run_benchmark  # noqa: E402

KEYS = {
    "split",
    "p",
    "forecaster",
    "optimizer",
    "arch",
    "rel_error",
    "val_loss",
    "val_acc",
    "true_val_loss",
    "true_val_acc",
}


def test_quick_forecasting_benchmark(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend on a shared machine
    try:
        out = tmp_path / "forecasting.json"
        result = run_benchmark(QUICK, out, command="run_benchmark(QUICK)", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["command"] == "run_benchmark(QUICK)"
    rows = saved["rows"]
    assert len(rows) == len(result["rows"]) > 0
    assert all(set(r) >= KEYS for r in rows)
    assert {r["split"] for r in rows} == {"seen", "unseen-init", "unseen-arch"}
    assert {r["forecaster"] for r in rows} == set(FORECASTERS)
    assert {r["p"] for r in rows} == set(QUICK.fractions)
    last = [r for r in rows if r["forecaster"] == "last"]
    assert all(abs(r["rel_error"] - 1.0) < 1e-9 for r in last)
    for r in rows:
        assert math.isfinite(r["true_val_loss"]) and 0.0 <= r["true_val_acc"] <= 1.0
        if r["forecaster"] in ("last", "linear", "lstm", "transformer"):
            assert r["rel_error"] is not None and math.isfinite(r["rel_error"])
    assert {d["chose"] for d in saved["gfm_diagnostics"]} <= {"fitted", "prior"}
    table = render_tables(saved)
    assert "| seen |" in table and "gfm-prior" in table
