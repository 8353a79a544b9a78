"""Analytic oracles: gradient flow on a quadratic has a closed form.

``L(w) = 1/2 sum_i lam_i (w_i - c_i)^2``. Plain gradient flow ``dw/ds = -lr grad L`` gives
``w(s) = c + exp(-lr lam s) (w(0) - c)``; the real optimizers' trajectories are recorded and the fitted field
must forecast them far better than standing still.
"""

import pytest
import torch

from lightning_gfm.dynamics import dynamics_for, future_learning_rates, lr_by_step, read_state, step_count
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.flow.matching import fit_field
from lightning_gfm.flow.ode import integrate
from lightning_gfm.flow.window import Window
from lightning_gfm.forecast import backtest_error, forecast
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

P = 2000
LAM = torch.logspace(-2, 0, P)


def test_ode_matches_closed_form_gradient_flow():
    torch.manual_seed(0)
    c, w0, lr = torch.randn(P), torch.randn(P), 0.5
    horizons = torch.tensor([10.0, 40.0, 100.0])
    traj = integrate(lambda t, w: -lr * LAM * (w - c), w0, horizons, max_step=0.5, solver="rk4")
    for k, s in enumerate(horizons, start=1):
        exact = c + torch.exp(-lr * LAM * s) * (w0 - c)
        torch.testing.assert_close(traj[k], exact, rtol=1e-4, atol=1e-5)
    assert torch.equal(traj[0], w0)


def test_sgd_dynamics_with_true_gradient_follow_closed_form():
    torch.manual_seed(0)
    c = torch.randn(P)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(P))
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    w0 = spec.flatten()
    lr = torch.full((P,), 0.5)
    traj = integrate(lambda t, w: dyn.velocity(w, {}, LAM * (w - c), lr, t)[0], w0, torch.tensor([50.0]), 1.0, "rk4")
    torch.testing.assert_close(traj[1], c + torch.exp(-0.5 * LAM * 50) * (w0 - c), rtol=1e-4, atol=1e-5)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.003),
}


def _record(name, n_steps=240, every=10, extra=60):
    torch.manual_seed(0)
    target = torch.randn(P)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(P) * 2)
    opt = OPTIMIZERS[name](module.parameters())
    spec = ParamSpec.from_module(module, opt)
    dyn = dynamics_for(opt, spec)
    buf = TrajectoryBuffer(24)
    future = {}
    for s in range(1, n_steps + extra + 1):
        opt.zero_grad()
        (0.5 * (LAM * (module.w - target) ** 2).sum()).backward()
        opt.step()
        if s % every == 0 and s <= n_steps:
            lrs = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
            state = read_state(opt, spec, dyn.state_names)
            buf.append(Snapshot(s, spec.flatten(), state, lrs, step_count(opt, spec)))
        if s > n_steps:
            future[s - n_steps] = spec.flatten()
    return spec, opt, dyn, buf, future


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fitted_field_forecasts_real_optimizer_on_quadratic(name):
    """Bound: relative error <= 0.35 at 50 steps ahead (1.0 = standing still), and no worse than linear."""
    spec, opt, dyn, buf, future = _record(name)
    win = Window.from_buffer(buf, spec, dyn.state_names)
    field = GradientField(FieldConfig(span=12))
    prior = GradientField(FieldConfig(span=12))
    report = fit_field(field, torch.optim.Adam(field.parameters(), 3e-3), win, dyn, steps=300, batch=4096, seed=0)
    assert report.loss_end < report.loss_start
    # the callback's rule: trust the fitted field only where it beats the prior on the recent past
    use = field if backtest_error(field, win, dyn, 4) <= backtest_error(prior, win, dyn, 4) else prior
    h = 50
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), h, 1)
    path = forecast(use, win, dyn, lr_steps, [h])
    w_now, truth = buf[len(buf) - 1].weights, future[h]
    err = float((path.weights[1] - truth).norm() / (truth - w_now).norm())
    linear = w_now + (w_now - buf[len(buf) - 2].weights) * (h / 10)
    err_linear = float((linear - truth).norm() / (truth - w_now).norm())
    assert err < 0.35, (name, err)
    assert err <= err_linear, (name, err, err_linear)


def test_forecast_chunks_are_exact():
    spec, opt, dyn, buf, _ = _record("adam", n_steps=120, extra=0)
    win = Window.from_buffer(buf, spec, dyn.state_names)
    field = GradientField(FieldConfig(span=6))
    fit_field(field, torch.optim.Adam(field.parameters(), 3e-3), win, dyn, steps=20, batch=1024, seed=0)
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), 30, 1)
    whole = forecast(field, win, dyn, lr_steps, [10, 30])
    chunked = forecast(field, win, dyn, lr_steps, [10, 30], chunk_size=333)
    torch.testing.assert_close(whole.weights, chunked.weights)
    for name in whole.state:
        torch.testing.assert_close(whole.state[name], chunked.state[name])
    assert whole.finite().all()


def test_long_horizon_forecast_stays_bounded():
    """Leap+Verify saw extrapolated Adam moments explode; the bounded surrogate keeps them finite."""
    spec, opt, dyn, buf, _ = _record("adam", n_steps=120, extra=0)
    win = Window.from_buffer(buf, spec, dyn.state_names)
    field = GradientField(FieldConfig(span=6))
    with torch.no_grad():
        field.out.bias.fill_(50.0)  # a wildly wrong field
    lr_steps = lr_by_step(future_learning_rates(opt, None, 0), 5000, 1)
    path = forecast(field, win, dyn, lr_steps, [1000, 5000])
    assert path.finite().all()
    v = path.state["exp_avg_sq"][-1]
    assert float(v.max()) < 1e6 * float(win.state["exp_avg_sq"][-1].max() + 1)
