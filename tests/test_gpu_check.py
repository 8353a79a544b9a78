"""benchmarks/gpu_check: its CPU dry run end to end, its refusal without CUDA, and a forecast on a CUDA device."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_writes_markdown_and_json(tmp_path):
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--horizon", "20"]) == 0
    (md,) = tmp_path.glob("*.md")
    (js,) = tmp_path.glob("*.json")
    result = json.loads(js.read_text())
    assert result["dry_run"] and result["device"].startswith("CPU dry run") and result["date"]
    assert [r["status"] for r in result["forecast"]] == ["ok", "ok"]
    assert all(r["prior_params_per_s"] > 0 and r["fitted_params_per_s"] > 0 for r in result["forecast"])
    assert [r["status"] for r in result["lightning"]] == ["ok", "ok"]
    assert all(r["jumps"] >= 1 for r in result["lightning"])
    assert "# GPU check: CPU dry run" in md.read_text()


def test_time_limit_skips_phases(tmp_path):
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--time-limit", "0"]) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(r["status"].startswith("skipped") for r in result["forecast"] + result["lightning"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_exits_with_a_clear_message(tmp_path, capsys):
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forecast_runs_on_the_models_cuda_device():
    from lightning_gfm.flow.field import FieldConfig, GradientField
    from lightning_gfm.forecast import forecast

    device = torch.device("cuda", 0)
    win, dyn = gpu_check.synthetic_window(5000, 4, device, torch.bfloat16)
    assert win.w.device.type == "cuda"
    field = GradientField(FieldConfig(span=12)).to(device)
    torch.nn.init.normal_(field.out.weight)  # a path-dependent field: the network runs at every stage
    lr_steps = torch.full((21, 1), 1e-3, dtype=torch.float64)
    path = forecast(field, win, dyn, lr_steps, [10, 20], device=device, chunk_size=2048)
    assert path.weights.device == device and path.weights.shape == (3, 5000)
    assert all(v.device == device for v in path.state.values())
    assert path.finite().all()
