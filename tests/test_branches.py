"""Trend branches, landing at the current weights, and the prior's first attempt and reach (docs/experiments.md,
E29-E38), against exact answers and in real Trainer runs."""

import lightning.pytorch as pl
import pytest
import torch
from models import DigitsModule, tiny_trainer
from test_trend import _window

from lightning_gfm import GFMCallback
from lightning_gfm.dynamics import lr_by_step
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.forecast import ForecastPath, forecast


def _path(start: float, horizons: list[int], slope: float, label_state: float = 0.0) -> ForecastPath:
    h = torch.tensor([0, *horizons], dtype=torch.float32)[:, None]
    weights = start + slope * h * torch.ones(1, 3)
    return ForecastPath([0, *horizons], weights, {"v": label_state + h * torch.ones(1, 3)}, 0.5)


def test_start_at_keeps_each_points_displacement_exactly_in_place():
    path = _path(2.0, [10, 20], slope=0.1)
    move = path.weights - path.weights[0]
    weights, state = path.weights, path.state
    now = torch.tensor([5.0, -1.0, 0.25])
    moved = path.start_at_(now)
    assert moved is path and path.weights is weights and path.state is state  # no model-sized copy
    assert torch.equal(path.weights[0], now)  # bit-exact: x - x == 0, so the start is not "moved"
    torch.testing.assert_close(path.weights - now, move)


def test_join_then_branch_recovers_each_path():
    a, b = _path(0.0, [10, 20, 40], slope=1.0), _path(0.0, [10, 20, 40], slope=-1.0, label_state=7.0)
    joined = ForecastPath.join([a, b], [8, 3])
    assert joined.horizons == [0, 10, 20, 40, 10, 20, 40]
    assert joined.branches == [8, 8, 8, 8, 3, 3, 3]
    assert joined.seconds == 1.0 and joined.weights.shape == (7, 3) and joined.state["v"].shape == (7, 3)
    for k, (want, label) in {2: (a, 8), 5: (b, 3), 0: (a, 8), None: (a, 8)}.items():
        got = joined.branch(k)
        assert got.horizons == want.horizons and got.branches == [label] * 4
        assert torch.equal(got.weights[1:], want.weights[1:])
        assert torch.equal(got.state["v"][1:], want.state["v"][1:])
        assert torch.equal(got.weights[0], a.weights[0])  # the shared start
    assert a.branch(1) is a  # a single forecast is its own branch


def test_join_and_branch_keep_the_steps_each_points_state_is_ahead():
    # the meta field's points take the prior's state at a horizon both forecast, else the anchor's: a jump to one
    # advances the optimizer's step counter by that state's steps, not the point's horizon (E50)
    prior = _path(0.0, [10, 20], slope=1.0)
    meta = ForecastPath([0, 20, 80], prior.weights[[0, 2, 2]], {"v": prior.state["v"][[0, 2, 0]]}, 0.0, [], [0, 20, 0])
    stateless = ForecastPath([0, 40], prior.weights[[0, 2]], {}, 0.0)
    assert [prior.state_ahead(k) for k in range(3)] == [0, 10, 20] and stateless.state_ahead(1) == 0
    joined = ForecastPath.join([prior, meta], [8, -1])
    assert joined.horizons == [0, 10, 20, 20, 80]
    assert [joined.state_ahead(k) for k in range(5)] == [0, 10, 20, 20, 0]
    assert [joined.branch(4).state_ahead(k) for k in range(3)] == [0, 20, 0]
    assert [joined.branch(1).state_ahead(k) for k in range(3)] == [0, 10, 20]


def test_branches_agree_on_a_straight_line_and_part_on_a_bend():
    # SGD, constant lr: the prior continues each trend line. On a straight trajectory every line has the same
    # slope, so the 8- and 3-snapshot paths coincide; after a bend the short line follows the new slope only.
    t = torch.arange(12, dtype=torch.float32)[:, None] * 10
    lr = lr_by_step(torch.tensor([[0.1]]), 40, 1)
    straight, dyn = _window(1.0 + t * torch.tensor([0.05, -0.02]))
    paths = {
        n: forecast(GradientField(FieldConfig(anchor="trend", trend=n)), straight, dyn, lr, [40], solver="euler")
        for n in (8, 3)
    }
    now = straight.w[-1]
    torch.testing.assert_close(paths[8].start_at_(now).weights, paths[3].start_at_(now).weights)
    bend = torch.where(t < 80, 1.0 + 0.05 * t, 1.0 + 0.05 * 80 + 0.2 * (t - 80))  # slope 0.05, then 0.2
    win, dyn = _window(bend)
    move = {
        n: forecast(GradientField(FieldConfig(anchor="trend", trend=n)), win, dyn, lr, [40], solver="euler")
        .start_at_(win.w[-1])
        .weights[1, 0]
        - win.w[-1, 0]
        for n in (8, 3)
    }
    # the 3-point line lies on the new slope: its move is 40 steps at 0.2, a little less (the prior's output is
    # capped smoothly, CAP * tanh(x / CAP), and this slope is large for the window); the 8-point line averages
    # both slopes
    assert 0.9 * 40 * 0.2 < float(move[3]) <= 40 * 0.2
    assert 40 * 0.05 < float(move[8]) < 0.9 * float(move[3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(branch_trends=(8,)), r"\[2, trend - 1\] = \[2, 7\].*got \(8,\)"),
        (dict(branch_trends=(1,)), r"\[2, trend - 1\].*got \(1,\)"),
        (dict(branch_trends=(3, 3)), r"distinct.*got \(3, 3\)"),
        (dict(branch_trends=(2.5,)), r"got \(2.5,\)"),
        (dict(branch_trends=(True,)), r"got \(True,\)"),
        (dict(branch_trends="3"), r"`branch_trends` must be a sequence of ints \(or None\), got '3'"),
        (dict(branch_trends=3), r"`branch_trends` must be a sequence of ints \(or None\), got 3"),
        (dict(branch_trends=(3,), anchor="state"), r"needs `anchor='trend'`, got anchor='state'"),
    ],
)
def test_branch_trends_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GFMCallback(overhead=None, **kwargs)


