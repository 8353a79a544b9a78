"""The meta-trained field: analytic forecasts, schedule-awareness, learning, saving, and the callback's use of it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gfm import GFMCallback
from lightning_gfm.dynamics import dynamics_for
from lightning_gfm.fields import field_info, load_field, save_field
from lightning_gfm.flow.meta import (
    MetaConfig,
    MetaField,
    MetaRun,
    MetaTrainConfig,
    basis_integrals,
    family_of,
    meta_forecast,
    meta_train,
)
from lightning_gfm.flow.window import Window
from lightning_gfm.params import ParamSpec
from tests.models import DigitsModule, tiny_trainer


def _window(w: torch.Tensor, steps: torch.Tensor, lrs: torch.Tensor, tensor_index: torch.Tensor) -> Window:
    """A window over given weights ``(K, P)``: one tensor per distinct ``tensor_index`` value."""
    n = int(tensor_index.max()) + 1
    sq = torch.zeros(w.shape[0], n).index_add_(1, tensor_index, w * w)
    cnt = torch.zeros(n).index_add_(0, tensor_index, torch.ones(w.shape[1]))
    k = w.shape[0]
    return Window(
        steps=steps.double(),
        w=w,
        state={},
        lrs=lrs.double(),
        opt_steps=steps.double(),
        u=None,
        u_rms=torch.ones(w.shape[1]),
        u_rms_tensor=torch.ones(w.shape[1]),
        w_rms_tensor=(sq / cnt + 1e-12).sqrt(),
        roles=torch.zeros(w.shape[1], dtype=torch.long),
        tensor_index=tensor_index,
        group_index=torch.zeros(w.shape[1], dtype=torch.long),
        interval=float(steps[1] - steps[0]),
        progress=torch.zeros(k),
    )


def _constant_field() -> MetaField:
    """A field whose coefficients and basis are both ``e_0``: it forecasts ``dw/dt = lr(t) / lr(0) * r``."""
    field = MetaField(MetaConfig(history=3, hidden=4, basis=2, time_hidden=4))
    with torch.no_grad():
        for p in field.parameters():
            p.zero_()
        field.out.bias[0] = 1.0
        field.time[2].bias[0] = 1.0
    return field


def _linear_run(seed: int, k: int = 12, p: int = 64, every: int = 10):
    """Weights moving at a constant per-scalar velocity ``c``: ``w_k = w_0 + c * s_k``."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.arange(1, k + 1, dtype=torch.float32) * every
    c = torch.randn(p, generator=gen) * 1e-3
    w = torch.randn(p, generator=gen) + steps.unsqueeze(1) * c
    tindex = torch.arange(p) % 2
    return w, steps, c, tindex


def _r(c: torch.Tensor, tindex: torch.Tensor) -> torch.Tensor:
    """The field's unit for constant velocities: ``|c|`` plus a tenth of its tensor's RMS."""
    n = int(tindex.max()) + 1
    sq = torch.zeros(n).index_add_(0, tindex, c * c) / torch.zeros(n).index_add_(0, tindex, torch.ones_like(c))
    return c.abs() + 0.1 * sq.sqrt()[tindex]


