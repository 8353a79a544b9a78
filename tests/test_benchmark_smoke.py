"""Smoke test of the acceleration benchmark: quick mode end to end, JSON shape, report generation."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks/`

from benchmarks.methods import METHODS  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.run import run_benchmark  # noqa: E402
from benchmarks.tasks import QUICK_TASKS  # noqa: E402


def test_quick_benchmark_and_report(tmp_path):
    out = tmp_path / "acceleration.json"
    run_benchmark(quick=True, out=out, log=lambda *a: None)
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m benchmarks.run --quick")
    runs = result["runs"]
    assert sorted((r["task"], r["method"], r["seed"]) for r in runs) == sorted(
        (t, m, 0) for t in QUICK_TASKS for m in METHODS
    )
    for r in runs:
        for key in ("task", "method", "seed", "steps_to_target", "seconds_to_target", "final_metric", "metric", "mode"):
            assert key in r
        assert r["steps_to_target"] is None or isinstance(r["steps_to_target"], int)
        assert r["seconds_to_target"] is None or isinstance(r["seconds_to_target"], float)
        assert r["metric"] == "test_loss" and r["mode"] == "min"
        assert len(r["curve"]["step"]) == len(r["curve"]["loss"]) == len(r["curve"]["seconds"]) > 2
        assert r["curve"]["step"][-1] == r["max_steps"]
        if r["method"] in ("linear", "gfm", "oracle"):
            assert r["jumps"], "every jump method attempts jumps in quick mode"
    base = {r["task"]: r for r in runs if r["method"] == "baseline"}
    for r in runs:
        assert r["target"] == base[r["task"]]["target"]
    assert all(r["steps_to_target"] is not None for r in base.values())

    doc = write_report(out, tmp_path / "docs" / "benchmark.md")
    text = doc.read_text()
    assert "| gfm |" in text and "| oracle |" in text and result["command"] in text
    for task in QUICK_TASKS:
        assert (tmp_path / "docs" / "img" / f"benchmark_{task}.png").stat().st_size > 0
