"""Every example runs end to end at a tiny budget (each runs in well under 2 minutes at its default budget)."""

import importlib.util
import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_quickstart(tmp_path):
    summary = _load("quickstart").main(["--quick", "--out", str(tmp_path)])
    assert summary["steps"] == 40 and summary["jumps"] >= 1
    assert list(tmp_path.rglob("metrics.csv"))


def test_char_lm_adamw_cosine(tmp_path):
    summary = _load("char_lm").main(["--quick", "--out", str(tmp_path)])
    assert summary["jumps"] >= 1 and summary["val_loss"] < 4.0


def test_cnn_momentum(tmp_path):
    results = _load("cnn_momentum").main(["--quick", "--out", str(tmp_path)])
    assert set(results) == {"baseline", "gfm"} and not results["gfm"]["jumps"].endswith("/ 0 tried")


def test_quickstart_with_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))  # restored after the test; the example points them under --out
    _load("quickstart").main(["--quick", "--wandb", "--out", str(tmp_path)])
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