def test_branch_trends_defaults():
    assert GFMCallback().branch_trends == ()  # off by default: it changed no crossing at the default reach (E39)
    assert GFMCallback(overhead=None, branch_trends=[4, 2]).branch_trends == (4, 2)
    assert GFMCallback(overhead=None, branch_trends=None).branch_trends == ()
    assert GFMCallback(overhead=None, anchor="state").branch_trends == ()


def test_first_attempt_waits_for_backtest_snapshots_only_when_a_backtest_runs():
    # the prior: its trend line (min_anchor 7) + 1 + 2; a fitted field: + the 3 backtest snapshots
    assert GFMCallback().min_snapshots == 7 + 1 + 2
    assert GFMCallback(overhead=None, fit_steps=5).min_snapshots == 7 + 3 + 2
    assert GFMCallback(overhead=None, backtest=0, fit_steps=5).min_snapshots == 7 + 1 + 2


def _fit(tmp_path, cb: GFMCallback, max_steps: int = 80):
    pl.seed_everything(0, verbose=False)
    model = DigitsModule()
    tiny_trainer(tmp_path, max_steps=max_steps, callbacks=[cb]).fit(model)
    return model


def test_prior_and_fitted_field_reach_as_far_as_the_window_lets_them(tmp_path):
    # record every 2 steps, first attempt at step 20 with 10 snapshots (steps 2 .. 20): 10 - 1 - 7 = 2 intervals
    # (4 steps) ahead for the prior as for a fitted field, though the prior fits nothing (E38); later attempts
    # reach further as the window grows: at step 40, 20 snapshots, 20 - 1 - 7 = 12 intervals
    for kwargs in ({}, {"fit_steps": 3, "backtest": 0}):
        cb = GFMCallback(overhead=None, record_every=2, jump_every=20, eval_batches=2, branch_trends=(), **kwargs)
        _fit(tmp_path / str(len(kwargs)), cb)
        assert [(j.step, max(h for h, _ in j.candidates)) for j in cb.jumps[:2]] == [(20, 4), (40, 24)]


def test_every_branch_is_evaluated_and_the_choice_is_recorded(tmp_path):
    cb = GFMCallback(
        overhead=None, record_every=2, jump_every=20, eval_batches=1, n_candidates=3, branch_trends=(3,)
    )  # one batch: no screen, every point in full
    seen = []
    original = cb._log

    def spy(trainer, record, path, win):
        seen.append((record, path))
        original(trainer, record, path, win)

    cb._log = spy
    _fit(tmp_path, cb)
    assert [j.step for j in cb.jumps] == [20, 40, 60]
    for record, path in seen:
        far = {20: 4, 40: 24, 60: 20}[record.step]  # the window's reach (10, 20, 24 snapshots), never past the end
        want = sorted({round(far / 4), round(far / 2), far})
        horizons = [h for h, _ in record.candidates]
        assert horizons == want * 2  # the 8-snapshot path's candidates, then the 3-snapshot branch's
        assert path.branches == [record.trend or 8] * 4 and path.horizons == [0, *want]  # the chosen branch
        if record.accepted:
            assert record.trend in (8, 3) and record.horizon in path.horizons
            metrics = [m for _, m in record.candidates]
            assert record.metric_after == pytest.approx(min(metrics))
        else:
            assert record.trend == 0
    assert any(r.accepted for r, _ in seen), "no jump accepted: the test checks nothing about the choice"


def test_no_branch_evaluates_one_path_from_the_current_weights(tmp_path):
    cb = GFMCallback(
        overhead=None, record_every=2, jump_every=20, eval_batches=1, n_candidates=3, branch_trends=()
    )  # one batch: no screen, every point in full
    _fit(tmp_path, cb)
    assert [j.step for j in cb.jumps] == [20, 40, 60]
    for j, want in zip(cb.jumps, ([1, 2, 4], [6, 12, 24], [5, 10, 20]), strict=True):
        # the path starts at the current weights, so its start is not evaluated (no denoised point, no 0 horizon)
        assert [h for h, _ in j.candidates] == want
        assert j.trend == 0
