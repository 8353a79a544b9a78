"""The denoised anchor (``anchor="trend"``), the automatic schedule and the candidate set, against exact answers."""

import pytest
import torch
from models import DigitsModule, tiny_trainer

from lightning_gfm import GFMCallback, auto_schedule
from lightning_gfm.dynamics import dynamics_for, lr_by_step, read_state
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.window import Window, _trend, anchor_context
from lightning_gfm.forecast import forecast
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer


def _window(weights: torch.Tensor, every: int = 10, lr: float = 0.1) -> tuple[Window, object]:
    """A window of SGD snapshots with the given weights (shape ``(K, P)``), recorded every ``every`` steps."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(weights[0].clone())
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    buf = TrajectoryBuffer(len(weights))
    for k, w in enumerate(weights):
        step = k * every
        state = read_state(opt, spec, dyn.state_names)
        buf.append(Snapshot(step, w.clone(), state, torch.tensor([lr], dtype=torch.float64), step))
    return Window.from_buffer(buf, spec, dyn.state_names), dyn


def test_trend_of_a_straight_line_is_exact():
    t = torch.arange(12, dtype=torch.float32)[:, None] * 10
    slope = torch.tensor([0.5, -2.0, 0.0, 1e-3])
    win, _ = _window(3.0 + t * slope)
    w, s = _trend(win, torch.tensor(11), torch.arange(4), 8)
    torch.testing.assert_close(s, slope, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w, win.w[11], rtol=1e-5, atol=1e-5)


def test_trend_removes_oscillation_and_does_not_extrapolate_a_random_walk():
    torch.manual_seed(0)
    k = torch.arange(12, dtype=torch.float32)[:, None]
    zigzag = 1.0 + 0.3 * (-1.0) ** k * torch.ones(1, 3)  # oscillates around 1 with no drift
    walk = torch.randn(12, 2000).cumsum(0)  # pure random walk: any fitted slope is noise
    win, _ = _window(torch.cat([zigzag, walk], dim=1))
    w, s = _trend(win, torch.tensor(11), torch.arange(2003), 8)
    assert (w[:3] - 1.0).abs().max() < 0.05  # the zigzag's centre, not its last swing (1.3 or 0.7)
    naive = (win.w[11, 3:] - win.w[4, 3:]) / 70  # the unshrunk two-point slope of the walk
    assert s[3:].abs().mean() < 0.6 * naive.abs().mean()


def test_trend_anchor_prior_forecast_is_linear_extrapolation_for_sgd():
    # SGD with a constant learning rate: the prior holds the gradient that produced the trend's velocity, so
    # the forecast is the trend line continued. The field's output is bounded by CAP * tanh(x / CAP), which
    # shrinks a gradient of one gradient-scale unit (every scalar of a straight line) by 4 tanh(1/4) = 0.98.
    t = torch.arange(12, dtype=torch.float32)[:, None] * 10
    slope = torch.tensor([0.05, -0.02, 0.01])
    win, dyn = _window(1.0 + t * slope)
    field = GradientField(FieldConfig(anchor="trend", trend=8))
    path = forecast(field, win, dyn, lr_by_step(torch.tensor([[0.1]]), 40, 1), [10, 40], solver="euler")
    torch.testing.assert_close(path.weights[0], win.w[-1], rtol=1e-5, atol=1e-5)  # a straight line: no noise
    for k, h in enumerate(path.horizons[1:], start=1):
        ratio = (path.weights[k] - win.w[-1]) / (h * slope)
        assert float(ratio.min()) > 0.97 and float(ratio.max()) <= 1.0 + 1e-5
        torch.testing.assert_close(ratio, ratio.mean().expand(3), rtol=1e-4, atol=1e-6)  # the same for all


def test_trend_anchor_needs_a_full_line():
    win, dyn = _window(torch.randn(12, 4))
    with pytest.raises(ValueError, match="An anchor needs 7 earlier snapshots; got anchor 5"):
        anchor_context(win, dyn, 5, torch.arange(4), 3, anchor_mode="trend", trend=8)
    assert FieldConfig(anchor="trend", trend=8).min_anchor == 7 and FieldConfig(anchor="state").min_anchor == 3


@pytest.mark.parametrize(("total", "expected"), [(2000, (33, 333)), (600, (10, 100)), (30, (1, 6)), (None, (20, 200))])
def test_auto_schedule(total, expected):
    assert auto_schedule(total) == expected


def test_auto_schedule_resolves_at_fit_start(tmp_path):
    torch.manual_seed(0)
    cb = GFMCallback(overhead=None, fit_steps=0, eval_batches=1)
    assert (cb.record_every, cb.jump_every) == (20, 200)  # before fit: the schedule for an unknown length
    tiny_trainer(tmp_path, [cb], max_steps=120).fit(DigitsModule())
    assert (cb.record_every, cb.jump_every) == (2, 20)
    assert cb.buffer.steps[-1] == 120 and all(s % 2 == 0 for s in cb.buffer.steps)
    assert cb.jumps and all(j.step % 20 == 0 for j in cb.jumps)


def test_geometric_candidates(tmp_path):
    cb = GFMCallback(overhead=None, record_every=2, jump_every=20, horizon=80, n_candidates=4)
    win = type("W", (), {"K": 24, "interval": 2.0})()
    trainer = type("T", (), {"max_steps": 1000})()
    assert cb._horizons(trainer, 100, win) == [10, 20, 40, 80]
    even = GFMCallback(overhead=None, record_every=2, jump_every=20, horizon=80, n_candidates=4, spacing="even")
    assert even._horizons(trainer, 100, win) == [20, 40, 60, 80]
    assert cb._horizons(trainer, 970, win) == [4, 8, 15, 30]  # never past the planned end


def test_auto_schedule_from_max_epochs(tmp_path):
    torch.manual_seed(0)
    cb = GFMCallback(overhead=None, eval_batches=1)
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=2)  # no max_steps: the length comes from the epochs
    trainer.fit(DigitsModule())
    assert trainer.global_step == int(trainer.estimated_stepping_batches) == 36  # 18 batches an epoch
    assert (cb.record_every, cb.jump_every) == auto_schedule(36) == (1, 6)
    assert cb.jumps and all(j.step % 6 == 0 for j in cb.jumps)