def test_constant_field_forecast_is_the_analytic_line():
    w, steps, c, tindex = _linear_run(0)
    win = _window(w, steps, torch.full((len(steps), 1), 1e-3), tindex)
    horizons = [5, 20, 47]
    lr = torch.full((60, 1), 1e-3, dtype=torch.float64)
    out, _ = meta_forecast(_constant_field(), win, "adam", lr, horizons, 200, torch.zeros(w.shape[1]))
    r = _r(c, tindex)
    expected = torch.stack([w[-1] + r * h for h in [0, *horizons]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_the_forecast_follows_the_learning_rate_schedule_exactly():
    """The rate halves from the 14th step on: the move to step 40 is ``r * (13 + 27 / 2)``; the velocities seen
    at a rate twice the anchor's count as half as fast (they are rescaled to the anchor's rate)."""
    w, steps, c, tindex = _linear_run(1)
    lrs = torch.full((len(steps), 1), 2e-3)
    lrs[-1] = 1e-3  # the anchor's rate is half the rate the history was recorded at
    win = _window(w, steps, lrs, tindex)
    lr = torch.full((41, 1), 1e-3, dtype=torch.float64)
    lr[13:] = 5e-4
    out, _ = meta_forecast(_constant_field(), win, "sgd", lr, [40], 500, torch.zeros(w.shape[1]))
    r = _r(c / 2, tindex)
    torch.testing.assert_close(out[1], w[-1] + r * (13 + 27 / 2), rtol=0, atol=1e-6)
    # saved on either side of the change (a horizon exactly on it is off by a twelfth of a step's rate change)
    z = basis_integrals(_constant_field(), lr, [12, 14, 40], float(steps[-1]), 500, 10.0)
    assert z[:, 0, 0].tolist() == pytest.approx([0.0, 12.0, 13.5, 26.5], abs=1e-5)


def test_meta_training_learns_to_extrapolate_unseen_runs():
    def run(seed):
        w, steps, c, tindex = _linear_run(seed, k=20)
        return MetaRun(_window(w, steps, torch.full((20, 1), 1e-3), tindex), "adam", 200.0, torch.zeros(64))

    field, report = meta_train(
        [run(s) for s in range(6)],
        MetaConfig(history=3),
        MetaTrainConfig(steps=300, anchors_per_step=4, scalars=64, lr=3e-3),
    )
    assert report["loss_last"] < 0.5 * report["loss_first"]
    w, steps, c, tindex = _linear_run(99, k=10)  # a run never trained on; the truth 100 steps on
    win = _window(w, steps, torch.full((10, 1), 1e-3), tindex)
    out, _ = meta_forecast(
        field, win, "adam", torch.full((101, 1), 1e-3, dtype=torch.float64), [100], 200, torch.zeros(64)
    )
    truth, move = w[-1] + 100 * c, 100 * c
    assert float((out[1] - truth).norm() / move.norm()) < 0.2  # standing still is 1.0


def test_save_and_load_keep_the_kind_and_the_forecast(tmp_path):
    torch.manual_seed(0)
    field = MetaField(MetaConfig(history=3))
    path = save_field(field, tmp_path / "meta.safetensors", trained_on="test")
    assert field_info(path)["kind"] == "meta"
    loaded = load_field(path)
    assert isinstance(loaded, MetaField) and loaded.config == field.config
    w, steps, _, tindex = _linear_run(2)
    win = _window(w, steps, torch.full((len(steps), 1), 1e-3), tindex)
    lr = torch.full((30, 1), 1e-3, dtype=torch.float64)
    a, _ = meta_forecast(field, win, "rmsprop", lr, [10, 25], 300, torch.zeros(64))
    b, _ = meta_forecast(loaded, win, "rmsprop", lr, [10, 25], 300, torch.zeros(64))
    assert torch.equal(a, b)


def test_a_file_of_an_unknown_kind_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file(
        {"x": torch.zeros(1)},
        str(path),
        metadata={"format": "lightning-gfm-field", "version": "1", "kind": "spline", "config": "{}"},
    )
    with pytest.raises(ValueError, match="kind 'spline'"):
        load_field(path)


@pytest.mark.parametrize(
    ("make", "family"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum"),
        (lambda p: torch.optim.AdamW(p, lr=1e-3), "adam"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), "rmsprop"),
        (lambda p: torch.optim.Adagrad(p, lr=1e-2), None),
    ],
)
def test_optimizer_families(make, family):
    net = nn.Linear(3, 2)
    opt = make(net.parameters())
    assert family_of(dynamics_for(opt, ParamSpec.from_module(net, opt))) == family


def test_the_callback_joins_the_meta_forecast_to_the_priors(tmp_path):
    torch.manual_seed(0)
    path = save_field(MetaField(MetaConfig()), tmp_path / "meta.safetensors")
    cb = GFMCallback(field=path, record_every=5, jump_every=60, eval_batches=1, overhead=None)
    assert cb.meta_path == str(path) and cb.field_path is None and not cb.learns
    trainer = tiny_trainer(tmp_path, [cb], max_steps=180)
    trainer.fit(DigitsModule())
    assert isinstance(cb.meta, MetaField) and cb.jumps
    for j in cb.jumps:  # every point of both paths was evaluated (no screen with one batch)
        horizons = [h for h, _ in j.candidates]
        # one attempt's 4 points, shared: the prior's 2 farthest, the meta field's end of the run and its half
        assert len(horizons) == cb.n_candidates, (j.step, horizons)
        far = 180 - j.step
        if far > max(horizons[:2]):  # the end lies beyond the prior's reach
            assert horizons[2:] == [round(far / 2), far] and max(horizons[:2]) < far, (j.step, horizons)
        assert j.source in (("meta", "prior") if j.accepted else ("",))
    # at least one attempt reached past the prior's reach
    assert any(max(h for h, _ in j.candidates[:2]) < 180 - j.step for j in cb.jumps)


def test_a_given_horizon_is_the_meta_fields_reach_too(tmp_path):
    torch.manual_seed(0)
    path = save_field(MetaField(MetaConfig()), tmp_path / "meta.safetensors")
    cb = GFMCallback(field=path, record_every=5, jump_every=60, eval_batches=1, overhead=None, horizon=20)
    trainer = tiny_trainer(tmp_path, [cb], max_steps=180)
    trainer.fit(DigitsModule())
    assert cb.jumps
    for j in cb.jumps:  # both paths at the same horizons: each once per path
        horizons = [h for h, _ in j.candidates]
        assert horizons and all(horizons.count(h) == 2 for h in horizons) and max(horizons) == 20


def test_a_family_the_field_never_trained_on_gets_no_code():
    def run(seed, family):
        w, steps, c, tindex = _linear_run(seed, k=12)
        return MetaRun(_window(w, steps, torch.full((12, 1), 1e-3), tindex), family, 200.0, torch.zeros(64))

    field, _ = meta_train(
        [run(0, "adam"), run(1, "sgd")], MetaConfig(history=3), MetaTrainConfig(steps=5, anchors_per_step=2)
    )
    assert field.config.families == ("sgd", "adam")
    w, steps, _, tindex = _linear_run(5)
    win = _window(w, steps, torch.full((len(steps), 1), 1e-3), tindex)
    lr = torch.full((30, 1), 1e-3, dtype=torch.float64)
    unseen, _ = meta_forecast(field, win, "rmsprop", lr, [10, 25], 300, torch.zeros(64))
    none, _ = meta_forecast(field, win, None, lr, [10, 25], 300, torch.zeros(64))
    seen, _ = meta_forecast(field, win, "adam", lr, [10, 25], 300, torch.zeros(64))
    assert torch.equal(unseen, none) and not torch.equal(seen, none)


def test_a_moving_schedule_integrated_in_learning_rate_time_is_the_quadrature_of_the_steps():
    """One moving schedule is integrated over learning-rate time (a grid that ignores most optimizer steps). The
    oracle: each step's rate times a fine Simpson quadrature of the basis over that step, summed."""
    from lightning_gfm.flow.meta import time_features

    torch.manual_seed(0)
    field = MetaField(MetaConfig())
    steps = torch.arange(601, dtype=torch.float64)
    warmup_cosine = 1e-3 * torch.clamp((steps + 1) / 150, max=1.0) * 0.5 * (1 + torch.cos(math.pi * steps / 600))
    halved = 1e-3 * 0.5 ** (steps // 100)
    held = torch.full_like(steps, 1e-3)
    horizons = [25, 100, 333, 600]
    t = torch.linspace(0, 600, 600 * 8 + 1, dtype=torch.float64)  # 8 Simpson panels per step
    with torch.no_grad():
        phi = field.phi(time_features(t.float(), 50.0, 700.0, 10.0)).double()
    w = torch.ones(9, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    per_step = torch.stack([(w[:, None] * phi[8 * j : 8 * j + 9]).sum(0) / 24 for j in range(600)])  # (600, K)
    for lr in (warmup_cosine, halved, held):
        ratio = lr / lr[0]
        exact = torch.stack(
            [torch.zeros(field.config.basis, dtype=torch.float64)]
            + [(ratio[:h, None] * per_step[:h]).sum(0) for h in horizons]
        )
        z = basis_integrals(field, lr.unsqueeze(1), horizons, 50.0, 700.0, 10.0)[:, 0]
        err = (z.double() - exact)[1:].norm(dim=1) / exact[1:].norm(dim=1)
        assert float(err.max()) < 2e-5, err  # the step-by-step grid: up to 4e-4 (its horizons weigh a mean rate)
    # a rate that vanishes before a horizon: learning-rate time stops; the step-by-step integration takes over
    stopped = torch.cat([torch.full((50, 1), 1e-3), torch.zeros(551, 1)]).double()
    z = basis_integrals(field, stopped, [25, 100, 200], 50.0, 700.0, 10.0)
    torch.testing.assert_close(z[2], z[3])  # nothing moves after the rate is 0
